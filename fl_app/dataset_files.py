"""torchvision's MNIST, Fashion-MNIST and CIFAR-10 files in a folder, read without torchvision.

The layout is torchvision's own (`ROOT/MNIST/raw/train-images-idx3-ubyte[.gz]`,
`ROOT/cifar-10-batches-py/data_batch_1`, ...), so a folder torchvision downloaded into works,
and so does one built by scripts/prepare_data.py from the original archives. Reading the files
directly costs milliseconds, needs no torchvision import (over a second) and, unlike
torchvision's CIFAR10 class, no checksum pass over 180 MB on every load: checksums are
checked once, when a folder is prepared.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

IDX_SETS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # folder under ROOT: NAME/raw
IDX_FILES = {  # split -> (images, labels), as torchvision names them (the archives add .gz)
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
SIZES = {"mnist": (60_000, 10_000), "fashion_mnist": (60_000, 10_000),
         "cifar10": (50_000, 10_000)}  # (train, test) examples of the full sets
_IDX_UBYTE = 0x08  # idx type code of unsigned bytes, the only one these sets use


def folder(name: str, root: Path) -> Path:
    """Where torchvision keeps dataset `name` under `root`."""
    if name in IDX_SETS:
        return root / IDX_SETS[name] / "raw"
    if name == "cifar10":
        return root / CIFAR_FOLDER
    raise ValueError(f"No torchvision file layout for dataset '{name}': "
                     f"known {sorted([*IDX_SETS, 'cifar10'])}.")


def file_names(name: str) -> list[str]:
    """The files dataset `name` needs, in its folder (idx files may also be gzipped)."""
    if name in IDX_SETS:
        return [f for pair in IDX_FILES.values() for f in pair]
    return [*CIFAR_BATCHES["train"], *CIFAR_BATCHES["test"]]


def missing(name: str, root: Path) -> list[str]:
    """The files of dataset `name` that are not under `root`."""
    return absent_from(name, folder(name, root))


def absent_from(name: str, where: Path) -> list[str]:
    """The files of dataset `name` that are not in the folder `where` itself (idx files also
    count as there when gzipped)."""
    gzipped = name in IDX_SETS
    return [f for f in file_names(name)
            if not (where / f).is_file() and not (gzipped and (where / f"{f}.gz").is_file())]


def expected(name: str, root: Path) -> str:
    """The files dataset `name` needs under `root`, in one line for error messages."""
    gz = "[.gz]" if name in IDX_SETS else ""
    return f"{folder(name, root)}/{{{','.join(file_names(name))}}}{gz}"


def read(name: str, root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test): uint8 images (N, C, H, W) or (N, H, W), int64 labels."""
    where = folder(name, root)
    if name in IDX_SETS:
        parts = [read_idx(_idx_path(where / f)) for split in ("train", "test")
                 for f in IDX_FILES[split]]
    else:
        parts = [a for split in ("train", "test") for a in _cifar_split(where, split)]
    x_train, y_train, x_test, y_test = parts
    for x, y, split in ((x_train, y_train, "train"), (x_test, y_test, "test")):
        if len(x) != len(y):
            raise ValueError(f"{where}: the {split} files hold {len(x)} images but {len(y)} "
                             "labels: the folder mixes files of different sets.")
    return x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)


def _idx_path(path: Path) -> Path:
    return path if path.is_file() else path.with_name(path.name + ".gz")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's MNIST format: magic 0x0000TTDD, DD big-endian int32 dimensions,
    then the data), plain or gzipped, as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] or data[1] or data[2] != _IDX_UBYTE or not 1 <= data[3] <= 4:
        raise ValueError(f"{path} is not an idx file of unsigned bytes (it starts with "
                         f"{data[:4].hex() or 'nothing'}, expected 000008 then 01-04).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: the header says {shape} ({int(np.prod(shape))} bytes), "
                         f"the file holds {body.size}: it is truncated or not an idx file.")
    return body.reshape(shape)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled CIFAR-10 batch: images (N, 3, 32, 32) uint8 and their labels."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="latin1")  # the batches were pickled by Python 2
    try:
        data, labels = batch["data"], batch["labels"]
    except (KeyError, TypeError):
        raise ValueError(f"{path} is not a CIFAR-10 batch (a pickled dict with 'data' and "
                         "'labels').") from None
    data = np.asarray(data, dtype=np.uint8)
    return data.reshape(len(data), 3, 32, 32), np.asarray(labels, dtype=np.int64)


def _cifar_split(where: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    batches = [read_cifar_batch(where / name) for name in CIFAR_BATCHES[split]]
    return np.concatenate([x for x, _ in batches]), np.concatenate([y for _, y in batches])
