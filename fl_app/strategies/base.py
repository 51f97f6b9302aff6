"""Shared machinery of fl_app's strategies: seeded sampling, reply validation, streaming means.

`SampledStrategy` subclasses Flower's Message-API `FedAvg` (so its constructor arguments,
`summary()` and `start()` work as users expect) and replaces the parts this project needs to be
stricter about:

- node sampling is seeded (reproducible runs) and waits a bounded time for enough nodes,
  then fails with a message that says how to fix it instead of waiting forever;
- the strategy keeps the current global model itself (`self.current`), because FedSGD clients
  reply with gradients and `aggregate_train` is not handed the global model;
- a bad reply (error, NaN, wrong shape, missing names, ...) is dropped and logged, never averaged
  in and never allowed to crash the round;
- replies are averaged into preallocated buffers one at a time, so server memory does not grow
  with the number of clients.

Subclasses say what a client sends (`mode`), what the update is (`client_update`, which the DP
wrapper clips) and how an averaged update becomes the new global model (`apply_update`).
"""

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from logging import INFO, WARNING

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.logger import log
from flwr.serverapp.grid import Grid
from flwr.serverapp.strategy import FedAvg

from fl_app.records import CLIENT_ID, array_views, from_array_record, to_array_record
from fl_app.strategies.averaging import all_finite, axpy, weighted_sum

NUM_EXAMPLES = "num-examples"
# The dtype kinds a reply's arrays may have: signed and unsigned integers, floats (real numbers:
# no bool, complex, datetime or object).
_REAL_KINDS = frozenset("iuf")

# Client-side privacy: each client reports its own epsilon, which only grows. A mean over the
# round's clients hides the worst one, so the largest value seen so far is recorded as <key>_max.
CLIENT_EPSILONS = ("local_epsilon", "dpsgd_epsilon")

# Separate random streams so that changing evaluation sampling never changes training sampling.
_TRAIN_STREAM = 0
_EVALUATE_STREAM = 1


class NotEnoughClientsError(RuntimeError):
    """Fewer nodes connected than the strategy needs, after waiting `node_wait_timeout`."""


class BadReply(ValueError):
    """A client reply that cannot be aggregated; the message is the reason."""


def _messages(message_type: str, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
              targets: list[tuple[int, int | None]], extra: dict | None = None) -> list[Message]:
    """One message per (node id, client id) target, carrying the arrays and a copy of the config
    (never the caller's, which is reused every round) with the round and `extra` added. Without
    client ids every message shares one content; a pool node's message also says which client
    it serves (CLIENT_ID)."""
    sent = {**dict(config), **(extra or {}), "server-round": server_round}
    shared = RecordDict({"arrays": arrays, "config": ConfigRecord(sent)})

    def content(client_id: int | None) -> RecordDict:
        if client_id is None:
            return shared
        config_record = ConfigRecord({**sent, CLIENT_ID: client_id})
        return RecordDict({"arrays": arrays, "config": config_record})

    return [Message(content=content(client_id), dst_node_id=node_id, message_type=message_type)
            for node_id, client_id in targets]


def _float_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype to compute in: float32 stays float32 (half the memory), ints/float64 -> float64."""
    return np.result_type(dtype, np.float32)


class MetricAverager:
    """Example-weighted running mean of the clients' scalar metrics (no list of replies kept).

    `running_max`, when given, is a dict that outlives the round: the largest value of each
    `CLIENT_EPSILONS` metric seen so far is kept in it and reported as `<key>_max`.
    """

    def __init__(self, running_max: dict[str, float] | None = None) -> None:
        self.running_max = running_max
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.num_clients = 0
        self.num_examples = 0.0

    def add(self, num_examples: float, metrics: MetricRecord) -> None:
        """Fold one client's scalar metrics in, weighted by its number of examples."""
        self.num_clients += 1
        self.num_examples += num_examples
        for key, value in metrics.items():
            if key == NUM_EXAMPLES or isinstance(value, (bool, list)):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + num_examples * float(value)
            self.weights[key] = self.weights.get(key, 0.0) + num_examples
            if self.running_max is not None and key in CLIENT_EPSILONS:
                self.running_max[key] = max(self.running_max.get(key, 0.0), float(value))

    def record(self) -> MetricRecord:
        """The averages so far, plus the total num-examples and the num-clients seen."""
        averages = {key: self.sums[key] / self.weights[key] for key in self.sums}
        averages |= {f"{key}_max": value for key, value in (self.running_max or {}).items()}
        total = self.num_examples
        num_examples = int(total) if total.is_integer() else total
        return MetricRecord(
            {**averages, NUM_EXAMPLES: num_examples, "num-clients": self.num_clients}
        )


