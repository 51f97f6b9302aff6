"""Specifications of WeightedFedAvg and GradientAveraging (no torch: numpy in, numpy out)."""

import logging
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from strategy_helpers import (
    FakeGrid,
    SimulatedGrid,
    error_reply,
    eval_reply,
    record,
    reply,
    set_task_identity,
    train_reply,
    unpack,
)

from fl_app.strategies import GradientAveraging, NotEnoughClientsError, WeightedFedAvg

NODES = [11, 12, 13, 14]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_task_identity(monkeypatch)


def start_round(strategy, global_model: dict[str, np.ndarray], server_round: int = 1) -> list:
    """Run configure_train as the server would, so the strategy knows the global model."""
    return list(strategy.configure_train(
        server_round, record(global_model), ConfigRecord({"lr": 0.1}), FakeGrid(NODES)
    ))


# --------------------------------------------------------------------------------------------
# FedAvg
# --------------------------------------------------------------------------------------------

def test_fedavg_result_matches_hand_computed_weighted_average() -> None:
    strategy = WeightedFedAvg()
    start_round(strategy, {"w": np.zeros((2, 2)), "b": np.zeros(1)})
    replies = [
        train_reply(11, {"w": np.array([[1.0, 2.0], [3.0, 4.0]]), "b": np.array([8.0])}, 1,
                    train_loss=0.4),
        train_reply(12, {"w": np.array([[5.0, 6.0], [7.0, 8.0]]), "b": np.array([0.0])}, 3,
                    train_loss=0.8),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)

    # (1 * client 1 + 3 * client 2) / 4, worked out by hand
    got = unpack(arrays)
    np.testing.assert_allclose(got["w"], [[4.0, 5.0], [6.0, 7.0]])
    np.testing.assert_allclose(got["b"], [2.0])
    assert metrics["train_loss"] == pytest.approx((1 * 0.4 + 3 * 0.8) / 4)
    assert metrics["num-examples"] == 4
    assert metrics["num-clients"] == 2
    assert metrics["num-dropped"] == 0
    np.testing.assert_allclose(strategy.current["w"], [[4.0, 5.0], [6.0, 7.0]])


@pytest.mark.parametrize("container", [list, iter], ids=["list", "stream"])
def test_fedavg_with_delta_replies_gives_the_model_weight_replies_give(container) -> None:
    start = {"w": np.array([1.0, -2.0]), "b": np.array([0.5])}
    trained = [({"w": np.array([2.0, 0.0]), "b": np.array([1.5])}, 1),
               ({"w": np.array([0.0, -4.0]), "b": np.array([0.5])}, 3)]
    models = []
    for deltas in (False, True):
        strategy = WeightedFedAvg()
        if deltas:
            strategy.reply_with_updates()
        sent = start_round(strategy, start)
        assert {m.content["config"]["mode"] for m in sent} == {"delta" if deltas else "weights"}
        replies = [train_reply(11 + i, {k: w[k] - start[k] for k in w} if deltas else w, n)
                   for i, (w, n) in enumerate(trained)]
        models.append(unpack(strategy.aggregate_train(1, container(replies))[0]))
    # (1 * client 1 + 3 * client 2) / 4 either way
    for got in models:
        np.testing.assert_allclose(got["w"], [0.5, -3.0])
        np.testing.assert_allclose(got["b"], [0.75])


def test_fedavg_equals_flowers_own_fedavg_on_the_same_replies() -> None:
    rng = np.random.default_rng(3)
    shapes = {"fc1.weight": (5, 4), "fc1.bias": (5,), "fc2.weight": (2, 5)}
    start = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    replies = [
        train_reply(node, {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()},
                    int(rng.integers(1, 100)), train_loss=float(rng.random()))
        for node in NODES
    ]
    strategy = WeightedFedAvg()
    start_round(strategy, start)

    ours, our_metrics = strategy.aggregate_train(1, replies)
    flowers, flower_metrics = FedAvg().aggregate_train(1, replies)

    assert set(unpack(ours)) == set(shapes)
    for key in shapes:
        assert unpack(ours)[key].dtype == np.float32
        np.testing.assert_allclose(unpack(ours)[key], unpack(flowers)[key], rtol=1e-5, atol=1e-6)
    assert our_metrics["train_loss"] == pytest.approx(flower_metrics["train_loss"])


