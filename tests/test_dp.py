"""Specifications of DPNoise (central user-level DP-FedAvg / DP-FedSGD) and its accounting."""

import dp_accounting
import numpy as np
import pytest
from dp_accounting import dp_event, rdp
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from strategy_helpers import (
    FakeGrid,
    SimulatedGrid,
    error_reply,
    record,
    set_task_identity,
    train_reply,
    unpack,
)

from fl_app.privacy.accounting import (
    PrivacyBudgetExhausted,
    epsilon_rdp,
    epsilon_spent,
    rounds_within_budget,
)
from fl_app.privacy.central import DPNoise
from fl_app.strategies import GradientAveraging, WeightedFedAvg

TINY_SIGMA = 1e-12  # noise this small leaves the hand-computed result intact to ~1e-12


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_task_identity(monkeypatch)


def dp_strategy(inner=None, num_nodes: int = 4, **kwargs) -> DPNoise:
    settings = {"clip_norm": 1.0, "noise_multiplier": TINY_SIGMA, "num_clients": num_nodes,
                "noise_seed": 0, **kwargs}
    return DPNoise(inner or WeightedFedAvg(fraction_train=0.5), **settings)


def configure(strategy, model: dict[str, np.ndarray], server_round: int = 1, nodes=None):
    nodes = nodes or list(range(1, strategy.num_clients + 1))
    return list(strategy.configure_train(server_round, record(model), ConfigRecord(),
                                         FakeGrid(nodes)))


# --------------------------------------------------------------------------------------------
# Clipping and noise
# --------------------------------------------------------------------------------------------

def test_clipping_bounds_every_update_norm_and_leaves_small_updates_alone() -> None:
    """One reply, m = q N = 1, noise ~0: the release moves W by exactly the clipped update."""
    rng = np.random.default_rng(1)
    clip = 2.0
    for scale in np.geomspace(1e-3, 1e3, 40):
        strategy = dp_strategy(WeightedFedAvg(fraction_train=0.5), num_nodes=2, clip_norm=clip)
        model = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
        update = {k: rng.normal(size=v.shape) for k, v in model.items()}
        norm = np.sqrt(sum(np.vdot(v, v) for v in update.values()))
        update = {k: v * scale / norm for k, v in update.items()}  # norm = scale
        configure(strategy, model)
        reply = train_reply(1, update, 10)  # DP-FedAvg clients send their delta
        arrays, metrics = strategy.aggregate_train(1, [reply])
        moved = {k: v - model[k] for k, v in unpack(arrays).items()}

        moved_norm = np.sqrt(sum(np.vdot(v, v) for v in moved.values()))
        assert moved_norm <= clip * (1 + 1e-9)
        assert metrics["num-clipped"] == int(scale > clip)
        for key in update:  # same direction; shorter only when above the bound
            expected = update[key] * min(1.0, clip / scale)
            np.testing.assert_allclose(moved[key], expected, rtol=1e-7, atol=1e-10)  # noise 2e-12


def test_noise_on_the_released_mean_has_std_sigma_c_over_m() -> None:
    sigma, clip, q, num_clients = 1.3, 0.7, 0.5, 10
    strategy = DPNoise(WeightedFedAvg(fraction_train=q), clip_norm=clip, noise_multiplier=sigma,
                       num_clients=num_clients, noise_seed=7)
    model = {"big": np.zeros((400, 500)), "small": np.zeros(10)}
    configure(strategy, model)
    # two clients reply with zero deltas (an unchanged model), so the release is pure noise
    replies = [train_reply(n, model, 10) for n in (1, 2)]
    released = unpack(strategy.aggregate_train(1, replies)[0])

    noise = np.concatenate([v.ravel() for v in released.values()])
    expected_std = sigma * clip / (q * num_clients)
    assert abs(noise.std() / expected_std - 1) < 0.03
    assert abs(noise.mean()) < 5 * expected_std / np.sqrt(noise.size)


