"""Issue 22, item 10 and issue 24, item 1: whoever reads a run folder learns the model and the
metrics, never the DP noise (no generator, no generator state, no seed in the checkpoint);
nobody but the owner may read it (the folder is 0700 and every file in it 0600 from the
start); and loading a checkpoint runs no code: a pickle is never unpickled by resume=, and a
changed, mismatched or object-holding npz is refused with one clear error."""

import hashlib
import io
import json
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

from fl_app import checkpoint, server_loop
from fl_app.cli import _resumed_run
from fl_app.config import ConfigError, overrides_from_run_config
from fl_app.convert_pickle_checkpoint import convert
from fl_app.inprocess import run

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
FL_APP = str(Path(sys.executable).parent / "fl-app")
BASE = ["dataset=digits", "model=logreg", "lr=0.1", "seed=3", "num_clients=4"]
DP = {"dp_fedavg": ["strategy=dp_fedavg"],
      "dp_fedavg_adaptive": ["strategy=dp_fedavg_adaptive", "fraction_train=0.75"]}
SECRETS = (b"bit_generator", b"PCG64", b"has_uint32", b"noise_seed", b"_noise_rng",
           b"_next_start", b"rng")


def checkpoint_bytes(folder: Path) -> bytes:
    """checkpoint.json and every npz beside it, as one byte string."""
    files = [folder / checkpoint.CHECKPOINT, *sorted((folder / "checkpoints").glob("*.npz"))]
    return b"".join(path.read_bytes() for path in files)


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
    data = checkpoint_bytes(tmp_path)
    ckpt = checkpoint.load(tmp_path)

    assert ckpt.strategy_state["rounds_done"] == 2  # the DP strategy's state is there
    # No generator is reachable from what it holds: only numbers, strings and arrays.
    kinds = (np.random.Generator, np.random.BitGenerator, np.random.RandomState,
             torch.Generator)
    assert not [o for o in reachable(ckpt) if isinstance(o, kinds)]
    # Nor the raw state such a generator pickles to, nor a seed to rebuild it from.
    for secret in SECRETS:
        assert secret not in data, secret
    for state in (o for o in reachable(ckpt) if isinstance(o, dict)):
        assert not {"_noise_rng", "noise_seed", "rng", "_rng", "noise"} & set(state)


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


def test_the_generator_an_old_checkpoint_stored_is_dropped_by_the_converter(tmp_path):
    folder = tmp_path / "old"
    shutil.copytree(FIXTURES / "dp_fedavg_adaptive", folder)
    assert b"bit_generator" in (folder / "checkpoint.pkl").read_bytes()  # it did store one
    stored = np.load(folder / "expected_state.npz")["noise_rng"]
    convert(folder)
    assert not (folder / "checkpoint.pkl").exists()  # the pickle held the secret: gone
    data = checkpoint_bytes(folder)
    for secret in SECRETS:
        assert secret not in data, secret
    for value in stored:  # the generator's state, as numbers, is not in the arrays either
        assert value.encode() not in data

    built = {}
    restore = server_loop.load_state

    def load_state(strategy, state):
        restore(strategy, state)
        built["strategy"] = strategy

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_loop, "load_state", load_state)
        _, run_config, _ = _resumed_run(folder, ["num_rounds=3"])
        run(overrides_from_run_config(run_config), run_config=run_config)
    strategy = built["strategy"]
    # Its noise comes from the config's noise_seed (7), never from the old file.
    assert strategy.noise.noise_seed == 7
    state = strategy.noise.rng.bit_generator.state["state"]
    assert [str(state["state"]), str(state["inc"])] != list(stored)
    assert strategy.adaptive_clip.noise is strategy.noise  # the count's noise: the same


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
    assert {"checkpoint.json", "model.pt", "metrics.jsonl", "summary.json", "config.yaml",
            "run_config.json", "checkpoints/round_0002.npz", "tensorboard"} <= names
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
    assert {".hydra/config.yaml", "checkpoint.json", "accuracy.png", "results.md"} <= names
    assert_private(out)


