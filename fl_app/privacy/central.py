"""Central, user-level differential privacy (DP-FedAvg, McMahan et al. 2018) around any strategy.

Each round: every connected client is sampled independently with probability q (Poisson
sampling); each usable reply's update (the delta for FedAvg, the gradient for FedSGD: whatever
the inner strategy says the update is) is clipped to L2 norm <= C over all arrays together; the
clipped updates are summed, Gaussian noise N(0, sigma^2 C^2) is added to every coordinate of the
sum, and the sum is divided by the *expected* number of clients m = q * num_clients. Adding or
removing one client changes the sum by at most C, and the fixed denominator means the number of
replies itself reveals nothing, so every round is exactly the sampled Gaussian mechanism that
`accounting.epsilons` accounts for (RDP and PLD; the tighter is reported as `epsilon`).

With `clipping="adaptive"` C is not fixed: it follows a target quantile of the update norms
(Andrew et al. 2019, `adaptive_clipping.py`) from a noised count of unclipped clients that is
released every round too. `noise_multiplier` is then the multiplier of the two releases together,
the one the accountant is given; the update's own noise is raised to
(sigma^-2 - (2 sigma_b)^-2)^-1/2 so that the pair costs exactly that.

With secure aggregation and `secagg.noise=distributed` (`add_noise_on_clients`) the clients add
the noise instead, each its share of Skellam noise before masking (fl_app.privacy.distributed):
this class then draws none, and epsilon follows the clients that survived each round.

The server is trusted (central DP): it sees individual updates; what is protected is everything
released from it (the global models). The aggregated client metrics it logs (train loss, ...)
are not noised and are not covered by the guarantee.
"""

from collections.abc import Iterable, Mapping
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.grid import Grid
from flwr.serverapp.strategy import Strategy

from fl_app.messages import DELTA
from fl_app.privacy import settings
from fl_app.privacy.accounting import (
    Epsilon,
    check_budget,
    epsilons,
    update_noise_multiplier,
)
from fl_app.privacy.adaptive_clipping import QuantileClipNorm
from fl_app.privacy.clipping import add_clipped_updates
from fl_app.privacy.distributed import ClientNoise, DistributedAccount
from fl_app.privacy.noise import GaussianNoise
from fl_app.strategies.aggregation import MetricAverager, axpy
from fl_app.strategies.base import SampledStrategy
from fl_app.strategies.sampling import poisson_sample


