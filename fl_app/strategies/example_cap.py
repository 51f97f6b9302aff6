"""The most examples a client's reply may claim: a bound on one client's weight in the mean.

A reply's `num-examples` is the client's own word. Weighted averaging trusts it, so one client
that claims 1e12 examples makes the mean its own update. `ExampleCap` clamps each claim to
`max_examples_per_client` (a setting) and, where the server knows it, to the size of the
partition the client really trains on (simulation: see `server_loop.bound_client_counts`).
"""

import math
from collections.abc import Mapping
from logging import WARNING

from flwr.common.logger import log


class ExampleCap:
    """Clamps claimed example counts; no limit set means the claims are trusted as they are."""

    def __init__(self, max_examples_per_client: float | None = None) -> None:
        value = max_examples_per_client
        if value is not None and not (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and value >= 1):
            raise ValueError(
                f"max_examples_per_client must be null (trust each client's num-examples) or a "
                f"number >= 1, got {value!r}: set it to the most examples one client may have.")
        self.limit = None if value is None else float(value)
        # Node id -> examples that node really has, where the server knows it.
        self.per_node: dict[int, int] = {}

    def know_sizes(self, per_node: Mapping[int, int], largest: int | None) -> None:
        """Bound every client by `largest` (the largest any client can have) and each node in
        `per_node` by its own size, on top of `max_examples_per_client`."""
        if largest is not None:
            self.limit = float(largest) if self.limit is None else min(self.limit, largest)
        self.per_node = {int(k): int(v) for k, v in per_node.items()}

    def bound(self, server_round: int, node_id: int, claimed: float) -> float:
        """`claimed` clamped to what node `node_id` may have; a clamped claim is logged."""
        limits = [x for x in (self.limit, self.per_node.get(node_id)) if x is not None]
        counted = float(min([claimed, *limits]))
        if counted < claimed:
            log(WARNING, "Round %s: node %s claims %g examples; counted as %g "
                "(max_examples_per_client, or the partition it has).", server_round, node_id,
                claimed, counted)
        return counted
