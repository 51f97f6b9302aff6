"""The one-line warning when DP noise will swamp the signal, and how many clients it asks for."""

import logging

import pytest
from strategy_helpers import set_task_identity
from test_server_loop import _cfg, _grid

from fl_app import targets
from fl_app.config import compose
from fl_app.models import num_parameters
from fl_app.privacy.noise_warning import NOISE_TO_SIGNAL_LIMIT, noise_to_signal, noise_warning
from fl_app.server_loop import run

# docs/privacy.md's "Privacy and accuracy on a large population": 500 clients, q = 0.1.
LARGE = ["num_clients=500", "fraction_train=0.1"]


def size(cfg) -> int:
    return num_parameters(targets.build("model", cfg.model))


def test_central_dp_with_two_clients_per_round_warns_naming_the_clients_it_needs() -> None:
    cfg = compose(["strategy=dp_fedavg", "num_clients=4", "fraction_train=0.5"])
    d = size(cfg)  # the 2NN: 199,210
    warning = noise_warning(cfg, d)
    # sigma sqrt(d) / m = 0.3 * 446 / 2 = 67 > 20: 0.3 * 446 / 20 = 6.7, so 7 clients a round.
    assert warning is not None and "\n" not in warning
    assert "67x" in warning and ">= 7 clients per round" in warning
    assert "num_clients>=14 at fraction_train=0.5" in warning
    # The advice works: 14 clients at q = 0.5 bring it under the limit.
    enough = compose(["strategy=dp_fedavg", "num_clients=14", "fraction_train=0.5"])
    assert noise_warning(enough, d) is None
    assert noise_to_signal(0.3, d, 7) <= NOISE_TO_SIGNAL_LIMIT < noise_to_signal(0.3, d, 6)


@pytest.mark.parametrize("overrides", [
    ["strategy=dp_fedavg", "strategy.noise_multiplier=0.7"],
    ["strategy=dp_fedavg", "strategy.noise_multiplier=1.0"],
    ["strategy=dp_fedavg_adaptive", "strategy.noise_multiplier=1.0", "strategy.clip_norm=0.1"],
    ["strategy=fedavg", "privacy=local", "privacy.noise_multiplier=0.1"],
])
def test_the_docs_large_population_settings_that_train_do_not_warn(overrides) -> None:
    cfg = compose(["model=mlp", "dataset=mnist5k", *overrides, *LARGE])
    assert noise_warning(cfg, size(cfg)) is None


def test_local_dp_that_ends_at_chance_in_the_docs_warns_and_asks_for_a_larger_cohort() -> None:
    # docs/privacy.md: local DP at sigma = 1 on this population ends at 0.114 test accuracy.
    cfg = compose(["model=mlp", "dataset=mnist5k", "strategy=fedavg", "privacy=local",
                   "privacy.noise_multiplier=1.0", *LARGE])
    warning = noise_warning(cfg, size(cfg))
    # sigma sqrt(d / m) = sqrt(199210 / 50) = 63; under 20 needs m >= 199210 / 400 = 499.
    assert warning is not None and "privacy.noise_multiplier=1" in warning
    assert "63x" in warning and ">= 499 clients per round" in warning


def test_the_hospitals_preset_and_runs_without_noise_do_not_warn() -> None:
    hospitals = compose(["+experiment=hospitals", "strategy=dp_fedavg"])
    assert noise_warning(hospitals, size(hospitals)) is None
    plain = compose(["num_clients=2"])
    assert noise_warning(plain, size(plain)) is None


def test_the_server_warns_at_its_start_once_it_knows_the_models_size(
        monkeypatch, tmp_path, caplog) -> None:
    set_task_identity(monkeypatch)
    # The 2NN on 8x8 digits (55,210 parameters), 3 clients a round: 0.3 * 235 / 3 = 23.5.
    cfg = _cfg(tmp_path, "strategy=dp_fedavg", "num_rounds=1", "strategy.noise_multiplier=0.3")
    with caplog.at_level(logging.WARNING):
        run(_grid(cfg, 3), cfg)
    said = [r.getMessage() for r in caplog.records if "swamp" in r.getMessage()]
    assert len(said) == 1 and "55210-parameter" in said[0] and ">= 4 clients" in said[0]
