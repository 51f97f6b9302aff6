"""Specifications of FedNova (Wang et al. 2020): normalized averaging by the clients' local steps.

W <- W + tau_eff · Σ_i p_i Delta_i / tau_i, p_i = n_i / Σ n_j, tau_eff = Σ_i p_i tau_i.
"""

import numpy as np
import pytest
from flwr.app import ConfigRecord
from strategy_helpers import FakeGrid, record, set_task_identity, train_reply, unpack

from fl_app import checkpoint, inprocess, targets
from fl_app.config import ConfigError, compose
from fl_app.messages import NUM_STEPS
from fl_app.privacy.central import DPNoise
from fl_app.strategies import FedNova, WeightedFedAvg

NODES = [11, 12]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_task_identity(monkeypatch)


def start_round(strategy, global_model: dict[str, np.ndarray]) -> list:
    """configure_train as the server runs it: the strategy learns the global model."""
    return list(strategy.configure_train(1, record(global_model), ConfigRecord(),
                                         FakeGrid(NODES)))


def delta_reply(node: int, model: dict[str, np.ndarray], size: float, n: int, steps: float):
    """A client whose delta is `size` in every coordinate of every array."""
    delta = {k: np.full_like(v, size) for k, v in model.items()}
    return train_reply(node, delta, n, **{NUM_STEPS: steps, "train_loss": 0.5})


# A global model of several float32 arrays, W = 0 in "w" and 0.5 in "b".
MODEL = {"w": np.zeros((2, 3), np.float32), "b": np.full(4, 0.5, np.float32)}


@pytest.mark.parametrize("container", [list, iter], ids=["list", "stream"])
def test_fednova_aggregate_matches_hand_computed_example(container) -> None:
    strategy = FedNova()
    sent = start_round(strategy, MODEL)
    assert {m.content["config"]["mode"] for m in sent} == {"delta"}
    # n = (10, 30), tau = (1, 4), Delta = (1.0, 2.0) in every coordinate:
    # p = (0.25, 0.75), tau_eff = 0.25·1 + 0.75·4 = 3.25,
    # Σ p_i Delta_i / tau_i = 0.25·1/1 + 0.75·2/4 = 0.625, step = 3.25 · 0.625 = 2.03125.
    replies = [delta_reply(11, MODEL, 1.0, 10, 1), delta_reply(12, MODEL, 2.0, 30, 4)]
    arrays, metrics = strategy.aggregate_train(1, container(replies))

    got = unpack(arrays)
    assert {k: v.dtype for k, v in got.items()} == {"w": np.float32, "b": np.float32}
    np.testing.assert_allclose(got["w"], np.full((2, 3), 2.03125), rtol=1e-6)
    np.testing.assert_allclose(got["b"], np.full(4, 0.5 + 2.03125), rtol=1e-6)
    np.testing.assert_allclose(strategy.current["b"], got["b"])
    assert metrics[NUM_STEPS] == pytest.approx(3.25)  # tau_eff: the example-weighted mean
    assert metrics["num-examples"] == 40 and metrics["num-clients"] == 2


def test_fedavg_on_the_same_deltas_weighs_the_client_with_more_steps_more() -> None:
    fedavg = WeightedFedAvg()
    fedavg.reply_with_updates()
    start_round(fedavg, MODEL)
    replies = [delta_reply(11, MODEL, 1.0, 10, 1), delta_reply(12, MODEL, 2.0, 30, 4)]
    got = unpack(fedavg.aggregate_train(1, replies)[0])
    np.testing.assert_allclose(got["w"], np.full((2, 3), 1.75))  # 0.25·1 + 0.75·2, not 2.03125


def test_fednova_equals_fedavg_when_every_client_takes_the_same_steps() -> None:
    rng = np.random.default_rng(5)
    model = {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": np.zeros(2, np.float32)}
    deltas = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in model.items()}
              for _ in NODES]
    released = []
    for strategy in (FedNova(), WeightedFedAvg()):
        strategy.reply_with_updates()
        start_round(strategy, model)
        replies = [train_reply(node, d, n, **{NUM_STEPS: 7})
                   for node, d, n in zip(NODES, deltas, (12, 50), strict=True)]
        released.append(unpack(strategy.aggregate_train(1, replies)[0]))
    for key in model:
        np.testing.assert_allclose(released[0][key], released[1][key], rtol=1e-5, atol=1e-6)


POSITIVE = "metric 'num-steps' must be a positive number for FedNova"


@pytest.mark.parametrize("steps,reason", [
    (None, POSITIVE), (0, POSITIVE), (-3, POSITIVE),
    (float("nan"), "metric 'num-steps' is not finite"),  # every reply's metrics are checked so
    (0.5, "metric 'num-steps' = 0.5 is below 1"),  # would blow its own delta up by 2
], ids=["missing", "zero", "negative", "nan", "fraction"])
def test_a_reply_without_a_positive_num_steps_is_dropped_with_the_reason(steps, reason) -> None:
    strategy = FedNova()
    start_round(strategy, MODEL)
    delta = {k: np.full_like(v, 1.0) for k, v in MODEL.items()}
    bad = train_reply(12, delta, 30) if steps is None else train_reply(
        12, delta, 30, **{NUM_STEPS: steps})
    good = delta_reply(11, MODEL, 0.5, 10, 3)

    arrays, metrics = strategy.aggregate_train(1, [good, bad])

    assert metrics["num-dropped"] == 1 and metrics["num-clients"] == 1
    assert len(strategy.last_dropped) == 1
    assert "node 12" in strategy.last_dropped[0]
    assert reason in strategy.last_dropped[0]
    # One client left: W + tau · Delta / tau = W + Delta.
    np.testing.assert_allclose(unpack(arrays)["b"], np.full(4, 1.0))


