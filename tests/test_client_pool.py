"""A client pool (config `client_pool`): a few nodes serve a large population of clients, each
message naming the client (its partition and its privacy state) the node serves for it."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from strategy_helpers import FakeGrid, record, set_task_identity

from fl_app import client_app, client_core, inprocess
from fl_app.client_core import build_client
from fl_app.config import ConfigError, check, compose
from fl_app.messages import CLIENT_ID
from fl_app.privacy.central import DPNoise
from fl_app.strategies import NotEnoughClientsError, WeightedFedAvg

POOL = [11, 12, 13]


@pytest.fixture(autouse=True)
def _identity(monkeypatch):
    set_task_identity(monkeypatch)


def _model() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 2), np.float32)}


def _sent(messages) -> list[tuple[int, int]]:
    return [(m.metadata.dst_node_id, m.content["config"][CLIENT_ID]) for m in messages]


def test_the_population_is_sampled_and_dealt_round_robin_onto_the_pool_nodes() -> None:
    strategy = WeightedFedAvg(fraction_train=0.1, min_train_nodes=2, min_available_nodes=2)
    strategy.use_client_pool(100)
    sent = _sent(strategy.configure_train(1, record(_model()), ConfigRecord(), FakeGrid(POOL)))
    clients = [c for _, c in sent]
    assert len(clients) == 10 and len(set(clients)) == 10
    assert all(0 <= c < 100 for c in clients) and max(clients) > len(POOL)  # not node ids
    assert [node for node, _ in sent] == [POOL[i % 3] for i in range(10)]
    again = _sent(strategy.configure_train(1, record(_model()), ConfigRecord(), FakeGrid(POOL)))
    assert again == sent  # seeded
    later = _sent(strategy.configure_train(2, record(_model()), ConfigRecord(), FakeGrid(POOL)))
    assert {c for _, c in later} != set(clients)


def test_without_a_pool_messages_name_no_client() -> None:
    strategy = WeightedFedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2)
    messages = strategy.configure_train(1, record(_model()), ConfigRecord(), FakeGrid(POOL))
    assert [m.metadata.dst_node_id for m in messages] == POOL
    assert all(CLIENT_ID not in m.content["config"] for m in messages)


def test_federated_evaluation_samples_pool_clients_too() -> None:
    strategy = WeightedFedAvg(fraction_evaluate=0.05, min_evaluate_nodes=2,
                              min_available_nodes=2)
    strategy.use_client_pool(200)
    sent = _sent(strategy.configure_evaluate(1, record(_model()), ConfigRecord(), FakeGrid(POOL)))
    assert len(sent) == 10 and {node for node, _ in sent} == set(POOL)


def test_dp_poisson_samples_the_population_not_the_nodes() -> None:
    inner = WeightedFedAvg(fraction_train=0.02, min_available_nodes=2)
    strategy = DPNoise(inner, clip_norm=1.0, noise_multiplier=1.0, num_clients=1000,
                       noise_seed=0)
    strategy.use_client_pool(1000)
    sizes = []
    for rnd in range(1, 21):
        sent = _sent(strategy.configure_train(rnd, record(_model()), ConfigRecord(),
                                              FakeGrid(POOL)))
        assert {node for node, _ in sent} <= set(POOL)
        sizes.append(len({c for _, c in sent}))
    # q N = 20 expected per round; over 20 rounds the mean is 20 +- 1 (std 4.4 / sqrt(20)).
    assert 17 < np.mean(sizes) < 23 and len(set(sizes)) > 1  # Poisson: the size varies


def test_a_population_smaller_than_the_minimum_is_refused() -> None:
    strategy = WeightedFedAvg(min_train_nodes=5, min_available_nodes=2)
    strategy.use_client_pool(3)
    with pytest.raises(NotEnoughClientsError, match="raise num_clients"):
        strategy.configure_train(1, record(_model()), ConfigRecord(), FakeGrid(POOL))


@pytest.mark.parametrize(("overrides", "named"), [
    (["client_pool=4"], "set num_clients"),
    (["num_clients=10", "client_pool=20"], "exceeds num_clients"),
    (["num_clients=10", "client_pool=0"], "integer >= 1"),
    (["num_clients=10", "client_pool=2", "min_clients=3"], "min_clients=3"),
    (["num_clients=10", "client_pool=2", "strategy=fedprox"], "built-in strategies"),
])
def test_bad_pool_settings_are_refused_naming_the_fix(overrides, named) -> None:
    with pytest.raises(ConfigError, match=named):
        check(compose(overrides))


def _train(context: Context, client_id: int, cfg_overrides: str) -> Message:
    client = build_client(compose(cfg_overrides.split()), 0, 30)
    arrays = record(dict(zip(client.keys, client.get_parameters({}), strict=True)))
    msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord(
        {"server-round": 1, CLIENT_ID: client_id})}), dst_node_id=0,
        message_type=MessageType.TRAIN)
    return client_app.train(msg, context)


def test_a_pool_node_trains_the_named_client_on_its_partition_with_its_own_privacy_state():
    overrides = "dataset=digits num_clients=30 client_pool=2 privacy=local batch_size=32"
    context = Context(run_id=3, node_id=0, state=RecordDict(),
                      node_config={"partition-id": 0, "num-partitions": 2},
                      run_config={"overrides": overrides})
    client_core._cached_client.cache_clear()
    cfg = compose(overrides.split())
    served = client_core._client(context, 17).data.x_train
    assert torch.equal(served, build_client(cfg, 17, 30).data.x_train)  # 17 of 30, not 0 of 2
    whole = build_client(compose(["dataset=digits"]), 0, 1).data.x_train  # one partition: all
    assert len(served) < len(whole) / 10
    for client_id in (17, 17, 4):
        reply = _train(context, client_id, overrides)
        assert not reply.has_error()
    assert context.state["privacy.17"]["releases"] == 2
    assert context.state["privacy.4"]["releases"] == 1


def test_a_node_with_its_own_data_refuses_a_pool_client(tmp_path) -> None:
    context = Context(run_id=3, node_id=0, state=RecordDict(),
                      node_config={"data-dir": str(tmp_path)},
                      run_config={"overrides": "dataset=digits"})
    with pytest.raises(ValueError, match="client_pool=null"):
        client_core._client(context, 5)


def test_a_pool_of_3_nodes_trains_a_population_of_30_and_the_model_improves(tmp_path) -> None:
    summary = inprocess.run(["dataset=digits", "num_clients=30", "client_pool=3",
                             "fraction_train=0.2", "num_rounds=4", "lr=0.1", "min_clients=2",
                             f"output_dir={tmp_path}"])
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["sampled"] for r in rows] == [6] * 4 and all(not r["lost_nodes"] for r in rows)
    # Chance is 0.1 on the 10 digits; the global model learns from the sampled clients.
    assert summary["test_accuracy"] > 0.6
    assert rows[-1]["test_accuracy"] >= rows[0]["test_accuracy"]