def test_resuming_an_old_world_readable_run_folder_makes_it_private(tmp_path):
    folder = tmp_path / "fedavg"
    shutil.copytree(FIXTURES / "fedavg", folder)
    os.chmod(folder, 0o755)
    for path in folder.iterdir():
        os.chmod(path, 0o644)
    convert(folder, keep_pickle=True)
    _, run_config, _ = _resumed_run(folder, ["num_rounds=3"])  # as `fl-app resume=` does
    run(overrides_from_run_config(run_config), run_config=run_config)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("checkpoint.pkl", "checkpoint.json", "checkpoints/round_0003.npz", "model.pt",
                 "metrics.jsonl", "summary.json", "config.yaml"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name



# ---------------------------------------------------------------------------------------------
# Loading a checkpoint runs no code: the attacks
# ---------------------------------------------------------------------------------------------

class MakesAFile:
    """What an attacker pickles: unpickling it creates the folder `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def test_fl_app_resume_never_unpickles_a_malicious_checkpoint_pkl(tmp_path):
    folder, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(FIXTURES / "fedavg", folder)
    (folder / "checkpoint.pkl").write_bytes(pickle.dumps(MakesAFile(marker)))
    proc = subprocess.run([FL_APP, f"resume={folder}", "num_rounds=3"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert not marker.exists()
    assert f"python -m fl_app.convert_pickle_checkpoint {folder}" in proc.stderr + proc.stdout


def test_the_converter_refuses_a_pickle_that_calls_anything_but_numpy(tmp_path):
    folder, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(FIXTURES / "fedavg", folder)
    (folder / "checkpoint.pkl").write_bytes(pickle.dumps(MakesAFile(marker)))
    with pytest.raises(ConfigError, match=r"names posix\.mkdir.*refused"):
        convert(folder)
    assert not marker.exists() and not (folder / checkpoint.CHECKPOINT).exists()


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory) -> Path:
    """A fedsgd run (its strategy state holds the momentum velocity) after one round."""
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    run([*BASE, "strategy=fedsgd", "num_rounds=1", f"output_dir={folder}"])
    return folder


def tampered(checkpointed_run: Path, tmp_path: Path, change) -> Path:
    """A copy of the run whose npz arrays `change(arrays)` rewrote (np.savez, pickle allowed,
    as an attacker would) and whose checkpoint.json names the new file's hash."""
    folder = tmp_path / "run"
    shutil.copytree(checkpointed_run, folder)
    index = json.loads((folder / checkpoint.CHECKPOINT).read_text())
    npz = folder / index["arrays"]
    arrays = dict(np.load(npz))
    change(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    npz.write_bytes(buffer.getvalue())
    index["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (folder / checkpoint.CHECKPOINT).write_text(json.dumps(index))
    return folder


def resume(folder: Path) -> None:
    run([*BASE, "strategy=fedsgd", "num_rounds=2", f"resume={folder}"])


def test_a_checkpoint_whose_npz_does_not_match_its_hash_is_refused(checkpointed_run, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(checkpointed_run, folder)
    npz = next((folder / "checkpoints").glob("*.npz"))
    arrays = dict(np.load(npz))
    arrays["model.0"] = arrays["model.0"] + 1.0  # a shifted model, same shapes
    np.savez(npz, **arrays)
    with pytest.raises(ConfigError, match="sha256 differs"):
        resume(folder)


def test_a_wrong_shaped_model_array_is_refused(checkpointed_run, tmp_path):
    folder = tampered(checkpointed_run, tmp_path,
                      lambda arrays: arrays.update({"model.0": np.zeros((3, 3), np.float32)}))
    with pytest.raises(ConfigError, match=r"model array 'net\.1\.weight' has shape \[3, 3\]"):
        resume(folder)


def test_a_wrong_shaped_strategy_array_is_refused(checkpointed_run, tmp_path):
    def shrink_velocity(arrays):
        key = next(k for k in arrays if k.startswith("strategy."))
        arrays[key] = arrays[key][:1]

    folder = tampered(checkpointed_run, tmp_path, shrink_velocity)
    with pytest.raises(ConfigError, match=r"strategy\.velocity\.net\.1\.\w+ has shape"):
        resume(folder)


def test_a_missing_array_is_refused(checkpointed_run, tmp_path):
    folder = tampered(checkpointed_run, tmp_path, lambda arrays: arrays.pop("model.1"))
    with pytest.raises(ConfigError, match="'model.1' that checkpoint.json names is missing"):
        resume(folder)


def test_an_npz_holding_an_object_array_is_refused_without_unpickling(checkpointed_run,
                                                                      tmp_path):
    marker = tmp_path / "pwned"

    def smuggle(arrays):
        arrays["model.0"] = np.array([MakesAFile(marker)], dtype=object)

    folder = tampered(checkpointed_run, tmp_path, smuggle)
    with pytest.raises(ConfigError, match="holds Python objects, which fl_app never unpickles"):
        resume(folder)
    assert not marker.exists()