def test_dp_fedavg_with_tiny_noise_equals_current_plus_clipped_deltas_over_m() -> None:
    strategy = dp_strategy(WeightedFedAvg(fraction_train=0.5), num_nodes=4, clip_norm=1.0)
    configure(strategy, {"w": np.array([1.0, 1.0])})
    replies = [  # DP-FedAvg clients send their deltas
        train_reply(1, {"w": np.array([3.0, 4.0])}, 100),  # norm 5 -> [0.6, 0.8]
        train_reply(2, {"w": np.array([0.3, 0.0])}, 1),    # norm 0.3: kept
        train_reply(3, {"w": np.array([np.nan, 0.0])}, 5),  # dropped
        error_reply(4, "crashed"),                          # dropped
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)

    # m = q * N = 2; uniform weights (num-examples ignored): [1, 1] + ([0.6, 0.8] + [0.3, 0]) / 2
    np.testing.assert_allclose(unpack(arrays)["w"], [1.45, 1.4], atol=1e-9)
    assert metrics["num-clipped"] == 1
    assert (metrics["num-clients"], metrics["num-dropped"]) == (2, 2)


def test_dp_fedavg_asks_clients_for_deltas_and_plain_fedavg_for_weights() -> None:
    model = {"w": np.ones(2)}
    dp = dp_strategy(WeightedFedAvg(fraction_train=1.0), num_nodes=2)
    assert {m.content["config"]["mode"] for m in configure(dp, model)} == {"delta"}
    plain = WeightedFedAvg(fraction_train=1.0)
    sent = plain.configure_train(1, record(model), ConfigRecord(), FakeGrid([1, 2]))
    assert {m.content["config"]["mode"] for m in sent} == {"weights"}


def test_dp_fedavg_releases_the_same_model_from_deltas_as_from_weights() -> None:
    """A strategy checkpointed before clients sent deltas still asks for weights and forms the
    deltas itself. Both protocols must release the same model, bit for bit in float32."""
    rng = np.random.default_rng(3)
    model = {"a": rng.normal(size=(300, 20)).astype(np.float32),
             "b": rng.normal(size=7).astype(np.float32)}
    trained = [{k: (v + rng.normal(scale=s, size=v.shape)).astype(np.float32)
                for k, v in model.items()} for s in (1e-3, 0.5, 2.0)]
    released = {}
    for mode in ("weights", "delta"):
        strategy = DPNoise(WeightedFedAvg(fraction_train=1.0), clip_norm=1.0,
                           noise_multiplier=0.5, num_clients=3, noise_seed=11)
        strategy.inner.mode = mode
        assert {m.content["config"]["mode"] for m in configure(strategy, model)} == {mode}
        replies = [train_reply(i + 1, t if mode == "weights" else
                               {k: t[k] - model[k] for k in t}, 10)
                   for i, t in enumerate(trained)]
        arrays, metrics = strategy.aggregate_train(1, replies)
        released[mode] = unpack(arrays)
        assert metrics["num-clipped"] == 2
    for key in model:
        np.testing.assert_array_equal(released["weights"][key], released["delta"][key])
        assert not np.array_equal(released["delta"][key], model[key])


@pytest.mark.parametrize("inner", [lambda: WeightedFedAvg(fraction_train=1.0),
                                   lambda: GradientAveraging(fraction_train=1.0, server_lr=0.3)],
                         ids=["fedavg", "fedsgd"])
