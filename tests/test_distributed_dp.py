"""The distributed DP mechanism (Skellam noise added by each client, inside the modular sum):
the noise the server's unmasked sum holds, its accounting, the modular wrap, and bad input."""

import dataclasses
import math
import os

import numpy as np
import pytest
from dp_accounting import dp_event, rdp

from fl_app.privacy import distributed as dd

SEED = b"public round seed"


def _clipped(update: np.ndarray, clip_norm: float) -> np.ndarray:
    norm = np.linalg.norm(update)
    return update * min(1.0, clip_norm / norm)


def _sum_of_encoded(updates, params, seed=SEED, rng_seed=0):
    """What secure aggregation's unmasked sum is: the clients' vectors added mod the modulus."""
    rng = np.random.default_rng(rng_seed)
    total = np.zeros(params.padded_dims, dtype=np.int64)
    for update in updates:
        vector, _ = dd.client_encode([update], params, seed, rng)
        assert vector.min() >= 0 and vector.max() < params.modulus
        total = (total + vector) % params.modulus
    return total.astype(np.uint32) if params.modulus <= 2**32 else total


def _decoded_noise(params, clients, rng_seed=0):
    rng = np.random.default_rng(100 + rng_seed)
    updates = [rng.normal(size=params.dims) * rng.uniform(0.001, 0.02) for _ in range(clients)]
    decoded = dd.server_decode(_sum_of_encoded(updates, params, rng_seed=rng_seed), params, SEED)
    return decoded - sum(_clipped(u, params.clip_norm) for u in updates)


def test_unmasked_sum_minus_clipped_sum_has_the_calibrated_std_and_zero_mean():
    params = dd.calibrate(clip_norm=1.0, noise_multiplier=0.8, dims=20_000, threshold=5,
                          max_clients=12)
    clients = 10
    noise = _decoded_noise(params, clients)
    expected = 0.8 * params.l2_bound / params.scale * math.sqrt(clients / 5)
    assert params.noise_std(clients) == pytest.approx(expected)
    # 20,000 coordinates: the sample std errs by ~0.5%, so 3% tolerance fails noise 10% off.
    assert np.std(noise) == pytest.approx(expected, rel=0.03)
    assert abs(np.mean(noise)) < 4 * expected / math.sqrt(params.dims)


def test_threshold_survivors_reach_target_std_and_fewer_do_not():
    params = dd.calibrate(1.0, 1.0, 8192, threshold=8, max_clients=20)
    target = 1.0 * params.l2_bound / params.scale  # z * Delta_2, in original units
    assert np.std(_decoded_noise(params, 8)) == pytest.approx(target, rel=0.05)
    assert np.std(_decoded_noise(params, 4, rng_seed=1)) < 0.8 * target


def test_epsilon_rises_when_survivors_drop_and_with_rounds():
    params = dd.calibrate(1.0, 1.0, 1000, threshold=20, max_clients=50)
    eps = {s: dd.epsilon_spent(params, [s] * 50, 0.1, 1e-5) for s in (50, 40, 20, 10)}
    assert eps[50] < eps[40] < eps[20] < eps[10] < math.inf
    by_rounds = [dd.epsilon_spent(params, [30] * r, 0.1, 1e-5) for r in (0, 1, 10, 50)]
    assert by_rounds[0] == 0.0
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:], strict=False))
    # One round that lost clients costs more than one that kept them.
    assert (dd.epsilon_spent(params, [50] * 9 + [20], 0.1, 1e-5)
            > dd.epsilon_spent(params, [50] * 10, 0.1, 1e-5))


def test_against_the_server_that_knows_the_cohort_epsilon_is_the_unsampled_one():
    params = dd.calibrate(1.0, 1.0, 1000, threshold=20, max_clients=50)
    assert (dd.epsilon_spent(params, [20] * 10, 1.0, 1e-5)
            > dd.epsilon_spent(params, [20] * 10, 0.1, 1e-5))


def _aligned_attack(params, seed, clients):
    """Every client sends the update of norm C that the rotation maps onto coordinate 0: the
    largest a coordinate of the sum can be (clients see the public seed before encoding)."""
    unit = np.zeros(params.padded_dims)
    unit[0] = 1.0
    update = dd.unrotate(unit, seed)[:params.dims] * params.clip_norm
    return [update] * clients


