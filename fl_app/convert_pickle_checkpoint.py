"""One-off converter of a run folder's old pickled checkpoint (checkpoint.pkl) to today's
format (checkpoint.json + checkpoints/round_NNNN.npz, fl_app.checkpoint).

    python -m fl_app.convert_pickle_checkpoint RUN_FOLDER

Unpickling runs code named by the file, so only convert run folders you wrote yourself.
The pickle is read without importing fl_app's (moved, renamed) classes: a restricted unpickler
turns every fl_app or Flower class it names into a placeholder that only keeps the attributes
the file stores, lets numpy rebuild its arrays, and refuses every other callable (os.system,
builtins.eval, ...). The old strategy's attributes are then mapped to today's `state_dict`
format, and the `_target_` paths of classes that moved are rewritten in the run's config.yaml.
The noise generator an old DP checkpoint holds is dropped (privacy/noise.py), and so is the
pickle itself once converted (`--keep-pickle` keeps it, 0600).
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from fl_app import checkpoint
from fl_app.config import to_yaml
from fl_app.errors import ConfigError
from fl_app.run_files import FILE_MODE, write_private
from fl_app.strategies.flower_adapter import FLOWER_STATE

# Classes whose `_target_` moved since a run folder was written: old path -> today's.
MOVED_TARGETS = {
    "fl_app.strategies.DPNoise": "fl_app.privacy.central.DPNoise",
    "fl_app.strategies.dp.DPNoise": "fl_app.privacy.central.DPNoise",
}
# Callables of numpy's that rebuild arrays and dtypes from bytes (what a checkpoint's arrays
# pickle to), and harmless builtins. Nothing else is called.
NUMPY_REBUILDERS = {
    ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
    ("numpy", "dtype"), ("numpy", "ndarray"),
}
SAFE_BUILTINS = {"set", "frozenset", "complex", "slice", "range"}


class Placeholder:
    """Stands in for an fl_app or Flower class while unpickling: keeps what the file says
    (constructor arguments, attributes, dict or list items) and runs none of the class's code."""

    _name = "?"

    def __new__(cls, *args: object, **kwargs: object) -> Placeholder:
        obj = object.__new__(cls)
        obj.__dict__.update(_args=args, _items={}, _list=[])
        return obj

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._args = args

    def __setstate__(self, state: object) -> None:
        if (isinstance(state, tuple) and len(state) == 2  # (__dict__, __slots__ values)
                and all(isinstance(part, dict | None) for part in state)):
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:  # a C extension's own state (numpy's generators): kept, never used
            self._state = state

    def __setitem__(self, key: object, value: object) -> None:
        self._items[key] = value

    def append(self, value: object) -> None:
        self._list.append(value)

    def extend(self, values: list) -> None:
        self._list.extend(values)


