"""dataset=mnist / cifar10 with data_root: torchvision's files in a folder, read offline; a
clear message naming the files when they are missing; scripts/prepare_data.py builds such a
folder from the archives and verifies them. Every file here is a tiny fake in the real formats
(idx files, pickled CIFAR batches): nothing is downloaded."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torchvision

from fl_app import inprocess
from fl_app.config import compose
from fl_app.data import NORMALIZATION, DatasetUnavailable, load_dataset

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "prepare_data.py"
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte"]


def idx_bytes(array: np.ndarray) -> bytes:
    """LeCun's idx format: 0x0000, type 0x08 (unsigned byte), ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_mnist(folder: Path, n_train: int = 40, n_test: int = 10, gz: bool = False) -> dict:
    """Random 28x28 digits in MNIST's four idx files under `folder`; returns the arrays."""
    rng = np.random.default_rng(1)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
              "train-labels-idx1-ubyte": np.arange(n_train) % 10,
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
              "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


def cifar_batches(n: int = 6) -> dict[str, dict]:
    """CIFAR-10's six batches as the Python-2 pickles hold them: 'data' (N, 3072), 'labels'."""
    rng = np.random.default_rng(2)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {name: {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                   "labels": [int(v) for v in rng.integers(0, 10, n)]} for name in names}


def write_cifar(folder: Path, batches: dict[str, dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))


def _load(dataset: str, root: Path, *extra: str):
    return load_dataset(compose([f"dataset={dataset}", f"data_root={root}", *extra]).dataset)


@pytest.fixture
def no_download(monkeypatch):
    """torchvision's dataset classes fail as they do offline, and say when they were asked."""
    asked = []

    def offline(root, train=True, download=False, **kwargs):
        asked.append(root)
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    for cls in ("MNIST", "FashionMNIST", "CIFAR10"):
        monkeypatch.setattr(torchvision.datasets, cls, offline)
    return asked


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_data_root_reads_torchvision_files_offline(tmp_path, no_download, gz):
    arrays = fake_mnist(tmp_path / "MNIST" / "raw", gz=gz)
    split = _load("mnist", tmp_path)
    assert split.x_train.shape == (40, 1, 28, 28) and split.x_test.shape == (10, 1, 28, 28)
    assert split.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    mean, std = NORMALIZATION["mnist"]
    expected = (arrays["t10k-images-idx3-ubyte"].astype(np.float32) - mean) / std
    np.testing.assert_allclose(split.x_test.numpy()[:, 0], expected, rtol=1e-6)
    assert no_download == []  # the files were there: torchvision was never asked


def test_cifar10_from_data_root_reads_the_pickled_batches_as_nchw(tmp_path, no_download):
    batches = cifar_batches()
    write_cifar(tmp_path / "cifar-10-batches-py", batches)
    split = _load("cifar10", tmp_path)
    assert split.x_train.shape == (30, 3, 32, 32) and split.x_test.shape == (6, 3, 32, 32)
    assert split.y_test.tolist() == batches["test_batch"]["labels"]
    assert split.y_train.tolist()[6:12] == batches["data_batch_2"]["labels"]
    mean, std = NORMALIZATION["cifar10"]
    first = batches["data_batch_1"]["data"][0].reshape(3, 32, 32).astype(np.float32)
    np.testing.assert_allclose(split.x_train[0].numpy(), (first - mean) / std, rtol=1e-6)


def test_dataset_root_and_fl_app_data_still_choose_the_folder(tmp_path, monkeypatch, no_download):
    fake_mnist(tmp_path / "a" / "MNIST" / "raw", n_train=20)
    fake_mnist(tmp_path / "b" / "MNIST" / "raw", n_train=30)
    assert len(load_dataset(compose(["dataset=mnist", f"dataset.root={tmp_path / 'a'}"])
                            .dataset).y_train) == 20
    monkeypatch.setenv("FL_APP_DATA", str(tmp_path / "b"))
    cfg = compose(["dataset=mnist"])
    assert cfg.data_root == cfg.dataset.root == str(tmp_path / "b")
    assert len(load_dataset(cfg.dataset).y_train) == 30


@pytest.mark.parametrize("name, folder, first_file", [
    ("mnist", "MNIST/raw", "train-images-idx3-ubyte"),
    ("fashion_mnist", "FashionMNIST/raw", "train-images-idx3-ubyte"),
    ("cifar10", "cifar-10-batches-py", "data_batch_1"),
])
def test_missing_files_are_one_line_naming_the_files_expected_and_where(
        tmp_path, no_download, name, folder, first_file):
    with pytest.raises(DatasetUnavailable) as err:
        _load(name, tmp_path, "dataset.download=false")
    message = str(err.value)
    assert "\n" not in message and no_download == []
    assert f"Dataset '{name}' is not in {tmp_path}: missing ['{first_file}'" in message
    assert f"{tmp_path / folder}/{{{first_file}," in message
    assert "scripts/prepare_data.py" in message and "data_root" in message

    with pytest.raises(DatasetUnavailable) as err:  # download=true, offline
        _load(name, tmp_path)
    message = str(err.value)
    assert len(no_download) == 1 and "\n" not in message
    assert "could not be downloaded (<urlopen error" in message
    assert f"{tmp_path / folder}/{{{first_file}," in message
    assert "Connect to the internet" in message