def _error_along(updates, params):
    """The decoded sum's error along the updates' direction (noise std there: one coordinate's)."""
    decoded = dd.server_decode(_sum_of_encoded(updates, params), params, SEED)
    direction = updates[0] / np.linalg.norm(updates[0])
    return decoded - sum(updates), float((decoded - sum(updates)) @ direction)


def test_no_wrap_at_max_clients_with_worst_case_inputs_and_wrap_far_beyond():
    # A small modulus, so that the bound binds; dims a power of 2, so the attack is exact.
    params = dd.calibrate(1.0, 0.3, 1024, threshold=10, max_clients=20, modulus=2**20)
    assert dd.wrap_probability(params, 20) <= dd.WRAP_PROBABILITY
    std = params.noise_std(20)
    for updates in (_aligned_attack(params, SEED, 20),
                    [np.full(1024, 1 / 32)] * 20):  # all clients: the same update of norm C
        error, along = _error_along(updates, params)
        assert np.max(np.abs(error)) < 7 * std and abs(along) < 7 * std
    # Far more clients than calibrated for: the bound says so, and the attack does wrap (the
    # sum's coordinate 0 passes modulus/2 and comes back off by a multiple of the modulus).
    assert dd.wrap_probability(params, 60) == 1.0
    _, along = _error_along(_aligned_attack(params, SEED, 60), params)
    assert abs(along) > 20 * params.noise_std(60)
    with pytest.raises(ValueError, match="no scale fits 600000 clients"):
        dd.calibrate(1.0, 1.0, 1024, threshold=5, max_clients=600_000, modulus=2**20)


def test_conditional_rounding_never_exceeds_the_l2_bound():
    rng = np.random.default_rng(3)
    # Half-way fractions: unconditioned, about 32 of 64 coordinates round up (norm ~ sqrt 32).
    x = np.full(64, 0.5)
    for _ in range(200):
        rounded = dd.conditional_round(x, math.sqrt(26), rng)
        assert rounded @ rounded <= 26
    with pytest.raises(RuntimeError, match="no vector of norm"):
        dd.conditional_round(np.full(64, 0.9), 1.0, rng)


def test_encoded_vectors_are_rounded_within_the_l2_bound_at_the_clip_norm():
    params = dd.calibrate(1.0, 1.0, 5000, threshold=5, max_clients=10, modulus=2**16)
    no_noise = dataclasses.replace(params, client_variance=0.0)
    rng = np.random.default_rng(4)
    for _ in range(20):
        vector, clipped = dd.client_encode([rng.normal(size=5000)], no_noise, SEED, rng)
        centred = np.where(vector >= params.modulus // 2, vector - params.modulus, vector)
        assert clipped and np.linalg.norm(centred) <= params.l2_bound


def test_rotation_round_trips_and_noiseless_decode_recovers_the_clipped_update():
    rng = np.random.default_rng(5)
    x = rng.normal(size=4096)
    assert np.allclose(dd.unrotate(dd.rotate(x, SEED), SEED), x, atol=1e-12)
    assert np.linalg.norm(dd.rotate(x, SEED)) == pytest.approx(np.linalg.norm(x))
    params = dd.calibrate(1.0, 1.0, 3000, threshold=5, max_clients=10, modulus=2**24)
    no_noise = dataclasses.replace(params, client_variance=0.0)
    update = rng.normal(size=3000) * 0.01  # norm ~0.55 < C: not clipped
    vector, clipped = dd.client_encode([update[:1000], update[1000:].reshape(40, 50)],
                                       no_noise, SEED, rng)
    assert not clipped
    error = dd.server_decode(vector, no_noise, SEED) - update
    assert np.max(np.abs(error)) < 5 / params.scale  # rounding: < 1 per rotated coordinate


def test_a_different_rotation_seed_does_not_decode():
    params = dd.calibrate(1.0, 1.0, 512, threshold=2, max_clients=4, modulus=2**24)
    no_noise = dataclasses.replace(params, client_variance=0.0)
    update = np.full(512, 0.04)
    vector, _ = dd.client_encode([update], no_noise, SEED, np.random.default_rng(0))
    assert np.allclose(dd.server_decode(vector, no_noise, SEED), update, atol=1e-3)
    assert not np.allclose(dd.server_decode(vector, no_noise, os.urandom(16)), update,
                           atol=1e-2)


def test_skellam_rdp_approaches_the_gaussian_of_the_same_variance():
    orders = np.array([2, 8, 32])
    for variance in (1e4, 1e8):
        gaussian = orders * 1.0 / (2 * variance)  # Delta_2 = 1, sigma^2 = the variance added
        skellam = dd.skellam_rdp(1.0, 1.0, variance, orders)
        assert np.all(skellam >= gaussian)
    # A factor 2 (mu read as each Poisson's rate) would leave the ratio at 0.5 or 2.
    assert np.allclose(skellam / gaussian, 1.0, rtol=1e-3)


def _gaussian_rdp(sigma: float, q: float, orders) -> np.ndarray:
    accountant = rdp.RdpAccountant(orders=[float(a) for a in orders])
    accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)))
    return np.array(accountant._rdp)


