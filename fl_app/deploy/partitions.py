"""Write each partition of a dataset to its own folder, for SuperNodes that hold local data.

    python -m fl_app.deploy.partitions OUT --num-partitions 3 [hydra overrides...]

writes OUT/partition-<i>/train.npz (raw images `x`, labels `y`; for dataset=shakespeare the
80-character windows `x` and next characters `y`) for i < N, the same split the config's
partitioner gives in simulation (partitioner=natural: N is the number of roles). Copy one
folder to each machine and start its SuperNode with --node-config
'data-dir="/path/to/partition-<i>"'.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fl_app.config import compose
from fl_app.data import EMBEDDED, embedded_raw, holdout_split, load_dataset, partition, train_owners


def export(out: Path, num_partitions: int, overrides: Sequence[str] = ()) -> list[Path]:
    cfg = compose(list(overrides))
    if cfg.dataset.name == "shakespeare":  # character windows (uint8 ids) and next characters
        split = load_dataset(cfg.dataset)
        x_train, y_train = split.x_train.numpy(), split.y_train.numpy()
    elif cfg.dataset.name in EMBEDDED:
        x, y = embedded_raw(cfg.dataset.name)
        x_train, y_train, _, _ = holdout_split(x, y, cfg.dataset.test_fraction)
    else:
        raise ValueError(f"Exporting supports the embedded datasets ({', '.join(EMBEDDED)}) "
                         "and shakespeare; for the torchvision sets, copy their files to each "
                         "machine instead.")
    folders = []
    for i, idx in enumerate(partition(y_train, cfg.partitioner, num_partitions,
                                      train_owners(cfg))):
        folder = out / f"partition-{i}"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "train.npz", x=x_train[idx], y=y_train[idx])
        folders.append(folder)
    return folders


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--num-partitions", type=int, required=True)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (dataset, partitioner)")
    args = parser.parse_intermixed_args(argv)
    for folder in export(args.out, args.num_partitions, args.overrides):
        print(folder.resolve())


if __name__ == "__main__":
    main()