def test_configure_train_sends_mode_and_round_without_touching_callers_config() -> None:
    caller_config = ConfigRecord({"lr": 0.1})
    for strategy, mode in ((WeightedFedAvg(), "weights"), (GradientAveraging(), "gradient")):
        messages = list(strategy.configure_train(
            7, record({"w": np.ones(3)}), caller_config, FakeGrid(NODES)))
        assert sorted(m.metadata.dst_node_id for m in messages) == NODES
        for message in messages:
            assert message.metadata.message_type == MessageType.TRAIN
            config = message.content["config"]
            assert (config["mode"], config["server-round"], config["lr"]) == (mode, 7, 0.1)
            np.testing.assert_array_equal(unpack(message.content["arrays"])["w"], np.ones(3))
    assert dict(caller_config) == {"lr": 0.1}


# --------------------------------------------------------------------------------------------
# FedSGD
# --------------------------------------------------------------------------------------------

def test_fedsgd_step_matches_hand_computed_update() -> None:
    strategy = GradientAveraging(server_lr=0.5)
    start_round(strategy, {"w": np.array([1.0, 2.0])})
    replies = [train_reply(11, {"w": np.array([1.0, 0.0])}, 1),
               train_reply(12, {"w": np.array([0.0, 1.0])}, 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # g = (1*[1,0] + 3*[0,1]) / 4 = [0.25, 0.75];  W = [1,2] - 0.5 g
    np.testing.assert_allclose(unpack(arrays)["w"], [0.875, 1.625])


def test_fedsgd_unweighted_step_counts_every_client_once() -> None:
    strategy = GradientAveraging(server_lr=0.5, weighted=False)
    start_round(strategy, {"w": np.array([1.0, 2.0])})
    replies = [train_reply(11, {"w": np.array([1.0, 0.0])}, 1),
               train_reply(12, {"w": np.array([0.0, 1.0])}, 3)]
    arrays, _ = strategy.aggregate_train(1, replies)
    # g = ([1,0] + [0,1]) / 2 = [0.5, 0.5]
    np.testing.assert_allclose(unpack(arrays)["w"], [0.75, 1.75])


def test_fedsgd_momentum_over_two_rounds_matches_hand_computed_steps() -> None:
    strategy = GradientAveraging(server_lr=0.1, server_momentum=0.9)
    start_round(strategy, {"w": np.array([0.0, 0.0])})
    arrays, _ = strategy.aggregate_train(1, [train_reply(11, {"w": np.array([1.0, -2.0])}, 5),
                                             train_reply(12, {"w": np.array([1.0, -2.0])}, 5)])
    # v1 = [1, -2];  W1 = -0.1 v1
    np.testing.assert_allclose(unpack(arrays)["w"], [-0.1, 0.2])

    start_round(strategy, unpack(arrays), server_round=2)
    arrays, _ = strategy.aggregate_train(2, [train_reply(11, {"w": np.array([2.0, 0.0])}, 5),
                                             train_reply(12, {"w": np.array([2.0, 0.0])}, 5)])
    # v2 = 0.9 [1, -2] + [2, 0] = [2.9, -1.8];  W2 = W1 - 0.1 v2
    np.testing.assert_allclose(unpack(arrays)["w"], [-0.39, 0.38])
    np.testing.assert_allclose(strategy.velocity["w"], [2.9, -1.8])


def test_fedsgd_resumed_from_state_dict_continues_like_the_original() -> None:
    def run_round(strategy, model, server_round, gradient):
        start_round(strategy, model, server_round)
        replies = [train_reply(n, {"w": gradient}, 1) for n in (11, 12)]
        return unpack(strategy.aggregate_train(server_round, replies)[0])

    original = GradientAveraging(server_lr=0.1, server_momentum=0.5)
    model = run_round(original, {"w": np.array([1.0, 1.0])}, 1, np.array([1.0, 3.0]))
    resumed = GradientAveraging(server_lr=0.1, server_momentum=0.5)
    resumed.load_state_dict(original.state_dict())

    expected = run_round(original, model, 2, np.array([-1.0, 2.0]))["w"]
    got = run_round(resumed, model, 2, np.array([-1.0, 2.0]))["w"]
    np.testing.assert_allclose(got, expected)
    # without the velocity the second step differs, so the check above can fail
    fresh = GradientAveraging(server_lr=0.1, server_momentum=0.5)
    assert not np.allclose(run_round(fresh, model, 2, np.array([-1.0, 2.0]))["w"], expected)


def _least_squares_gradient(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of the mean squared error 1/(2n) ||x w - y||^2."""
    return x.T @ (x @ w - y) / len(y)


def test_fedsgd_round_with_full_batch_gradients_equals_centralized_gradient_descent() -> None:
    rng = np.random.default_rng(0)
    true_w = np.array([1.5, -2.0, 0.5])
    sizes = (7, 20, 13)  # unequal, so weighting by examples matters
    data = []
    for n in sizes:
        x = rng.normal(size=(n, 3))
        data.append((x, x @ true_w + 0.1 * rng.normal(size=n)))
    w0, lr = rng.normal(size=3), 0.3

    strategy = GradientAveraging(server_lr=lr, min_available_nodes=3, min_train_nodes=3)
    start_round(strategy, {"w": w0})
    replies = [train_reply(node, {"w": _least_squares_gradient(w0, x, y)}, len(y))
               for node, (x, y) in zip(NODES, data, strict=False)]
    federated = unpack(strategy.aggregate_train(1, replies)[0])["w"]

    x_all = np.concatenate([x for x, _ in data])
    y_all = np.concatenate([y for _, y in data])
    centralized = w0 - lr * _least_squares_gradient(w0, x_all, y_all)
    np.testing.assert_allclose(federated, centralized, rtol=1e-12)
    # and a uniform average would not have matched: the check can fail
    assert not np.allclose(
        w0 - lr * np.mean([_least_squares_gradient(w0, x, y) for x, y in data], axis=0),
        centralized,
    )


def test_flowers_round_loop_drives_fedsgd_to_the_least_squares_solution() -> None:
    rng = np.random.default_rng(5)
    true_w = np.array([2.0, -1.0])
    data = {}
    for node, n in zip(NODES, (10, 30, 20, 40), strict=True):
        x = rng.normal(size=(n, 2))
        data[node] = (x, x @ true_w)

    def client(node_id: int, message) -> RecordDict:
        assert message.content["config"]["mode"] == "gradient"
        w = unpack(message.content["arrays"])["w"]
        x, y = data[node_id]
        return RecordDict({"arrays": record({"w": _least_squares_gradient(w, x, y)}),
                           "metrics": MetricRecord({"num-examples": len(y)})})

    strategy = GradientAveraging(server_lr=0.5, server_momentum=0.5)
    result = strategy.start(SimulatedGrid(NODES, client), record({"w": np.zeros(2)}),
                            num_rounds=60)
    np.testing.assert_allclose(unpack(result.arrays)["w"], true_w, atol=1e-6)
    assert result.train_metrics_clientapp[60]["num-clients"] == 4


# --------------------------------------------------------------------------------------------
# Bad replies
# --------------------------------------------------------------------------------------------

GOOD_1 = {"w": np.array([1.0, 2.0]), "b": np.array([[0.0]])}
GOOD_2 = {"w": np.array([3.0, 6.0]), "b": np.array([[4.0]])}


def _bad_reply(kind: str):
    node = 99
    if kind == "error":
        return error_reply(node, "client crashed: CUDA out of memory")
    if kind == "missing-metrics":
        return reply(node, RecordDict({"arrays": record(GOOD_1)}))
    if kind == "missing-arrays":
        return reply(node, RecordDict({"metrics": MetricRecord({"num-examples": 5})}))
    arrays, num_examples = dict(GOOD_1), 5
    if kind == "nan":
        arrays["w"] = np.array([np.nan, 1.0])
    elif kind == "inf":
        arrays["b"] = np.array([[np.inf]])
    elif kind == "wrong-shape":
        arrays["w"] = np.array([1.0, 2.0, 3.0])
    elif kind == "missing-array":
        del arrays["b"]
    elif kind == "extra-array":
        arrays["c"] = np.zeros(2)
    elif kind == "complex":
        arrays["w"] = np.array([1.0 + 2j, 2.0])
    elif kind == "bool":
        arrays["w"] = np.array([True, False])
    elif kind == "zero-examples":
        num_examples = 0
    elif kind == "negative-examples":
        num_examples = -3
    return train_reply(node, arrays, num_examples)


BAD_KINDS = ["error", "missing-metrics", "missing-arrays", "nan", "inf", "wrong-shape",
             "missing-array", "extra-array", "complex", "bool", "zero-examples",
             "negative-examples"]


# A list (what Flower's grids return) is summed first and checked in the sum; an iterator is
# checked reply by reply. Both must drop the same replies and give the same model.
@pytest.mark.parametrize("container", [list, iter], ids=["list", "stream"])
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_reply_is_dropped_and_logged_and_good_replies_still_averaged(
    kind: str, container, caplog: pytest.LogCaptureFixture
) -> None:
    strategy = WeightedFedAvg()
    start_round(strategy, {"w": np.zeros(2), "b": np.zeros((1, 1))})
    replies = [train_reply(11, GOOD_1, 1), _bad_reply(kind), train_reply(12, GOOD_2, 1)]
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(3, container(replies))

    got = unpack(arrays)
    np.testing.assert_allclose(got["w"], [2.0, 4.0])
    np.testing.assert_allclose(got["b"], [[2.0]])
    assert all(np.all(np.isfinite(v)) for v in got.values())
    assert (metrics["num-clients"], metrics["num-dropped"]) == (2, 1)
    assert len(strategy.last_dropped) == 1 and "node 99" in strategy.last_dropped[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("node 99" in w for w in warnings)


def test_reason_for_dropping_says_what_was_wrong() -> None:
    strategy = WeightedFedAvg()
    start_round(strategy, {"w": np.zeros(2), "b": np.zeros((1, 1))})
    strategy.aggregate_train(1, [_bad_reply(k) for k in ("error", "wrong-shape", "nan",
                                                          "complex")])
    reasons = " | ".join(strategy.last_dropped)
    assert "non-numeric dtype complex128" in reasons
    assert "CUDA out of memory" in reasons
    assert "(3,)" in reasons and "(2,)" in reasons
    assert "NaN" in reasons


def test_all_bad_replies_leave_the_global_model_unchanged() -> None:
    strategy = GradientAveraging()
    start_round(strategy, {"w": np.array([1.0, 2.0]), "b": np.zeros((1, 1))})
    arrays, metrics = strategy.aggregate_train(1, [_bad_reply(k) for k in BAD_KINDS])
    assert arrays is None
    assert metrics["num-clients"] == 0 and metrics["num-dropped"] == len(BAD_KINDS)
    np.testing.assert_array_equal(strategy.current["w"], [1.0, 2.0])


@pytest.mark.parametrize("container", [list, iter], ids=["list", "stream"])
def test_an_average_that_overflows_leaves_the_global_model_unchanged(container, caplog) -> None:
    strategy = WeightedFedAvg()
    start_round(strategy, {"w": np.ones(2, np.float32)})
    huge = {"w": np.array([3e38, 1.0], np.float32)}  # finite, but 3e38 + 3e38 is not
    replies = [train_reply(11, huge, 1), train_reply(12, huge, 1)]
    with caplog.at_level(logging.WARNING):
        arrays, _ = strategy.aggregate_train(1, container(replies))
    if arrays is not None:  # the list path averages with weights 1/2: no overflow, exact
        np.testing.assert_array_equal(unpack(arrays)["w"], huge["w"])
    else:
        assert any("overflows" in r.getMessage() for r in caplog.records)
        np.testing.assert_array_equal(strategy.current["w"], [1.0, 1.0])


def test_no_replies_at_all_returns_no_model() -> None:
    strategy = WeightedFedAvg()
    start_round(strategy, {"w": np.ones(2)})
    arrays, metrics = strategy.aggregate_train(1, [])
    assert arrays is None and metrics["num-clients"] == 0


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------

def test_not_enough_nodes_raises_a_useful_error_after_the_timeout() -> None:
    strategy = WeightedFedAvg(min_available_nodes=3, node_wait_timeout=0.1)
    started = time.monotonic()
    with pytest.raises(NotEnoughClientsError) as info:
        strategy.configure_train(1, record({"w": np.ones(1)}), ConfigRecord(), FakeGrid([5]))
    assert time.monotonic() - started < 2.0
    message = str(info.value)
    assert "Only 1 node(s) connected" in message and "requires 3" in message
    assert "SuperNode" in message and "num-supernodes" in message and "min_clients" in message


def test_sampling_waits_for_nodes_that_connect_late() -> None:
    strategy = WeightedFedAvg(min_available_nodes=3, node_wait_timeout=5.0)
    grid = FakeGrid([1], later=[[1, 2], [1, 2, 3]])
    messages = strategy.configure_train(1, record({"w": np.ones(1)}), ConfigRecord(), grid)
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    assert grid.polls == 3


def test_sampling_is_deterministic_per_seed_and_round_and_respects_fraction() -> None:
    nodes = list(range(100, 120))

    def sample(seed: int, server_round: int, fraction: float = 0.3, min_nodes: int = 2,
               order=nodes) -> list[int]:
        strategy = WeightedFedAvg(fraction_train=fraction, min_train_nodes=min_nodes, seed=seed)
        messages = strategy.configure_train(
            server_round, record({"w": np.ones(1)}), ConfigRecord(), FakeGrid(order))
        return [m.metadata.dst_node_id for m in messages]

    first = sample(seed=1, server_round=4)
    assert len(first) == 6 and len(set(first)) == 6 and set(first) <= set(nodes)  # int(20*0.3)
    assert sample(seed=1, server_round=4) == first
    assert sample(seed=1, server_round=4, order=nodes[::-1]) == first  # grid order irrelevant
    assert sample(seed=1, server_round=5) != first
    assert sample(seed=2, server_round=4) != first
    assert len(sample(seed=1, server_round=1, fraction=0.05, min_nodes=3)) == 3  # min wins
    assert sorted(sample(seed=1, server_round=1, fraction=1.0)) == nodes


def test_evaluation_is_skipped_when_fraction_evaluate_is_zero() -> None:
    strategy = WeightedFedAvg(fraction_evaluate=0.0)
    assert list(strategy.configure_evaluate(
        1, record({"w": np.ones(1)}), ConfigRecord(), FakeGrid(NODES))) == []


def test_evaluation_messages_go_to_a_seeded_sample() -> None:
    strategy = WeightedFedAvg(fraction_evaluate=0.5, seed=3)
    config = ConfigRecord({"batch": 8})
    messages = list(strategy.configure_evaluate(2, record({"w": np.ones(1)}), config,
                                                FakeGrid(NODES)))
    assert len(messages) == 2
    assert all(m.metadata.message_type == MessageType.EVALUATE for m in messages)
    assert messages[0].content["config"]["server-round"] == 2
    assert dict(config) == {"batch": 8}


def test_evaluate_metrics_are_example_weighted_and_errors_dropped() -> None:
    strategy = WeightedFedAvg()
    metrics = strategy.aggregate_evaluate(1, [
        eval_reply(11, 10, accuracy=0.5, loss=1.0),
        eval_reply(12, 30, accuracy=0.9, loss=0.2),
        error_reply(13, "disk full"),
    ])
    assert metrics["accuracy"] == pytest.approx((10 * 0.5 + 30 * 0.9) / 40)
    assert metrics["loss"] == pytest.approx((10 * 1.0 + 30 * 0.2) / 40)
    assert metrics["num-clients"] == 2 and metrics["num-examples"] == 40
    assert strategy.aggregate_evaluate(1, [error_reply(13, "disk full")]) is None


def test_fedsgd_refuses_a_nonsensical_server_optimizer() -> None:
    with pytest.raises(ValueError, match="server_lr"):
        GradientAveraging(server_lr=0.0)
    with pytest.raises(ValueError, match="server_momentum"):
        GradientAveraging(server_momentum=1.0)


def test_fedsgd_tells_clients_its_gradient_batch_size(monkeypatch):
    set_task_identity(monkeypatch)
    arrays = record({"w": np.zeros(3, np.float32)})
    full = GradientAveraging().build_train_messages(1, arrays, ConfigRecord(), [7])[0]
    batch = GradientAveraging(batch_size=32).build_train_messages(1, arrays, ConfigRecord(), [7])[0]
    assert full.content["config"]["batch-size"] == 0  # 0: the whole local set
    assert batch.content["config"]["batch-size"] == 32
    assert batch.content["config"]["mode"] == "gradient"


@pytest.mark.parametrize("strategy_class", [WeightedFedAvg, GradientAveraging])
def test_aggregation_memory_does_not_grow_with_the_number_of_replies(strategy_class,
                                                                     monkeypatch):
    """Replies stream through in-place sums: 60 replies cost no more memory than 6."""
    import tracemalloc

    set_task_identity(monkeypatch)
    current = {"w": np.zeros((500, 500), dtype=np.float32)}  # 1 MB

    def peak(num_replies: int) -> int:
        strategy = strategy_class()
        strategy.set_current(current)
        replies = (train_reply(i, {"w": np.full((500, 500), i, np.float32)}, 10)
                   for i in range(num_replies))
        tracemalloc.start()
        arrays, _ = strategy.aggregate_train(1, replies)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        mean = (num_replies - 1) / 2  # replies hold 0, 1, ..., C-1, equally weighted
        expected = mean if strategy_class is WeightedFedAvg else -strategy.server_lr * mean
        np.testing.assert_allclose(arrays["w"].numpy(), expected, rtol=1e-5)
        return top

    few, many = peak(6), peak(60)
    assert many < few + 2_000_000  # a stacked 60-reply array alone would be 60 MB
