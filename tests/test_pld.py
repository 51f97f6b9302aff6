"""The privacy-loss-distribution (PLD) accountant beside RDP: tighter, valid, and what the budget
stop and the reported epsilon use."""

import logging
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event, pld
from flwr.app import ConfigRecord
from scipy.optimize import brentq
from scipy.stats import norm
from strategy_helpers import FakeGrid, record, set_task_identity

from fl_app.privacy import accounting
from fl_app.privacy.accounting import (
    Epsilon,
    PrivacyBudgetExhausted,
    epsilon_pld,
    epsilon_rdp,
    epsilon_spent,
    epsilons,
    pld_epsilon_of_steps,
    rounds_within_budget,
)
from fl_app.privacy.central import DPNoise
from fl_app.privacy.client import DPSGD, LocalDP
from fl_app.strategies import WeightedFedAvg


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_task_identity(monkeypatch)  # building a Message needs it


def configure(strategy: DPNoise, model: dict[str, np.ndarray], server_round: int,
              nodes: list[int] | None = None) -> None:
    nodes = nodes or list(range(1, strategy.num_clients + 1))
    list(strategy.configure_train(server_round, record(model), ConfigRecord(), FakeGrid(nodes)))


# docs/privacy.md's "Privacy and accuracy on a large population": (sigma, q, releases, delta).
# Central rows: 500 clients, q = 0.1, 50 rounds, delta = 1/(10 N). Local DP: sigma / 2 per
# release, q = 1, 15 releases (the most any client had there). DP-SGD: q = 4/8, 10 steps a round.
# The hospitals preset: sigma = 0.3, 5 clients, q = 1, 20 rounds, delta = 1/50.
DOCS_SETTINGS = [(0.7, 0.1, 50, 2e-4), (1.0, 0.1, 50, 2e-4), (0.05, 1.0, 15, 1e-5),
                 (0.5, 1.0, 15, 1e-5), (1.0, 0.5, 150, 1e-5), (0.3, 1.0, 20, 0.02)]


@pytest.mark.parametrize(("sigma", "q", "rounds", "delta"), DOCS_SETTINGS)
def test_pld_epsilon_is_below_rdp_and_within_a_sane_factor_on_the_docs_settings(
        sigma, q, rounds, delta) -> None:
    both = epsilons(sigma, q, rounds, delta)
    assert both.pld is not None
    assert 0.5 * both.rdp < both.pld <= both.rdp
    assert both.value == both.pld == epsilon_spent(sigma, q, rounds, delta)