def check_reply(msg: Message, reference: dict[str, np.ndarray], check_values: bool = True
                ) -> tuple[dict[str, np.ndarray], float, MetricRecord]:
    """(arrays, num_examples, metrics) of a train reply that can be aggregated against the
    global model `reference` (same names and shapes); raise BadReply saying why otherwise.

    `check_values=False` skips the pass over the values (NaN / Inf) for a caller that finds
    them another way: in the sum of all replies, or in the reply's norm."""
    if msg.has_error():
        raise BadReply(f"error reply: {msg.error.reason}")
    if not msg.has_content():
        raise BadReply("reply has no content")
    record = msg.content.get("arrays")
    if not isinstance(record, ArrayRecord):
        raise BadReply("no 'arrays' ArrayRecord")
    metrics = msg.content.get("metrics")
    if not isinstance(metrics, MetricRecord):
        raise BadReply("no 'metrics' MetricRecord")
    if NUM_EXAMPLES not in metrics:
        raise BadReply(f"metrics lack '{NUM_EXAMPLES}'")
    num_examples = metrics[NUM_EXAMPLES]
    if (isinstance(num_examples, (bool, list)) or not math.isfinite(num_examples)
            or num_examples <= 0):
        raise BadReply(f"'{NUM_EXAMPLES}' must be a positive number, got {num_examples!r}")
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            raise BadReply(f"metric '{key}' is not finite ({value!r})")

    missing, extra = sorted(set(reference) - set(record)), sorted(set(record) - set(reference))
    if missing or extra:
        raise BadReply(f"array names differ (missing {missing}, unexpected {extra})")
    for key, array in record.items():
        # Checked before decoding, so a huge wrong-shaped reply costs nothing.
        if tuple(array.shape) != reference[key].shape:
            raise BadReply(
                f"'{key}' has shape {tuple(array.shape)}, expected {reference[key].shape}"
            )
    arrays = array_views(record)  # read-only views: replies are never copied
    for key, array in arrays.items():
        if array.dtype.kind not in _REAL_KINDS:
            raise BadReply(f"'{key}' has non-numeric dtype {array.dtype}")
    if check_values:
        bad = non_finite_array(arrays)
        if bad is not None:
            raise BadReply(f"'{bad}' contains NaN or Inf")
    return arrays, float(num_examples), metrics


def non_finite_array(arrays: dict[str, np.ndarray]) -> str | None:
    """The name of the first array holding NaN or Inf; None if all values are finite."""
    return next((key for key, array in arrays.items() if not all_finite(array)), None)


def _all_finite(arrays: dict[str, np.ndarray]) -> bool:
    return non_finite_array(arrays) is None


