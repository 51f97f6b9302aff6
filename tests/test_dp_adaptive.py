"""Specifications of adaptive clipping (Andrew et al. 2019) in DPNoise and its honest accounting."""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import ConfigRecord
from strategy_helpers import FakeGrid, record, set_task_identity, train_reply, unpack

from fl_app.config import ConfigError, compose
from fl_app.privacy.accounting import (
    combined_noise_multiplier,
    epsilon_spent,
    update_noise_multiplier,
)
from fl_app.privacy.adaptive_clipping import QuantileClipNorm
from fl_app.privacy.central import DPNoise
from fl_app.privacy.noise import GaussianNoise
from fl_app.strategies import GradientAveraging, WeightedFedAvg


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_task_identity(monkeypatch)


def adaptive(inner=None, num_clients: int = 4, **kwargs) -> DPNoise:
    settings = {"clip_norm": 1.0, "noise_multiplier": 1e-12, "num_clients": num_clients,
                "noise_seed": 0, "clipping": "adaptive", "clipped_count_stddev": 1e-9, **kwargs}
    return DPNoise(inner or WeightedFedAvg(fraction_train=1.0), **settings)


def configure(strategy: DPNoise, model: dict[str, np.ndarray], server_round: int = 1) -> None:
    nodes = list(range(1, strategy.num_clients + 1))
    strategy.configure_train(server_round, record(model), ConfigRecord(), FakeGrid(nodes))


# --------------------------------------------------------------------------------------------
# The clip norm follows the target quantile
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target_quantile", [0.5, 0.8])
@pytest.mark.parametrize("start", [0.01, 100.0], ids=["from_below", "from_above"])
def test_adaptive_clip_norm_moves_to_the_target_quantile_of_synthetic_norms(
        start: float, target_quantile: float) -> None:
    # Update norms ~ lognormal(0, 1): the gamma-quantile is exp(Phi^-1(gamma)).
    true_quantile = math.exp(float(np.quantile(np.random.default_rng(9).normal(size=200_000),
                                               target_quantile)))
    clip = QuantileClipNorm(start, target_quantile, learning_rate=0.2, count_stddev=100 / 20,
                            expected_clients=100, noise=GaussianNoise(1))
    data = np.random.default_rng(2)
    trajectory = []
    for _ in range(300):
        norms = data.lognormal(0.0, 1.0, size=data.binomial(1000, 0.1))  # Poisson-sampled cohort
        clip.update(int((norms <= clip.value).sum()), len(norms))
        trajectory.append(clip.value)

    # Far from the quantile nearly every norm is on one side, so log C moves at close to its
    # full rate toward it: eta * gamma per round from below, eta * (1 - gamma) from above.
    distance = [abs(math.log(c / true_quantile)) for c in [start, *trajectory]]
    rate = 0.2 * (target_quantile if start < true_quantile else 1 - target_quantile)
    assert distance[0] - distance[20] > 0.75 * 20 * rate
    # ... and it settles at the quantile.
    settled = np.mean(trajectory[150:])
    assert settled == pytest.approx(true_quantile, rel=0.1)
    fresh = data.lognormal(0.0, 1.0, size=100_000)
    assert np.mean(fresh <= settled) == pytest.approx(target_quantile, abs=0.05)


def test_noised_unclipped_fraction_is_unbiased_with_std_count_noise_over_m() -> None:
    clip = QuantileClipNorm(1.0, 0.5, 0.2, count_stddev=3.0, expected_clients=60,
                            noise=GaussianNoise(4))
    draws = np.array([clip.noisy_unclipped_fraction(45, 60) for _ in range(20_000)])
    assert draws.mean() == pytest.approx(45 / 60, abs=0.002)
    assert draws.std() == pytest.approx(3.0 / 60, rel=0.03)


def test_adaptive_round_clips_with_this_rounds_norm_then_takes_the_geometric_step() -> None:
    strategy = adaptive(num_clients=4, clip_norm=1.0, target_quantile=0.5, clip_lr=0.2)
    configure(strategy, {"w": np.zeros(2)})
    replies = [train_reply(n, {"w": np.array([0.3, 0.0])}, 1) for n in (1, 2, 3)]  # norm 0.3
    replies.append(train_reply(4, {"w": np.array([3.0, 4.0])}, 1))                 # norm 5
    arrays, metrics = strategy.aggregate_train(1, replies)

    # clipped with C = 1: (3 * [0.3, 0] + [0.6, 0.8]) / m, m = 4
    np.testing.assert_allclose(unpack(arrays)["w"], [0.375, 0.2], atol=1e-7)
    assert metrics["clip-norm"] == 1.0 and metrics["num-clipped"] == 1
    assert metrics["unclipped-fraction"] == pytest.approx(0.75, abs=1e-8)
    # 3 of 4 under C, target 0.5: C shrinks by exp(-0.2 * (0.75 - 0.5))
    assert strategy.clip_norm == pytest.approx(math.exp(-0.05), rel=1e-8)

    configure(strategy, {"w": np.zeros(2)}, 2)
    _, metrics = strategy.aggregate_train(2, [])
    assert metrics["clip-norm"] == pytest.approx(math.exp(-0.05))  # the norm round 2 used


