"""The base of fl_app's strategies: `SampledStrategy`, one class for what they all do.

It subclasses Flower's Message-API `FedAvg` (so its constructor arguments, `summary()` and
`start()` work as users expect) and replaces the parts this project is stricter about:
- who takes part: seeded sampling, a bounded wait for nodes, client pools (a `NodeSampler`,
  sampling.py);
- the messages a round sends (fl_app.messages, the server <-> client contract);
- which replies are used (replies.py) and their screened, streaming, weighted mean, taken here
  with the kernels and metric averages of aggregation.py.

The strategy keeps the current global model itself (`self.current`), because FedSGD clients
reply with gradients and `aggregate_train` is not handed the global model.

A subclass says, as class attributes, what its clients send (`mode`, one of
`messages.REPLY_KINDS`) and what it supports (`needs_each_update`, `client_pool`, `central_dp`,
`plans_cohort`; see features.py, which the config checks ask); and, as methods, what an update is
(`update_offset`, what DP clips), how an averaged update becomes the new model
(`apply_update`, `update_step`) and what a checkpoint must keep (`state_dict`).
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.grid import Grid
from flwr.serverapp.strategy import FedAvg

from fl_app.messages import REPLY, WEIGHTS, round_messages
from fl_app.records import from_array_record, to_array_record
from fl_app.strategies.aggregation import (
    MetricAverager,
    add_all_or_nothing,
    average_evaluation,
    positive_count,
    weighted_sum,
)
from fl_app.strategies.replies import BadReply, ExampleCap, check_reply, non_finite_array
from fl_app.strategies.sampling import EVALUATE_STREAM, TRAIN_STREAM, NodeSampler


def _float_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype to compute in: float32 stays float32 (half the memory), ints/float64 -> float64."""
    return np.result_type(dtype, np.float32)


