"""A tabular, cross-silo federation: breast-cancer data split over 5 label-skewed "hospitals"
(`+experiment=hospitals`) learns under every strategy and client-side privacy choice.

The runs are the real app in one process (`fl_app.inprocess.run`): the ServerApp's round loop
and the ClientApp's handlers, with only Flower's transport left out.
"""

import itertools
import tomllib

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from sklearn.datasets import load_breast_cancer

from fl_app.config import CONF_DIR, compose, overrides_from_run_config
from fl_app.data import client_data, holdout_split, load_dataset, local_data, partition
from fl_app.inprocess import run
from fl_app.models import num_parameters
from fl_app.privacy.client import LocalDP

HOSPITALS = ["+experiment=hospitals"]


@pytest.fixture
def one_torch_thread(monkeypatch):
    """A 62-parameter model on 2 shared cores: one torch thread was ~25x faster per SGD step
    than two (thread hand-off dominates), which keeps this file fast."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("FL_APP_TORCH_THREADS", "1")  # read by the ClientApp when it builds
    yield
    torch.set_num_threads(threads)


def test_hospitals_preset_is_breast_cancer_logreg_over_5_dirichlet_hospitals():
    cfg = compose(HOSPITALS)
    assert (cfg.dataset.name, cfg.num_clients) == ("breast_cancer", 5)
    assert cfg.partitioner._target_.endswith("DirichletPartitioner")
    model = instantiate(cfg.model)
    assert type(model).__name__ == "LogisticRegression"
    assert num_parameters(model) == 30 * 2 + 2  # one weight per feature and class, 2 biases
    assert num_parameters(instantiate(compose([*HOSPITALS, "model=tabular_mlp"]).model)) == (
        30 * 32 + 32 + 32 * 2 + 2)


def test_hospitals_preset_survives_the_default_run_config_of_flwr_run():
    """`flwr run` (and `fl-app`, which drives it) hands the ServerApp pyproject's run-config
    defaults merged with the user's keys; the preset's dataset, model and partitioner must
    not be replaced by those defaults."""
    pyproject = tomllib.loads((CONF_DIR.parent / "pyproject.toml").read_text())
    run_config = {**pyproject["tool"]["flwr"]["app"]["config"],
                  "strategy": "dp_fedavg", "overrides": "+experiment=hospitals"}
    cfg = compose(overrides_from_run_config(run_config))
    assert (cfg.dataset.name, cfg.model._target_) == ("breast_cancer",
                                                      "fl_app.models.LogisticRegression")
    assert cfg.partitioner._target_.endswith("DirichletPartitioner")
    assert cfg.strategy._target_ == "fl_app.privacy.central.DPNoise"


def test_features_are_z_scored_with_training_split_statistics_only():
    split = load_dataset(compose(HOSPITALS).dataset)
    assert split.x_train.shape == (455, 30) and split.x_test.shape == (114, 30)
    x, y = load_breast_cancer(return_X_y=True)
    raw_train, _, raw_test, _ = holdout_split(x, y, 0.2)
    mean, std = raw_train.mean(axis=0), raw_train.std(axis=0)
    # Training features: exactly zero mean and unit variance, feature by feature.
    assert np.allclose(split.x_train.mean(0), 0, atol=1e-5)
    assert np.allclose(split.x_train.numpy().std(0), 1, atol=1e-4)
    # Test features: the same map, not their own (or all rows') statistics.
    assert np.allclose(split.x_test, (raw_test - mean) / std, atol=1e-4)
    assert not np.allclose(split.x_test, (raw_test - x.mean(0)) / x.std(0), atol=1e-3)
    assert np.abs(split.x_test.numpy().mean(0)).max() > 0.05


def test_every_hospital_holds_patients_and_their_class_mix_differs():
    cfg = compose(HOSPITALS)
    labels = load_dataset(cfg.dataset).y_train.numpy()
    parts = partition(labels, cfg.partitioner, cfg.num_clients)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(labels)  # disjoint, all rows used
    assert min(map(len, parts)) >= cfg.partitioner.min_partition_size >= 30
    benign = np.array([labels[p].mean() for p in parts])
    # Label skew: the hospitals' benign fractions spread far wider than an IID split's.
    iid = partition(labels, compose(["dataset=breast_cancer", "partitioner=iid"]).partitioner, 5)
    iid_benign = np.array([labels[p].mean() for p in iid])
    assert benign.max() - benign.min() > 0.4 > 2 * (iid_benign.max() - iid_benign.min())
    # Each hospital trains on its own rows and keeps val_fraction of them held out.
    data = [client_data(cfg, i, cfg.num_clients) for i in range(cfg.num_clients)]
    assert all(len(d.y_train) >= 27 and len(d.y_val) >= 3 for d in data)


CENTRAL_DP = ["strategy.noise_multiplier=0.3"]
CASES = {
    # name: (overrides, accuracy it must reach after 5 rounds, summary key proving the DP ran)
    "fedavg": (["strategy=fedavg"], 0.90, None),
    "fedsgd": (["strategy=fedsgd"], 0.90, None),
    "dp_fedavg": (["strategy=dp_fedavg", *CENTRAL_DP], 0.85, "epsilon"),
    "dp_fedsgd": (["strategy=dp_fedsgd", *CENTRAL_DP], 0.85, "epsilon"),
    "dp_fedavg_adaptive": (["strategy=dp_fedavg_adaptive", *CENTRAL_DP], 0.85, "epsilon"),
    "local_dp": (["privacy=local", "privacy.noise_multiplier=0.5", "privacy.clip_norm=0.5"],
                 0.85, "local_epsilon_max"),
    "dpsgd": (["privacy=dpsgd", "privacy.noise_multiplier=1.0"], 0.85, "dpsgd_epsilon_max"),
    **{name: ([f"strategy={name}"], 0.85, None)  # Flower's own strategies
       for name in ("fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")},
    "tabular_mlp_fedavg": (["model=tabular_mlp"], 0.90, None),
    "tabular_mlp_dp_fedavg": (["model=tabular_mlp", "strategy=dp_fedavg", *CENTRAL_DP], 0.85,
                              "epsilon"),
}


@pytest.fixture
def seeded_local_noise(monkeypatch):
    """Local DP draws its noise from OS entropy by design. Drawn afresh, its 5 noisy hospitals
    ended between 0.842 and 0.956 over 21 runs, so a rare draw failed the 0.85 bar once in CI:
    here each client's generator gets the next of fixed seeds, and the run is the same every
    time. (The central DP cases ended at 0.93-0.97 in 10 runs each; they keep OS entropy.)"""
    seeds = itertools.count(1)
    init = LocalDP.__init__

    def seeded(self, *args, rng=None, **kwargs):
        init(self, *args, rng=rng or np.random.default_rng(next(seeds)), **kwargs)

    monkeypatch.setattr(LocalDP, "__init__", seeded)


@pytest.mark.parametrize("case", list(CASES))
def test_hospitals_learn_far_above_the_majority_class(case, tmp_path, one_torch_thread,
                                                      seeded_local_noise):
    overrides, min_accuracy, privacy_key = CASES[case]
    y_test = load_dataset(compose(HOSPITALS).dataset).y_test.numpy()
    majority = np.bincount(y_test).max() / len(y_test)  # always "benign": 0.60
    assert min_accuracy > majority + 0.2

    summary = run([*HOSPITALS, *overrides, "num_rounds=5", f"output_dir={tmp_path}"])

    assert summary["rounds"] == 5 and summary["test_accuracy"] >= min_accuracy
    if privacy_key:  # the privacy mechanism really ran and accounted for itself
        assert 0 < summary[privacy_key] < float("inf")


def test_a_hospitals_own_data_folder_is_standardized_with_the_agreed_statistics(tmp_path):
    """A SuperNode with its own train.npz of raw features gets exactly the rows it would get
    as partition 1 in simulation: scaled with the shared training split's statistics, not
    with its own (which would differ from every other hospital's)."""
    cfg = compose(HOSPITALS)
    x, y = load_breast_cancer(return_X_y=True)
    raw_train, y_train, _, _ = holdout_split(x.astype(np.float32), y, 0.2)
    own_rows = partition(y_train, cfg.partitioner, cfg.num_clients)[1]
    np.savez(tmp_path / "train.npz", x=raw_train[own_rows], y=y_train[own_rows])
    own, shared = local_data(cfg, tmp_path, seed_id=1), client_data(cfg, 1, cfg.num_clients)
    assert torch.allclose(own.x_train, shared.x_train, atol=1e-5)
    assert torch.equal(own.y_val, shared.y_val)
