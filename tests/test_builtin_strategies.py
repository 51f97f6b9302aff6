"""Flower's built-in strategies, picked with one `strategy=` override, drive the real app and learn.

Each config in conf/strategy/ whose `_target_` is a `flwr.serverapp.strategy` class runs the
ServerApp's round loop with the real ClientApp in one process (fl_app.inprocess) on the digits
dataset, 5 clients, 3 rounds. The robust aggregators are also run with one client replying
garbage weights every round, next to plain FedAvg, which that one client ruins.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message
from hydra.utils import instantiate
from strategy_helpers import FakeGrid, error_reply, record, set_task_identity, train_reply

from fl_app import server_loop, training
from fl_app.config import compose
from fl_app.data import load_dataset
from fl_app.inprocess import InProcessGrid
from fl_app.records import from_array_record, to_array_record

BUILTINS = {  # config name -> Flower class
    "fedprox": "FedProx",
    "fedadam": "FedAdam",
    "fedyogi": "FedYogi",
    "fedmedian": "FedMedian",
    "fedtrimmedavg": "FedTrimmedAvg",
    "krum": "Krum",
}
NUM_CLIENTS = 5
BASE = ["dataset=digits", "num_rounds=3", "lr=0.1"]


def run_app(tmp_path: Path, *overrides: str,
            grid_class: type[InProcessGrid] = InProcessGrid) -> tuple[dict, list[dict]]:
    """The app's summary and its metrics.jsonl rows, for a run on `grid_class`."""
    overrides = (*BASE, *overrides, f"num_clients={NUM_CLIENTS}", f"output_dir={tmp_path}")
    summary = server_loop.run(grid_class(overrides, NUM_CLIENTS), compose(overrides))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: one thread is faster, and much faster on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def initial_accuracy() -> float:
    """Test accuracy of the initial global model (seeded as the ServerApp seeds it)."""
    cfg = compose(BASE)
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model)
    test = load_dataset(cfg.dataset)
    return training.evaluate(model, test.x_test, test.y_test)[1]


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_strategy_runs_through_the_app_and_learns(name, tmp_path, initial_accuracy,
                                                          monkeypatch):
    mus = []  # the proximal weight every client's local training was given
    plain_train = training.train

    def recording_train(*args, **kwargs):
        mus.append(kwargs.get("proximal_mu", 0.0))
        return plain_train(*args, **kwargs)

    monkeypatch.setattr(training, "train", recording_train)

    summary, rows = run_app(tmp_path, f"strategy={name}", "fraction_evaluate=0.4")

    assert f"_target_: flwr.serverapp.strategy.{BUILTINS[name]}\n" in (
        tmp_path / "config.yaml").read_text()
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["sampled"] == NUM_CLIENTS and r["lost_nodes"] == [] for r in rows)
    # Measured: 0.86 (Krum) to 0.91 after 3 rounds; the initial model is at chance (about 0.1).
    assert initial_accuracy < 0.2
    assert summary["test_accuracy"] > 0.75
    assert rows[-1]["train_train_loss"] < rows[0]["train_train_loss"]
    # Federated evaluation: 2 of the 5 clients score the new global model on held-out data.
    assert rows[-1]["client_accuracy"] > 0.7
    # Only FedProx makes the clients add a proximal term, and they all add it.
    assert len(mus) == 3 * NUM_CLIENTS
    assert set(mus) == ({0.01} if name == "fedprox" else {0.0})


class ByzantineGrid(InProcessGrid):
    """Node 0 replies, every round, with well-formed garbage: its weights replaced by N(0, 100²)."""

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            if reply.metadata.src_node_id == 0:
                rng = np.random.default_rng(0)
                arrays = from_array_record(reply.content["arrays"])
                reply.content["arrays"] = to_array_record(
                    {k: (100 * rng.standard_normal(v.shape)).astype(v.dtype)
                     for k, v in arrays.items()})
        return replies


@pytest.mark.parametrize("name", ["krum", "fedmedian", "fedtrimmedavg"])
def test_robust_aggregation_learns_despite_a_client_sending_garbage(name, tmp_path):
    summary, _ = run_app(tmp_path, f"strategy={name}", grid_class=ByzantineGrid)
    assert summary["test_accuracy"] > 0.75  # measured 0.86 (Krum) to 0.91, as without garbage


def test_plain_fedavg_is_ruined_by_one_client_sending_garbage(tmp_path):
    summary, _ = run_app(tmp_path, "strategy=fedavg", grid_class=ByzantineGrid)
    assert summary["test_accuracy"] < 0.4  # measured 0.20: one reply in five rules the mean


class FailingNodeGrid(InProcessGrid):
    """Node 0's ClientApp fails every round: its reply is an error Message."""

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        replies = super().send_and_receive(messages, timeout)
        return [Message(Error(code=0, reason="node 0 crashed"), reply_to=m)
                if m.metadata.dst_node_id == 0 else r
                for m, r in zip(messages, replies, strict=True)]


@pytest.mark.parametrize("name", ["fedadam", "krum"])
def test_builtin_strategy_drops_an_error_reply_and_learns_from_the_rest(name, tmp_path):
    summary, rows = run_app(tmp_path, f"strategy={name}", "num_rounds=2",
                            grid_class=FailingNodeGrid)
    assert [r["lost_nodes"] for r in rows] == [[0], [0]]
    assert summary["test_accuracy"] > 0.7


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_aggregate_train_ignores_error_replies(name, monkeypatch):
    """An error reply changes nothing: the aggregate is that of the other replies alone."""
    set_task_identity(monkeypatch)
    rng = np.random.default_rng(1)
    current = {"w": rng.standard_normal((3, 2)).astype(np.float32)}
    updates = {i: {"w": current["w"] + 0.1 * rng.standard_normal((3, 2)).astype(np.float32)}
               for i in (1, 2, 3, 4)}

    def aggregate(with_error: bool):
        strategy = instantiate(compose([f"strategy={name}"]).strategy)
        grid = FakeGrid([0, 1, 2, 3, 4])
        list(strategy.configure_train(1, record(current), ConfigRecord(), grid))
        replies = [train_reply(i, w, num_examples=10 * i) for i, w in updates.items()]
        return strategy.aggregate_train(1, [*replies, *([error_reply(0, "boom")] * with_error)])

    (arrays, metrics), (expected, expected_metrics) = aggregate(True), aggregate(False)
    np.testing.assert_array_equal(arrays["w"].numpy(), expected["w"].numpy())
    assert dict(metrics or {}) == dict(expected_metrics or {})


class NaNGrid(InProcessGrid):
    """Node 0 replies, every round, with a NaN in its weights (well-formed otherwise)."""

    def send_and_receive(self, messages, timeout=None):
        replies = super().send_and_receive(messages, timeout)
        for reply in replies:
            if reply.metadata.src_node_id == 0:
                arrays = from_array_record(reply.content["arrays"])
                first = next(iter(arrays))
                arrays[first] = arrays[first].copy()
                arrays[first].flat[0] = np.nan
                reply.content["arrays"] = to_array_record(arrays)
        return replies


@pytest.mark.parametrize("name", ["fedprox", "fedadam", "fedmedian"])
def test_the_app_screens_nan_replies_that_flowers_strategies_would_average_in(name, tmp_path):
    summary, rows = run_app(tmp_path, f"strategy={name}", "num_rounds=2", grid_class=NaNGrid)
    assert [r["lost_nodes"] for r in rows] == [[0], [0]]
    final = torch.load(tmp_path / "model.pt")
    assert all(torch.isfinite(v).all() for v in final.values())
    assert summary["test_accuracy"] > 0.7
