"""Who takes part in a round: seeded sampling of the connected nodes, or of a client pool's
population, after a bounded wait for enough nodes; and the Poisson sampling DP accounts for.
"""

import time
from logging import INFO

import numpy as np
from flwr.common.logger import log
from flwr.serverapp.grid import Grid

# Separate random streams so that changing evaluation sampling never changes training sampling.
TRAIN_STREAM = 0
EVALUATE_STREAM = 1


class NotEnoughClientsError(RuntimeError):
    """Fewer nodes connected than the strategy needs, after waiting `node_wait_timeout`."""


class NodeSampler:
    """Seeded sampling from the connected nodes or, after `use_client_pool`, from a population
    of clients served by the connected nodes (a pool)."""

    def __init__(self, seed: int, node_wait_timeout: float, min_available_nodes: int) -> None:
        self.seed = int(seed)
        self.node_wait_timeout = float(node_wait_timeout)
        self.min_available_nodes = int(min_available_nodes)
        # With a client pool: the population size, and the nodes serving it.
        self.population: int | None = None
        self.pool: tuple[int, ...] = ()

    def wait_for_nodes(self, grid: Grid, required: int) -> list[int]:
        """Return the sorted connected node ids once at least `required` are connected.

        Polls every 0.5 s for up to `node_wait_timeout` seconds, then raises
        `NotEnoughClientsError`: a run that can never start should say so, not hang.
        """
        deadline = time.monotonic() + self.node_wait_timeout
        logged = False
        while True:
            node_ids = sorted(grid.get_node_ids())
            if len(node_ids) >= required:
                return node_ids
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotEnoughClientsError(
                    f"Only {len(node_ids)} node(s) connected after waiting "
                    f"{self.node_wait_timeout:g} s, but this strategy requires {required} "
                    f"(min_available_nodes={self.min_available_nodes}, or the round's "
                    "min_train_nodes). Start more SuperNodes, raise num-supernodes in the "
                    "federation config (simulation), or lower min_clients in the strategy config."
                )
            if not logged:
                log(INFO, "Waiting for nodes: %d connected, %d required (up to %.0f s).",
                    len(node_ids), required, self.node_wait_timeout)
                logged = True
            time.sleep(min(0.5, remaining))

    def use_client_pool(self, population: int) -> None:
        """Sample from `population` clients instead of from the connected nodes; the nodes are
        a pool that each serve, per message, the client the server names (CLIENT_ID)."""
        if isinstance(population, bool) or int(population) != population or population < 1:
            raise ValueError(f"population must be a positive integer, got {population!r}.")
        self.population = int(population)

    def candidates(self, grid: Grid, required: int) -> list[int]:
        """Who can be sampled: the connected node ids (at least `required`, waited for), or
        with a client pool the client ids 0..population-1 (the pool's nodes are waited for)."""
        node_ids = self.wait_for_nodes(grid, required if self.population is None
                                       else self.min_available_nodes)
        if self.population is None:
            return node_ids
        if self.population < required:
            raise NotEnoughClientsError(
                f"The population has {self.population} clients, but this strategy requires "
                f"{required} (min_train_nodes / min_evaluate_nodes / min_available_nodes): "
                "raise num_clients or lower min_clients.")
        self.pool = tuple(node_ids)
        return list(range(self.population))

    def targets(self, chosen: list[int]) -> list[tuple[int, int | None]]:
        """(node id, client id) per chosen candidate: the node itself, or with a client pool
        the clients dealt round-robin onto the pool's nodes (a node serves its share in turn)."""
        if self.population is None:
            return [(node_id, None) for node_id in chosen]
        if chosen and not self.pool:
            raise RuntimeError("No pool nodes known yet: call candidates() first.")
        return [(self.pool[i % len(self.pool)], client_id)
                for i, client_id in enumerate(chosen)]

    def sample(self, grid: Grid, server_round: int, fraction: float, min_nodes: int,
               stream: int = TRAIN_STREAM) -> list[int]:
        """Sample max(int(n * fraction), min_nodes) of the n candidates, capped at n: the
        connected nodes, or with a client pool the population's clients.

        Deterministic for a given (seed, round, stream): node ids are sorted first, so the
        order in which the grid lists them does not matter.
        """
        candidates = self.candidates(grid, max(self.min_available_nodes, min_nodes))
        return self.draw(candidates, server_round, fraction, min_nodes, stream)

    def draw(self, candidates: list[int], server_round: int, fraction: float, min_nodes: int,
             stream: int = TRAIN_STREAM) -> list[int]:
        """`sample`'s draw from `candidates` (sorted): a function of (seed, round, stream,
        candidates) alone, so the next round's sample can be known ahead (`connected_now`)."""
        size = min(max(int(len(candidates) * fraction), min_nodes), len(candidates))
        entropy = [self.seed, server_round]
        if stream != TRAIN_STREAM:
            entropy.append(stream)
        rng = np.random.default_rng(entropy)
        chosen = rng.choice(len(candidates), size=size, replace=False)
        return sorted(candidates[i] for i in chosen)

    def connected_now(self, grid: Grid, required: int) -> list[int] | None:
        """The sorted connected node ids if at least `required` are connected now, else None:
        `candidates` without waiting, for knowing a later round's sample ahead. None with a
        client pool too (several of its clients share a node)."""
        if self.population is not None:
            return None
        node_ids = sorted(grid.get_node_ids())
        return node_ids if len(node_ids) >= required else None


def poisson_sample(candidates: list[int], rate: float, seed: int, server_round: int) -> list[int]:
    """Each candidate in with probability `rate`, independently (Poisson sampling, as DP's
    accountant assumes): the cohort size varies from round to round and may be zero. Seeded by
    (seed, round), the stream of node sampling's training draws."""
    rng = np.random.default_rng([seed, server_round])
    return [n for n, u in zip(candidates, rng.random(len(candidates)), strict=True) if u < rate]