def test_subsampled_bound_is_valid_below_unsampled_and_equal_at_q_one():
    orders = list(range(2, 65))
    sigma = 1.5
    unsampled = [a / (2 * sigma**2) for a in orders]
    at_one = dd.subsampled_rdp(lambda a: a / (2 * sigma**2), 1.0, orders)
    assert np.allclose(at_one, unsampled)
    bound = dd.subsampled_rdp(lambda a: a / (2 * sigma**2), 0.05, orders)
    exact = _gaussian_rdp(sigma, 0.05, orders)  # tight for the Gaussian (Mironov et al. 2019)
    assert np.all(bound >= exact - 1e-12)
    assert np.all(bound <= np.array(unsampled))
    assert bound[0] < 0.05 * unsampled[0]  # amplification ~ q^2 at low orders
    # Near the Gaussian's own (tight) analysis: within 5% at the low orders, where the other
    # direction's bound binds, and equal above (Zhu & Wang's general bound is 3x there).
    assert np.allclose(bound, exact, rtol=0.05)
    assert np.allclose(bound[3:], exact[3:], rtol=1e-9)


def _renyi(p: np.ndarray, q: np.ndarray, order: int) -> float:
    return float(np.log(np.sum(p**order * q ** (1 - order))) / (order - 1))


@pytest.mark.parametrize("seed", range(5))
def test_subsampled_bound_holds_both_ways_on_exact_discrete_pairs(seed):
    """Any mechanism: random output distributions P (with the client) and Q (without), and
    the exact divergences of the Poisson mixture (1-q) Q + q P against Q, in both directions."""
    rng = np.random.default_rng(seed)
    p, q_dist = rng.dirichlet(np.ones(6)), rng.dirichlet(np.ones(6))
    orders = list(range(2, 21))

    def eps(order):
        return max(_renyi(p, q_dist, order), _renyi(q_dist, p, order))

    for rate in (0.01, 0.1, 0.5, 0.9):
        bound = dd.subsampled_rdp(eps, rate, orders)
        mix = (1 - rate) * q_dist + rate * p
        for order, b in zip(orders, bound, strict=True):
            assert _renyi(mix, q_dist, order) <= b + 1e-12
            assert _renyi(q_dist, mix, order) <= b + 1e-12


def test_subsampled_rdp_from_values_needs_every_integer_order():
    with pytest.raises(ValueError, match="every integer order"):
        dd.subsampled_rdp([0.1, 0.2], 0.1, [2, 4])
    with pytest.raises(ValueError, match="sample_rate"):
        dd.subsampled_rdp(lambda a: 0.1, 0.0, [2])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"noise_multiplier": 0.0}, "noise_multiplier must be a positive"),
    ({"noise_multiplier": float("nan")}, "noise_multiplier must be a positive"),
    ({"clip_norm": -1.0}, "clip_norm must be a positive"),
    ({"threshold": 11}, "max_clients must be an integer >= threshold = 11"),
    ({"threshold": 0}, "threshold must be a positive integer"),
    ({"modulus": 3 * 2**20}, "modulus must be a power of 2"),
    ({"modulus": 2**40}, "modulus must be a power of 2 between"),
    ({"dims": 0}, "dims must be a positive integer"),
    ({"dims": 10.5}, "dims must be a positive integer"),
    ({"beta": 1.0}, "beta must be in"),
])
def test_bad_settings_get_one_clear_error(kwargs, message):
    settings = {"clip_norm": 1.0, "noise_multiplier": 1.0, "dims": 100, "threshold": 3,
                "max_clients": 10} | kwargs
    with pytest.raises(ValueError, match=message):
        dd.calibrate(**settings)


