"""Specifications of example-level DP-SGD (Opacus) in the clients' local training."""

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from opacus.accountants import RDPAccountant
from strategy_helpers import FakeGrid, record, set_task_identity, train_reply

from fl_app import training
from fl_app.client_core import build_client
from fl_app.config import ConfigError, compose
from fl_app.models import MLP
from fl_app.privacy.accounting import epsilon_rdp
from fl_app.privacy.central import DPNoise
from fl_app.privacy.client import DPSGD
from fl_app.strategies import WeightedFedAvg


def dpsgd_client(*overrides: str, **privacy: float):
    cfg = compose(["dataset=digits", "privacy=dpsgd", "batch_size=64", "local_epochs=1",
                   *[f"privacy.{k}={v}" for k, v in privacy.items()], *overrides])
    return build_client(cfg, 0, 4)


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def test_dpsgd_client_reports_an_epsilon_that_grows_each_round_and_matches_the_accountants(
) -> None:
    sigma, delta = 1.1, 1e-5
    client = dpsgd_client(noise_multiplier=sigma, delta=delta)
    n = len(client.data.y_train)
    steps_per_round = math.ceil(n / 64)  # Poisson batches of expected size 64: q = 1/steps
    params = client.get_parameters({})
    epsilons = []
    for server_round in (1, 2, 3):
        params, num_examples, metrics = client.fit(params, {"server-round": server_round})
        assert num_examples == n and "train_loss" not in metrics
        steps = server_round * steps_per_round
        direct = RDPAccountant()
        direct.history = [(sigma, 1 / steps_per_round, steps)]
        assert metrics["dpsgd_epsilon_rdp"] == pytest.approx(direct.get_epsilon(delta),
                                                             rel=1e-9)
        # Google's dp_accounting agrees up to its grid of RDP orders.
        assert metrics["dpsgd_epsilon_rdp"] == pytest.approx(
            epsilon_rdp(sigma, 1 / steps_per_round, steps, delta), rel=0.01)
        assert metrics["dpsgd_epsilon"] == min(metrics["dpsgd_epsilon_rdp"],
                                               metrics["dpsgd_epsilon_pld"])
        assert (metrics["dpsgd_delta"], metrics["dpsgd_noise_multiplier"]) == (delta, sigma)
        epsilons.append(metrics["dpsgd_epsilon"])
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2]


def test_dpsgd_epsilon_is_smaller_with_more_noise() -> None:
    low, high = DPSGD(1.0, 0.8, 1e-5), DPSGD(1.0, 1.6, 1e-5)
    low.history = [(0.8, 0.1, 50)]
    high.history = [(1.6, 0.1, 50)]
    assert high.epsilon() < low.epsilon()
    assert DPSGD(1.0, 1.0, 1e-5).epsilon() == 0.0  # no step, no cost


def test_dpsgd_trains_the_plain_model_and_leaves_no_opacus_state_on_it() -> None:
    client = dpsgd_client("lr=0.1", noise_multiplier=0.5, max_grad_norm=5.0)
    keys = list(client.model.state_dict())
    start = client.get_parameters({})
    before, _, _ = client.evaluate(start, {})
    params = start
    for server_round in range(1, 6):
        params, _, _ = client.fit(params, {"server-round": server_round})
    after, _, _ = client.evaluate(params, {})
    assert list(client.model.state_dict()) == keys  # not GradSampleModule's "_module." keys
    assert [p.shape for p in params] == [p.shape for p in start]
    assert not any(hasattr(p, "grad_sample") for p in client.model.parameters())
    assert after < before  # it does learn