class PlaceholderUnpickler(pickle.Unpickler):
    """Unpickles an old checkpoint: fl_app/Flower classes (and numpy's generators, which are
    dropped) become Placeholders, numpy rebuilds arrays, anything else is refused."""

    def find_class(self, module: str, name: str) -> type | Callable:
        if module.split(".")[0] in ("fl_app", "flwr") or module.startswith("numpy.random"):
            return type(name, (Placeholder,), {"_name": f"{module}.{name}"})
        if (module, name) in NUMPY_REBUILDERS:
            return super().find_class(module, name)
        if module == "builtins" and name in SAFE_BUILTINS:
            return super().find_class(module, name)
        if (module, name) == ("collections", "OrderedDict"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the file names {module}.{name}, which no fl_app checkpoint holds; refused")


def read_pickled(path: Path) -> Placeholder:
    """The old checkpoint in `path`, as Placeholders (see the module docstring)."""
    try:
        ckpt = PlaceholderUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as err:  # noqa: BLE001 - whatever a broken or hostile file raises
        raise ConfigError(f"Cannot convert {path}: {err}") from err
    if not isinstance(ckpt, Placeholder) or not {"round", "weights", "strategy"} <= set(
            vars(ckpt)):
        raise ConfigError(f"Cannot convert {path}: it is not an fl_app checkpoint.")
    return ckpt


def strategy_state(old: Placeholder) -> dict:
    """Today's `state_dict()` of the strategy an old checkpoint pickled."""
    attrs = vars(old)
    name = old._name.rsplit(".", 1)[-1]
    if name == "DPNoise":
        return {"rounds_done": int(attrs["rounds_done"]), "clip_norm": float(attrs["clip_norm"]),
                "inner": strategy_state(attrs["inner"])}
    if old._name.startswith("flwr."):
        return {k: _arrays(attrs[k]) for k in FLOWER_STATE if k in attrs}
    state = {"client_epsilon_max": {str(k): float(v) for k, v in
                                    attrs.get("client_epsilon_max", {}).items()}}
    if "velocity" in attrs:  # GradientAveraging's server momentum
        state["velocity"] = _arrays(attrs["velocity"])
    return state


def _arrays(value: object) -> object:
    """A dict, list or Flower ArrayRecord of arrays as numpy arrays (None stays None)."""
    if value is None:
        return None
    if isinstance(value, Placeholder):  # an ArrayRecord: a dict of flwr.app.Array
        return {str(k): _array(v) for k, v in value._items.items()}
    if isinstance(value, dict):
        return {str(k): _array(v) for k, v in value.items()}
    return [_array(v) for v in value]


def _array(value: object) -> np.ndarray:
    if isinstance(value, Placeholder):  # a flwr.app.Array: its bytes as np.save wrote them
        return np.load(io.BytesIO(vars(value)["data"]), allow_pickle=False)
    return np.asarray(value)


def rewrite_targets(config_file: Path) -> list[str]:
    """Rewrite moved `_target_` paths in `config_file`; return the ones rewritten."""
    cfg = OmegaConf.to_container(OmegaConf.load(config_file))
    changed: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if node.get("_target_") in MOVED_TARGETS:
                changed.append(node["_target_"])
                node["_target_"] = MOVED_TARGETS[node["_target_"]]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(cfg)
    if changed:
        write_private(config_file, to_yaml(OmegaConf.create(cfg)))
    return changed


def convert(folder: Path, keep_pickle: bool = False) -> Path:
    """Convert the run in `folder`: its checkpoint.pkl to checkpoint.json + npz (the pickle is
    then deleted, or with `keep_pickle` left 0600), its config.yaml's moved targets. Returns
    checkpoint.json's path."""
    old = read_pickled(folder / checkpoint.PICKLED)
    attrs = vars(old)
    new = checkpoint.Checkpoint(
        round=int(attrs["round"]),
        weights={str(k): np.asarray(v) for k, v in attrs["weights"].items()},
        strategy_state=strategy_state(attrs["strategy"]),
        history=list(attrs["history"]), elapsed=float(attrs["elapsed"]))
    if (folder / "config.yaml").is_file():
        rewrite_targets(folder / "config.yaml")
    written = checkpoint.save(folder, new)
    # The pickle is code, and a DP run's holds its noise generator: a secret (noise.py).
    if keep_pickle:
        os.chmod(folder / checkpoint.PICKLED, FILE_MODE)
    else:
        (folder / checkpoint.PICKLED).unlink()
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: convert each run folder given."""
    parser = argparse.ArgumentParser(
        prog="python -m fl_app.convert_pickle_checkpoint",
        description="Convert run folders' old pickled checkpoints (checkpoint.pkl) to the "
                    "format fl-app resume= reads. Unpickling runs code: convert only your own "
                    "run folders.")
    parser.add_argument("folders", nargs="+", type=Path, metavar="RUN_FOLDER")
    parser.add_argument("--keep-pickle", action="store_true",
                        help="keep checkpoint.pkl (made 0600) instead of deleting it: for DP "
                             "runs it holds the noise generator's state, a secret")
    args = parser.parse_args(argv)
    print("warning: this unpickles checkpoint.pkl, which can run code: convert only run "
          "folders you wrote yourself.", file=sys.stderr)
    for folder in args.folders:
        try:
            written = convert(folder.expanduser().resolve(), args.keep_pickle)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"{folder}: wrote {written.name} and {checkpoint.ARRAYS_FOLDER}/; "
              f"{'kept' if args.keep_pickle else 'deleted'} {checkpoint.PICKLED}. Resume with "
              f"`fl-app resume={folder}`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
