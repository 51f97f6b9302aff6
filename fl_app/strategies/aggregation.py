"""Server-side aggregation: the numeric kernels (in-place weighted sums, finiteness checks and
update norms, each a single pass over a reply's bytes) and the clients' averaged metrics
(example-weighted running sums: no list of replies is held).

The server's cost is memory traffic: a CNN reply is 6.6 MB and C of them are read per round.
Everything here reads each reply once where the maths allows it, writes into preallocated
buffers, and never builds an array the size of C replies.
"""

import math
from collections.abc import Iterable, Sequence
from logging import WARNING

import numpy as np
from flwr.app import Message, MetricRecord
from flwr.common.logger import log
from scipy.linalg import blas

from fl_app.messages import CLIENT_EPSILONS, METRICS, NUM_EXAMPLES

# y += a * x in one pass (BLAS axpy). Looked up once: get_blas_funcs costs ~10 us a call,
# 8% of a 1,000-reply CNN round when called per array.
_AXPY = {np.dtype(np.float32): blas.saxpy, np.dtype(np.float64): blas.daxpy}

# Norms are summed chunk by chunk: float32 products, each chunk's sum then added in float64.
# One float32 sum over a 1.6 M-parameter update is off by ~1e-5 (measured), enough to let a
# clipped update exceed its bound; chunks of 64 K keep it near 1e-7 at BLAS speed (a float64
# pass costs 4x as much).
_CHUNK = 1 << 16


def axpy(acc: np.ndarray, weight: float, array: np.ndarray) -> None:
    """acc += weight * array in place, without a temporary where BLAS applies."""
    blas_axpy = _AXPY.get(acc.dtype)
    if blas_axpy is not None and acc.flags.c_contiguous and acc.size:
        x = array.reshape(-1)
        if x.dtype != acc.dtype:
            x = x.astype(acc.dtype)
        blas_axpy(x, acc.reshape(-1), a=weight)
    else:
        acc += weight * array


def add_all_or_nothing(total: dict[str, np.ndarray], weight: float,
                       arrays: dict[str, np.ndarray]) -> None:
    """total[k] += weight * arrays[k] for every k of `total`, or none of it: when one array
    cannot be added, those already added are subtracted again (to within rounding) and the
    error is raised, so a sum is never left holding part of a reply."""
    added = []
    try:
        for key, acc in total.items():
            axpy(acc, weight, arrays[key])
            added.append(key)
    except Exception:
        for key in added:
            axpy(total[key], -weight, arrays[key])
        raise


def all_finite(array: np.ndarray) -> bool:
    """One BLAS pass instead of a boolean array the size of the reply: NaN and Inf make the
    sum of squares non-finite. A sum that overflows (float32 values near 1e19) is confirmed
    element by element, so a huge but finite array is not mistaken for a broken one."""
    flat = array.reshape(-1)
    if flat.dtype.kind == "f" and math.isfinite(float(np.vdot(flat, flat))):
        return True
    return bool(np.all(np.isfinite(flat)))


def weighted_sum(template: dict[str, np.ndarray], arrays: Sequence[dict[str, np.ndarray]],
                 weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Σ_i weights[i] * arrays[i] in new arrays shaped and typed like `template`.

    One array name at a time, so its sum stays in cache while every reply's part is added.
    """
    out = {}
    for key, ref in template.items():
        acc = np.empty_like(ref)
        if not arrays:
            acc.fill(0)
        for i, (named, weight) in enumerate(zip(arrays, weights, strict=True)):
            if i == 0:
                np.multiply(named[key], weight, out=acc, casting="unsafe")
            else:
                axpy(acc, weight, named[key])
        out[key] = acc
    return out


def update_and_squared_norm(arrays: dict[str, np.ndarray], offset: dict[str, np.ndarray] | None,
                            scratch: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """The update `arrays - offset` (written into `scratch`; `arrays` itself when there is no
    offset) and its squared L2 norm over all arrays together.

    Each chunk is subtracted and squared while it is in cache, so a reply is read once; NaN or
    Inf anywhere gives a non-finite norm.
    """
    update = {}
    total = 0.0
    for key, array in arrays.items():
        flat = array.reshape(-1)
        if offset is None:
            out = flat
        else:
            out = scratch[key].reshape(-1)
            base = offset[key].reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            end = start + _CHUNK
            if offset is not None:
                np.subtract(flat[start:end], base[start:end], out=out[start:end])
            chunk = out[start:end]
            if chunk.dtype.kind != "f":  # an integer dot product wraps instead of growing
                chunk = chunk.astype(np.float64)
            total += float(np.dot(chunk, chunk))
        update[key] = array if offset is None else scratch[key]
    return update, total


def positive_count(value: object) -> bool:
    """Whether `value` can be a reply's num-examples: a finite number > 0 (no bool, no list)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


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
        self.total_weight = 0.0  # the replies' weights in the model's mean, summed

    def add(self, num_examples: float, metrics: MetricRecord, weight: float = 1.0) -> None:
        """Fold one client's scalar metrics in, weighted by its number of examples; `weight` is
        the client's weight in the model's mean (strategies differ in it)."""
        self.num_clients += 1
        self.num_examples += num_examples
        self.total_weight += weight
        for key, value in metrics.items():
            if key == NUM_EXAMPLES or isinstance(value, (bool, list)):
                continue
            self.sums[key] = self.sums.get(key, 0.0) + num_examples * float(value)
            self.weights[key] = self.weights.get(key, 0.0) + num_examples
            if self.running_max is not None and key in CLIENT_EPSILONS:
                self.running_max[key] = max(self.running_max.get(key, 0.0), float(value))

    def mean(self, key: str) -> float | None:
        """The example-weighted mean of metric `key` so far; None when no client reported it."""
        return self.sums[key] / self.weights[key] if self.weights.get(key) else None

    def record(self) -> MetricRecord:
        """The averages so far, plus the total num-examples and the num-clients seen."""
        averages = {key: self.sums[key] / self.weights[key] for key in self.sums}
        averages |= {f"{key}_max": value for key, value in (self.running_max or {}).items()}
        total = self.num_examples
        num_examples = int(total) if total.is_integer() else total
        return MetricRecord(
            {**averages, NUM_EXAMPLES: num_examples, "num-clients": self.num_clients}
        )


def average_evaluation(server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
    """Example-weighted mean of the clients' evaluation metrics; None if none is usable.

    An error reply, or one without a positive num-examples, is logged and left out."""
    averager = MetricAverager()
    for msg in replies:
        node_id = msg.metadata.src_node_id
        if msg.has_error():
            log(WARNING, "Round %s: evaluation error from node %s: %s",
                server_round, node_id, msg.error.reason)
            continue
        metrics = msg.content.get(METRICS) if msg.has_content() else None
        num_examples = metrics.get(NUM_EXAMPLES) if isinstance(metrics, MetricRecord) else None
        if not positive_count(num_examples):
            log(WARNING, "Round %s: dropping evaluation reply from node %s: no positive '%s'",
                server_round, node_id, NUM_EXAMPLES)
            continue
        averager.add(float(num_examples), metrics)
    return averager.record() if averager.num_clients else None
