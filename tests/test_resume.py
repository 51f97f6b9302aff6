"""Checkpoints and resume: a run killed at any point continues to the uninterrupted run's model,
whatever its strategy."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fl_app import checkpoint
from fl_app.config import ConfigError, available, compose
from fl_app.inprocess import run

BASE = ["dataset=digits", "lr=0.1", "num_rounds=5", "seed=3"]
STRATEGIES = {
    # server momentum is strategy state
    "fedsgd": ["strategy=fedsgd", "strategy.server_lr=0.5"],
    # clip norm, accountant and the noise generator are strategy state
    "dp_fedavg_adaptive": ["strategy=dp_fedavg_adaptive", "strategy.noise_seed=7",
                           "strategy.noise_multiplier=0.3", "fraction_train=0.6"],
}
# A process that is SIGKILLed by a checkpoint.save wrapper: after round KILL's checkpoint is
# written, or just before it is (its metrics row is then on disk without a checkpoint).
KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    from fl_app import checkpoint
    from fl_app.inprocess import run

    save, kill_round, when = checkpoint.save, int(sys.argv[1]), sys.argv[2]

    def save_then_die(folder, ckpt, keep_all=False):
        if ckpt.round == kill_round and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        save(folder, ckpt, keep_all)
        if ckpt.round == kill_round:
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint.save = save_then_die
    run(sys.argv[3:], num_clients=5)
""")


def _rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _kill_during_run(overrides, kill_round, when):
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, str(kill_round), when, *overrides],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.mark.parametrize("when", ["after", "before"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_a_run_killed_mid_way_resumes_to_the_uninterrupted_runs_model(tmp_path, strategy, when):
    torch.set_num_threads(1)  # the killed process uses one thread too: same float sums
    overrides = [*BASE, *STRATEGIES[strategy]]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run([*overrides, f"output_dir={whole}"], num_clients=5)

    _kill_during_run([*overrides, f"output_dir={killed}"], kill_round=3, when=when)
    assert not (killed / "summary.json").exists()
    assert [r["round"] for r in _rows(killed)] == [1, 2, 3]

    summary = run([*overrides, f"resume={killed}"], num_clients=5)
    assert summary["rounds"] == 5
    assert [r["round"] for r in _rows(killed)] == [1, 2, 3, 4, 5]
    for a, b in zip(_rows(whole), _rows(killed), strict=True):
        assert a["test_accuracy"] == b["test_accuracy"] and a["test_loss"] == b["test_loss"]
        assert a.get("train_epsilon") == b.get("train_epsilon")
    expected, got = torch.load(whole / "model.pt"), torch.load(killed / "model.pt")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def _exact_overrides(strategy: str) -> list[str]:
    """`strategy` on a small, fast run; a DP strategy with a noise_seed, so that its noise, too,
    is a function of the config (a resumed run is reseeded from it: privacy/noise.py)."""
    overrides = ["dataset=digits", "model=logreg", "lr=0.1", "seed=3", f"strategy={strategy}"]
    if "noise_seed" in compose([f"strategy={strategy}"]).strategy:
        overrides += ["strategy.noise_seed=7", "fraction_train=0.6"]
    return overrides


def _checkpointed_state(folder):
    ckpt = checkpoint.load(folder)
    return ckpt.weights, ckpt.strategy_state


def _assert_same_tree(a: object, b: object, where: str = "state") -> None:
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), where
        for key in a:
            _assert_same_tree(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, where


@pytest.mark.parametrize("strategy", available("strategy"))
def test_every_strategy_resumed_from_its_checkpoint_ends_as_the_uninterrupted_run(
        tmp_path, strategy):
    torch.set_num_threads(1)
    overrides = _exact_overrides(strategy)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    run([*overrides, "num_rounds=4", f"output_dir={whole}"], num_clients=5)
    run([*overrides, "num_rounds=2", f"output_dir={resumed}"], num_clients=5)
    # The checkpoint of round 2 is data: arrays and JSON, nothing pickled.
    assert not list(resumed.rglob("*.pkl"))
    run([*overrides, "num_rounds=4", f"resume={resumed}"], num_clients=5)

    for a, b in zip(_rows(whole), _rows(resumed), strict=True):
        assert a["test_accuracy"] == b["test_accuracy"] and a["test_loss"] == b["test_loss"]
        assert a.get("train_epsilon") == b.get("train_epsilon")
    expected, got = torch.load(whole / "model.pt"), torch.load(resumed / "model.pt")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    # The strategy's state after round 4 (momentum, moments, clip norm, ...) is the same too.
    (weights_a, state_a), (weights_b, state_b) = map(_checkpointed_state, (whole, resumed))
    _assert_same_tree(weights_a, weights_b, "model")
    _assert_same_tree(state_a, state_b)


def test_resuming_a_finished_run_with_more_rounds_trains_on(tmp_path):
    run([*BASE, "num_rounds=2", f"output_dir={tmp_path}"], num_clients=5)
    summary = run([*BASE, "num_rounds=4", f"resume={tmp_path}"], num_clients=5)
    assert summary["rounds"] == 4 and [r["round"] for r in _rows(tmp_path)] == [1, 2, 3, 4]


def test_resume_refuses_a_config_that_changes_the_result(tmp_path):
    run([*BASE, "num_rounds=1", f"output_dir={tmp_path}"], num_clients=5)
    with pytest.raises(ConfigError, match="lr: run 0.1 vs now 0.2"):
        run([*BASE, "lr=0.2", f"resume={tmp_path}"], num_clients=5)


def test_resume_without_a_checkpoint_says_what_resume_takes(tmp_path):
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(ConfigError, match="checkpoint.json"):
        run([*BASE, f"resume={tmp_path}"], num_clients=5)


def test_resume_refuses_client_side_privacy(tmp_path):
    with pytest.raises(ConfigError, match="client-side privacy"):
        run([*BASE, "privacy=local", f"resume={tmp_path}"], num_clients=5)


def test_every_round_is_checkpointed_when_asked(tmp_path):
    run([*BASE, "num_rounds=3", "checkpoints=all", f"output_dir={tmp_path}"], num_clients=5)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["round_0001.npz", "round_0002.npz", "round_0003.npz"]
    assert json.loads((tmp_path / "checkpoint.json").read_text())["arrays"] == (
        "checkpoints/round_0003.npz")


def test_metrics_rows_hold_time_and_traffic_of_every_round(tmp_path):
    summary = run([*BASE, "num_rounds=3", "fraction_evaluate=0.4", f"output_dir={tmp_path}"],
                  num_clients=5)
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [1, 2, 3]
    model_bytes = sum(np.asarray(v).nbytes for v in torch.load(tmp_path / "model.pt").values())
    for row in rows:
        # 5 train messages and replies, then 2 evaluation messages carrying the model
        assert model_bytes * 7 <= row["bytes_sent"] < model_bytes * 7 * 1.01
        assert model_bytes * 5 <= row["bytes_received"] < model_bytes * 5 * 1.01
        assert row["seconds"] > 0 and "client_accuracy" in row
    assert summary["bytes_sent"] == sum(r["bytes_sent"] for r in rows)