def test_adaptive_clipping_works_on_fedsgd_gradients() -> None:
    strategy = adaptive(GradientAveraging(fraction_train=1.0, server_lr=1.0), num_clients=2,
                        clip_norm=10.0, target_quantile=0.5, clip_lr=0.2)
    configure(strategy, {"w": np.array([5.0, 5.0])})
    replies = [train_reply(1, {"w": np.array([0.1, 0.0])}, 1),
               train_reply(2, {"w": np.array([0.0, 0.1])}, 1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(unpack(arrays)["w"], [4.95, 4.95], atol=1e-7)
    assert strategy.clip_norm == pytest.approx(10.0 * math.exp(-0.1))  # all under C: shrink


def test_state_dict_restores_the_adapted_clip_norm() -> None:
    strategy = adaptive(clip_norm=2.0)
    configure(strategy, {"w": np.zeros(1)})
    strategy.aggregate_train(1, [])
    restored = adaptive(clip_norm=2.0)
    restored.load_state_dict(strategy.state_dict())
    assert restored.clip_norm == strategy.clip_norm != 2.0
    assert restored.adaptive_clip.value == strategy.clip_norm


# --------------------------------------------------------------------------------------------
# Noise and accounting: the count costs privacy too
# --------------------------------------------------------------------------------------------

def test_update_noise_is_raised_so_that_update_and_count_together_cost_sigma() -> None:
    for sigma, count_stddev in [(1.0, 5.0), (0.5, 0.3), (2.0, 1.01)]:
        update = update_noise_multiplier(sigma, count_stddev)
        assert update > sigma
        assert combined_noise_multiplier(update, count_stddev) == pytest.approx(sigma, rel=1e-12)


def test_adaptive_epsilon_equals_dp_accounting_for_the_composed_update_and_count_release() -> None:
    sigma, q, num_clients, rounds = 1.0, 0.1, 200, 12
    strategy = DPNoise(WeightedFedAvg(fraction_train=q), clip_norm=1.0, noise_multiplier=sigma,
                       num_clients=num_clients, clipping="adaptive", noise_seed=0)
    count_stddev = strategy.adaptive_clip.count_stddev
    assert count_stddev == pytest.approx(max(q * num_clients / 20, sigma))
    for server_round in range(1, rounds + 1):
        configure(strategy, {"w": np.zeros(2)}, server_round)
        _, metrics = strategy.aggregate_train(server_round, [])

    # What is really released each round: the update sum (multiplier sigma_u) and the centred
    # count (sensitivity 1/2, noise std sigma_b: multiplier 2 sigma_b), on one Poisson sample.
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    both = dp_event.ComposedDpEvent([
        dp_event.GaussianDpEvent(strategy.update_noise_multiplier),
        dp_event.GaussianDpEvent(2 * count_stddev)])
    accountant.compose(dp_event.PoissonSampledDpEvent(q, both), rounds)
    assert metrics["epsilon-rdp"] == pytest.approx(accountant.get_epsilon(strategy.delta),
                                                   rel=1e-9)
    assert metrics["epsilon"] == pytest.approx(epsilon_spent(sigma, q, rounds, strategy.delta))
    assert metrics["noise-multiplier"] == sigma
    assert metrics["update-noise-multiplier"] == strategy.update_noise_multiplier > sigma
    assert metrics["clipped-count-stddev"] == count_stddev


def test_adaptive_release_noise_std_is_the_raised_update_multiplier_times_c_over_m() -> None:
    sigma, clip, num_clients = 1.0, 0.5, 10
    strategy = DPNoise(WeightedFedAvg(fraction_train=1.0), clip_norm=clip, noise_multiplier=sigma,
                       num_clients=num_clients, clipping="adaptive", clipped_count_stddev=0.6,
                       noise_seed=3)
    configure(strategy, {"w": np.zeros(300_000)})
    released = unpack(strategy.aggregate_train(1, [])[0])["w"]
    expected = update_noise_multiplier(sigma, 0.6) * clip / num_clients
    assert expected > 1.5 * sigma * clip / num_clients  # the count takes a real share here
    assert released.std() == pytest.approx(expected, rel=0.02)


# --------------------------------------------------------------------------------------------
# Refused settings
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("settings", "named"), [
    ({"clipped_count_stddev": 0.5}, "clipped_count_stddev"),  # 2 * 0.5 = sigma: nothing left
    ({"clipped_count_stddev": -1.0}, "clipped_count_stddev"),
    ({"target_quantile": 1.0}, "target_quantile"),
    ({"target_quantile": 0.0}, "target_quantile"),
    ({"clip_lr": 0.0}, "clip_lr"),
    ({"clipping": "sometimes"}, "clipping"),
])
def test_bad_adaptive_settings_are_refused_naming_the_setting(settings, named) -> None:
    kwargs = {"clip_norm": 1.0, "noise_multiplier": 1.0, "num_clients": 100,
              "clipping": "adaptive", **settings}
    with pytest.raises(ValueError, match=named):
        DPNoise(WeightedFedAvg(fraction_train=0.1), **kwargs)


@pytest.mark.parametrize("override,key", [
    ("strategy.clipped_count_stddev=0.1", "strategy.clipped_count_stddev"),
    ("strategy.target_quantile=1.5", "strategy.target_quantile"),
    ("strategy.clip_lr=-0.1", "strategy.clip_lr"),
    ("strategy.clipping=sometimes", "strategy.clipping"),
])
def test_bad_adaptive_config_is_refused_at_compose_time(override, key) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}="):
        compose(["strategy=dp_fedavg_adaptive", override])


def test_dp_fedavg_adaptive_is_dp_fedavg_with_adaptive_clipping_from_a_small_start() -> None:
    cfg = compose(["strategy=dp_fedavg_adaptive"])
    base = compose(["strategy=dp_fedavg"])
    assert cfg.strategy.clipping == "adaptive" and base.strategy.clipping == "fixed"
    assert cfg.strategy.clip_norm < base.strategy.clip_norm
    assert cfg.strategy.strategy == base.strategy.strategy