class DPNoise(Strategy):
    """User-level central DP with fixed or adaptive clipping and Poisson sampling.

    Its features (fl_app.strategies.features): clients reply as its inner strategy asks
    (`mode` below is that of a FedAvg inner one, in deltas); the noised mean of the clipped
    updates is all it uses, so secure aggregation can serve it (with fixed clipping); it
    samples clients itself.

    Parameters
    ----------
    strategy : the inner strategy (WeightedFedAvg or GradientAveraging). Its `fraction_train`
        is the sampling probability q; its `seed` seeds the sampling.
    clip_norm : C, the L2 bound on each client's whole update (the initial C when adaptive).
    noise_multiplier : sigma, what the accountant is given; the noise std on the sum is
        sigma * C (fixed clipping) or sigma_u * C with the larger sigma_u (adaptive).
    num_clients : the population size N the sampling draws from (the number of SuperNodes,
        or with a client pool the number of clients).
    delta : the DP delta; default 1 / (10 N). Must be below 1 / N.
    max_epsilon : optional budget; `configure_train` raises `PrivacyBudgetExhausted` before a
        round that would exceed it.
    noise_seed : seed of the noise RNG. Leave it None (OS entropy) for real privacy: a known
        seed lets anyone regenerate and subtract the noise. Set it only for tests. Neither it
        nor the generator is in a checkpoint (noise.py).
    clipping : "fixed" (C stays clip_norm) or "adaptive" (Andrew et al. 2019).
    target_quantile, clip_lr : adaptive only: gamma, the fraction of updates to leave
        unclipped, and eta, the step of the geometric update C <- C exp(-eta (b~ - gamma)).
    clipped_count_stddev : adaptive only: sigma_b, the noise std on the count of unclipped
        clients; default max(m / 20, sigma) with m = q * num_clients (Andrew et al.: m / 20).
    """

    mode = DELTA
    needs_each_update = None
    client_pool = True
    central_dp = True
    plans_cohort = True

    def __init__(
        self,
        strategy: SampledStrategy,
        clip_norm: float,
        noise_multiplier: float,
        num_clients: int,
        delta: float | None = None,
        max_epsilon: float | None = None,
        noise_seed: int | None = None,
        clipping: str = "fixed",
        target_quantile: float = 0.5,
        clip_lr: float = 0.2,
        clipped_count_stddev: float | None = None,
    ) -> None:
        num_clients, delta = settings.checked_central(
            strategy, clip_norm, noise_multiplier, num_clients, delta, max_epsilon, SampledStrategy)
        settings.require("clipping", clipping, settings.clipping(clipping))
        # Clients form their own update (a FedAvg client its delta), so the server only clips
        # and sums: a round's critical path reads each reply twice instead of three times.
        strategy.reply_with_updates()
        self.inner = strategy
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = float(noise_multiplier)
        self.num_clients = num_clients
        self.delta = delta
        self.max_epsilon = None if max_epsilon is None else float(max_epsilon)
        self.sample_rate = float(strategy.fraction_train)
        self.rounds_done = 0
        self.epsilon = 0.0  # the tighter of the two accountants' (self.epsilons)
        self.epsilons = Epsilon(0.0, 0.0)
        # (round, C, global model's id, step a, buffer) of the next release, drawn while the
        # clients train (presample_noise).
        self._next_start: tuple[int, float, int, float | None, dict[str, np.ndarray]] | None = None
        self.noise = GaussianNoise(noise_seed)  # never checkpointed (noise.py)
        # secagg.noise=distributed: the clients add the noise, and this account of who survived
        # each round gives epsilon (add_noise_on_clients); None: the server adds it.
        self.client_noise: DistributedAccount | None = None
        self.clipping = clipping
        self.adaptive_clip: QuantileClipNorm | None = None
        # The multiplier of the update's noise: sigma itself, unless the count shares the budget.
        self.update_noise_multiplier = self.noise_multiplier
        if clipping == "adaptive":
            if clipped_count_stddev is None:
                clipped_count_stddev = max(self.expected_clients / 20, self.noise_multiplier)
            self.adaptive_clip = QuantileClipNorm(
                self.clip_norm, target_quantile, clip_lr, clipped_count_stddev,
                self.expected_clients, self.noise)
            self.update_noise_multiplier = update_noise_multiplier(
                self.noise_multiplier, clipped_count_stddev)

    def use_client_pool(self, population: int) -> None:
        """Sample from `population` clients served by a pool of nodes (see SampledStrategy)."""
        self.inner.use_client_pool(population)

    def add_noise_on_clients(self, dims: int, modulus: int) -> None:
        """secagg.noise=distributed: the clients add the noise to what they mask
        (fl_app.privacy.distributed), so this strategy never draws any; each round is
        accounted for the clients that survived it (fewer survivors: less noise, more epsilon).
        `dims`: the model's parameter count; `modulus`: secure aggregation's."""
        if self.adaptive_clip is not None:
            raise ValueError("distributed DP needs clipping=fixed: adaptive clipping needs "
                             "each update's norm on the server.")
        self.client_noise = DistributedAccount(
            self.clip_norm, self.noise_multiplier, dims, self.sample_rate, self.delta, modulus,
            max(round(self.expected_clients), 2))
        self._account()

    def know_client_sizes(self, per_node: Mapping[int, int], largest: int | None) -> None:
        """Bound the replies' num-examples (see SampledStrategy); here they weigh only the
        clients' metrics: every clipped update counts once."""
        self.inner.know_client_sizes(per_node, largest)

    @property
    def expected_clients(self) -> float:
        """m = q * num_clients: the fixed denominator of the noisy mean."""
        return self.sample_rate * self.num_clients

    @property
    def current(self) -> dict[str, np.ndarray] | None:
        """The inner strategy's current global model."""
        return self.inner.current

    @property
    def last_dropped(self) -> list[str]:
        """Reasons for the replies dropped in the last aggregated round."""
        return self.inner.last_dropped

    def _epsilons_after(self, rounds: int) -> Epsilon:
        if self.client_noise is not None:  # Skellam: dp_accounting has no PLD of it
            return Epsilon.rdp_only(self.client_noise.epsilon(), "distributed Skellam noise")
        return epsilons(self.noise_multiplier, self.sample_rate, rounds, self.delta)

    def _epsilon_after(self, rounds: int) -> float:
        return self._epsilons_after(rounds).value

    def _account(self) -> None:
        """Epsilon after the rounds done, from the RDP and the PLD accountants."""
        self.epsilons = self._epsilons_after(self.rounds_done)
        self.epsilon = self.epsilons.value

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Check the budget, then Poisson-sample clients and send them the global model."""
        if self.max_epsilon is not None and self.client_noise is not None:
            self.client_noise.check_budget(self.max_epsilon, self.num_clients)
        elif self.max_epsilon is not None:
            check_budget(self.noise_multiplier, self.sample_rate, self.delta, self.max_epsilon,
                         self.rounds_done, self.num_clients)
        # The connected nodes, or with a client pool the population's client ids.
        candidates = self.inner.candidates(grid, self.inner.min_available_nodes)
        if len(candidates) != self.num_clients:
            log(WARNING, "DP: %d clients can be sampled but num_clients = %d; the privacy "
                "accounting and the noise scale assume %d.", len(candidates), self.num_clients,
                self.num_clients)
        chosen = self._draw(candidates, server_round)
        log(INFO, "configure_train (DP): Poisson-sampled %d of %d clients (q = %g)",
            len(chosen), len(candidates), self.sample_rate)
        messages = self.inner.build_train_messages(server_round, arrays, config, chosen)
        if self.client_noise is None:  # distributed DP: the server draws no noise at all
            self.presample_noise(server_round)  # while the clients train (below)
        return messages

    def _draw(self, candidates: list[int], server_round: int) -> list[int]:
        return poisson_sample(candidates, self.sample_rate, self.inner.seed, server_round)

    def next_cohort(self, grid: Grid, server_round: int) -> list[int] | None:
        """The node ids configure_train will Poisson-sample for round `server_round` (its draw,
        from the nodes connected now), without sending, waiting, or touching the budget or
        the noise; None when too few nodes are connected or a client pool serves them."""
        candidates = self.inner.sampler.connected_now(grid, self.inner.min_available_nodes)
        if candidates is None:
            return None
        return self._draw(candidates, server_round)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Clip each update, sum, add N(0, sigma^2 C^2) noise, divide by q*N, apply.

        The noisy update is released even when no client replied: the round still counts
        in the accounting, and skipping it would reveal that nobody took part. With adaptive
        clipping the noised fraction of unclipped updates then moves C for the next round.
        """
        if self.inner.current is None:
            raise RuntimeError("DPNoise.aggregate_train called before configure_train.")
        if self.client_noise is not None:
            raise RuntimeError("distributed DP releases only secure sums (release_secure_sum): "
                               "individual replies carry no noise.")
        clip = self.clip_norm  # this round's C (adaptive clipping changes it afterwards)
        # The sum starts from this round's noise (drawn while the clients trained, used once),
        # and from W too where the step allows: no zero-filled buffer and no extra pass to add
        # the noise, or to apply the sum, afterwards.
        step, total = self._take_sum_start(server_round, clip)
        averager = MetricAverager(self.inner.client_epsilon_max)
        num_clipped = add_clipped_updates(
            self.inner, server_round, replies, total,
            weight=(1.0 if step is None else step) / self.expected_clients, clip=clip,
            averager=averager)

        new_global = (self.inner.apply_update(total) if step is None
                      else self.inner.commit(total))

        self.rounds_done += 1
        self._account()
        metrics_out = averager.record()
        metrics_out["num-dropped"] = len(self.inner.last_dropped)
        metrics_out["num-clipped"] = num_clipped
        for key, value in self.epsilons.metrics().items():
            metrics_out[key] = value
        metrics_out["delta"] = self.delta
        metrics_out["clip-norm"] = clip
        metrics_out["noise-multiplier"] = self.noise_multiplier
        metrics_out["update-noise-multiplier"] = self.update_noise_multiplier
        if self.adaptive_clip is not None:
            num_unclipped = averager.num_clients - num_clipped
            fraction = self.adaptive_clip.update(num_unclipped, averager.num_clients)
            self.clip_norm = self.adaptive_clip.value
            metrics_out["unclipped-fraction"] = fraction  # noised: part of the DP release
            metrics_out["clipped-count-stddev"] = self.adaptive_clip.count_stddev
        log(INFO, "DP round %s: %d update(s), %d clipped; epsilon = %s (delta = %g)",
            server_round, averager.num_clients, num_clipped, self.epsilons, self.delta)
        return self.inner.to_record(new_global), metrics_out

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated to the inner strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated to the inner strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        """Log the inner strategy's summary and the DP settings."""
        self.inner.summary()
        log(INFO, "\t└──> DP (central, user-level, Poisson sampling): clip_norm=%g, "
            "noise_multiplier=%g, q=%g, num_clients=%d, delta=%g, max_epsilon=%s",
            self.clip_norm, self.noise_multiplier, self.sample_rate, self.num_clients,
            self.delta, self.max_epsilon)
        if self.adaptive_clip is not None:
            clip = self.adaptive_clip
            log(INFO, "\t    adaptive clipping: target_quantile=%g, clip_lr=%g, "
                "clipped_count_stddev=%g, update noise multiplier=%g", clip.target_quantile,
                clip.learning_rate, clip.count_stddev, self.update_noise_multiplier)

    def seed_noise(self, noise_seed: int | None) -> None:
        """Draw the noise afresh: from OS entropy (None), or for tests from (noise_seed, round).
        A strategy restored from a checkpoint is given its config's noise_seed again."""
        self.noise.reseed(noise_seed)

    def state_dict(self) -> dict:
        """Rounds already released (epsilon follows from them; with distributed DP, from who
        survived each), the clip norm (adaptive clipping moves it) and the inner strategy's
        state. Never the noise generator."""
        state = {"rounds_done": self.rounds_done, "clip_norm": self.clip_norm,
                 "inner": self.inner.state_dict()}
        if self.client_noise is not None:
            state["client_noise_rounds"] = self.client_noise.state()
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what `state_dict` returned; epsilon is recomputed from the rounds done."""
        self.rounds_done = int(state["rounds_done"])
        self.clip_norm = float(state["clip_norm"])
        if self.adaptive_clip is not None:
            self.adaptive_clip.value = self.clip_norm
        if self.client_noise is not None:
            self.client_noise.load_state(state.get("client_noise_rounds", []))
        self._account()
        self.inner.load_state_dict(state["inner"])

    # ----------------------------------------------------------------------------------------
    # The noise, drawn while the clients train: drawing N(0, sigma² C²) for every parameter
    # takes as long as averaging ~20 CNN replies, and the server is idle until the replies
    # come. Same generator, same order: the released model is what drawing it later gives.
    # ----------------------------------------------------------------------------------------

    def _sum_start(self, clip: float) -> tuple[float | None, dict[str, np.ndarray]]:
        """(a, the buffer the round's sum starts from): W + a·noise/m when the inner
        strategy's step is W + a·u, so the sum is the new model and applying it costs no pass
        after the replies; (None, noise/m) otherwise. Adding the updates to W rather than to a
        sum of their own rounds each to W's float32 spacing (~4e-9 for weights near 0.05), far
        below the noise's std."""
        if self.client_noise is not None:  # the clients' noise is in the sum already
            noise = {k: np.zeros_like(w) for k, w in self.inner.current.items()}
        else:
            noise = self.noise.like(self.inner.current, self.update_noise_multiplier * clip,
                                    self.expected_clients)
        step = self.inner.update_step()
        if step is not None:
            for key, weights in self.inner.current.items():
                noise[key] *= step
                noise[key] += weights
        return step, noise

    def presample_noise(self, server_round: int) -> None:
        """Draw the noise of `server_round`'s release now, at this round's C."""
        self.noise.start_round(server_round)
        self._next_start = (server_round, self.clip_norm, id(self.inner.current),
                            *self._sum_start(self.clip_norm))

    def _take_sum_start(self, server_round: int,
                        clip: float) -> tuple[float | None, dict[str, np.ndarray]]:
        pending, self._next_start = self._next_start, None
        if pending is not None and pending[:3] == (server_round, clip, id(self.inner.current)):
            return pending[3], pending[4]
        self.noise.start_round(server_round)  # aggregate_train called without configure_train
        return self._sum_start(clip)

    # ----------------------------------------------------------------------------------------
    # The release from a secure sum (secagg=secaggplus, fl_app.secagg): the server holds only
    # the sum of the clients' updates, each clipped by its client.
    # ----------------------------------------------------------------------------------------

    def release_secure_sum(self, server_round: int, clipped_sum: dict[str, np.ndarray] | None,
                           num_clients: int, num_examples: int, num_clipped: int,
                           client_metrics: MetricRecord,
                           noised: ClientNoise | None = None) -> tuple[ArrayRecord, MetricRecord]:
        """`aggregate_train` for secure aggregation (fl_app.secagg): the clients clipped their
        own updates to clip_norm and the server holds only their sum (None: nobody sampled),
        and the clients' mean metrics. The same N(0, sigma^2 C^2) noise, denominator q*N and
        accounting are applied to it.

        With distributed DP the sum is already noised by the clients (`noised` says how: the
        round's survivors, threshold and cohort): the server adds nothing, and epsilon follows
        from the noise the survivors added."""
        if self.adaptive_clip is not None:
            raise ValueError("Adaptive clipping needs each update's norm, which secure "
                             "aggregation hides: use clipping=fixed.")
        if noised is not None and self.client_noise is None:
            raise ValueError("a secure sum the clients noised (secagg.noise=distributed) "
                             "reached a strategy that adds its own noise: call "
                             "add_noise_on_clients first (server_loop.run does).")
        if self.client_noise is not None:
            if noised is None and clipped_sum is not None:
                raise ValueError("distributed DP: a secure sum arrived without the clients' "
                                 "noise; refusing to release it un-noised.")
            step, total = self._sum_start(self.clip_norm)
            self.client_noise.record(noised)
        else:
            step, total = self._take_sum_start(server_round, self.clip_norm)
        weight = (1.0 if step is None else step) / self.expected_clients
        for key, acc in total.items():
            if clipped_sum is not None:
                axpy(acc, weight, clipped_sum[key])
        new_global = (self.inner.apply_update(total) if step is None
                      else self.inner.commit(total))
        self.rounds_done += 1
        self._account()
        averager = MetricAverager(self.inner.client_epsilon_max)  # client-side DP's worst ε
        averager.add(num_examples, client_metrics)
        metrics_out = MetricRecord({
            **averager.record(), "num-clients": num_clients, "num-clipped": num_clipped,
            **self.epsilons.metrics(), "delta": self.delta, "clip-norm": self.clip_norm,
            "noise-multiplier": self.noise_multiplier,
            "update-noise-multiplier": self.update_noise_multiplier,
            **({} if self.client_noise is None else self.client_noise.last_metrics())})
        log(INFO, "DP round %s (secure sum): %d update(s), %d clipped; epsilon = %s "
            "(delta = %g)", server_round, num_clients, num_clipped, self.epsilons, self.delta)
        return self.inner.to_record(new_global), metrics_out

    def skip_secure_round(self, server_round: int) -> MetricRecord:
        """A round secure aggregation could not run (too few clients sampled for a safe share
        plan): nothing is released and the model stays, but the round is counted as if it
        were (the accountant's epsilon only grows), so the epsilon reported never undercounts
        a round whose cohort depended on who was sampled."""
        self._next_start = None  # this round's presampled noise is never used
        if self.client_noise is not None:
            self.client_noise.record(None)  # counted at the least noise a round can have
        self.rounds_done += 1
        self._account()
        log(INFO, "DP round %s (secure sum): skipped, nothing released; epsilon = %s "
            "(delta = %g)", server_round, self.epsilons, self.delta)
        return MetricRecord({"num-clients": 0, **self.epsilons.metrics(), "delta": self.delta,
                             "clip-norm": self.clip_norm,
                             "noise-multiplier": self.noise_multiplier,
                             **({} if self.client_noise is None
                                else self.client_noise.last_metrics())})
