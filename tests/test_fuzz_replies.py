"""Fuzz: random malformed train replies, mixed with honest ones, through the server's round.

For every strategy the app offers, seeded rounds give 3 of 8 nodes a random malformed reply
(wrong dtypes, shapes, lying headers, names, counts, NaN / Inf, truncated or foreign bytes,
a pickle, missing records). Each round must end with a finite model equal to the one the
honest (and harmless) replies alone give; every reply of a `DROP` kind must be dropped with a
reason, and every `HARMLESS` one kept. Run with `-s` to see how each kind ended.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from strategy_helpers import set_task_identity
from train_round_harness import (
    ALL_STRATEGIES,
    MAX_EXAMPLES,
    NODES,
    assert_same_model,
    build_strategy,
    dropped,
    honest_arrays,
    lying_array,
    npy_bytes,
    reply_of,
    run_round,
    strategy_config,
    twin_of,
)

from fl_app.records import to_array_record

ROUNDS = 7
BAD_PER_ROUND = 3

Arrays = dict[str, np.ndarray]
UNPICKLED: list[str] = []  # what a pickle in a reply would record, were it ever loaded


class _Trap:
    def __reduce__(self):
        return (UNPICKLED.append, ("a reply's pickle was loaded",))


def _with_w(arrays: Arrays, w: Array) -> ArrayRecord:
    record = to_array_record(arrays)
    record["w"] = w
    return record


def _pickled_w(w: np.ndarray) -> Array:
    buffer = io.BytesIO()
    np.save(buffer, np.array([_Trap()] * w.size, dtype=object).reshape(w.shape),
            allow_pickle=True)
    return lying_array(w, buffer.getvalue())


def _wider(w: np.ndarray) -> np.ndarray:
    """`w` in a wider float (FedAdam's global model is float64 after its first round)."""
    return w.astype(np.float64 if w.dtype == np.float32 else np.longdouble)


# Malformed replies that must be dropped: name -> (message, honest arrays, count) -> reply.
DROP: dict[str, Callable[[Message, Arrays, int], Message]] = {
    "error reply": lambda m, a, n: Message(Error(code=0, reason="client crashed"), reply_to=m),
    "empty content": lambda m, a, n: Message(RecordDict(), reply_to=m),
    "no arrays": lambda m, a, n: Message(
        RecordDict({"metrics": MetricRecord({"num-examples": n})}), reply_to=m),
    "no metrics": lambda m, a, n: Message(
        RecordDict({"arrays": to_array_record(a)}), reply_to=m),
    "metrics as a ConfigRecord": lambda m, a, n: Message(
        RecordDict({"arrays": to_array_record(a), "metrics": ConfigRecord({"num-examples": n})}),
        reply_to=m),
    "no num-examples": lambda m, a, n: reply_of(m, a, {"train_loss": 0.1}),
    "num-examples 0": lambda m, a, n: reply_of(m, a, {"num-examples": 0}),
    "num-examples negative": lambda m, a, n: reply_of(m, a, {"num-examples": -n}),
    "num-examples NaN": lambda m, a, n: reply_of(m, a, {"num-examples": float("nan")}),
    "num-examples Inf": lambda m, a, n: reply_of(m, a, {"num-examples": float("inf")}),
    "num-examples a list": lambda m, a, n: reply_of(m, a, {"num-examples": [n, n]}),
    "metric NaN": lambda m, a, n: reply_of(m, a, {"num-examples": n, "train_loss": float("nan")}),
    "missing array": lambda m, a, n: reply_of(m, {"w": a["w"]}, {"num-examples": n}),
    "extra array": lambda m, a, n: reply_of(m, {**a, "x": a["b"]}, {"num-examples": n}),
    "renamed array": lambda m, a, n: reply_of(m, {"W": a["w"], "b": a["b"]}, {"num-examples": n}),
    "wrong shape, honest header": lambda m, a, n: reply_of(
        m, {"w": a["w"].reshape(3, 4), "b": a["b"]}, {"num-examples": n}),
    "0-d array": lambda m, a, n: reply_of(m, {"w": np.float32(1.0), "b": a["b"]},
                                          {"num-examples": n}),
    "header lies: (1,) inside": lambda m, a, n: reply_of(
        m, _with_w(a, lying_array(a["w"], np.full(1, -499999.5, a["w"].dtype))),
        {"num-examples": n}),
    "header lies: (20,) inside": lambda m, a, n: reply_of(
        m, _with_w(a, lying_array(a["w"], np.zeros(20, a["w"].dtype))), {"num-examples": n}),
    "header lies: (3, 4) inside": lambda m, a, n: reply_of(
        m, _with_w(a, lying_array(a["w"], a["w"].reshape(3, 4))), {"num-examples": n}),
    "a wider float than the model's": lambda m, a, n: reply_of(
        m, {"w": _wider(a["w"]), "b": a["b"]}, {"num-examples": n}),
    "int8 bytes": lambda m, a, n: reply_of(
        m, {"w": np.full(a["w"].shape, 100, np.int8), "b": a["b"]}, {"num-examples": n}),
    "float16 bytes": lambda m, a, n: reply_of(
        m, {"w": a["w"].astype(np.float16), "b": a["b"]}, {"num-examples": n}),
    "bool bytes": lambda m, a, n: reply_of(
        m, {"w": a["w"] > 0, "b": a["b"]}, {"num-examples": n}),
    "complex bytes": lambda m, a, n: reply_of(
        m, {"w": a["w"].astype(np.complex64), "b": a["b"]}, {"num-examples": n}),
    "object dtype (a pickle)": lambda m, a, n: reply_of(
        m, _with_w(a, _pickled_w(a["w"])), {"num-examples": n}),
    "NaN value": lambda m, a, n: reply_of(
        m, {"w": np.where(a["w"] == a["w"].flat[3], np.nan, a["w"]), "b": a["b"]},
        {"num-examples": n}),
    "Inf value": lambda m, a, n: reply_of(
        m, {"w": a["w"], "b": np.full_like(a["b"], np.inf)}, {"num-examples": n}),
    "truncated bytes": lambda m, a, n: reply_of(
        m, _with_w(a, lying_array(a["w"], npy_bytes(a["w"])[:-7])), {"num-examples": n}),
    "header only": lambda m, a, n: reply_of(
        m, _with_w(a, lying_array(a["w"], npy_bytes(a["w"])[:128])), {"num-examples": n}),
    "no bytes": lambda m, a, n: reply_of(
        m, _with_w(a, lying_array(a["w"], b"")), {"num-examples": n}),
    "garbage bytes": lambda m, a, n: reply_of(
        m, _with_w(a, lying_array(a["w"], bytes(range(256)))), {"num-examples": n}),
    "foreign stype": lambda m, a, n: reply_of(
        m, _with_w(a, Array(dtype="float32", shape=a["w"].shape, stype="torch.Tensor",
                            data=npy_bytes(a["w"]))), {"num-examples": n}),
}


def _fortran(w: np.ndarray) -> Array:
    return lying_array(w, np.asfortranarray(w))


# Odd replies that are harmless: name -> (message, arrays, count) -> (reply, what it counts as).
HARMLESS: dict[str, Callable[[Message, Arrays, int], tuple[Message, Message]]] = {
    "num-examples 1e12 (bounded)": lambda m, a, n: (
        reply_of(m, a, {"num-examples": 1e12, "train_loss": 0.5}),
        reply_of(m, a, {"num-examples": MAX_EXAMPLES, "train_loss": 0.5})),
    "extra metric": lambda m, a, n: (
        reply_of(m, a, {"num-examples": n, "train_loss": 0.5, "surprise": 3.0}),
        reply_of(m, a, {"num-examples": n, "train_loss": 0.5})),
    "extra record": lambda m, a, n: (
        Message(RecordDict({"arrays": to_array_record(a), "more": to_array_record(a),
                            "metrics": MetricRecord({"num-examples": n, "train_loss": 0.5})}),
                reply_to=m),
        reply_of(m, a, {"num-examples": n, "train_loss": 0.5})),
    "Fortran-order bytes": lambda m, a, n: (
        reply_of(m, _with_w(a, _fortran(a["w"])), {"num-examples": n, "train_loss": 0.5}),
        reply_of(m, a, {"num-examples": n, "train_loss": 0.5})),
    "declared dtype lies, bytes right": lambda m, a, n: (
        reply_of(m, _with_w(a, Array(dtype="float64", shape=a["w"].shape,
                                     stype="numpy.ndarray", data=npy_bytes(a["w"]))),
                 {"num-examples": n, "train_loss": 0.5}),
        reply_of(m, a, {"num-examples": n, "train_loss": 0.5})),
    "trailing bytes": lambda m, a, n: (
        reply_of(m, _with_w(a, lying_array(a["w"], npy_bytes(a["w"]) + bytes(16))),
                 {"num-examples": n, "train_loss": 0.5}),
        reply_of(m, a, {"num-examples": n, "train_loss": 0.5})),
}

KINDS = [*DROP, *HARMLESS]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_task_identity(monkeypatch)


def _plans(name: str) -> list[dict[int, str]]:
    """Per round, which nodes misbehave and how: random nodes (seeded per strategy), kinds
    dealt in turn from a seeded shuffle, each strategy starting where the previous stopped,
    so that together they try every kind."""
    rng = np.random.default_rng([2024, ALL_STRATEGIES.index(name)])
    kinds = [KINDS[i] for i in np.random.default_rng(2024).permutation(len(KINDS))]
    start = ALL_STRATEGIES.index(name) * ROUNDS * BAD_PER_ROUND
    plans = []
    for rnd in range(ROUNDS):
        bad = rng.choice(NODES, size=BAD_PER_ROUND, replace=False)
        plans.append({int(node): kinds[(start + rnd * BAD_PER_ROUND + i) % len(kinds)]
                      for i, node in enumerate(bad)})
    return plans


def _answers(plan: dict[int, str], rnd: int):
    """(attacked, clean) answer functions of one round: the clean one leaves out every
    dropped reply and gives each harmless one as what it should count as."""
    def arrays_and_count(message: Message) -> tuple[Arrays, int]:
        rng = np.random.default_rng([rnd, message.metadata.dst_node_id])
        return honest_arrays(message, rng), int(rng.integers(10, 100))

    def answer(message: Message, clean: bool) -> Message | None:
        arrays, n = arrays_and_count(message)
        kind = plan.get(message.metadata.dst_node_id)
        if kind is None:
            return reply_of(message, arrays, {"num-examples": n, "train_loss": 0.5})
        if kind in DROP:
            return None if clean else DROP[kind](message, arrays, n)
        attacked, counted = HARMLESS[kind](message, arrays, n)
        return counted if clean else attacked

    return (lambda m: answer(m, clean=False)), (lambda m: answer(m, clean=True))


@pytest.mark.parametrize("name", ALL_STRATEGIES)
def test_malformed_replies_are_dropped_with_a_reason_and_the_model_stays_honest(name, caplog):
    cfg = strategy_config(name)
    strategy = build_strategy(cfg)
    weights = None
    outcomes = Counter()  # how each kind of reply ended
    for rnd, plan in enumerate(_plans(name), start=1):
        attacked, clean = _answers(plan, rnd)
        twin = twin_of(cfg, strategy)
        caplog.clear()
        got = run_round(cfg, strategy, attacked, rnd, weights)
        reasons = dropped(caplog)
        want = run_round(cfg, twin, clean, rnd, weights)

        assert_same_model(got, want)
        for node, kind in plan.items():
            ended = "dropped" if node in reasons else "kept"
            outcomes[ended] += 1
            assert ended == ("dropped" if kind in DROP else "kept"), (rnd, node, kind, reasons)
            assert node not in reasons or reasons[node].strip(), kind
        assert set(reasons) <= set(plan), reasons  # no honest reply was dropped
        weights = got
    assert not UNPICKLED
    print(f"\n{name}: {sum(outcomes.values())} bad replies, {dict(outcomes)}")


def test_fuzzing_covers_every_kind_and_at_least_200_bad_replies():
    """The seeded plans above: every kind of malformed reply is tried, 200+ in all."""
    tried = Counter(kind for name in ALL_STRATEGIES for plan in _plans(name)
                    for kind in plan.values())
    assert set(tried) == set(KINDS), set(KINDS) - set(tried)
    assert sum(tried.values()) >= 200