def test_client_refuses_a_request_whose_noise_does_not_follow_from_its_settings():
    params = dd.calibrate(1.0, 1.0, 1000, threshold=10, max_clients=20)
    assert dd.params_problem(params, dims=1000, min_noise_multiplier=1.0,
                             min_threshold=10) is None
    # A server that claims z = 1 but asks each client for a quarter of the variance.
    weak = dataclasses.replace(params, client_variance=params.client_variance / 4)
    assert "client_variance" in dd.params_problem(weak)
    assert "l2_bound" in dd.params_problem(dataclasses.replace(params, l2_bound=1e12))
    assert "this client's update has 999" in dd.params_problem(params, dims=999)
    assert "agreed to" in dd.params_problem(params, min_noise_multiplier=2.0)
    few = dd.calibrate(1.0, 1.0, 1000, threshold=2, max_clients=20)
    assert "threshold 2 is below" in dd.params_problem(few, min_threshold=10)
    huge = dd.derive_params(1.0, 1.0, 1000, 10, 20, 2**16, dd.BETA, 1e4)  # consistent, but wraps
    assert "would wrap" in dd.params_problem(huge)
    assert "expected DistributedParams" in dd.params_problem({"scale": 1.0})


def test_encode_and_decode_refuse_malformed_vectors():
    params = dd.calibrate(1.0, 1.0, 100, threshold=2, max_clients=4)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="expect dims = 100"):
        dd.client_encode([np.zeros(99)], params, SEED, rng)
    with pytest.raises(ValueError, match="NaN or infinite"):
        dd.client_encode([np.full(100, np.nan)], params, SEED, rng)
    with pytest.raises(ValueError, match="rotation_seed must be at least 8 bytes"):
        dd.client_encode([np.zeros(100)], params, b"", rng)
    with pytest.raises(ValueError, match="length padded_dims = 128"):
        dd.server_decode(np.zeros(100, dtype=np.int64), params, SEED)
    with pytest.raises(ValueError, match="integer vector"):
        dd.server_decode(np.zeros(128), params, SEED)


def test_noise_the_sampler_cannot_draw_exactly_is_refused():
    params = dd.derive_params(1.0, 1.0, 1000, 10, 20, 2**32, dd.BETA, 1e9)
    assert "sampler is inexact" in dd.params_problem(params)
    with pytest.raises(ValueError, match="above what the sampler draws exactly"):
        dd.client_encode([np.zeros(1000)], params, SEED, np.random.default_rng(0))
    calibrated = dd.calibrate(1.0, 1.0, 100_000, threshold=20, max_clients=50)
    assert calibrated.client_variance / 2 <= dd.MAX_POISSON_RATE


def test_no_wrap_at_the_default_modulus_when_max_clients_align_their_updates():
    params = dd.calibrate(1.0, 1.0, 16_384, threshold=20, max_clients=50)
    assert params.modulus == 2**32
    assert dd.wrap_probability(params, 50) <= dd.WRAP_PROBABILITY
    error, along = _error_along(_aligned_attack(params, SEED, 50), params)
    assert abs(along) < 7 * params.noise_std(50)
    assert np.std(error) == pytest.approx(params.noise_std(50), rel=0.05)


def test_decode_reads_the_sum_in_any_integer_dtype_modulo_the_modulus():
    params = dd.calibrate(1.0, 1.0, 300, threshold=2, max_clients=4)
    rng = np.random.default_rng(6)
    total = _sum_of_encoded([rng.normal(size=300) * 0.01 for _ in range(3)], params)
    expected = dd.server_decode(total, params, SEED)
    as_int64 = total.astype(np.int64)
    for same in (as_int64 - 2**32, as_int64 + 3 * 2**32, as_int64.astype(np.uint64) + 2**63):
        assert np.array_equal(dd.server_decode(same, params, SEED), expected)
