"""Checkpoints written after every round, and resuming a killed run from the last one.

A checkpoint holds everything the next round depends on: the global model, the strategy's
state (`state_dict()`: server momentum, FedAdam moments, clip norm, rounds the accountant has
counted), the metrics history (stopping rules read it) and the wall time so far. It is data,
never code: the arrays in `checkpoints/round_NNNN.npz` (read with `allow_pickle=False`), the
rest in `checkpoint.json`, which names the npz and its sha256. Loading one runs no code, and a
changed, truncated or mismatched file is refused with one ConfigError.

Never the DP noise generator: with its state anyone who reads the files could regenerate and
subtract every later round's noise (privacy/noise.py). A resumed DP run draws fresh noise
from OS entropy, or with a `noise_seed` (tests) from its config, which the server loop hands
back after loading. Client training is seeded by (seed, partition, round), so a resumed run
on CPU ends with the same model as the uninterrupted one; `tests/test_resume.py` checks that
bit for bit.

Saving is crash-safe: the new npz is written first (under a name of its own), then
checkpoint.json is replaced in one rename, then older npz files are deleted. A kill at any
point leaves a checkpoint.json whose npz is there. Files are 0600 in 0700 folders
(run_files.py). Run folders from before this format (`checkpoint.pkl`) are converted once by
`python -m fl_app.convert_pickle_checkpoint FOLDER`; nothing here ever unpickles.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fl_app.errors import ConfigError
from fl_app.run_files import private_folder, write_private

CHECKPOINT = "checkpoint.json"
ARRAYS_FOLDER = "checkpoints"
PICKLED = "checkpoint.pkl"  # the format before this one, never read here
FORMAT = "fl_app checkpoint"
VERSION = 1
CONVERTER = "python -m fl_app.convert_pickle_checkpoint"
# Number kinds an array may hold (bool, signed, unsigned, float): never objects, which only
# pickle can read.
ARRAY_KINDS = "biuf"
_ARRAY_REF = "$array"  # {"$array": "strategy.3"}: where a state's array is, in the npz
# Settings a resumed run may change: where and how long it runs, not what it computes (a run
# may go on on another device, reading the same files from another folder).
MAY_DIFFER = ("resume", "output_dir", "num_rounds", "stopping", "logger", "checkpoints",
              "node_wait_timeout", "round_timeout", "device", "client_gpus", "data_root",
              "dataset.root")


@dataclass
class Checkpoint:
    """A run after `round` rounds: the global model, the strategy's `state_dict()` (nested
    dicts and lists of JSON values and numpy arrays), the metrics rows, the wall seconds."""

    round: int
    weights: dict[str, np.ndarray]
    strategy_state: dict
    history: list[dict]
    elapsed: float  # wall seconds of the run before this process took over


def save(folder: Path, ckpt: Checkpoint, keep_all: bool = False) -> Path:
    """Write the checkpoint crash-safely (see the module docstring); `keep_all` keeps every
    round's npz, else only the one checkpoint.json names. Returns checkpoint.json's path."""
    arrays = {f"model.{i}": np.asarray(v) for i, v in enumerate(ckpt.weights.values())}
    state = _split_arrays(ckpt.strategy_state, arrays, "strategy")
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    kept = private_folder(folder / ARRAYS_FOLDER)
    npz = kept / f"round_{ckpt.round:04d}.npz"
    write_private(npz, data)
    index = {"format": FORMAT, "version": VERSION, "round": int(ckpt.round),
             "elapsed": float(ckpt.elapsed), "arrays": f"{ARRAYS_FOLDER}/{npz.name}",
             "sha256": hashlib.sha256(data).hexdigest(), "model": list(ckpt.weights),
             "strategy": state, "history": ckpt.history}
    path = write_private(folder / CHECKPOINT, json.dumps(index, indent=1))
    if not keep_all:
        for old in kept.glob("round_*.npz"):
            if old != npz:
                old.unlink(missing_ok=True)
    return path


def load(folder: Path, model: Mapping[str, np.ndarray] | None = None) -> Checkpoint:
    """The last checkpoint of the run in `folder`, checked against `model` (the freshly built
    global model's arrays: names and shapes) when given. ConfigError, naming what is
    wrong, if there is none or it is not intact; runs no code."""
    path = _require_checkpoint(folder)
    try:
        index = json.loads(path.read_text())
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(f"format {index.get('format')!r} version {index.get('version')!r}"
                             f" is not {FORMAT!r} version {VERSION}")
        npz = folder / index["arrays"]
        if npz.resolve().parent != (folder / ARRAYS_FOLDER).resolve():
            raise ValueError(f"its arrays must be in {ARRAYS_FOLDER}/, not {index['arrays']!r}")
        data = npz.read_bytes()
        if hashlib.sha256(data).hexdigest() != index["sha256"]:
            raise ValueError(f"{npz.name} is not the file it names (sha256 differs): it was "
                             "changed or replaced after it was written")
        arrays = _read_npz(data)
        names = [str(k) for k in index["model"]]
        weights = {name: _join_arrays({_ARRAY_REF: f"model.{i}"}, arrays)
                   for i, name in enumerate(names)}
        state = _join_arrays(index["strategy"], arrays)
        if arrays:
            raise ValueError(f"{npz.name} holds arrays nothing refers to: {sorted(arrays)[:3]}")
        ckpt = Checkpoint(int(index["round"]), weights, state, list(index["history"]),
                          float(index["elapsed"]))
        if model is not None:
            _check_against_model(ckpt, model)
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as err:
        raise ConfigError(
            f"Cannot resume from {path}: {err}. The checkpoint is damaged or was changed: "
            "restore the run folder from a copy, or start a new run.") from err
    return ckpt


def check_resumable(folder: Path, cfg: DictConfig) -> None:
    """Refuse to resume a run whose config differs in anything that changes the result."""
    if cfg.privacy.get("name", "none") != "none":
        raise ConfigError(
            f"Cannot resume a run with client-side privacy (privacy={cfg.privacy.name}): each "
            "client's ε accountant lives in its SuperNode's state, which ended with the run, so "
            "a resumed run would under-report ε. Start a new run instead."
        )
    _require_checkpoint(folder)
    saved_file = folder / "config.yaml"
    if not saved_file.is_file():
        raise ConfigError(f"Cannot resume: {saved_file} is missing, so the run's config is "
                          "unknown.")
    saved = _comparable(OmegaConf.load(saved_file))
    saved.setdefault("secagg.name", "none")  # a run from before secure aggregation existed
    current = _comparable(cfg)
    differ = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differ:
        shown = ", ".join(f"{k}: run {saved.get(k)!r} vs now {current.get(k)!r}"
                          for k in differ[:5])
        raise ConfigError(
            f"Cannot resume {folder}: the config differs from the run's ({shown}). Resume with "
            "the same strategy/model/dataset/... as the run (its config.yaml); `fl-app "
            f"resume={folder}` reuses them for you."
        )


def _require_checkpoint(folder: Path) -> Path:
    path = folder / CHECKPOINT
    if path.is_file():
        return path
    if (folder / PICKLED).is_file():
        raise ConfigError(
            f"Cannot resume: {folder} holds an old pickled checkpoint ({PICKLED}), which fl-app "
            f"never unpickles (unpickling runs code). If the run is your own, convert it once "
            f"with `{CONVERTER} {folder}`, then resume again.")
    raise ConfigError(
        f"Cannot resume: {path} does not exist. resume= takes the output folder of a run "
        f"that completed at least one round (it holds {CHECKPOINT}).")


def _split_arrays(tree: object, arrays: dict[str, np.ndarray], prefix: str) -> object:
    """`tree` as JSON, each numpy array moved into `arrays` and replaced by a reference."""
    if isinstance(tree, np.ndarray):
        if tree.dtype.kind not in ARRAY_KINDS:
            raise TypeError(f"strategy state holds a {tree.dtype} array: only numbers can be "
                            "checkpointed without pickle")
        key = f"{prefix}.{len(arrays)}"
        arrays[key] = tree
        return {_ARRAY_REF: key}
    if isinstance(tree, np.generic):
        return tree.item()
    if isinstance(tree, Mapping):
        return {str(k): _split_arrays(v, arrays, prefix) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_split_arrays(v, arrays, prefix) for v in tree]
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    raise TypeError(f"strategy state holds a {type(tree).__name__}: a state_dict() holds "
                    "only JSON values and numpy arrays")


def _join_arrays(tree: object, arrays: dict[str, np.ndarray]) -> object:
    """The inverse of `_split_arrays`: references replaced by (taken out of) `arrays`."""
    if isinstance(tree, dict):
        if set(tree) == {_ARRAY_REF}:
            key = tree[_ARRAY_REF]
            if key not in arrays:
                raise ValueError(f"the array {key!r} that checkpoint.json names is missing "
                                 "from the npz")
            return arrays.pop(key)
        return {k: _join_arrays(v, arrays) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join_arrays(v, arrays) for v in tree]
    return tree


def _read_npz(data: bytes) -> dict[str, np.ndarray]:
    """Every array of an npz, refusing (without unpickling) any that is not plain numbers."""
    arrays = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        for key in npz.files:
            try:
                array = npz[key]
            except ValueError as err:  # numpy: "Object arrays cannot be loaded when ..."
                raise ValueError(f"array {key!r} holds Python objects, which fl_app never "
                                 "unpickles") from err
            if array.dtype.kind not in ARRAY_KINDS:
                raise ValueError(f"array {key!r} has dtype {array.dtype}, not numbers")
            arrays[key] = array
    return arrays


def _check_against_model(ckpt: Checkpoint, model: Mapping[str, np.ndarray]) -> None:
    """The checkpoint's global model, and every array of its strategy state laid out like the
    model (a dict by parameter name, or a list in the model's order), match `model`."""
    shapes = {k: np.shape(v) for k, v in model.items()}
    if list(ckpt.weights) != list(shapes):
        raise ValueError(f"its model has the arrays {list(ckpt.weights)[:4]}..., the model "
                         f"built from the config {list(shapes)[:4]}...")
    # Shapes, not dtypes: a run's global model may be float64 (Flower's FedAdam makes it so),
    # and it goes on in the dtypes it had.
    for key, value in ckpt.weights.items():
        if value.shape != shapes[key]:
            raise ValueError(f"model array {key!r} has shape {list(value.shape)}, the model's "
                             f"{list(shapes[key])}")
    _check_state_shapes(ckpt.strategy_state, shapes, "strategy")


def _check_state_shapes(tree: object, shapes: dict[str, tuple], where: str) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if isinstance(value, np.ndarray) and key in shapes and value.shape != shapes[key]:
                raise ValueError(f"{where}.{key} has shape {list(value.shape)}, the model's "
                                 f"{key!r} {list(shapes[key])}")
            _check_state_shapes(value, shapes, f"{where}.{key}")
    elif isinstance(tree, list):
        if len(tree) == len(shapes) and all(isinstance(v, np.ndarray) for v in tree):
            for value, (key, shape) in zip(tree, shapes.items(), strict=True):
                if value.shape != shape:
                    raise ValueError(f"{where} holds a {list(value.shape)} array where the "
                                     f"model's {key!r} is {list(shape)}")
        for i, value in enumerate(tree):
            _check_state_shapes(value, shapes, f"{where}[{i}]")


def _comparable(cfg: DictConfig) -> dict[str, object]:
    flat = _flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v for k, v in flat.items()
            if k.split(".")[0] not in MAY_DIFFER and k not in MAY_DIFFER}


def _flatten(tree: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        flat |= _flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
    return flat
