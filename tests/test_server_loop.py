"""The ServerApp's round loop, driven in-process with real TorchClients behind a fake grid."""

import json

import numpy as np
import torch
from strategy_helpers import SimulatedGrid, serve, set_task_identity

from fl_app.client_core import build_client
from fl_app.config import compose
from fl_app.server_loop import run


def _grid(cfg, num_clients, silent=()):
    clients = [build_client(cfg, i, num_clients) for i in range(num_clients)]

    class Grid(SimulatedGrid):
        def send_and_receive(self, messages, timeout=None):
            # Nodes in `silent` never answer, like a SuperNode that died.
            return [r for r in super().send_and_receive(messages, timeout)
                    if r.metadata.src_node_id not in silent]

    return Grid(list(range(num_clients)), serve(clients))


def _cfg(tmp_path, *overrides):
    return compose(["dataset=digits", "num_clients=3", "lr=0.1", f"output_dir={tmp_path}",
                    *overrides])


def test_run_learns_and_writes_config_metrics_model_and_summary(monkeypatch, tmp_path):
    set_task_identity(monkeypatch)
    cfg = _cfg(tmp_path, "num_rounds=3")
    summary = run(_grid(cfg, 3), cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3] and summary["test_accuracy"] > 0.6
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 3
    assert "num_clients: 3" in (tmp_path / "config.yaml").read_text()
    assert set(torch.load(tmp_path / "model.pt")) == set(build_client(cfg, 0, 3).keys)


def test_a_silent_node_is_recorded_lost_and_the_round_uses_the_others(monkeypatch, tmp_path):
    set_task_identity(monkeypatch)
    cfg = _cfg(tmp_path, "num_rounds=2")
    summary = run(_grid(cfg, 3, silent={2}), cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["lost_nodes"] == [2] and r["train_num-clients"] == 2 for r in rows)
    assert summary["test_accuracy"] > 0.4


def test_fewer_replies_than_min_clients_leave_the_model_unchanged(monkeypatch, tmp_path):
    set_task_identity(monkeypatch)
    cfg = _cfg(tmp_path, "num_rounds=1", "min_clients=3")
    summary = run(_grid(cfg, 3, silent={2}), cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["lost_nodes"] == [2] and "train_num-clients" not in rows[0]
    initial = build_client(cfg, 0, 3).get_parameters({})
    final = torch.load(tmp_path / "model.pt")
    assert all(np.array_equal(a, final[k].numpy())
               for k, a in zip(build_client(cfg, 0, 3).keys, initial, strict=True))
    assert summary["rounds"] == 1


def test_privacy_budget_stops_the_run_cleanly_before_the_round_that_exceeds_it(
        monkeypatch, tmp_path):
    set_task_identity(monkeypatch)
    cfg = _cfg(tmp_path, "strategy=dp_fedavg", "num_rounds=10", "strategy.max_epsilon=5",
               "strategy.noise_multiplier=1.0")
    summary = run(_grid(cfg, 3), cfg)
    assert 1 <= summary["rounds"] < 10 and "budget" in summary["stop_reason"]
    assert summary["epsilon"] <= 5