def test_starting_the_sum_from_the_model_releases_what_applying_the_mean_does(inner) -> None:
    """The sum starts from W + a·noise/m (a: the inner step) and is itself the new model; the
    same noise applied after the sum, as `apply_update` does, differs by rounding only."""
    rng = np.random.default_rng(5)
    model = {"a": rng.normal(size=(200, 30)).astype(np.float32),
             "b": rng.normal(size=9).astype(np.float32)}
    updates = [{k: rng.normal(scale=0.05, size=v.shape).astype(np.float32)
                for k, v in model.items()} for _ in range(3)]
    released = []
    for fold in (True, False):
        strategy = DPNoise(inner(), clip_norm=1.0, noise_multiplier=0.5, num_clients=3,
                           noise_seed=3)
        if not fold:
            strategy.inner.update_step = lambda: None
        configure(strategy, model)
        arrays, _ = strategy.aggregate_train(
            1, [train_reply(i + 1, u, 5) for i, u in enumerate(updates)])
        released.append(unpack(arrays))
    for key in model:
        np.testing.assert_allclose(released[0][key], released[1][key], rtol=0, atol=2e-6)
        assert np.abs(released[0][key] - model[key]).max() > 1e-2  # noise and updates moved it


def test_dp_fedsgd_clips_the_gradient_not_reply_minus_current() -> None:
    inner = GradientAveraging(fraction_train=1.0, server_lr=0.1)
    strategy = dp_strategy(inner, num_nodes=2, clip_norm=1.0)
    # far from zero, so clipping reply - current would give a completely different step
    configure(strategy, {"w": np.array([10.0, 10.0])})
    replies = [train_reply(1, {"w": np.array([3.0, 4.0])}, 1),   # gradient, clipped to [0.6, 0.8]
               train_reply(2, {"w": np.array([0.0, 0.5])}, 1)]   # gradient, kept
    arrays, metrics = strategy.aggregate_train(1, replies)

    # mean = ([0.6, 0.8] + [0, 0.5]) / (1.0 * 2) = [0.3, 0.65];  W = 10 - 0.1 * mean
    np.testing.assert_allclose(unpack(arrays)["w"], [9.97, 9.935], atol=1e-9)
    assert metrics["num-clipped"] == 1


def test_round_without_replies_still_releases_noise_and_counts_for_privacy() -> None:
    strategy = dp_strategy(noise_multiplier=1.0, noise_seed=3)
    configure(strategy, {"w": np.zeros(5)})
    arrays, metrics = strategy.aggregate_train(1, [])
    assert arrays is not None
    assert np.all(unpack(arrays)["w"] != 0.0)
    assert strategy.rounds_done == 1
    assert metrics["epsilon"] == pytest.approx(epsilon_spent(1.0, 0.5, 1, strategy.delta))


def test_dp_round_reports_privacy_metrics_and_epsilon_grows_each_round() -> None:
    strategy = dp_strategy(noise_multiplier=1.1, clip_norm=0.5)
    epsilons = []
    for server_round in (1, 2):
        configure(strategy, {"w": np.zeros(3)}, server_round)
        _, metrics = strategy.aggregate_train(
            server_round, [train_reply(1, {"w": np.ones(3)}, 4, train_loss=0.25)])
        expected = epsilon_spent(1.1, 0.5, server_round, strategy.delta)
        assert metrics["epsilon"] == pytest.approx(expected) == strategy.epsilon
        assert metrics["delta"] == strategy.delta
        assert (metrics["clip-norm"], metrics["noise-multiplier"]) == (0.5, 1.1)
        assert metrics["num-clipped"] == 1 and metrics["train_loss"] == pytest.approx(0.25)
        epsilons.append(metrics["epsilon"])
    assert epsilons[1] > epsilons[0] > 0


def test_poisson_sampling_is_seeded_and_each_node_joins_with_probability_q() -> None:
    nodes = list(range(1000, 1200))

    def cohort(seed: int, server_round: int) -> list[int]:
        strategy = dp_strategy(WeightedFedAvg(fraction_train=0.3, seed=seed), num_nodes=200)
        messages = configure(strategy, {"w": np.zeros(1)}, server_round, nodes)
        return sorted(m.metadata.dst_node_id for m in messages)

    assert cohort(5, 1) == cohort(5, 1)
    assert cohort(5, 1) != cohort(5, 2)
    sizes = [len(cohort(5, r)) for r in range(1, 41)]
    assert len(set(sizes)) > 1  # Poisson: the cohort size is random, not fixed
    # mean of 40 Binomial(200, 0.3) draws: 60 +- 1.0 (one std); allow 4 std
    assert abs(np.mean(sizes) - 60) < 4.0


