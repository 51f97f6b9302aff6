"""Issue 22, item 10: whoever reads a run folder learns the model and the metrics, never the DP
noise (no generator, no generator state, no seed in checkpoint.pkl), and nobody but the owner
may read it: the folder is 0700 and every file in it 0600 from the start."""

import io
import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fl_app import checkpoint
from fl_app.cli import _resumed_run
from fl_app.config import overrides_from_run_config
from fl_app.inprocess import run

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
FL_APP = str(Path(sys.executable).parent / "fl-app")
BASE = ["dataset=digits", "model=logreg", "lr=0.1", "seed=3", "num_clients=4"]
DP = {"dp_fedavg": ["strategy=dp_fedavg"],
      "dp_fedavg_adaptive": ["strategy=dp_fedavg_adaptive", "fraction_train=0.75"]}


class Raw:
    """Stands in for fl_app's classes: an object holds what the file says, as the file says it,
    and none of fl_app's own unpickling code runs (which reseeds a generator)."""


class Outsider(pickle.Unpickler):
    """Unpickles a checkpoint as someone without fl_app would, noting every class and function
    the file names."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.names: set[str] = set()

    def find_class(self, module: str, name: str):
        self.names.add(f"{module}.{name}")
        if module.startswith("fl_app."):
            return type(name, (Raw,), {})
        return super().find_class(module, name)


def reachable(root: object) -> list[object]:
    """Every object reachable from `root` through attributes and containers."""
    seen, stack, found = set(), [root], []
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, str | bytes | int | float | np.ndarray):
            continue
        seen.add(id(obj))
        found.append(obj)
        if isinstance(obj, dict):
            stack += [*obj.keys(), *obj.values()]
        elif isinstance(obj, list | tuple | set):
            stack += list(obj)
        elif hasattr(obj, "__dict__"):
            stack.append(vars(obj))
    return found


@pytest.mark.parametrize("strategy", sorted(DP))
def test_a_dp_checkpoint_read_by_an_outsider_holds_no_noise_generator(strategy, tmp_path):
    run([*BASE, *DP[strategy], "num_rounds=2", f"output_dir={tmp_path}"])
    data = (tmp_path / "checkpoint.pkl").read_bytes()
    outsider = Outsider(data)
    ckpt = outsider.load()

    assert type(ckpt.strategy).__name__ == "DPNoise"
    # No generator class is named by the file, and none is reachable from what it holds.
    assert not {n for n in outsider.names if "random" in n or "Generator" in n
                or "bit_generator" in n}, outsider.names
    kinds = (np.random.Generator, np.random.BitGenerator, np.random.RandomState,
             torch.Generator)
    assert not [o for o in reachable(ckpt) if isinstance(o, kinds)]
    # Nor the raw state such a generator pickles to, nor a seed to rebuild it from.
    for secret in (b"bit_generator", b"PCG64", b"has_uint32", b"noise_seed", b"_noise_rng",
                   b"_next_start"):
        assert secret not in data, secret
    for state in (vars(o) for o in reachable(ckpt) if hasattr(o, "__dict__")):
        assert not {"_noise_rng", "noise_seed", "rng", "_rng"} & set(state)


def test_two_resumes_of_one_dp_checkpoint_draw_different_noise(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run([*BASE, *DP["dp_fedavg"], "num_rounds=1", f"output_dir={first}"])
    shutil.copytree(first, second)
    for folder in (first, second):
        run([*BASE, *DP["dp_fedavg"], "num_rounds=2", f"resume={folder}"])
    a, b = torch.load(first / "model.pt"), torch.load(second / "model.pt")
    # Clients train deterministically (seeded by seed, partition and round): only the noise,
    # fresh OS entropy in each resumed process, tells the two round-2 models apart.
    assert all(not torch.equal(a[k], b[k]) for k in a)


def test_with_a_noise_seed_two_resumes_draw_the_same_noise(tmp_path):
    seeded = [*BASE, *DP["dp_fedavg"], "strategy.noise_seed=5"]
    first, second = tmp_path / "first", tmp_path / "second"
    run([*seeded, "num_rounds=1", f"output_dir={first}"])
    shutil.copytree(first, second)
    for folder in (first, second):
        run([*seeded, "num_rounds=2", f"resume={folder}"])
    a, b = torch.load(first / "model.pt"), torch.load(second / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_generator_an_old_checkpoint_stored_is_dropped_on_load(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(FIXTURES / "dp_fedavg_adaptive", folder)
    assert b"bit_generator" in (folder / "checkpoint.pkl").read_bytes()  # it did store one
    stored = np.load(folder / "expected_state.npz")["noise_rng"]
    strategy = checkpoint.load(folder).strategy
    state = strategy._noise_rng.bit_generator.state["state"]
    assert [str(state["state"]), str(state["inc"])] != list(stored)
    assert strategy.adaptive_clip.rng is strategy._noise_rng  # the count's noise: the same
    assert strategy.noise_seed is None


def modes(folder: Path) -> dict[str, int]:
    """Permission bits of the folder and of everything under it, by relative path."""
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def assert_private(folder: Path) -> None:
    for name, mode in modes(folder).items():
        is_dir = name == "." or (folder / name).is_dir()
        assert mode == (0o700 if is_dir else 0o600), f"{name}: {oct(mode)}"


def test_every_file_a_run_writes_is_0600_in_a_0700_folder(tmp_path, monkeypatch):
    # A permissive umask: the files must be private because they are created so.
    old = os.umask(0o022)
    try:
        run([*BASE, *DP["dp_fedavg"], "num_rounds=2", "logger=tensorboard", "checkpoints=all",
             f"output_dir={tmp_path / 'run'}"], run_config={"overrides": "num_rounds=2"})
    finally:
        os.umask(old)
    names = set(modes(tmp_path / "run"))
    assert {"checkpoint.pkl", "model.pt", "metrics.jsonl", "summary.json", "config.yaml",
            "run_config.json", "checkpoints/round_0002.pkl", "tensorboard"} <= names
    assert any(n.startswith("tensorboard/events.") for n in names)
    assert_private(tmp_path / "run")


def test_fl_app_hydra_files_and_report_outputs_are_private_too(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run(["sh", "-c", f"umask 022 && exec {FL_APP} \"$@\"", "fl-app", *BASE,
                           "num_rounds=1", "engine=inprocess", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = subprocess.run(["sh", "-c", "umask 022 && exec fl-app-report \"$@\"",
                             "fl-app-report", str(out)], capture_output=True, text=True,
                            timeout=300, env={**env, "PATH": f"{Path(FL_APP).parent}:"
                                              f"{env['PATH']}"})
    assert report.returncode == 0, report.stderr[-2000:]
    names = set(modes(out))
    assert {".hydra/config.yaml", "checkpoint.pkl", "accuracy.png", "results.md"} <= names
    assert_private(out)


def test_resuming_an_old_world_readable_run_folder_makes_it_private(tmp_path):
    folder = tmp_path / "fedavg"
    shutil.copytree(FIXTURES / "fedavg", folder)
    os.chmod(folder, 0o755)
    for path in folder.iterdir():
        os.chmod(path, 0o644)
    _, run_config, _ = _resumed_run(folder, ["num_rounds=3"])  # as `fl-app resume=` does
    run(overrides_from_run_config(run_config), run_config=run_config)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("checkpoint.pkl", "model.pt", "metrics.jsonl", "summary.json", "config.yaml"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name

