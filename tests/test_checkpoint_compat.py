"""Checkpoints written before fl_app/strategies was split, as pickles, still resume: through
the one-off converter (`python -m fl_app.convert_pickle_checkpoint FOLDER`), which reads them
without importing fl_app's classes and writes today's format (checkpoint.json + npz).

An old checkpoint pickles the strategy object, its classes named by module path (e.g.
`fl_app.strategies.dp.DPNoise`) and its attributes by name. The fixtures under
`tests/fixtures/checkpoints/` were written by main at 64d7ece (see the README there), two rounds
each; `expected_state.npz` holds, from that same code, the strategy state each checkpoint
carries, and `expected_rounds.json` the metrics of rounds 3 and 4 when it was resumed there.

The DP fixture's checkpoint holds its noise generator, which the converter drops (issue 22,
item 10: whoever reads a checkpoint must not be able to regenerate the noise): its resumed
rounds draw other noise than the old code's, so only their privacy accounting is compared
exactly, not their loss.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_app import checkpoint, server_loop
from fl_app.cli import _resumed_run
from fl_app.config import ConfigError, overrides_from_run_config
from fl_app.convert_pickle_checkpoint import convert
from fl_app.inprocess import run
from fl_app.privacy.accounting import epsilon_spent

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
NAMES = ("dp_fedavg_adaptive", "fedadam", "fedavg", "fedsgd_momentum")
FL_APP = str(Path(sys.executable).parent / "fl-app")
ROUNDS = 4


def _named(prefix: str, arrays: dict | None) -> dict[str, np.ndarray]:
    return {f"{prefix}.{k}": np.asarray(v) for k, v in (arrays or {}).items()}


def strategy_state(strategy: object, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the next rounds of each fixture's strategy depend on, as flat named arrays.

    A strategy built for a resumed run holds no global model until its first configure_train
    hands it the checkpoint's (`weights`): that is the model it then starts from."""
    name = type(strategy).__name__
    if name == "FedAdam":
        return {**_named("m_t", strategy.m_t), **_named("v_t", strategy.v_t),
                **_named("current", strategy.current_arrays)}
    if name == "DPNoise":
        return {"rounds_done": np.asarray(strategy.rounds_done),
                "clip_norm": np.asarray(strategy.clip_norm),
                "adaptive_clip": np.asarray(strategy.adaptive_clip.value),
                # RDP's: the fixtures were written when it was the only accountant.
                "epsilon": np.asarray(strategy.epsilons.rdp),
                "inner_mode": np.asarray(strategy.inner.mode),
                **_named("current", _current(strategy.inner, weights))}
    state = {"mode": np.asarray(strategy.mode), "seed": np.asarray(strategy.seed),
             **_named("current", _current(strategy, weights))}
    if name == "GradientAveraging":
        state |= {"server_momentum": np.asarray(strategy.server_momentum),
                  **_named("velocity", strategy.velocity)}
    return state


