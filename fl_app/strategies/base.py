"""The base of fl_app's strategies: `SampledStrategy`.

It subclasses Flower's Message-API `FedAvg` (so its constructor arguments, `summary()` and
`start()` work as users expect) and replaces the parts this project needs to be stricter about,
each in a file of its own:

- who takes part: seeded sampling, a bounded wait for nodes, client pools (sampling.py);
- the messages a round sends (messages.py);
- whether a reply can be used (replies.py), and the screened, streaming mean of the usable
  ones (reply_averaging.py); the clients' metrics are averaged in metrics.py.

The strategy keeps the current global model itself (`self.current`), because FedSGD clients
reply with gradients and `aggregate_train` is not handed the global model. Subclasses say what a
client sends (`mode`), what the update is (`update_offset`, which the DP wrapper clips) and how
an averaged update becomes the new global model (`apply_update`).
"""

from collections.abc import Iterable, Mapping
from logging import INFO

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.grid import Grid
from flwr.serverapp.strategy import FedAvg

from fl_app.records import from_array_record, to_array_record
from fl_app.strategies.example_cap import ExampleCap
from fl_app.strategies.messages import round_messages
from fl_app.strategies.metrics import (
    CLIENT_EPSILONS,
    NUM_EXAMPLES,
    MetricAverager,
    average_evaluation,
)
from fl_app.strategies.replies import BadReply, check_reply, non_finite_array
from fl_app.strategies.reply_averaging import ReplyAveraging
from fl_app.strategies.sampling import (
    EVALUATE_STREAM,
    TRAIN_STREAM,
    ClientSampling,
    NotEnoughClientsError,
)

# Importable from here, where they were defined before the split.
__all__ = [
    "CLIENT_EPSILONS",
    "NUM_EXAMPLES",
    "BadReply",
    "MetricAverager",
    "NotEnoughClientsError",
    "SampledStrategy",
    "check_reply",
    "non_finite_array",
]


def _float_dtype(dtype: np.dtype) -> np.dtype:
    """Dtype to compute in: float32 stays float32 (half the memory), ints/float64 -> float64."""
    return np.result_type(dtype, np.float32)


class SampledStrategy(ClientSampling, ReplyAveraging, FedAvg):
    """Base of fl_app's strategies: seeded sampling, validated replies, in-place averaging.

    Parameters are Flower's `FedAvg` ones plus `node_wait_timeout` (seconds to wait for
    `min_available_nodes` before raising `NotEnoughClientsError`), `seed` (node sampling
    is a pure function of seed and round, so runs are reproducible) and
    `max_examples_per_client` (the most examples one reply counts for; None trusts each
    client's num-examples).
    """

    mode: str = "weights"
    # Weight each client's update by its num-examples (True) or count every client once.
    weighted: bool = True
    # Bounds each reply's num-examples; class-level too, so a strategy pickled in a checkpoint
    # before it existed resumes (trusting the counts, as it did).
    example_cap: ExampleCap | None = None

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
        self.node_wait_timeout = float(node_wait_timeout)
        self.seed = int(seed)
        self.example_cap = ExampleCap(max_examples_per_client)
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

    def know_client_sizes(self, per_node: Mapping[int, int], largest: int | None) -> None:
        """Bound each reply's num-examples by the examples its client really has, where the
        server knows them (simulation): `largest` for every client, `per_node` by node id."""
        if self.example_cap is None:
            self.example_cap = ExampleCap()
        self.example_cap.know_sizes(per_node, largest)

    def client_config(self) -> dict[str, int | float | str | bool]:
        """What this strategy tells every client besides the mode (none for FedAvg)."""
        return {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Strategy state a checkpoint must keep (flat, `np.savez`-able). Stateless here."""
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state_dict` returned."""

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
    # A round (aggregate_train: reply_averaging.py)
    # ----------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded) and send them the global model with mode and round."""
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
        extra = {**self.client_config(), "mode": self.mode}
        return round_messages(MessageType.TRAIN, server_round, arrays, config,
                              self.targets(chosen), extra)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes (seeded, own stream) for federated evaluation; none if fraction is 0."""
        chosen = self.sample_round(grid, server_round, EVALUATE_STREAM) or []
        return round_messages(MessageType.EVALUATE, server_round, arrays, config,
                              self.targets(chosen))

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Example-weighted mean of the clients' evaluation metrics; None if none usable."""
        return average_evaluation(server_round, replies)

    def summary(self) -> None:
        """Log the configuration (Flower's FedAvg summary plus what this class adds)."""
        super().summary()
        cap = self.example_cap
        log(INFO, "\t├──> %s: mode=%s, weighted=%s, seed=%d, node_wait_timeout=%.1fs, "
            "max_examples_per_client=%s", type(self).__name__, self.mode, self.weighted,
            self.seed, self.node_wait_timeout, None if cap is None else cap.limit)