def test_each_examples_gradient_is_clipped_to_max_grad_norm() -> None:
    # One full-batch step (q = 1: every example in) with almost no noise is lr times the mean of
    # the clipped per-example gradients. Identical examples have identical gradients, so that
    # mean is one clipped gradient: its norm is exactly C, far below the unclipped norm.
    torch.manual_seed(0)
    model = MLP((1, 8, 8), 10)
    x, y = torch.randn(1, 1, 8, 8).repeat(50, 1, 1, 1) * 5, torch.full((50,), 3)
    unclipped = training.gradient(model, x, y, None, 0)[0]
    assert np.linalg.norm(flat(g.numpy() for g in unclipped.values())) > 0.5
    start = flat(p.detach() for p in model.parameters())
    training.train_dpsgd(model, x, y, epochs=1, batch_size=None, lr=1.0, noise_multiplier=1e-9,
                         max_grad_norm=0.01, accountant_history=[])
    step = np.linalg.norm(flat(p.detach() for p in model.parameters()) - start)
    assert step == pytest.approx(0.01, rel=1e-4)


def test_dpsgd_noise_std_is_sigma_times_c_over_the_expected_batch() -> None:
    # Clip the gradients to almost nothing: one full-batch step is then lr * noise / batch.
    torch.manual_seed(0)
    model = MLP((1, 28, 28), 10)
    x, y = torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,))
    start = flat(p.detach() for p in model.parameters())
    sigma, clip = 2.0, 1e-3
    training.train_dpsgd(model, x, y, epochs=1, batch_size=None, lr=1.0, noise_multiplier=sigma,
                         max_grad_norm=clip, accountant_history=[])
    step = flat(p.detach() for p in model.parameters()) - start
    assert step.std() == pytest.approx(sigma * clip / 40, rel=0.02)  # ~200k coordinates


def test_dpsgd_noise_and_sampling_do_not_follow_the_config_seed() -> None:
    a, b = dpsgd_client(), dpsgd_client()
    start = a.get_parameters({})
    wa, _, _ = a.fit(start, {"server-round": 1})
    wb, _, _ = b.fit(start, {"server-round": 1})
    assert not np.array_equal(wa[0], wb[0])


def test_dpsgd_refuses_gradient_mode_and_a_fedsgd_strategy() -> None:
    client = dpsgd_client()
    with pytest.raises(ValueError, match="privacy=dpsgd trains locally"):
        client.fit(client.get_parameters({}), {"mode": "gradient"})
    for strategy in ("fedsgd", "dp_fedsgd"):
        with pytest.raises(ConfigError, match="DP-SGD trains locally"):
            compose([f"strategy={strategy}", "privacy=dpsgd"])


def test_dpsgd_refuses_a_delta_not_well_below_one_over_the_local_examples() -> None:
    with pytest.raises(ValueError, match="training examples"):
        dpsgd_client(delta=0.01)  # ~360 local examples: delta must be below ~0.003


@pytest.mark.parametrize("central_dp", [False, True])
def test_server_records_the_mean_and_the_largest_client_epsilon_so_far(
        monkeypatch, central_dp: bool) -> None:
    set_task_identity(monkeypatch)
    strategy = WeightedFedAvg(fraction_train=1.0)
    if central_dp:
        strategy = DPNoise(strategy, clip_norm=1.0, noise_multiplier=1.0, num_clients=4)
    rounds = [[(1, 10, 1.0), (2, 30, 3.0)], [(3, 20, 2.0)]]  # (node, examples, epsilon)
    for server_round, replies in enumerate(rounds, start=1):
        strategy.configure_train(server_round, record({"w": np.zeros(2)}), ConfigRecord(),
                                 FakeGrid([1, 2, 3, 4]))
        _, metrics = strategy.aggregate_train(server_round, [
            train_reply(node, {"w": np.ones(2)}, n, dpsgd_epsilon=eps)
            for node, n, eps in replies])
        if server_round == 1:
            assert metrics["dpsgd_epsilon"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)
    assert metrics["dpsgd_epsilon"] == 2.0      # this round's clients
    assert metrics["dpsgd_epsilon_max"] == 3.0  # the worst client so far, from round 1