def test_state_dict_restores_rounds_epsilon_and_inner_velocity() -> None:
    inner = GradientAveraging(fraction_train=0.5, server_momentum=0.9)
    strategy = dp_strategy(inner, noise_multiplier=1.0)
    configure(strategy, {"w": np.zeros(2)})
    strategy.aggregate_train(1, [train_reply(1, {"w": np.array([0.1, 0.2])}, 1)])
    state = strategy.state_dict()

    restored = dp_strategy(GradientAveraging(fraction_train=0.5, server_momentum=0.9),
                           noise_multiplier=1.0)
    restored.load_state_dict(state)
    assert restored.rounds_done == 1
    assert restored.epsilon == pytest.approx(strategy.epsilon) and restored.epsilon > 0
    np.testing.assert_array_equal(restored.inner.velocity["w"], inner.velocity["w"])


# --------------------------------------------------------------------------------------------
# Accounting
# --------------------------------------------------------------------------------------------

def test_epsilon_grows_with_rounds_and_shrinks_with_more_noise() -> None:
    assert epsilon_spent(1.0, 1.0, 0, 1e-5) == 0.0
    by_rounds = [epsilon_spent(1.0, 1.0, r, 1e-5) for r in (1, 10, 100)]
    assert by_rounds[0] < by_rounds[1] < by_rounds[2]
    by_sigma = [epsilon_spent(s, 1.0, 10, 1e-5) for s in (0.5, 1.0, 4.0)]
    assert by_sigma[0] > by_sigma[1] > by_sigma[2]


def test_epsilon_equals_dp_accounting_called_directly() -> None:
    sigma, q, rounds, delta = 1.2, 0.2, 8, 1e-4
    accountant = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    for _ in range(rounds):  # one compose per round, as a round-by-round accountant would
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)))
    assert epsilon_rdp(sigma, q, rounds, delta) == pytest.approx(
        accountant.get_epsilon(delta), rel=1e-9)


def test_epsilon_equals_flowers_rdp_accountant_for_poisson_sampling() -> None:
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    num_clients, cohort, sigma, rounds, delta = 50, 10, 1.2, 30, 1e-4  # q = 0.2
    accountant = RdpAccountant(PrivacyConfig(
        target_delta=delta, population_size=num_clients,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.POISSON))
    accountant.compose(GaussianPrivacyEvent(sigma, cohort, num_clients), count=rounds)
    assert epsilon_rdp(sigma, cohort / num_clients, rounds, delta) == pytest.approx(
        accountant.get_epsilon(delta), rel=1e-9)


def test_rounds_within_budget_is_the_last_round_not_exceeding_it() -> None:
    sigma, q, delta, budget = 1.0, 1.0, 1e-5, 20.0
    expected = 0
    while epsilon_spent(sigma, q, expected + 1, delta) <= budget:
        expected += 1
    assert 1 < expected < 1000
    assert rounds_within_budget(sigma, q, delta, budget, max_rounds=1000) == expected
    assert rounds_within_budget(sigma, q, delta, budget, max_rounds=3) == min(3, expected)
    assert rounds_within_budget(sigma, q, delta, 1e-6, max_rounds=1000) == 0