def test_pld_epsilon_equals_dp_accountings_pld_accountant_called_directly() -> None:
    sigma, q, rounds, delta = 1.2, 0.2, 30, 1e-4
    accountant = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), rounds)
    direct = accountant.get_epsilon(delta)  # its finer 1e-4 grid
    ours = epsilon_pld(sigma, q, rounds, delta)
    assert direct <= ours <= direct + 0.01  # both rounded up: ours on a coarser grid


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang 2018, Thm. 8: the Gaussian mechanism with sensitivity 1 and std sigma is
    (eps, delta)-DP exactly when Phi(1/(2 sigma) - eps sigma) - e^eps Phi(-1/(2 sigma) - eps
    sigma) <= delta; the smallest such eps, by a root find."""
    def excess(eps: float) -> float:
        return (norm.cdf(0.5 / sigma - eps * sigma)
                - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma) - delta)

    return brentq(excess, 0.0, 50.0)


@pytest.mark.parametrize(("sigma", "releases"), [(0.5, 1), (1.0, 1), (2.0, 10), (1.0, 40)])
def test_pld_of_unsampled_gaussian_releases_is_the_analytic_gaussian_mechanism(
        sigma, releases) -> None:
    delta = 1e-5
    # k releases with std sigma compose to one with std sigma / sqrt(k).
    exact = analytic_gaussian_epsilon(sigma / math.sqrt(releases), delta)
    ours = epsilon_pld(sigma, 1.0, releases, delta)
    assert exact - 1e-9 <= ours <= exact + 2e-3  # pessimistic: never below the truth
    assert epsilon_rdp(sigma, 1.0, releases, delta) > ours


def test_budget_stop_follows_pld_past_where_rdp_would_stop_and_stops_when_the_min_crosses(
) -> None:
    sigma, q, num_clients, delta, budget = 1.0, 0.1, 100, 1e-3, 3.0
    rdp_allowed = 0
    while epsilon_rdp(sigma, q, rdp_allowed + 1, delta) <= budget:
        rdp_allowed += 1
    allowed = rounds_within_budget(sigma, q, delta, budget, max_rounds=1000)
    assert allowed > rdp_allowed >= 1
    assert epsilon_spent(sigma, q, allowed, delta) <= budget < epsilon_spent(
        sigma, q, allowed + 1, delta)

    strategy = DPNoise(WeightedFedAvg(fraction_train=q), clip_norm=1.0, noise_multiplier=sigma,
                       num_clients=num_clients, delta=delta, max_epsilon=budget, noise_seed=0)
    nodes = list(range(1, num_clients + 1))
    with pytest.raises(PrivacyBudgetExhausted) as info:
        for server_round in range(1, allowed + 10):
            configure(strategy, {"w": np.zeros(2)}, server_round, nodes)
            strategy.aggregate_train(server_round, [])
    assert strategy.rounds_done == allowed  # RDP alone would have stopped at rdp_allowed
    assert strategy.epsilons.rdp > budget >= strategy.epsilon == strategy.epsilons.pld
    assert "RDP" in str(info.value) and "PLD" in str(info.value)


def test_dp_metrics_report_the_tighter_epsilon_with_both_accountants_beside_it() -> None:
    sigma, q, delta = 1.0, 0.5, 0.01
    strategy = DPNoise(WeightedFedAvg(fraction_train=q), clip_norm=1.0, noise_multiplier=sigma,
                       num_clients=4, delta=delta, noise_seed=0)
    configure(strategy, {"w": np.zeros(2)}, 1)
    _, metrics = strategy.aggregate_train(1, [])
    _, secure = strategy.release_secure_sum(2, None, 0, 0, 0, {})
    skipped = strategy.skip_secure_round(3)
    for rounds, released in ((1, metrics), (2, secure), (3, skipped)):
        assert released["epsilon-rdp"] == pytest.approx(epsilon_rdp(sigma, q, rounds, delta))
        assert released["epsilon-pld"] == pytest.approx(epsilon_pld(sigma, q, rounds, delta))
        assert released["epsilon"] == min(released["epsilon-rdp"], released["epsilon-pld"])
        assert released["epsilon-pld"] < released["epsilon-rdp"]


def test_a_resumed_strategy_recomputes_both_epsilons_from_the_rounds_done() -> None:
    def build() -> DPNoise:
        return DPNoise(WeightedFedAvg(fraction_train=0.5), clip_norm=1.0, noise_multiplier=1.0,
                       num_clients=4, delta=0.01, noise_seed=0)

    first = build()
    for server_round in (1, 2, 3):
        configure(first, {"w": np.zeros(2)}, server_round)
        first.aggregate_train(server_round, [])
    resumed = build()
    resumed.load_state_dict(first.state_dict())
    assert resumed.epsilons == first.epsilons == epsilons(1.0, 0.5, 3, 0.01)
    assert resumed.epsilon == first.epsilon > 0


def test_client_side_dp_reports_the_tighter_epsilon_with_both_beside_it() -> None:
    local = LocalDP(1.0, 1.0, 1e-5, num_clients=100, rng=np.random.default_rng(0))
    for _ in range(5):
        local.privatize({"w": np.ones(3)})
    metrics = local.metrics()
    assert metrics["local_epsilon_pld"] == pytest.approx(epsilon_pld(0.5, 1.0, 5, 1e-5))
    assert metrics["local_epsilon"] == metrics["local_epsilon_pld"] < metrics["local_epsilon_rdp"]

    dpsgd = DPSGD(1.0, 1.0, 1e-5)
    dpsgd.history = [(1.0, 0.1, 100), (1.5, 0.2, 50)]  # two stretches of DP-SGD steps
    accountant = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for sigma, q, steps in dpsgd.history:
        accountant.compose(
            dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    metrics = dpsgd.metrics()
    assert metrics["dpsgd_epsilon_pld"] == pytest.approx(accountant.get_epsilon(1e-5), abs=0.02)
    assert metrics["dpsgd_epsilon"] == metrics["dpsgd_epsilon_pld"] < metrics["dpsgd_epsilon_rdp"]


def test_a_mechanism_pld_cannot_compose_keeps_rdp_reports_no_pld_and_says_so_once(caplog) -> None:
    mechanism = "distributed Skellam (test)"
    with caplog.at_level(logging.WARNING):
        first = Epsilon.rdp_only(3.25, mechanism)
        again = Epsilon.rdp_only(4.5, mechanism)
    assert first.value == 3.25 and again.value == 4.5
    assert first.metrics() == {"epsilon": 3.25, "epsilon-rdp": 3.25}  # no epsilon-pld
    said = [r.getMessage() for r in caplog.records
            if r.getMessage() == f"PLD: not available for {mechanism}, using RDP"]
    assert len(said) == 1
    assert first.pld_missing == said[0]


def test_pld_that_fails_falls_back_to_rdp_and_says_so(monkeypatch, caplog) -> None:
    def broken(*args) -> None:
        raise ValueError("no PLD today")

    monkeypatch.setattr(accounting, "_steps_pld", broken)
    with caplog.at_level(logging.WARNING):
        both = epsilons(1.37, 0.1, 7, 1e-5)  # a setting no other test caches
    assert both.pld is None and both.value == both.rdp == epsilon_rdp(1.37, 0.1, 7, 1e-5)
    assert "epsilon-pld" not in both.metrics()
    assert any("PLD: failed" in r.getMessage() and "using RDP" in r.getMessage()
               for r in caplog.records)


def test_a_setting_whose_pld_is_too_slow_uses_rdp_from_then_on(monkeypatch, caplog) -> None:
    monkeypatch.setattr(accounting, "PLD_SLOW_SECONDS", 0.0)
    monkeypatch.setattr(accounting, "_too_slow", set())
    with caplog.at_level(logging.WARNING):
        first = pld_epsilon_of_steps([(1.41, 0.1, 3)], 1e-5)  # computed, then marked slow
        later = pld_epsilon_of_steps([(1.41, 0.1, 4)], 1e-5)
    assert first is not None and later is None
    assert any("too slow" in r.getMessage() for r in caplog.records)
    assert epsilon_spent(1.41, 0.1, 5, 1e-5) == epsilon_rdp(1.41, 0.1, 5, 1e-5)


def test_pld_refuses_bad_settings_with_the_accountants_errors() -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        pld_epsilon_of_steps([(0.0, 0.1, 3)], 1e-5)
    with pytest.raises(ValueError, match="step count"):
        pld_epsilon_of_steps([(1.0, 0.1, -1)], 1e-5)
    assert pld_epsilon_of_steps([(1.0, 0.1, 0)], 1e-5) == 0.0  # no step, no cost
