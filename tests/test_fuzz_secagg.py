"""Fuzzing the server side of secure aggregation: seeded random malformed replies at every
stage (wrong types, dtypes, shapes, keys, counts, NaN/inf, truncated or altered bytes), mixed
with honest clients. Every bad input must end as a dropout with a logged reason, a round that
fails with one SecAggError (model unchanged: no sum is returned), or harmlessly (the sum is
still exactly the honest clients' sum); never another exception, never a wrong sum."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from flwr.app import Array, MetricRecord
from strategy_helpers import set_task_identity
from test_secagg import StageGrid, fake_clients, mean_bound, plain_weighted_mean, run_sum, trainer

from fl_app.secagg.settings import SecAggError

NUM_CASES = 216
NUM_NODES = 5


@pytest.fixture(autouse=True)
def _identity(monkeypatch):
    set_task_identity(monkeypatch)


def _garbage(rng: random.Random) -> object:
    return rng.choice([b"", b"\x00" * rng.randint(1, 200), rng.randbytes(97), "pk", 7, -1,
                       3.5, float("nan"), True, [1, 2], ["a"], [b"x"]])


def _mutate_bytes(value: bytes, rng: random.Random) -> bytes:
    kind = rng.choice(["truncate", "extend", "flip"])
    if kind == "truncate":
        return value[:rng.randint(0, max(len(value) - 1, 0))]
    if kind == "extend":
        return value + rng.randbytes(rng.randint(1, 9))
    i = rng.randrange(len(value))
    return value[:i] + bytes([value[i] ^ (1 << rng.randrange(8))]) + value[i + 1:]


def _mutate_list(value: list, rng: random.Random) -> object:
    kind = rng.choice(["drop", "repeat", "reverse", "garbage-item", "not-a-list"])
    if kind == "drop" and value:
        return value[:-1]
    if kind == "repeat" and value:
        return [*value, value[0]]
    if kind == "reverse":
        return value[::-1]
    if kind == "garbage-item" and value:
        items = list(value)
        i = rng.randrange(len(items))  # the same type: a ConfigRecord list is homogeneous
        items[i] = _mutate_bytes(items[i], rng) if isinstance(items[i], bytes) else 10**6
        return items
    return _garbage(rng)


def _mutate_record(record, rng: random.Random) -> str:
    """Change one entry of a stage's ConfigRecord; returns what was done."""
    key = rng.choice(sorted(record))
    kind = rng.choice(["delete", "garbage", "mutate"])
    if kind == "delete":
        del record[key]
    elif kind == "garbage" or not isinstance(record[key], bytes | list):
        record[key] = _garbage(rng)
    elif isinstance(record[key], bytes):
        record[key] = _mutate_bytes(record[key], rng)
    else:
        record[key] = _mutate_list(list(record[key]), rng)
    return f"{kind} {key}"


def _mutate_masked(content, rng: random.Random) -> str:
    vector = content["masked"]["vector"].numpy()
    kind = rng.choice(["float", "nan", "short", "long", "2d", "int64", "drop-record",
                       "clear-private", "clear-inf", "clear-nan"])
    if kind == "drop-record":
        del content["masked"]
    elif kind.startswith("clear-"):
        value = {"clear-private": 2.0, "clear-inf": float("inf"), "clear-nan": float("nan")}[kind]
        key = "train_loss" if kind == "clear-private" else "local_epsilon"
        content["metrics"] = MetricRecord({key: value})
    else:
        new = {"float": lambda v: v.astype(np.float32),
               "nan": lambda v: np.full(v.shape, np.nan, np.float64),
               "short": lambda v: v[:-rng.randint(1, 5)],
               "long": lambda v: np.concatenate([v, v[:3]]),
               "2d": lambda v: v[:len(v) // 2 * 2].reshape(2, -1),
               "int64": lambda v: v.astype(np.int64)}[kind](vector)
        content["masked"]["vector"] = Array(np.ascontiguousarray(new))
    return kind


def _case(seed: int) -> tuple[str, str, set[int], StageGrid]:
    rng = random.Random(seed)
    stage = rng.choice(["setup", "share-keys", "collect", "unmask"])
    bad = set(rng.sample(range(NUM_NODES), rng.choice([1, 1, 1, 2])))
    done = []

    def alter(at, nid, content):
        if at != stage or nid not in bad:
            return
        if stage == "collect" and "masked" in content and rng.random() < 0.6:
            done.append(_mutate_masked(content, rng))
        elif "secagg" in content and len(content["secagg"]):
            done.append(_mutate_record(content["secagg"], rng))

    grid = StageGrid(range(NUM_NODES), trainer(fake_clients(NUM_NODES, size=40, seed=seed)),
                     alter=alter, catch=Exception)
    grid.mutations = done
    return stage, f"seed {seed}", bad, grid


def test_random_malformed_secagg_replies_are_dropped_or_fail_the_round_cleanly(caplog):
    outcomes: Counter[str] = Counter()
    for seed in range(NUM_CASES):
        stage, name, bad, grid = _case(seed)
        clients = fake_clients(NUM_NODES, size=40, seed=seed)
        caplog.clear()
        try:
            result = run_sum(grid, range(NUM_NODES))
        except SecAggError as err:  # anything else fails the test with its traceback
            assert "\n" not in str(err) and "unchanged" in str(err), (name, err)
            outcomes["round failed cleanly"] += 1
            continue
        in_sum = sorted(set(range(NUM_NODES)) - set(result.lost))
        for key in ("w", "b"):  # the sum is exactly the honest clients' sum, never corrupted
            mean = result.update_sum[key] / result.weight
            assert np.isfinite(mean).all(), name
            error = np.abs(mean - plain_weighted_mean(clients, in_sum, key))
            assert error.max() <= mean_bound(result, clients, in_sum), (name, grid.mutations)
        dropped = bad & set(result.lost)
        for nid in dropped:  # each dropped bad reply has its reason in the log
            assert f"node {nid}" in caplog.text, (name, grid.mutations)
        outcomes["dropped with a reason" if dropped else "harmless"] += 1
    print(f"\nsecagg fuzz: {NUM_CASES} cases: {dict(outcomes)}")
    assert sum(outcomes.values()) == NUM_CASES >= 200
    assert outcomes["dropped with a reason"] > NUM_CASES / 3
