"""Reply checks: whether a client's train reply can be averaged against the global model.

Anything a client sends (an error, no arrays, NaN, a wrong shape, dtype or name, bytes that
do not hold what their Array header declares, a bad num-examples) is turned into a `BadReply`
that says why, so the strategy drops that reply and the round goes on.
"""

import math
from collections.abc import Mapping
from logging import WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from fl_app.messages import ARRAYS, METRICS, NUM_EXAMPLES
from fl_app.records import array_view
from fl_app.strategies.aggregation import all_finite, positive_count

# The dtype kinds a reply's arrays may have: signed and unsigned integers, floats (real numbers:
# no bool, complex, datetime or object).
_REAL_KINDS = frozenset("iuf")


class BadReply(ValueError):
    """A client reply that cannot be aggregated; the message is the reason."""


def check_reply(msg: Message, reference: dict[str, np.ndarray], check_values: bool = True,
                dtypes: Mapping[str, np.dtype] | None = None
                ) -> tuple[dict[str, np.ndarray], float, MetricRecord]:
    """(arrays, num_examples, metrics) of a train reply that can be aggregated against the
    global model `reference`: the same names, and arrays whose bytes decode to the global
    model's shapes and dtypes (`dtypes`, what the model was sent in; default the reference's
    own; see `_same_dtype`). Raise BadReply saying why otherwise.

    `check_values=False` skips the pass over the values (NaN / Inf) for a caller that finds
    them another way: in the sum of all replies, or in the reply's norm."""
    if msg.has_error():
        raise BadReply(f"error reply: {msg.error.reason}")
    if not msg.has_content():
        raise BadReply("reply has no content")
    record = msg.content.get(ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise BadReply("no 'arrays' ArrayRecord")
    metrics = msg.content.get(METRICS)
    if not isinstance(metrics, MetricRecord):
        raise BadReply("no 'metrics' MetricRecord")
    if NUM_EXAMPLES not in metrics:
        raise BadReply(f"metrics lack '{NUM_EXAMPLES}'")
    num_examples = metrics[NUM_EXAMPLES]
    if not positive_count(num_examples):
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
    arrays = {key: _decoded(key, array, reference[key].shape,
                            (dtypes or {}).get(key, reference[key].dtype))
              for key, array in record.items()}
    if check_values:
        bad = non_finite_array(arrays)
        if bad is not None:
            raise BadReply(f"'{bad}' contains NaN or Inf")
    return arrays, float(num_examples), metrics


def _decoded(key: str, array: Array, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The ndarray in `array`'s bytes (a read-only view: replies are never copied), checked
    against the global model's `shape` and `dtype`. The bytes carry a header of their own,
    which is what numpy decodes: the Array's declared shape and dtype may lie about it."""
    try:
        value = array_view(array)
    except Exception as exc:  # noqa: BLE001 - any undecodable bytes are the client's fault
        raise BadReply(f"'{key}' cannot be decoded ({type(exc).__name__}: {exc})") from None
    if value.dtype.kind not in _REAL_KINDS:
        raise BadReply(f"'{key}' has non-numeric dtype {value.dtype}")
    if value.shape != shape or not _same_dtype(value.dtype, np.dtype(dtype)):
        raise BadReply(
            f"'{key}' holds a {value.dtype} array of shape {value.shape} (declared "
            f"{array.dtype} {tuple(array.shape)}); the global model's is {np.dtype(dtype)} "
            f"{shape}: the client must send arrays of the model's shape, in its dtype"
        )
    return value


def _same_dtype(sent: np.dtype, model: np.dtype) -> bool:
    """Whether a reply in `sent` fits a global model in `model`: the same dtype, or float32
    for a float64 model (Flower's adaptive strategies keep the global model in float64 while
    clients train in float32). Nothing narrower: int8 or float16 sums wrap or overflow where
    the model's dtype would not (and an int8 norm, wrapped, would slip past DP clipping)."""
    return sent == model or (sent == np.float32 and model == np.float64)


def non_finite_array(arrays: dict[str, np.ndarray]) -> str | None:
    """The name of the first array holding NaN or Inf; None if all values are finite."""
    return next((key for key, array in arrays.items() if not all_finite(array)), None)


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
