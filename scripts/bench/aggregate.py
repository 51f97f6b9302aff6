"""Item 2: each strategy's aggregate_train on C = 10, 100, 1,000 CNN replies, against a NumPy
weighted average of the same arrays, and the extra memory it takes as C grows.

The replies are handed over as a list of Flower Messages, as Flower's grids return them. They
share K pre-serialised payloads (building 1,000 distinct 6.6 MB replies would take 6.6 GB), but
every aggregate still reads every reply from Flower's bytes, as it does on a server, and none
of them can tell that two replies share bytes. The list is built before the clock starts and
before memory tracing starts: the replies are the grid's memory, not the strategy's. Extra
memory is the peak of traced allocations (numpy's buffers and Python's objects) during the call.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Callable

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
from fl_app.messages import ARRAYS, CONFIG, METRICS, NUM_EXAMPLES, TRAIN_LOSS

K = 4  # distinct reply payloads, reused cyclically
TARGET_RATIO = 1.2
FLOWER = "FedAvg (Flower built-in)"  # timed as plain Flower's figure; its memory is C x a model


def cnn_arrays() -> dict[str, np.ndarray]:
    import torch

    from fl_app.models import CNN, get_weights

    torch.manual_seed(0)
    return get_weights(CNN([1, 28, 28], 10))


def _identity() -> None:
    # A ServerApp process gets its identity from the SuperLink; Messages cannot be built without.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class Replies:
    """C train replies as Flower Messages, built from K distinct payloads: trained weights, or
    with `deltas=True` their differences from `current` (what DP-FedAvg's clients send)."""

    def __init__(self, current: dict[str, np.ndarray], deltas: bool = False) -> None:
        rng = np.random.default_rng(0)
        self.decoded = [{k: (v + 0.01 * rng.standard_normal(v.shape)).astype(v.dtype)
                         for k, v in current.items()} for _ in range(K)]
        if deltas:
            self.decoded = [{k: v - current[k] for k, v in d.items()} for d in self.decoded]
        self.payloads = [{k: Array(v) for k, v in d.items()} for d in self.decoded]

    @staticmethod
    def num_examples(i: int) -> int:
        return 150 + (i * 37) % 100  # unequal weights

    def __call__(self, c: int) -> list[Message]:
        return [self.reply(i) for i in range(c)]

    def reply(self, i: int) -> Message:
        instruction = Message(RecordDict({CONFIG: ConfigRecord()}), dst_node_id=i + 1,
                              message_type=MessageType.TRAIN)
        return Message(RecordDict({
            ARRAYS: ArrayRecord(self.payloads[i % K]),
            METRICS: MetricRecord({NUM_EXAMPLES: self.num_examples(i), TRAIN_LOSS: 0.5}),
        }), reply_to=instruction)


def numpy_average(replies: Replies, c: int) -> dict[str, np.ndarray]:
    """The reference: W = Σ n_i W_i / Σ n_i, accumulated in place over the same arrays
    (one scratch buffer per array, so nothing grows with C)."""
    template = replies.decoded[0]
    acc = {k: np.zeros_like(v) for k, v in template.items()}
    scratch = {k: np.empty_like(v) for k, v in template.items()}
    total = 0.0
    for i in range(c):
        n = replies.num_examples(i)
        arrays = replies.decoded[i % K]
        for k, a in acc.items():
            np.multiply(arrays[k], n, out=scratch[k])
            a += scratch[k]
        total += n
    for a in acc.values():
        a /= total
    return acc


def numpy_dp_sum(replies: Replies, c: int, current: dict[str, np.ndarray],
                 offset: bool, clip: float = 1.0) -> dict[str, np.ndarray]:
    """The DP reference, as one writes it in NumPy: each update (W_i - W, or the reply itself
    for gradients), its norm, min(1, C / norm) times it added to the sum (noise excluded)."""
    acc = {k: np.zeros_like(v) for k, v in current.items()}
    for i in range(c):
        arrays = replies.decoded[i % K]
        update = {k: a - current[k] for k, a in arrays.items()} if offset else arrays
        norm = float(np.sqrt(sum(np.vdot(u, u) for u in update.values())))
        scale = min(1.0, clip / max(norm, 1e-12))
        for k, a in acc.items():
            a += scale * update[k]
    return acc


class _Nodes:
    """Just enough of a Grid for configure_train: C connected nodes."""

    def __init__(self, c: int) -> None:
        self.ids = list(range(1, c + 1))

    def get_node_ids(self) -> list[int]:
        return self.ids


def strategies(current: dict[str, np.ndarray], c: int) -> dict[str, Callable]:
    """name -> factory of a strategy ready to aggregate C replies: configure_train has run, as
    on a server (that is where DPNoise draws the round's noise, while the clients train)."""
    from flwr.serverapp.strategy import FedAvg

    from fl_app.privacy.central import DPNoise
    from fl_app.records import to_array_record
    from fl_app.strategies import GradientAveraging, WeightedFedAvg

    record = to_array_record(current)
    nodes = max(c, 2)

    def ready(strategy):
        strategy.configure_train(1, record, ConfigRecord(), _Nodes(nodes))
        return strategy

    def dp(inner):
        return DPNoise(inner, clip_norm=1.0, noise_multiplier=0.3, num_clients=nodes,
                       noise_seed=0)

    return {
        "WeightedFedAvg (fl_app)": lambda: ready(WeightedFedAvg(min_available_nodes=1)),
        "GradientAveraging (fl_app)": lambda: ready(GradientAveraging(server_lr=0.1)),
        "DPNoise around WeightedFedAvg (fl_app)": lambda: ready(dp(WeightedFedAvg())),
        "DPNoise around GradientAveraging (fl_app)": lambda: ready(
            dp(GradientAveraging(server_lr=0.1))),
        FLOWER: lambda: FedAvg(),
    }


def _timed(fn: Callable[[], object]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
# Keyed by whether the server must form each update from a reply of weights (W_i - W).
DP_REFERENCE = {True: "NumPy DP sum of weight replies: delta, norm, clip, add",
                False: "NumPy DP sum of update replies (deltas, gradients): norm, clip, add"}
NOISE = "DP noise draw (N(0, σ²) for every parameter, once a round)"


def _reply_mode(strategy) -> str:
    """What the strategy's clients send ("weights", "delta", "gradient"; Flower's: weights)."""
    return getattr(getattr(strategy, "inner", strategy), "mode", "weights")


def _measure_size(c: int, current: dict[str, np.ndarray], replies: Replies, deltas: Replies,
                  res: dict) -> None:
    """Time (and trace the memory of) every variant on C replies; results into `res`.

    Each repeat times the reference and then every variant once, and the best of the repeats
    is kept: this VM's speed drifts by a third within minutes, and interleaving lets the drift
    hit the reference and the variants alike instead of one block of repeats each.
    """
    repeat = max(3, 100 // c)
    by_mode = {"weights": replies(c), "delta": deltas(c)}
    made = strategies(current, c)
    numpy_variants = {REFERENCE: lambda: numpy_average(replies, c)}
    for offset, name in DP_REFERENCE.items():
        numpy_variants[name] = lambda o=offset: numpy_dp_sum(replies, c, current, o)
    modes = {name: _reply_mode(make()) for name, make in made.items()}
    inputs = {name: by_mode.get(mode, by_mode["weights"]) for name, mode in modes.items()}
    best = dict.fromkeys([*numpy_variants, *made], float("inf"))
    for _ in range(repeat):
        for name, fn in numpy_variants.items():
            best[name] = min(best[name], _timed(fn))
        for name, make in made.items():
            strategy = make()
            best[name] = min(best[name], _timed(lambda s=strategy, m=inputs[name]:
                                                 s.aggregate_train(1, m)))
    base = best[REFERENCE]
    for name, seconds in best.items():
        res.setdefault(name, {})[c] = {"seconds": seconds, "ratio": seconds / base}
    for name, make in made.items():
        entry = res[name][c]
        entry["clients_send"] = modes[name]
        if "DPNoise" in name:  # also against the NumPy code of the same DP maths
            own = best[DP_REFERENCE[modes[name] == "weights"]]
            entry["ratio_to_dp_reference"] = best[name] / own
        if name == FLOWER:
            continue  # it decodes every reply (C x the model); the page reports fl_app's only
        strategy = make()
        entry["peak_extra_bytes"] = _peak_extra(
            lambda s=strategy, m=inputs[name]: s.aggregate_train(1, m))


def run(sizes: tuple[int, ...] = (10, 100, 1000)) -> Part:
    import logging

    from flwr.common.logger import FLOWER_LOGGER
    FLOWER_LOGGER.setLevel(logging.WARNING)  # one INFO line per DP round otherwise
    _identity()
    current = cnn_arrays()
    model_bytes = sum(v.nbytes for v in current.values())
    replies, deltas = Replies(current), Replies(current, deltas=True)
    part = Part(data={"model_parameters": int(sum(v.size for v in current.values())),
                      "model_bytes": model_bytes, "sizes": list(sizes), "results": {}})
    res = part.data["results"]
    rng = np.random.default_rng(0)
    noise = min(_timed(lambda: [rng.normal(0.0, 0.3, size=v.shape) for v in current.values()])
                for _ in range(3))
    res[NOISE] = {"seconds": noise}

    for c in sizes:
        _measure_size(c, current, replies, deltas, res)
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
    modes = {name: res[name][sizes[0]]["clients_send"] for name in strategies(current, 2)}
    for offset, dp_name in DP_REFERENCE.items():
        part.rows.append(Row(f"  {dp_name} / reference: the floor of DP written in NumPy",
                             ratio_text(dp_name)))
        for name, mode in modes.items():
            if "DPNoise" not in name or (mode == "weights") != offset:
                continue
            own = [res[name][c]["ratio_to_dp_reference"] for c in sizes]
            ok = max(own) <= TARGET_RATIO
            part.rows.append(Row(f"    {name} (clients send: {mode}) / this DP reference",
                                 " / ".join(f"{r:.2f}×" for r in own) + verdict(ok),
                                 f"≤ {TARGET_RATIO}×", ok=ok))
    for name in strategies(current, 2):
        if name == FLOWER:
            continue
        mem = [res[name][c]["peak_extra_bytes"] for c in sizes]
        flat = max(mem) <= 1.5 * min(mem) + 8 * 2**20
        part.rows.append(Row(f"  extra memory of aggregate_train, {name}",
                             " / ".join(fmt_mb(m) for m in mem) + verdict(flat),
                             "independent of C", ok=flat))
    part.rows.append(Row(f"  {NOISE}: DPNoise draws it in configure_train, while the clients "
                         "train, so it is not in the DP figures above", f"{noise * 1e3:.0f} ms"))
    return part