class SampledStrategy(FedAvg):
    """Base of fl_app's strategies: seeded sampling, validated replies, in-place averaging.

    Parameters are Flower's `FedAvg` ones plus `node_wait_timeout` (seconds to wait for
    `min_available_nodes` before raising `NotEnoughClientsError`), `seed` (node sampling
    is a pure function of seed and round, so runs are reproducible) and
    `max_examples_per_client` (the most examples one reply counts for; None trusts each
    client's num-examples).
    """

    # What clients reply with (fl_app.messages.REPLY_KINDS).
    mode: str = WEIGHTS
    # Weight each client's update by its num-examples (True) or count every client once.
    weighted: bool = True
    # Why this strategy needs each client's own update (None: the weighted mean of the replies
    # is all it uses, so secure aggregation, which reveals only their sum, can serve it).
    needs_each_update: str | None = None
    # Whether a client pool (config client_pool) can serve its sampled clients.
    client_pool: bool = True
    # Whether it adds central DP noise (only fl_app.privacy.central.DPNoise does).
    central_dp: bool = False
    # Whether `next_cohort` says ahead whom a round's configure_train will sample.
    plans_cohort: bool = True
    # Reply metrics (fl_app.messages) it reads, each a positive number in every usable reply.
    required_metrics: tuple[str, ...] = ()

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        node_wait_timeout: float = 60.0,
        seed: int = 0,
        max_examples_per_client: float | None = None,
    ) -> None:
        for name, value in (("fraction_train", fraction_train),
                            ("fraction_evaluate", fraction_evaluate)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
        if node_wait_timeout < 0:
            raise ValueError(f"node_wait_timeout must be >= 0 seconds, got {node_wait_timeout!r}.")
        # Flower's FedAvg warns when fraction_evaluate is 0; here that is the default (the
        # server evaluates centrally), so set it after the parent has run, without the warning.
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate or 1.0,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
        )
        if fraction_evaluate == 0.0:
            self.fraction_evaluate = 0.0
            self.min_evaluate_nodes = 0
        self.sampler = NodeSampler(seed, node_wait_timeout, min_available_nodes)
        self.example_cap = ExampleCap(max_examples_per_client)
        self.current: dict[str, np.ndarray] | None = None
        self.last_dropped: list[str] = []
        # The largest epsilon each kind of client-side DP has reported (messages.CLIENT_EPSILONS).
        self.client_epsilon_max: dict[str, float] = {}
        # The dtypes the global model arrived in: the new model is sent back in the same ones.
        self._dtypes: dict[str, np.dtype] = {}

    @property
    def seed(self) -> int:
        """The seed of node sampling (and of DP's Poisson sampling)."""
        return self.sampler.seed

    @property
    def node_wait_timeout(self) -> float:
        """Seconds to wait for enough nodes before NotEnoughClientsError."""
        return self.sampler.node_wait_timeout

    # ----------------------------------------------------------------------------------------
    # What subclasses define
    # ----------------------------------------------------------------------------------------

    def update_offset(self) -> dict[str, np.ndarray] | None:
        """What to subtract from a reply to get the update it stands for (the update a DP
        wrapper clips): the global model when clients send weights, None when they send the
        update itself."""
        raise NotImplementedError

    def update_step(self) -> float | None:
        """a when `apply_update(u)` is W + a·u for every update u (a caller that builds u as a
        sum can then start it from W and scale each term by a); None when it is not."""
        return None

    def reply_with_updates(self) -> None:
        """Have clients send their update itself (what `update_offset` would otherwise be
        subtracted from); a no-op where they already do."""

    def apply_update(self, mean_update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Turn an averaged update into the new global model, store it and return it.

        `mean_update` is the caller's scratch: its arrays may be reused for the result."""
        raise NotImplementedError

    def global_from_mean_reply(self, mean_reply: dict[str, np.ndarray],
                               averager: MetricAverager) -> dict[str, np.ndarray]:
        """New global model from the weighted mean of the raw replies (default: they are
        updates); `averager` holds the replies' total weight, examples and mean metrics."""
        return self.apply_update(mean_reply)

    def client_config(self) -> dict[str, int | float | str | bool]:
        """What this strategy tells every client besides the reply kind (none for FedAvg)."""
        return {}

    def state_dict(self) -> dict:
        """What a checkpoint must keep for the next round to be what it would have been: plain
        values (JSON) and numpy arrays, in nested dicts. Nothing here: the global model is
        checkpointed on its own and everything else follows from the config."""
        return {"client_epsilon_max": dict(self.client_epsilon_max)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what `state_dict` returned."""
        self.client_epsilon_max = {str(k): float(v)
                                   for k, v in state.get("client_epsilon_max", {}).items()}

    # ----------------------------------------------------------------------------------------
    # Sampling (sampling.NodeSampler) and what the server knows of the clients
    # ----------------------------------------------------------------------------------------

    def use_client_pool(self, population: int) -> None:
        """Sample from `population` clients served by a pool of nodes (NodeSampler)."""
        self.sampler.use_client_pool(population)

    @property
    def population(self) -> int | None:
        """With a client pool, the number of clients sampled from; else None."""
        return self.sampler.population

    def candidates(self, grid: Grid, required: int) -> list[int]:
        """The node ids (or with a client pool the client ids) a round may sample."""
        return self.sampler.candidates(grid, required)

    def sample_round(self, grid: Grid, server_round: int, stream: int) -> list[int] | None:
        """The round's training (TRAIN_STREAM) or evaluation (EVALUATE_STREAM) sample, by
        that stage's fraction and minimum; None when the stage is off (its fraction is 0)."""
        if stream == TRAIN_STREAM:
            fraction, min_nodes = self.fraction_train, self.min_train_nodes
        else:
            fraction, min_nodes = self.fraction_evaluate, self.min_evaluate_nodes
        if fraction == 0.0:
            return None
        return self.sampler.sample(grid, server_round, fraction, min_nodes, stream)

    def next_cohort(self, grid: Grid, server_round: int) -> list[int] | None:
        """The node ids `configure_train` will send round `server_round`'s training to, drawn
        now (the same draw, from the nodes connected now) without sending or waiting; None
        when it cannot say (training off, too few nodes connected, a client pool). Secure
        aggregation keys that round ahead with it."""
        if self.fraction_train == 0.0:
            return None
        candidates = self.sampler.connected_now(
            grid, max(self.sampler.min_available_nodes, self.min_train_nodes))
        if candidates is None:
            return None
        return self.sampler.draw(candidates, server_round, self.fraction_train,
                                 self.min_train_nodes)

    def know_client_sizes(self, per_node: Mapping[int, int], largest: int | None) -> None:
        """Bound each reply's num-examples by the examples its client really has, where the
        server knows them (simulation): `largest` for every client, `per_node` by node id."""
        self.example_cap.know_sizes(per_node, largest)

    # ----------------------------------------------------------------------------------------
    # The global model
    # ----------------------------------------------------------------------------------------

    def set_current(self, arrays: ArrayRecord | dict[str, np.ndarray]) -> None:
        """Store a float copy of the global model (the reference replies are checked against)."""
        named = from_array_record(arrays) if isinstance(arrays, ArrayRecord) else arrays
        self._dtypes = {k: np.asarray(v).dtype for k, v in named.items()}
        self.current = {
            k: np.array(v, dtype=_float_dtype(np.asarray(v).dtype)) for k, v in named.items()
        }

    def _require_current(self) -> dict[str, np.ndarray]:
        if self.current is None:
            raise RuntimeError(
                "The strategy has no global model yet: call configure_train (or set_current) "
                "before aggregate_train, since replies are checked against the global model."
            )
        return self.current

    def commit(self, new_global: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Make `new_global` the current model (float arrays) and return it."""
        self.current = new_global
        return new_global

    def to_record(self, arrays: dict[str, np.ndarray]) -> ArrayRecord:
        """ArrayRecord of `arrays` in the dtypes the global model came in (ints rounded)."""
        out = {}
        for key, value in arrays.items():
            dtype = self._dtypes.get(key, value.dtype)
            if np.issubdtype(dtype, np.integer):
                value = np.rint(value)
            out[key] = value.astype(dtype, copy=False)
        return to_array_record(out)

    # ----------------------------------------------------------------------------------------
    # A round
    # ----------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded) and send them the global model with the reply kind and round."""
        node_ids = self.sample_round(grid, server_round, TRAIN_STREAM)
        if node_ids is None:
            return []
        log(INFO, "configure_train: sampled %d %s", len(node_ids),
            "nodes" if self.population is None else "clients")
        return self.build_train_messages(server_round, arrays, config, node_ids)

    def build_train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, chosen: list[int]
    ) -> list[Message]:
        """Remember `arrays` as the current global model and build one TRAIN message per chosen
        node (or pool client)."""
        self.set_current(arrays)
        extra = {**self.client_config(), REPLY: self.mode}
        return round_messages(MessageType.TRAIN, server_round, arrays, config,
                              self.sampler.targets(chosen), extra)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded, own stream) for federated evaluation; none if fraction is 0."""
        chosen = self.sample_round(grid, server_round, EVALUATE_STREAM) or []
        return round_messages(MessageType.EVALUATE, server_round, arrays, config,
                              self.sampler.targets(chosen))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics; None if none usable."""
        return average_evaluation(server_round, replies)

    def summary(self) -> None:
        """Log the configuration (Flower's FedAvg summary plus what this class adds)."""
        super().summary()
        log(INFO, "\t├──> %s: mode=%s, weighted=%s, seed=%d, node_wait_timeout=%.1fs, "
            "max_examples_per_client=%s", type(self).__name__, self.mode, self.weighted,
            self.seed, self.node_wait_timeout, self.example_cap.limit)

    # ----------------------------------------------------------------------------------------
    # Replies: screened, then averaged into the new global model one at a time. A bad reply is
    # dropped and logged, never averaged in and never allowed to crash the round; replies are
    # summed into preallocated buffers, so memory does not grow with the number of clients.
    # ----------------------------------------------------------------------------------------

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
        dtypes = self._dtypes
        for msg in replies:
            try:
                arrays, num_examples, metrics = check_reply(msg, reference, check_values, dtypes)
                for key in self.required_metrics:
                    if not positive_count(metrics.get(key)):
                        raise BadReply(f"metric '{key}' must be a positive number for "
                                       f"{type(self).__name__}, got {metrics.get(key)!r}")
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
        if non_finite_array(mean) is not None:
            log(WARNING, "Round %s: the average of %d finite replies overflows %s; global model "
                "unchanged. Lower the learning rate or clip the clients' updates.",
                server_round, averager.num_clients, next(iter(mean.values())).dtype)
            return None, metrics_out
        return self.to_record(self.global_from_mean_reply(mean, averager)), metrics_out

    def reply_weight(self, num_examples: float, metrics: MetricRecord) -> float:
        """A reply's weight in the mean: its (bounded) num-examples, or 1 when unweighted."""
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
            if mean is not None and non_finite_array(mean) is not None:
                kept = self._finite_only(server_round, kept)
                mean = self._weighted_mean(kept)
        except Exception:  # noqa: BLE001 - a checked reply that still will not add: find it
            return self._mean_one_by_one(server_round, self._finite_only(server_round, kept),
                                         averager)
        for _, _, num_examples, metrics in kept:
            averager.add(num_examples, metrics, self.reply_weight(num_examples, metrics))
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
        weights = [self.reply_weight(num_examples, metrics)
                   for _, _, num_examples, metrics in kept]
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
            weight = self.reply_weight(num_examples, metrics)
            if self.fold(server_round, msg, sums, weight, arrays):
                total_weight += weight
                averager.add(num_examples, metrics, weight)
        if averager.num_clients == 0:
            return None
        for acc in sums.values():
            acc /= total_weight
        return sums