def _current(strategy: object, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return weights if strategy.current is None else strategy.current


def _copy(name: str, tmp_path: Path) -> Path:
    # The files name the folder they were written in (output_dir); resume= takes the copy's.
    folder = tmp_path / name
    shutil.copytree(FIXTURES / name, folder)
    return folder


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def resume_in_process(folder: Path, monkeypatch) -> tuple[object, object, object, dict]:
    """Convert `folder`, then resume it to ROUNDS rounds as `fl-app resume=FOLDER
    num_rounds=ROUNDS` does (its run_config.json's overrides, then resume=), in this process.
    Returns the checkpoint loaded, the strategy built and given its state, a copy of that
    state then, and the run's summary."""
    loaded = {}

    def load_state(strategy: object, state: dict) -> None:
        restore(strategy, state)
        loaded["strategy"] = strategy
        loaded["state"] = {k: v.copy() for k, v in
                           strategy_state(strategy, loaded["ckpt"].weights).items()}

    def load(path: Path, model=None) -> checkpoint.Checkpoint:
        loaded["ckpt"] = ckpt = checkpoint_load(path, model)
        return ckpt

    convert(folder)
    checkpoint_load, restore = checkpoint.load, server_loop.load_state
    monkeypatch.setattr(checkpoint, "load", load)
    monkeypatch.setattr(server_loop, "load_state", load_state)
    torch.set_num_threads(1)  # as when expected_rounds.json was written: the same float sums
    _, run_config, _ = _resumed_run(folder, [f"num_rounds={ROUNDS}"])
    summary = run(overrides_from_run_config(run_config), run_config=run_config)
    return loaded["ckpt"], loaded["strategy"], loaded["state"], summary


@pytest.mark.parametrize("name", NAMES)
def test_a_checkpoint_from_before_the_split_resumes_where_it_stopped(name, tmp_path, monkeypatch):
    folder = _copy(name, tmp_path)
    before = _rows(folder)
    ckpt, strategy, state, summary = resume_in_process(folder, monkeypatch)

    # The strategy came back with the state the old code had put in the checkpoint, except
    # the noise generator, which is dropped (see the module docstring).
    expected = dict(np.load(FIXTURES / name / "expected_state.npz"))
    stored_generator = expected.pop("noise_rng", None)
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)

    # Rounds 3 and 4 ran on from it, after the two rows already in the folder.
    assert ckpt.round == 2 and summary["rounds"] == ROUNDS
    rows = _rows(folder)
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and rows[:2] == before
    want = json.loads((FIXTURES / name / "expected_rounds.json").read_text())
    for got, row in zip(rows[2:], want, strict=True):
        if stored_generator is None:
            assert got["test_loss"] == pytest.approx(row["test_loss"], rel=1e-5)
            assert got["test_accuracy"] == pytest.approx(row["test_accuracy"], abs=1e-9)
        else:  # other noise: the same sampling and accounting, a model that still learns
            assert got["train_epsilon"] == pytest.approx(epsilon_spent(
                strategy.noise_multiplier, strategy.sample_rate, got["round"], strategy.delta))
            assert got["test_accuracy"] == pytest.approx(row["test_accuracy"], abs=0.2)

    # It trained: the final model is not the checkpoint's, and the state moved on.
    final = torch.load(folder / "model.pt")
    assert any(not np.array_equal(final[k].numpy(), ckpt.weights[k]) for k in ckpt.weights)
    after = strategy_state(strategy, ckpt.weights)
    moved = [k for k in expected if k.startswith(("velocity.", "m_t.", "v_t.", "rounds_done"))]
    assert all(not np.array_equal(after[k], expected[k]) for k in moved)
    if name == "dp_fedavg_adaptive":
        assert int(after["rounds_done"]) == ROUNDS
        assert float(after["epsilon"]) > float(expected["epsilon"])


def test_fl_app_resume_continues_a_checkpoint_from_before_the_split(tmp_path):
    folder = _copy("fedsgd_momentum", tmp_path)
    converter = subprocess.run([sys.executable, "-m", "fl_app.convert_pickle_checkpoint",
                                str(folder)], capture_output=True, text=True, timeout=300)
    assert converter.returncode == 0, converter.stderr[-2000:]
    assert "can run code" in converter.stderr  # it says what unpickling means
    proc = subprocess.run([FL_APP, f"resume={folder}", f"num_rounds={ROUNDS}"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["round"] for r in _rows(folder)] == [1, 2, 3, 4]
    assert json.loads((folder / "summary.json").read_text())["rounds"] == ROUNDS


def test_an_unconverted_old_run_is_refused_with_the_command_that_converts_it(tmp_path):
    folder = _copy("fedavg", tmp_path)
    _, run_config, _ = _resumed_run(folder, [f"num_rounds={ROUNDS}"])
    with pytest.raises(ConfigError, match="python -m fl_app.convert_pickle_checkpoint") as err:
        run(overrides_from_run_config(run_config), run_config=run_config)
    assert str(folder) in str(err.value)
    assert not (folder / checkpoint.CHECKPOINT).exists()


def test_the_converter_rewrites_moved_targets_in_the_runs_config(tmp_path):
    folder = _copy("dp_fedavg_adaptive", tmp_path)
    assert "_target_: fl_app.strategies.DPNoise" in (folder / "config.yaml").read_text()
    convert(folder)
    text = (folder / "config.yaml").read_text()
    assert "fl_app.strategies.DPNoise" not in text
    assert "_target_: fl_app.privacy.central.DPNoise" in text
