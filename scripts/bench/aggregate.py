"""Item 2: each strategy's aggregate_train on C = 10, 100, 1,000 CNN replies, against a NumPy
weighted average of the same arrays, and the extra memory it takes as C grows.

The replies are Flower Messages built on the fly by a generator, so the benchmark never holds C
of them. For timing they share K pre-serialised reply payloads (building a Message is then
cheap, and the time spent building them is measured and subtracted); every aggregate still
decodes every reply's arrays from Flower's bytes, as it does on a server. For memory every
Message gets its own copy of the bytes, as replies arriving over the network do, and the peak
of traced allocations (tracemalloc: numpy's buffers and Python's objects) above what was
allocated before the call is the extra memory.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from bench.common import Part, Row, fmt_mb, verdict

K = 4  # distinct reply payloads, reused cyclically
TARGET_RATIO = 1.2


def cnn_arrays() -> dict[str, np.ndarray]:
    import torch

    from fl_app.models import CNN, get_weights

    torch.manual_seed(0)
    return get_weights(CNN([1, 28, 28], 10))


def _identity() -> None:
    # A ServerApp process gets its identity from the SuperLink; Messages cannot be built without.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class Replies:
    """A factory of C train replies (a generator), timing its own work."""

    def __init__(self, current: dict[str, np.ndarray], own_bytes: bool) -> None:
        rng = np.random.default_rng(0)
        self.decoded = [{k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
                         for k, v in current.items()} for _ in range(K)]
        self.payloads = [{k: Array(v) for k, v in d.items()} for d in self.decoded]
        self.own_bytes = own_bytes
        self.build_seconds = 0.0

    @staticmethod
    def num_examples(i: int) -> int:
        return 150 + (i * 37) % 100  # unequal weights

    def __call__(self, c: int) -> Iterator[Message]:
        self.build_seconds = 0.0
        for i in range(c):
            t0 = time.perf_counter()
            payload = self.payloads[i % K]
            if self.own_bytes:
                payload = {k: Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype,
                                    data=bytes(bytearray(a.data)))
                           for k, a in payload.items()}
            instruction = Message(RecordDict({"config": ConfigRecord()}), dst_node_id=i + 1,
                                  message_type=MessageType.TRAIN)
            msg = Message(RecordDict({
                "arrays": ArrayRecord(payload),
                "metrics": MetricRecord({"num-examples": self.num_examples(i),
                                         "train_loss": 0.5}),
            }), reply_to=instruction)
            self.build_seconds += time.perf_counter() - t0
            yield msg


def numpy_average(replies: Replies, c: int, decode: bool = False) -> dict[str, np.ndarray]:
    """The reference: W = Σ n_i W_i / Σ n_i, accumulated in place over the same arrays
    (one scratch buffer per array, so nothing grows with C). `decode=True` also decodes each
    reply from Flower's bytes (Array.numpy()) first, to split the strategies' cost."""
    template = replies.decoded[0]
    acc = {k: np.zeros_like(v) for k, v in template.items()}
    scratch = {k: np.empty_like(v) for k, v in template.items()}
    total = 0.0
    for i in range(c):
        n = replies.num_examples(i)
        if decode:
            arrays = {k: a.numpy() for k, a in replies.payloads[i % K].items()}
        else:
            arrays = replies.decoded[i % K]
        for k, a in acc.items():
            np.multiply(arrays[k], n, out=scratch[k])
            a += scratch[k]
        total += n
    for a in acc.values():
        a /= total
    return acc


# ------------------------------------------------------------------------------------------
# A prototype of the proposed change, measured on the same Messages (see the report): decode
# each Array without copying (np.frombuffer on Flower's bytes; .npy headers parsed once per
# distinct header), check finiteness with one BLAS dot product, accumulate with BLAS axpy
# (y += a*x in one pass, no temporary).
# ------------------------------------------------------------------------------------------

_HEADERS: dict[bytes, tuple] = {}


def zero_copy(array: Array) -> np.ndarray:
    """The ndarray a Flower `Array` holds, as a read-only view of its bytes (no copy)."""
    data = array.data
    size_bytes = 2 if data[6] == 1 else 4  # .npy v1: 2-byte header length; v2/v3: 4
    start = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    key = bytes(data[:start])
    meta = _HEADERS.get(key)
    if meta is None:
        import io

        fmt = np.lib.format
        bio = io.BytesIO(key)
        version = fmt.read_magic(bio)
        read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        meta = _HEADERS[key] = read(bio)
    shape, fortran, dtype = meta
    if fortran or dtype.hasobject:
        return array.numpy()
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=start).reshape(shape)


def _axpy(x: np.ndarray, y: np.ndarray, a: float) -> None:
    """y += a * x in place (flat, same dtype)."""
    from scipy.linalg import blas

    blas.get_blas_funcs("axpy", (y,))(x.reshape(-1), y, a=a)


def prototype_fedavg(current: dict[str, np.ndarray], replies) -> dict[str, np.ndarray]:
    acc = {k: np.zeros(v.size, dtype=v.dtype) for k, v in current.items()}
    total = 0.0
    for msg in replies:
        n = float(msg.content["metrics"]["num-examples"])
        record = msg.content["arrays"]
        if set(record) != set(current):
            continue
        arrays = {k: zero_copy(a) for k, a in record.items()}
        if any(arrays[k].shape != v.shape for k, v in current.items()):
            continue
        sq = sum(float(np.vdot(a.reshape(-1), a.reshape(-1))) for a in arrays.values())
        if not np.isfinite(sq):
            continue
        for k, a in acc.items():
            _axpy(arrays[k], a, n)
        total += n
    return {k: (a / total).reshape(current[k].shape) for k, a in acc.items()}


def prototype_dp(current: dict[str, np.ndarray], replies, clip: float = 1.0,
                 std: float = 0.3, m: float = 10.0, chunk: int = 1 << 16,
                 noise: bool = True) -> dict[str, np.ndarray]:
    """Clip each delta W_i - W to `clip`, sum, add N(0, std²) noise, divide by m; the delta's
    norm is taken chunk by chunk in a cache-sized buffer and never materialised whole."""
    flat = {k: v.reshape(-1) for k, v in current.items()}
    total = {k: np.zeros(v.size, dtype=v.dtype) for k, v in current.items()}
    buf = np.empty(chunk, dtype=np.float32)
    scale_sum = 0.0
    for msg in replies:
        arrays = {k: zero_copy(a).reshape(-1) for k, a in msg.content["arrays"].items()}
        sq = 0.0
        for k, c in flat.items():
            x = arrays[k]
            for s in range(0, c.size, chunk):
                d = buf[:min(chunk, c.size - s)]
                np.subtract(x[s:s + chunk], c[s:s + chunk], out=d)
                sq += float(np.vdot(d, d))
        if not np.isfinite(sq):
            continue
        scale = min(1.0, clip / max(np.sqrt(sq), 1e-12))
        for k, t in total.items():
            _axpy(arrays[k], t, scale)
        scale_sum += scale
    rng = np.random.default_rng(0)
    for k, t in total.items():
        _axpy(flat[k], t, -scale_sum)  # sum of scale_i * (W_i - W)
        if noise:
            z = rng.standard_normal(t.size, dtype=t.dtype)
            _axpy(z, t, std)
        t /= m
    return {k: (flat[k] + t).reshape(current[k].shape) for k, t in total.items()}




def strategies(current: dict[str, np.ndarray], c: int) -> dict[str, Callable]:
    """name -> factory of a ready strategy (its global model set) for C replies."""
    from flwr.serverapp.strategy import FedAvg

    from fl_app.records import to_array_record
    from fl_app.strategies import DPNoise, GradientAveraging, WeightedFedAvg

    record = to_array_record(current)

    def fedavg():
        s = WeightedFedAvg()
        s.set_current(record)
        return s

    def fedsgd():
        s = GradientAveraging(server_lr=0.1)
        s.set_current(record)
        return s

    def dp():
        inner = WeightedFedAvg()
        s = DPNoise(inner, clip_norm=1.0, noise_multiplier=0.3, num_clients=max(c, 2),
                    noise_seed=0)
        inner.set_current(record)
        return s

    return {
        "WeightedFedAvg (fl_app)": fedavg,
        "GradientAveraging (fl_app)": fedsgd,
        "DPNoise around WeightedFedAvg (fl_app)": dp,
        "FedAvg (Flower built-in)": lambda: FedAvg(),
    }


def _timed(fn: Callable[[], object], replies: Replies | None = None) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0 - (replies.build_seconds if replies else 0.0)


def _peak_extra(fn: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        tracemalloc.stop()
    return peak - before


REFERENCE = "NumPy weighted average (reference)"
DECODING = "NumPy weighted average + Flower's Array.numpy() decoding"
PROTO_AVG = "prototype: zero-copy decode + BLAS axpy + dot-product check"
PROTO_DP = "prototype DP: the same, delta norm in cache-sized chunks"
NOISE = "DP noise draw alone (N(0, σ²) for every parameter, once a round)"


def _measure_size(c: int, current: dict[str, np.ndarray], shared: Replies, owned: Replies,
                  res: dict, flower_memory_max: int) -> None:
    """Time (and trace the memory of) every variant on C replies; results into `res`."""
    repeat = max(1, 100 // c)  # small C: the best of several
    base = min(_timed(lambda: numpy_average(shared, c)) for _ in range(repeat))
    res.setdefault(REFERENCE, {})[c] = {"seconds": base}
    variants = {
        DECODING: lambda: numpy_average(shared, c, decode=True),
        PROTO_AVG: lambda: prototype_fedavg(current, shared(c)),
        PROTO_DP: lambda: prototype_dp(current, shared(c), m=c),
    }
    for name, fn in variants.items():
        t = min(_timed(fn, shared if name != DECODING else None) for _ in range(repeat))
        res.setdefault(name, {})[c] = {"seconds": t, "ratio": t / base}
    res[PROTO_AVG][c]["peak_extra_bytes"] = _peak_extra(
        lambda: prototype_fedavg(current, owned(c)))
    for name, make in strategies(current, c).items():
        def call(make=make):
            return make().aggregate_train(1, shared(c))
        t = min(_timed(call, shared) for _ in range(repeat))
        entry = res.setdefault(name, {}).setdefault(c, {})
        entry.update(seconds=t, ratio=t / base)
        if "Flower" in name and c > flower_memory_max:
            entry["peak_extra_bytes"] = None  # it holds every reply: C x the model
            continue
        strategy = make()
        entry["peak_extra_bytes"] = _peak_extra(
            lambda s=strategy: s.aggregate_train(1, owned(c)))


def run(sizes: tuple[int, ...] = (10, 100, 1000), flower_memory_max: int = 100) -> Part:
    import logging

    from flwr.common.logger import FLOWER_LOGGER
    FLOWER_LOGGER.setLevel(logging.WARNING)  # one INFO line per DP round otherwise
    _identity()
    current = cnn_arrays()
    model_bytes = sum(v.nbytes for v in current.values())
    shared, owned = Replies(current, own_bytes=False), Replies(current, own_bytes=True)
    part = Part(data={"model_parameters": int(sum(v.size for v in current.values())),
                      "model_bytes": model_bytes, "sizes": list(sizes), "results": {}})
    res = part.data["results"]
    rng = np.random.default_rng(0)
    noise = min(_timed(lambda: [rng.normal(0.0, 0.3, size=v.shape) for v in current.values()])
                for _ in range(3))
    res[NOISE] = {"seconds": noise}

    for c in sizes:
        _measure_size(c, current, shared, owned, res, flower_memory_max)
        print(f"  aggregate C={c}: reference {res[REFERENCE][c]['seconds'] * 1e3:.0f} ms",
              flush=True)

    c_text = ", ".join(f"{c:,}" for c in sizes)

    def ratios(name: str) -> list[float]:
        return [res[name][c]["ratio"] for c in sizes]

    def ratio_text(name: str) -> str:
        return " / ".join(f"{r:.2f}×" for r in ratios(name))

    ref = res[REFERENCE]
    part.rows.append(Row(f"Aggregation of C = {c_text} CNN replies ({fmt_mb(model_bytes)} each): "
                         "NumPy in-place weighted average (the reference)",
                         " / ".join(f"{ref[c]['seconds'] * 1e3:,.0f} ms" for c in sizes)))
    for name in strategies(current, 2):
        ok = max(ratios(name)) <= TARGET_RATIO
        part.rows.append(Row(f"  aggregate_train / reference, {name}",
                             ratio_text(name) + verdict(ok), f"≤ {TARGET_RATIO}×", ok=ok))
    for name in strategies(current, 2):
        mem = [res[name][c].get("peak_extra_bytes") for c in sizes]
        flower = "Flower" in name
        flat = None if flower else max(mem) <= 1.5 * min(mem) + 8 * 2**20
        text = " / ".join(fmt_mb(m) if m is not None else f"≈{fmt_mb(c * model_bytes)} (not run)"
                          for m, c in zip(mem, sizes, strict=True))
        part.rows.append(Row(f"  extra memory of aggregate_train, {name}",
                             text + verdict(flat), "independent of C", ok=flat))
    part.rows.append(Row(f"  where the time goes: {DECODING}", ratio_text(DECODING)))
    part.rows.append(Row(f"  {NOISE}", f"{noise * 1e3:.0f} ms"))
    part.rows.append(Row(f"  {PROTO_AVG} (proposed for the fl_app strategies)",
                         ratio_text(PROTO_AVG) + verdict(max(ratios(PROTO_AVG)) <= TARGET_RATIO),
                         f"≤ {TARGET_RATIO}×"))
    part.rows.append(Row(f"  {PROTO_DP}, incl. noise", ratio_text(PROTO_DP)))
    return part