def test_budget_exhausted_is_raised_before_the_round_that_would_exceed_it() -> None:
    sigma, q, num_clients, delta, budget = 2.0, 0.5, 4, 0.01, 2.0
    allowed = 0  # the expected number of rounds, straight from the accountant
    while epsilon_spent(sigma, q, allowed + 1, delta) <= budget:
        allowed += 1
    assert allowed >= 2

    strategy = DPNoise(WeightedFedAvg(fraction_train=q), clip_norm=1.0, noise_multiplier=sigma,
                       num_clients=num_clients, delta=delta, max_epsilon=budget, noise_seed=0)
    for server_round in range(1, allowed + 1):
        configure(strategy, {"w": np.zeros(2)}, server_round)
        strategy.aggregate_train(server_round, [])
    assert strategy.epsilon <= budget

    with pytest.raises(PrivacyBudgetExhausted) as info:
        configure(strategy, {"w": np.zeros(2)}, allowed + 1)
    message = str(info.value)
    assert f"{strategy.epsilon:.4g}" in message
    assert f"{epsilon_spent(sigma, q, allowed + 1, delta):.4g}" in message
    assert "max_epsilon = 2" in message
    for fix in ("noise_multiplier", "fraction_train", "num_clients"):
        assert fix in message
    assert strategy.rounds_done == allowed  # the refused round was not released


def test_flowers_round_loop_stops_with_budget_exhausted_after_the_allowed_rounds() -> None:
    sigma, q, num_clients, delta, budget = 2.0, 0.5, 4, 0.01, 2.0
    allowed = rounds_within_budget(sigma, q, delta, budget, max_rounds=100)

    def client(node_id: int, message) -> RecordDict:
        assert message.content["config"]["mode"] == "delta"
        return RecordDict({"arrays": record({"w": np.full(3, 0.1)}),
                           "metrics": MetricRecord({"num-examples": 3})})

    strategy = DPNoise(WeightedFedAvg(fraction_train=q), clip_norm=1.0, noise_multiplier=sigma,
                       num_clients=num_clients, delta=delta, max_epsilon=budget, noise_seed=0)
    with pytest.raises(PrivacyBudgetExhausted):
        strategy.start(SimulatedGrid([1, 2, 3, 4], client), record({"w": np.zeros(3)}),
                       num_rounds=allowed + 5)
    assert strategy.rounds_done == allowed
    assert strategy.epsilon == pytest.approx(epsilon_spent(sigma, q, allowed, delta))


# --------------------------------------------------------------------------------------------
# Refused settings
# --------------------------------------------------------------------------------------------

def test_default_delta_is_a_tenth_of_one_over_num_clients() -> None:
    strategy = DPNoise(WeightedFedAvg(), clip_norm=1.0, noise_multiplier=1.0, num_clients=50)
    assert strategy.delta == pytest.approx(1 / 500)


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"delta": 0.1}, "1/num_clients"),  # 10 clients: delta must be < 0.1
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.5}, "delta"),
        ({"num_clients": 0}, "num_clients"),
        ({"max_epsilon": -1.0}, "max_epsilon"),
        ({"fraction_train": 0.0}, "fraction_train"),
    ],
)
def test_bad_privacy_settings_are_refused_with_the_setting_named(settings, named) -> None:
    fraction = settings.pop("fraction_train", 0.5)
    kwargs = {"clip_norm": 1.0, "noise_multiplier": 1.0, "num_clients": 10, **settings}
    with pytest.raises(ValueError, match=named.replace("/", ".")):
        DPNoise(WeightedFedAvg(fraction_train=fraction), **kwargs)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ((0.0, 0.5, 1e-5), "noise_multiplier"),
        ((1.0, 0.0, 1e-5), "sample_rate"),
        ((1.0, 1.5, 1e-5), "sample_rate"),
        ((1.0, 0.5, 0.0), "delta"),
        ((1.0, 0.5, 1.0), "delta"),
    ],
)
def test_accounting_refuses_invalid_inputs(args, named) -> None:
    sigma, q, delta = args
    with pytest.raises(ValueError, match=named):
        epsilon_spent(sigma, q, 10, delta)
    with pytest.raises(ValueError, match=named):
        rounds_within_budget(sigma, q, delta, max_epsilon=1.0, max_rounds=10)


def test_dp_wrapper_refuses_a_strategy_without_client_update() -> None:
    from flwr.serverapp.strategy import FedAvg

    with pytest.raises(TypeError, match="SampledStrategy"):
        DPNoise(FedAvg(), clip_norm=1.0, noise_multiplier=1.0, num_clients=10)