class SampledStrategy(FedAvg):
    """Base of fl_app's strategies: seeded sampling, validated replies, in-place averaging.

    Parameters are Flower's `FedAvg` ones plus `node_wait_timeout` (seconds to wait for
    `min_available_nodes` before raising `NotEnoughClientsError`) and `seed` (node sampling
    is a pure function of seed and round, so runs are reproducible).
    """

    mode: str = "weights"
    # Weight each client's update by its num-examples (True) or count every client once.
    weighted: bool = True
    # With a client pool (`use_client_pool`): the population size, and the nodes serving it.
    # Class-level too, so a strategy pickled in a checkpoint before pools existed resumes.
    population: int | None = None
    _pool: tuple[int, ...] = ()

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 0.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        node_wait_timeout: float = 60.0,
        seed: int = 0,
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
        self.node_wait_timeout = float(node_wait_timeout)
        self.seed = int(seed)
        self.current: dict[str, np.ndarray] | None = None
        self.last_dropped: list[str] = []
        # The largest epsilon each kind of client-side DP has reported (see CLIENT_EPSILONS).
        self.client_epsilon_max: dict[str, float] = {}
        # The dtypes the global model arrived in: the new model is sent back in the same ones.
        self._dtypes: dict[str, np.dtype] = {}

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

    def global_from_mean_reply(self, mean_reply: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """New global model from the mean of the raw replies (default: they are updates)."""
        return self.apply_update(mean_reply)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Strategy state a checkpoint must keep (flat, `np.savez`-able). Stateless here."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` returned."""

    # ----------------------------------------------------------------------------------------
    # Sampling
    # ----------------------------------------------------------------------------------------

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
                    f"(min_available_nodes={self.min_available_nodes}, "
                    f"min_train_nodes={self.min_train_nodes}). Start more SuperNodes, raise "
                    "num-supernodes in the federation config (simulation), or lower "
                    "min_clients in the strategy config."
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
        self._pool = tuple(node_ids)
        return list(range(self.population))

    def targets(self, chosen: list[int]) -> list[tuple[int, int | None]]:
        """(node id, client id) per chosen candidate: the node itself, or with a client pool
        the clients dealt round-robin onto the pool's nodes (a node serves its share in turn)."""
        if self.population is None:
            return [(node_id, None) for node_id in chosen]
        if not self._pool:
            raise RuntimeError("No pool nodes known yet: call candidates() first.")
        return [(self._pool[i % len(self._pool)], client_id)
                for i, client_id in enumerate(chosen)]

    def sample_nodes(
        self, grid: Grid, server_round: int, fraction: float, min_nodes: int, stream: int = 0
    ) -> list[int]:
        """Sample max(int(n * fraction), min_nodes) of the n candidates, capped at n: the
        connected nodes, or with a client pool the population's clients.

        Deterministic for a given (seed, round, stream): node ids are sorted first, so the
        order in which the grid lists them does not matter.
        """
        candidates = self.candidates(grid, max(self.min_available_nodes, min_nodes))
        size = min(max(int(len(candidates) * fraction), min_nodes), len(candidates))
        entropy = [self.seed, server_round]
        if stream != _TRAIN_STREAM:
            entropy.append(stream)
        rng = np.random.default_rng(entropy)
        chosen = rng.choice(len(candidates), size=size, replace=False)
        return sorted(candidates[i] for i in chosen)

    # ----------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded) and send them the global model with mode and round."""
        if self.fraction_train == 0.0:
            return []
        node_ids = self.sample_nodes(
            grid, server_round, self.fraction_train, self.min_train_nodes, _TRAIN_STREAM
        )
        log(INFO, "configure_train: sampled %d %s", len(node_ids),
            "nodes" if self.population is None else "clients")
        return self.build_train_messages(server_round, arrays, config, node_ids)

    def build_train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, chosen: list[int]
    ) -> list[Message]:
        """Remember `arrays` as the current global model and build one TRAIN message per chosen
        node (or pool client)."""
        self.set_current(arrays)
        extra = {**self.client_config(), "mode": self.mode}
        return _messages(MessageType.TRAIN, server_round, arrays, config, self.targets(chosen),
                         extra)

    def client_config(self) -> dict[str, int | float | str | bool]:
        """What this strategy tells every client besides the mode (none for FedAvg)."""
        return {}

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

    def screen(
        self, server_round: int, replies: Iterable[Message], check_values: bool = True
    ) -> Iterator[tuple[Message, dict[str, np.ndarray], float, MetricRecord]]:
        """Yield (reply, arrays, num_examples, metrics) of each usable reply, one at a time.

        Unusable replies are logged at WARNING with node id and reason and recorded in
        `self.last_dropped`; nothing a client sends can make this raise. With
        `check_values=False` the values are not checked for NaN / Inf (see `check_reply`).
        """
        self.last_dropped = []
        reference = self._require_current()  # no global model is a server bug: let it raise
        for msg in replies:
            try:
                arrays, num_examples, metrics = check_reply(msg, reference, check_values)
            except BadReply as exc:
                self.drop(server_round, msg, str(exc))
            except Exception as exc:  # noqa: BLE001 - a malformed reply must not end the run
                self.drop(server_round, msg, f"unreadable reply ({type(exc).__name__}: {exc})")
            else:
                yield msg, arrays, num_examples, metrics

    def drop(self, server_round: int, msg: Message, reason: str) -> None:
        """Leave a reply out of the round: log why and record it in `last_dropped`."""
        node_id = msg.metadata.src_node_id
        self.last_dropped.append(f"node {node_id}: {reason}")
        log(WARNING, "Round %s: dropping reply from node %s: %s", server_round, node_id, reason)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the usable replies (weighted by num-examples or uniformly) into a new model.

        With no usable reply the global model stays as it is and the ArrayRecord is None.
        """
        averager = MetricAverager(self.client_epsilon_max)
        if isinstance(replies, Sequence):
            mean, finite = self._mean_of_sequence(server_round, replies, averager)
        else:
            mean = self._mean_of_stream(server_round, replies, averager)
            finite = mean is None or _all_finite(mean)

        metrics_out = averager.record()
        metrics_out["num-dropped"] = len(self.last_dropped)
        if mean is None:
            log(WARNING, "Round %s: no usable reply (%d dropped); global model unchanged.",
                server_round, len(self.last_dropped))
            return None, metrics_out
        if not finite:
            log(WARNING, "Round %s: the average of %d finite replies overflows %s; global model "
                "unchanged. Lower the learning rate or clip the clients' updates.",
                server_round, averager.num_clients, next(iter(mean.values())).dtype)
            return None, metrics_out
        return self.to_record(self.global_from_mean_reply(mean)), metrics_out

    def _weight(self, num_examples: float) -> float:
        return num_examples if self.weighted else 1.0

    def _mean_of_sequence(self, server_round: int, replies: Sequence[Message],
                          averager: MetricAverager) -> tuple[dict[str, np.ndarray] | None, bool]:
        """The mean when the replies are all at hand (what Flower's grids return): each reply is
        read once, into the sum, and NaN / Inf is looked for in the sum only. Only when the sum
        is not finite is each reply checked, the broken ones dropped and the mean taken again.
        Returns the mean and whether it is finite (it may still overflow).
        """
        kept = list(self.screen(server_round, replies, check_values=False))
        mean = self._weighted_mean(kept)
        finite = mean is None or _all_finite(mean)
        if not finite:
            checked = []
            for msg, arrays, num_examples, metrics in kept:
                bad = non_finite_array(arrays)
                if bad is None:
                    checked.append((msg, arrays, num_examples, metrics))
                else:
                    self.drop(server_round, msg, f"'{bad}' contains NaN or Inf")
            kept = checked
            mean = self._weighted_mean(kept)
            finite = mean is None or _all_finite(mean)
        for _, _, num_examples, metrics in kept:
            averager.add(num_examples, metrics)
        return mean, finite

    def _weighted_mean(self, kept: list) -> dict[str, np.ndarray] | None:
        if not kept:
            return None
        weights = [self._weight(num_examples) for _, _, num_examples, _ in kept]
        total = sum(weights)
        return weighted_sum(self._require_current(), [arrays for _, arrays, _, _ in kept],
                            [w / total for w in weights])

    def _mean_of_stream(self, server_round: int, replies: Iterable[Message],
                        averager: MetricAverager) -> dict[str, np.ndarray] | None:
        """The mean of replies that arrive one at a time: each is checked, then added to
        preallocated sums and let go, so memory does not grow with their number."""
        sums = {k: np.zeros_like(v) for k, v in self._require_current().items()}
        total_weight = 0.0
        for _, arrays, num_examples, metrics in self.screen(server_round, replies):
            weight = self._weight(num_examples)
            for key, acc in sums.items():
                axpy(acc, weight, arrays[key])
            total_weight += weight
            averager.add(num_examples, metrics)
        if averager.num_clients == 0:
            return None
        for acc in sums.values():
            acc /= total_weight
        return sums

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
    # Evaluation
    # ----------------------------------------------------------------------------------------

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded, own stream) for federated evaluation; none if fraction is 0."""
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self.sample_nodes(
            grid, server_round, self.fraction_evaluate, self.min_evaluate_nodes, _EVALUATE_STREAM
        )
        return _messages(MessageType.EVALUATE, server_round, arrays, config,
                         self.targets(node_ids))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics; None if none usable."""
        averager = MetricAverager()
        for msg in replies:
            node_id = msg.metadata.src_node_id
            if msg.has_error():
                log(WARNING, "Round %s: evaluation error from node %s: %s",
                    server_round, node_id, msg.error.reason)
                continue
            metrics = msg.content.get("metrics") if msg.has_content() else None
            num_examples = metrics.get(NUM_EXAMPLES) if isinstance(metrics, MetricRecord) else None
            if (not isinstance(num_examples, (int, float)) or isinstance(num_examples, bool)
                    or not math.isfinite(num_examples) or num_examples <= 0):
                log(WARNING, "Round %s: dropping evaluation reply from node %s: no positive '%s'",
                    server_round, node_id, NUM_EXAMPLES)
                continue
            averager.add(float(num_examples), metrics)
        return averager.record() if averager.num_clients else None

    def summary(self) -> None:
        """Log the configuration (Flower's FedAvg summary plus what this class adds)."""
        super().summary()
        log(INFO, "\t├──> %s: mode=%s, weighted=%s, seed=%d, node_wait_timeout=%.1fs",
            type(self).__name__, self.mode, self.weighted, self.seed, self.node_wait_timeout)
