"""The privacy config groups compose, reach every entry point, and refuse unsafe settings."""

import tomllib

import pytest
from hydra.utils import instantiate

from fl_app.config import (
    CONF_DIR,
    GROUPS,
    ConfigError,
    available,
    compose,
    overrides_from_run_config,
)
from fl_app.privacy.central import DPNoise
from fl_app.strategies import GradientAveraging, WeightedFedAvg


def test_privacy_group_offers_none_local_and_dpsgd_and_defaults_to_none() -> None:
    assert set(available("privacy")) == {"none", "local", "dpsgd"}
    assert compose().privacy.name == "none"
    assert {"dp_fedavg", "dp_fedsgd", "dp_fedavg_adaptive"} <= set(available("strategy"))


@pytest.mark.parametrize(("strategy", "inner", "clipping"), [
    ("dp_fedavg", WeightedFedAvg, "fixed"),
    ("dp_fedsgd", GradientAveraging, "fixed"),
    ("dp_fedavg_adaptive", WeightedFedAvg, "adaptive"),
])
def test_central_dp_strategies_build_dpnoise_around_the_right_inner_strategy(
        strategy, inner, clipping) -> None:
    built = instantiate(compose([f"strategy={strategy}", "num_clients=100",
                                 "fraction_train=0.1"]).strategy)
    assert isinstance(built, DPNoise) and type(built.inner) is inner
    assert built.clipping == clipping and built.delta == pytest.approx(1e-3)


def test_privacy_is_a_run_config_key_of_flwr_run_and_reaches_the_composed_config() -> None:
    run_config = {"privacy": "local", "overrides": "privacy.noise_multiplier=2.5"}
    cfg = compose(overrides_from_run_config(run_config))
    assert cfg.privacy.name == "local" and cfg.privacy.noise_multiplier == 2.5
    with open(CONF_DIR.parent / "pyproject.toml", "rb") as f:
        app_config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    # Empty group keys fall back to conf/config.yaml (privacy: none), so presets can set them.
    assert set(app_config) == {*GROUPS, "overrides"} and app_config["privacy"] == ""
    assert compose(overrides_from_run_config(app_config)).privacy.name == "none"


@pytest.mark.parametrize("overrides,key", [
    (["strategy=dp_fedavg", "strategy.noise_multiplier=0"], "strategy.noise_multiplier"),
    (["strategy=dp_fedsgd", "strategy.noise_multiplier=-1"], "strategy.noise_multiplier"),
    (["strategy=dp_fedavg", "strategy.clip_norm=0"], "strategy.clip_norm"),
    (["strategy=dp_fedavg", "strategy.delta=1"], "strategy.delta"),
    (["strategy=dp_fedavg", "num_clients=10", "strategy.delta=0.1"], "strategy.delta"),
    (["strategy=dp_fedavg", "strategy.max_epsilon=0"], "strategy.max_epsilon"),
    (["privacy=local", "privacy.noise_multiplier=0"], "privacy.noise_multiplier"),
    (["privacy=local", "privacy.clip_norm=-0.5"], "privacy.clip_norm"),
    (["privacy=local", "privacy.delta=1.5"], "privacy.delta"),
    (["privacy=local", "num_clients=100", "privacy.delta=0.01"], "privacy.delta"),
    (["privacy=dpsgd", "privacy.noise_multiplier=0"], "privacy.noise_multiplier"),
    (["privacy=dpsgd", "privacy.max_grad_norm=0"], "privacy.max_grad_norm"),
    (["privacy=dpsgd", "privacy.delta=1"], "privacy.delta"),
    (["privacy=none", "privacy.name=maybe"], "privacy.name"),
])
def test_unsafe_privacy_settings_are_refused_at_compose_time_naming_the_setting(
        overrides, key) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}=.* is invalid: it must be"):
        compose(overrides)


def test_a_delta_not_below_one_over_num_clients_is_refused_with_a_safe_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"below 1/num_clients = 0.1, e.g. 0.01"):
        compose(["strategy=dp_fedavg", "num_clients=10", "strategy.delta=0.1"])