def test_a_client_cannot_claim_more_steps_than_its_examples_allow() -> None:
    # E = 2 local epochs of batches of 10: 30 examples allow at most 2 · 3 = 6 steps.
    strategy = FedNova(local_epochs=2, batch_size=10)
    start_round(strategy, MODEL)
    honest = delta_reply(11, MODEL, 1.0, 30, 6)
    liar = delta_reply(12, MODEL, 1.0, 30, 7)

    arrays, metrics = strategy.aggregate_train(1, [honest, liar])

    assert metrics["num-clients"] == 1
    assert strategy.last_dropped == [
        "node 12: metric 'num-steps' = 7 exceeds the 6 steps 30 examples allow "
        "(local_epochs=2, batch_size=10)"]
    np.testing.assert_allclose(unpack(arrays)["w"], np.full((2, 3), 1.0))


def test_the_config_bounds_the_steps_by_the_runs_own_training_settings() -> None:
    cfg = compose(["strategy=fednova", "local_epochs=3", "batch_size=16"])
    strategy = targets.build("strategy", cfg.strategy)
    assert (strategy.local_epochs, strategy.batch_size) == (3, 16)


def test_a_liar_claiming_huge_steps_and_examples_cannot_scale_the_others_updates() -> None:
    # Unbounded, 1e12 claimed steps would make tau_eff ~1e12 and multiply every other
    # client's normalized delta by it. Its count is bounded to 100 examples, so at most
    # 10 steps (one epoch, batches of 10) are believed, and the claim is dropped.
    strategy = FedNova(local_epochs=1, batch_size=10, max_examples_per_client=100)
    start_round(strategy, MODEL)
    honest = [delta_reply(11, MODEL, 1.0, 50, 5), delta_reply(13, MODEL, 3.0, 50, 5)]
    liar = delta_reply(12, MODEL, 0.0, 10**9, 1e12)

    arrays, _ = strategy.aggregate_train(1, [*honest, liar])

    assert len(strategy.last_dropped) == 1 and "node 12" in strategy.last_dropped[0]
    np.testing.assert_allclose(unpack(arrays)["w"], np.full((2, 3), 2.0))  # (1 + 3) / 2


@pytest.mark.parametrize("setting", [{"local_epochs": 0}, {"batch_size": 2.5},
                                     {"local_epochs": True}])
def test_nonsensical_training_settings_are_refused_naming_them(setting) -> None:
    name = next(iter(setting))
    with pytest.raises(ValueError, match=f"FedNova's {name} must be null or an integer >= 1"):
        FedNova(**setting)


def test_fednova_with_secure_aggregation_is_refused_at_compose_time_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="own local step count") as err:
        compose(["strategy=fednova", "secagg=secaggplus", "num_clients=10"])
    message = str(err.value)
    assert "\n" not in message
    assert "strategy FedNova" in message and "secure aggregation reveals only the sum" in message


def test_under_central_dp_fednova_is_dp_fedavg_on_deltas() -> None:
    rng = np.random.default_rng(9)
    model = {"w": rng.normal(size=(4, 3)), "b": np.zeros(3)}
    deltas = [{k: rng.normal(scale=s, size=v.shape) for k, v in model.items()}
              for s in (0.1, 2.0)]
    released = []
    for inner in (FedNova(fraction_train=1.0), WeightedFedAvg(fraction_train=1.0)):
        strategy = DPNoise(inner, clip_norm=1.0, noise_multiplier=0.5, num_clients=2,
                           noise_seed=4)
        sent = list(strategy.configure_train(1, record(model), ConfigRecord(),
                                             FakeGrid([1, 2])))
        assert {m.content["config"]["mode"] for m in sent} == {"delta"}
        replies = [train_reply(node, d, n, **{NUM_STEPS: tau})
                   for node, d, n, tau in zip((1, 2), deltas, (10, 30), (1, 4), strict=True)]
        released.append(unpack(strategy.aggregate_train(1, replies)[0]))
    for key in model:
        np.testing.assert_allclose(released[0][key], released[1][key])


def test_fednova_learns_digits_with_clients_that_take_different_numbers_of_steps(
        tmp_path, monkeypatch) -> None:
    steps_seen: list[float] = []
    weight = FedNova.reply_weight

    def spy(self, num_examples, metrics):
        steps_seen.append(float(metrics[NUM_STEPS]))
        return weight(self, num_examples, metrics)

    monkeypatch.setattr(FedNova, "reply_weight", spy)
    summary = inprocess.run(["strategy=fednova", "dataset=digits", "partitioner=dirichlet",
                             "num_clients=4", "num_rounds=3", "lr=0.1", "batch_size=16",
                             f"output_dir={tmp_path}"])

    assert len(set(steps_seen)) > 1  # heterogeneous local work: what FedNova normalizes
    history = checkpoint.load(tmp_path).history
    assert history[0]["round"] == 0
    # Chance is 0.1 on the 10 digits.
    assert history[0]["test_accuracy"] < 0.3
    assert summary["test_accuracy"] > history[0]["test_accuracy"] + 0.4
