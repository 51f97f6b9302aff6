"""Every config combination composes; every bad input gets one clear message."""

import itertools

import pytest
from omegaconf import OmegaConf

from fl_app.config import ConfigError, available, compose, overrides_from_run_config

# Each strategy and each partitioner with each dataset, each model once: the groups are
# independent, so the full product (over a thousand) would test nothing more.
# Character ids (dataset=shakespeare) are read by model=char_lstm only, and only that dataset
# has natural clients (partitioner=natural); both pairings are refused otherwise (tested in
# test_shakespeare.py).
TOKEN_DATASETS, TOKEN_MODELS, NATURAL = {"shakespeare"}, {"char_lstm"}, {"natural"}


def _model_for(dataset: str) -> str:
    return "char_lstm" if dataset in TOKEN_DATASETS else "mlp"


COMBINATIONS = [
    *((s, _model_for(d), d, "iid") for s, d in itertools.product(available("strategy"),
                                                                   available("dataset"))),
    *(("fedavg", _model_for(d), d, p) for d, p in itertools.product(available("dataset"),
                                                                    available("partitioner"))
      if p not in NATURAL or d in TOKEN_DATASETS),
    *(("fedavg", m, "mnist5k", "iid") for m in available("model") if m not in TOKEN_MODELS),
]


def test_config_groups_offer_the_documented_choices():
    assert {"fedavg", "fedsgd", "dp_fedavg"} <= set(available("strategy"))
    assert {"mlp", "cnn"} <= set(available("model"))
    assert {"mnist5k", "digits", "mnist", "fashion_mnist", "cifar10"} <= set(available("dataset"))
    assert {"iid", "dirichlet", "shards", "pathological"} <= set(available("partitioner"))


@pytest.mark.parametrize("strategy,model,dataset,partitioner", COMBINATIONS)
def test_every_combination_composes_and_resolves(strategy, model, dataset, partitioner):
    cfg = compose([f"strategy={strategy}", f"model={model}", f"dataset={dataset}",
                   f"partitioner={partitioner}", "num_clients=10"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if model not in TOKEN_MODELS:  # the LSTM reads windows of any length: no input_shape
        assert resolved["model"]["input_shape"] == resolved["dataset"]["input_shape"]
    assert cfg.partitioner._target_.startswith("flwr_datasets.partitioner.")
    assert cfg.strategy._target_.startswith(("fl_app.strategies.", "fl_app.privacy.central.",
                                             "flwr.serverapp.strategy."))


def test_default_run_is_fedavg_mlp_on_embedded_mnist():
    cfg = compose()
    assert (cfg.strategy._target_.rsplit(".", 1)[-1], cfg.model._target_.rsplit(".", 1)[-1],
            cfg.dataset.name, cfg.partitioner._target_.rsplit(".", 1)[-1]) == (
        "WeightedFedAvg", "MLP", "mnist5k", "IidPartitioner")


def test_run_config_keys_and_overrides_reach_the_composed_config():
    run_config = {"strategy": "fedsgd", "model": "cnn", "dataset": "digits",
                  "partitioner": "dirichlet",
                  "overrides": "strategy.server_lr=0.25 num_rounds=7 partitioner.alpha=0.1"}
    cfg = compose(overrides_from_run_config(run_config))
    assert cfg.strategy.server_lr == 0.25 and cfg.num_rounds == 7
    assert cfg.partitioner.alpha == 0.1 and cfg.dataset.name == "digits"
    assert cfg.model._target_ == "fl_app.models.CNN"


@pytest.mark.parametrize("group", ["strategy", "model", "dataset", "partitioner"])
def test_unknown_group_name_lists_the_choices(group):
    with pytest.raises(ConfigError, match=rf"Unknown {group} 'nope'. Choose one of \["):
        compose([f"{group}=nope"])


def test_unknown_run_config_key_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="put any other setting in overrides"):
        overrides_from_run_config({"num_rounds": 3})


@pytest.mark.parametrize("override", ["no_such_key=1", "strategy.no_such=1", "num_rounds"])
def test_bad_override_is_one_clear_error(override):
    with pytest.raises(ConfigError, match="Bad override"):
        compose([override])


@pytest.mark.parametrize("override,key", [
    ("num_rounds=0", "num_rounds"), ("fraction_train=0", "fraction_train"),
    ("fraction_train=1.5", "fraction_train"), ("lr=-1", "lr"), ("batch_size=0", "batch_size"),
    ("local_epochs=0", "local_epochs"), ("min_clients=0", "min_clients"),
])
def test_invalid_values_are_refused_naming_the_setting(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        compose([override])


def test_min_clients_above_num_clients_is_refused():
    with pytest.raises(ConfigError, match="min_clients=5 exceeds num_clients=3"):
        compose(["num_clients=3", "min_clients=5"])


@pytest.mark.parametrize("overrides,key", [
    (["strategy=fedprox", "strategy.proximal_mu=-1"], "strategy.proximal_mu"),
    (["strategy=fedprox", "lr=0.1", "strategy.proximal_mu=30"], "strategy.proximal_mu"),
    (["strategy=fedadam", "strategy.tau=0"], "strategy.tau"),
    (["strategy=fedyogi", "strategy.beta_2=1"], "strategy.beta_2"),
    (["strategy=fedtrimmedavg", "strategy.beta=0.5"], "strategy.beta"),
    (["strategy=krum", "num_clients=4"], "strategy.num_malicious_nodes"),
])
def test_builtin_strategy_settings_flower_would_accept_silently_are_refused(overrides, key):
    with pytest.raises(ConfigError, match=key):
        compose(overrides)
