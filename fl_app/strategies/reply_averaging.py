"""A round's train replies screened and averaged into the new global model, one reply at a time.

`ReplyAveraging` is a part of `SampledStrategy` (base.py): it reads the strategy's global model
(`_require_current`), `weighted` and `client_epsilon_max`, and hands the mean to
`global_from_mean_reply`. A bad reply is dropped and logged, never averaged in and never
allowed to crash the round; replies are summed into preallocated buffers, so server memory does
not grow with the number of clients.
"""

from collections.abc import Iterable, Iterator, Sequence
from logging import WARNING

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from fl_app.strategies.averaging import add_all_or_nothing, weighted_sum
from fl_app.strategies.metrics import MetricAverager
from fl_app.strategies.replies import BadReply, check_reply, non_finite_array


def _all_finite(arrays: dict[str, np.ndarray]) -> bool:
    return non_finite_array(arrays) is None


class ReplyAveraging:
    """`aggregate_train` of fl_app's strategies, and the reply screening DP reuses."""

    def screen(
        self, server_round: int, replies: Iterable[Message], check_values: bool = True
    ) -> Iterator[tuple[Message, dict[str, np.ndarray], float, MetricRecord]]:
        """Yield (reply, arrays, num_examples, metrics) of each usable reply, one at a time;
        num_examples is the client's claim bounded by the strategy's `example_cap`.

        Unusable replies are logged at WARNING with node id and reason and recorded in
        `self.last_dropped`; nothing a client sends can make this raise. With
        `check_values=False` the values are not checked for NaN / Inf (see `check_reply`).
        """
        self.last_dropped = []
        reference = self._require_current()  # no global model is a server bug: let it raise
        dtypes = getattr(self, "_dtypes", None)  # absent in strategies pickled before it was
        for msg in replies:
            try:
                arrays, num_examples, metrics = check_reply(msg, reference, check_values, dtypes)
            except BadReply as exc:
                self.drop(server_round, msg, str(exc))
            except Exception as exc:  # noqa: BLE001 - a malformed reply must not end the run
                self.drop(server_round, msg, f"unreadable reply ({type(exc).__name__}: {exc})")
            else:
                yield msg, arrays, self.bounded_count(server_round, msg, num_examples), metrics

    def bounded_count(self, server_round: int, msg: Message, claimed: float) -> float:
        """The examples a reply counts for: its claim, at most what its client may have."""
        cap = self.example_cap
        return claimed if cap is None else cap.bound(server_round, msg.metadata.src_node_id,
                                                     claimed)

    def drop(self, server_round: int, msg: Message, reason: str) -> None:
        """Leave a reply out of the round: log why and record it in `last_dropped`."""
        node_id = msg.metadata.src_node_id
        self.last_dropped.append(f"node {node_id}: {reason}")
        log(WARNING, "Round %s: dropping reply from node %s: %s", server_round, node_id, reason)

    def fold(self, server_round: int, msg: Message, total: dict[str, np.ndarray],
             weight: float, arrays: dict[str, np.ndarray]) -> bool:
        """total += weight * arrays, all of it or none; a reply that cannot be added is
        dropped (False), never allowed to end the round or leave part of itself in `total`."""
        try:
            add_all_or_nothing(total, weight, arrays)
        except Exception as exc:  # noqa: BLE001 - one reply must not end the run
            self.drop(server_round, msg, f"cannot be added to the sum ({type(exc).__name__}: "
                      f"{exc})")
            return False
        return True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the usable replies (weighted by num-examples or uniformly) into a new model.

        With no usable reply the global model stays as it is and the ArrayRecord is None.
        """
        averager = MetricAverager(self.client_epsilon_max)
        if isinstance(replies, Sequence):
            mean = self._mean_of_sequence(server_round, replies, averager)
        else:
            mean = self._mean_one_by_one(server_round, self.screen(server_round, replies),
                                         averager)

        metrics_out = averager.record()
        metrics_out["num-dropped"] = len(self.last_dropped)
        if mean is None:
            log(WARNING, "Round %s: no usable reply (%d dropped); global model unchanged.",
                server_round, len(self.last_dropped))
            return None, metrics_out
        if not _all_finite(mean):
            log(WARNING, "Round %s: the average of %d finite replies overflows %s; global model "
                "unchanged. Lower the learning rate or clip the clients' updates.",
                server_round, averager.num_clients, next(iter(mean.values())).dtype)
            return None, metrics_out
        return self.to_record(self.global_from_mean_reply(mean)), metrics_out

    def _weight(self, num_examples: float) -> float:
        return num_examples if self.weighted else 1.0

    def _mean_of_sequence(self, server_round: int, replies: Sequence[Message],
                          averager: MetricAverager) -> dict[str, np.ndarray] | None:
        """The mean when the replies are all at hand (what Flower's grids return): each reply is
        read once, into the sum, and NaN / Inf is looked for in the sum only. Only when the sum
        is not finite is each reply checked, the broken ones dropped and the mean taken again.
        The mean may still overflow.
        """
        kept = list(self.screen(server_round, replies, check_values=False))
        try:
            mean = self._weighted_mean(kept)
            if mean is not None and not _all_finite(mean):
                kept = self._finite_only(server_round, kept)
                mean = self._weighted_mean(kept)
        except Exception:  # noqa: BLE001 - a checked reply that still will not add: find it
            return self._mean_one_by_one(server_round, self._finite_only(server_round, kept),
                                         averager)
        for _, _, num_examples, metrics in kept:
            averager.add(num_examples, metrics)
        return mean

    def _finite_only(self, server_round: int, kept: list) -> list:
        """`kept` without the replies holding NaN or Inf, which are dropped."""
        finite = []
        for msg, arrays, num_examples, metrics in kept:
            bad = non_finite_array(arrays)
            if bad is None:
                finite.append((msg, arrays, num_examples, metrics))
            else:
                self.drop(server_round, msg, f"'{bad}' contains NaN or Inf")
        return finite

    def _weighted_mean(self, kept: list) -> dict[str, np.ndarray] | None:
        if not kept:
            return None
        weights = [self._weight(num_examples) for _, _, num_examples, _ in kept]
        total = sum(weights)
        return weighted_sum(self._require_current(), [arrays for _, arrays, _, _ in kept],
                            [w / total for w in weights])

    def _mean_one_by_one(self, server_round: int, kept: Iterable[tuple],
                         averager: MetricAverager) -> dict[str, np.ndarray] | None:
        """The mean of screened replies taken one at a time (as they arrive, or after the sum
        of them all failed): each is added to preallocated sums and let go, so memory does not
        grow with their number; one that cannot be added is dropped."""
        sums = {k: np.zeros_like(v) for k, v in self._require_current().items()}
        total_weight = 0.0
        for msg, arrays, num_examples, metrics in kept:
            weight = self._weight(num_examples)
            if self.fold(server_round, msg, sums, weight, arrays):
                total_weight += weight
                averager.add(num_examples, metrics)
        if averager.num_clients == 0:
            return None
        for acc in sums.values():
            acc /= total_weight
        return sums