def test_a_partial_folder_names_just_the_missing_files(tmp_path, no_download):
    raw = tmp_path / "MNIST" / "raw"
    fake_mnist(raw)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetUnavailable, match=r"missing \['t10k-labels-idx1-ubyte'\] of"):
        _load("mnist", tmp_path, "dataset.download=false")


def test_a_truncated_idx_file_is_refused_naming_it(tmp_path, no_download):
    raw = tmp_path / "MNIST" / "raw"
    fake_mnist(raw)
    path = raw / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"idx3-ubyte: the header says \(40, 28, 28\)"):
        _load("mnist", tmp_path)


def test_dataset_mnist_with_data_root_trains_in_process(tmp_path, no_download):
    fake_mnist(tmp_path / "data" / "MNIST" / "raw", n_train=60)
    summary = inprocess.run(["dataset=mnist", f"data_root={tmp_path / 'data'}", "num_clients=2",
                             "num_rounds=1", f"output_dir={tmp_path / 'run'}"])
    assert summary["rounds"] == 1 and 0 <= summary["test_accuracy"] <= 1


# ---------------------------------------------------------------- scripts/prepare_data.py

@pytest.fixture
def script():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _md5s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_prepare_data_builds_a_data_root_from_checked_mnist_archives(
        tmp_path, script, monkeypatch, no_download, capsys):
    arrays = fake_mnist(tmp_path / "downloads", gz=True)
    # The fakes' own MD5s stand in for the official ones torchvision lists.
    monkeypatch.setattr(script, "known_checksums", lambda name: _md5s(tmp_path / "downloads"))
    assert script.main(["--from", str(tmp_path / "downloads"), "--to", str(tmp_path / "root")]) == 0
    raw = tmp_path / "root" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        [*MNIST_FILES, *(f"{f}.gz" for f in MNIST_FILES)])  # as torchvision keeps them
    out = capsys.readouterr().out
    assert ("mnist: 40 training / 10 test images, verified (MD5 as torchvision lists them)"
            in out and f"use: fl-app dataset=mnist data_root={tmp_path / 'root'}" in out)
    split = _load("mnist", tmp_path / "root")
    assert split.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()


def test_prepare_data_refuses_files_whose_md5_torchvision_does_not_list(
        tmp_path, script, capsys):
    fake_mnist(tmp_path / "downloads", gz=True)
    assert script.main(["--from", str(tmp_path / "downloads"), "--to", str(tmp_path / "root"),
                        "--datasets", "mnist"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("prepare_data.py: error: ")
    # torchvision's MD5 of the official train-images-idx3-ubyte.gz
    assert "but torchvision lists f68b3c2dcbeaaa9fbdd348bbdeb94873" in err
    assert "train-images-idx3-ubyte.gz" in err and "--datasets fashion_mnist?" in err
    assert not (tmp_path / "root" / "MNIST").exists()  # nothing copied before all are verified


def test_prepare_data_unpacks_the_cifar_archive_into_torchvisions_layout(
        tmp_path, script, capsys):
    batches = cifar_batches()
    archive = tmp_path / "downloads" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        for name, batch in batches.items():
            data = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert script.main(["--from", str(tmp_path / "downloads"), "--to", str(tmp_path / "root"),
                        "--verify", "format"]) == 0
    split = _load("cifar10", tmp_path / "root")
    assert split.y_test.tolist() == batches["test_batch"]["labels"]

    # Checked against torchvision's MD5 of the official archive, the fake is refused.
    assert script.main(["--from", str(tmp_path / "downloads"), "--to", str(tmp_path / "r2")]) == 1
    assert "but torchvision lists c58f30108f718f92721af3b95e74349a" in capsys.readouterr().err


def test_prepare_data_verify_sizes_refuses_a_subset(tmp_path, script, capsys):
    fake_mnist(tmp_path / "downloads")
    assert script.main(["--from", str(tmp_path / "downloads"), "--to", str(tmp_path / "root"),
                        "--verify", "sizes"]) == 1
    assert ("the files hold 40 training and 10 test images; the full set has 60000 and 10000"
            in capsys.readouterr().err)


def test_prepare_data_with_nothing_to_prepare_names_the_files_it_looks_for(
        tmp_path, script, capsys):
    (tmp_path / "empty").mkdir()
    assert script.main(["--from", str(tmp_path / "empty"), "--to", str(tmp_path / "root")]) == 1
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte.gz" in err and "cifar-10-python.tar.gz" in err
    assert err.count("\n") == 1
