"""Checkpoints written after every round, and resuming a killed run from the last one.

A checkpoint holds everything the next round depends on: the global model, the strategy object
itself (server momentum, FedAdam moments, clip norm, the privacy accountant), the metrics
history (stopping rules read it) and the wall time so far. Never the DP noise generator: with
its state anyone who reads the file could regenerate and subtract every later round's noise
(strategies/dp_noise.py). A resumed DP run draws fresh noise from OS entropy, or with a
`noise_seed` (tests) from its config, which the server loop hands back after `load`.
Client training is seeded by (seed, partition, round), so a resumed run on CPU ends with
the same model as the uninterrupted one; `tests/test_resume.py` checks that bit for bit.
The file is created 0600 in a 0700 folder (run_files.py).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from fl_app.config import ConfigError
from fl_app.run_files import open_private, private_folder, write_private

CHECKPOINT = "checkpoint.pkl"
# Settings a resumed run may change: where and how long it runs, not what it computes (a run
# may go on on another device, reading the same files from another folder).
MAY_DIFFER = ("resume", "output_dir", "num_rounds", "stopping", "logger", "checkpoints",
              "node_wait_timeout", "round_timeout", "device", "client_gpus", "data_root",
              "dataset.root")


@dataclass
class Checkpoint:
    round: int
    weights: dict[str, np.ndarray]
    strategy: object
    history: list[dict]
    elapsed: float  # wall seconds of the run before this process took over


def save(folder: Path, ckpt: Checkpoint, keep_all: bool = False) -> Path:
    """Write the checkpoint atomically: a kill mid-write leaves the previous one intact."""
    path, tmp = folder / CHECKPOINT, folder / (CHECKPOINT + ".tmp")
    data = pickle.dumps(ckpt, protocol=pickle.HIGHEST_PROTOCOL)
    with open_private(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if keep_all:
        kept = private_folder(folder / "checkpoints")
        write_private(kept / f"round_{ckpt.round:04d}.pkl", data)
    return path


def load(folder: Path) -> Checkpoint:
    """The last checkpoint of the run in `folder`; ConfigError if there is none."""
    path = _require_checkpoint(folder)
    with path.open("rb") as f:
        ckpt = pickle.load(f)  # noqa: S301 - the run's own file, like torch.load of a model
    if not isinstance(ckpt, Checkpoint):
        raise ConfigError(f"Cannot resume: {path} is not an fl_app checkpoint.")
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
    if not path.is_file():
        raise ConfigError(
            f"Cannot resume: {path} does not exist. resume= takes the output folder of a run "
            "that completed at least one round (it holds checkpoint.pkl)."
        )
    return path


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
