"""The persistent client worker a deployed SuperNode's ClientApp hands its messages to.

A `sleep` process stands in for the SuperNode's executor (the worker's owner); every process
is stopped by PID at the end (fl_app.processes.stop also stops the workers an owner has).
"""

import subprocess
import sys
import time

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from strategy_helpers import record

from fl_app import worker_link
from fl_app.client_core import build_client, handle
from fl_app.config import compose
from fl_app.processes import alive, client_workers, stop

RUN_CONFIG = {"dataset": "digits", "overrides": "batch_size=32 local_epochs=1"}


@pytest.fixture
def owner(tmp_path, monkeypatch):
    monkeypatch.setenv("FL_APP_TORCH_THREADS", "1")  # the worker's torch, as the test's
    monkeypatch.setattr(worker_link, "socket_dir", lambda: _private(tmp_path / "workers"))
    proc = subprocess.Popen(["sleep", "600"])
    yield proc.pid
    stop([proc.pid], grace=5)
    proc.wait()


def _private(folder):
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder


def context(run_config=RUN_CONFIG, state=None) -> Context:
    return Context(run_id=5, node_id=3, node_config={"partition-id": 1, "num-partitions": 4},
                   state=state if state is not None else RecordDict(),
                   run_config=dict(run_config))


def train_content(server_round: int = 1, cfg_overrides=("dataset=digits",)) -> RecordDict:
    client = build_client(compose(list(cfg_overrides)), 1, 4)
    weights = dict(zip(client.keys, client.get_parameters({}), strict=True))
    return RecordDict({"arrays": record(weights),
                       "config": ConfigRecord({"server-round": server_round})})


def test_worker_answers_like_the_client_in_process_and_is_reused(owner) -> None:
    content = train_content()
    by_worker = worker_link.call("train", content, context(), owner_pid=owner)
    workers = client_workers([owner])
    assert len(workers) == 1

    import torch
    torch.set_num_threads(1)
    here = handle("train", content, context())
    assert by_worker["metrics"]["num-examples"] == here["metrics"]["num-examples"]
    for key, array in here["arrays"].items():
        np.testing.assert_allclose(by_worker["arrays"][key].numpy(), array.numpy(),
                                   rtol=1e-5, atol=1e-6)

    evaluated = worker_link.call("evaluate", content, context(), owner_pid=owner)
    assert 0.0 <= evaluated["metrics"]["accuracy"] <= 1.0
    assert client_workers([owner]) == workers  # the same process answered again


def test_client_privacy_state_comes_back_into_the_nodes_context(owner) -> None:
    run_config = {**RUN_CONFIG, "privacy": "local"}
    ctx = context(run_config)
    first = worker_link.call("train", train_content(1), ctx, owner_pid=owner)
    second = worker_link.call("train", train_content(2), ctx, owner_pid=owner)
    assert "privacy" in ctx.state  # what the SuperNode keeps for the next message
    assert first["metrics"]["local_epsilon"] < second["metrics"]["local_epsilon"]


def test_a_failing_message_comes_back_as_an_error_naming_the_reason(owner) -> None:
    bad = RecordDict({"arrays": record({"not-a-layer": np.zeros(3, np.float32)}),
                      "config": ConfigRecord({"server-round": 1})})
    with pytest.raises(RuntimeError, match="not-a-layer"):
        worker_link.call("train", bad, context(), owner_pid=owner)
    # the worker survives a bad message and answers the next one
    reply = worker_link.call("train", train_content(), context(), owner_pid=owner)
    assert reply["metrics"]["num-examples"] > 0


def test_worker_ends_with_its_owner_and_leaves_no_socket(tmp_path, monkeypatch) -> None:
    folder = _private(tmp_path / "workers")
    monkeypatch.setattr(worker_link, "socket_dir", lambda: folder)
    owner = subprocess.Popen(["sleep", "600"])
    try:
        worker_link.call("evaluate", train_content(), context(), owner_pid=owner.pid)
        (worker,) = client_workers([owner.pid])
        owner.kill()
        owner.wait()
        deadline = time.monotonic() + 15
        while alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(worker)
        assert not list(folder.glob("*.sock"))
    finally:
        stop([owner.pid, *client_workers([owner.pid])], grace=5)


def test_only_flwr_clientapp_processes_hand_messages_on(monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flwr-clientapp", "--token", "x"])
    assert worker_link.wanted(context())
    off = Context(run_id=5, node_id=3, node_config={"client-worker": "false"},
                  state=RecordDict(), run_config={})
    assert not worker_link.wanted(off)
    monkeypatch.setattr(sys, "argv", ["default_worker.py"])  # a Ray actor, a test, ...
    assert not worker_link.wanted(context())


class FakeTorch:
    def __init__(self) -> None:
        self.threads = 8

    def get_num_threads(self) -> int:
        return self.threads

    def set_num_threads(self, n: int) -> None:
        self.threads = n


def test_workers_on_one_machine_share_its_cores_unless_told(monkeypatch) -> None:
    from fl_app import processes
    from fl_app.processes import share_cores

    monkeypatch.delenv("FL_APP_TORCH_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr(processes, "client_workers", lambda owners=None: [11, 12, 13])
    monkeypatch.setattr(processes, "executors", lambda: [])
    torch = FakeTorch()
    assert share_cores(torch) == 2 and torch.threads == 2  # 8 cores, 3 workers
    monkeypatch.setattr(processes, "client_workers", lambda owners=None: [11])
    assert share_cores(torch) == 8  # alone on its machine: every core
    monkeypatch.setattr(processes, "executors", lambda: [21, 22, 23])
    assert share_cores(torch) == 2  # a worker and 3 fl-app-executors
    monkeypatch.setenv("FL_APP_TORCH_THREADS", "3")
    assert share_cores(torch) == 3


def test_one_worker_serves_every_run_of_a_supernode_with_clients_of_their_own(owner) -> None:
    run_config = {**RUN_CONFIG, "privacy": "local"}
    first_run = Context(run_id=5, node_id=3, node_config={"partition-id": 1, "num-partitions": 4},
                        state=RecordDict(), run_config=run_config)
    next_run = Context(run_id=6, node_id=3, node_config={"partition-id": 1, "num-partitions": 4},
                       state=RecordDict(), run_config=run_config)
    worker_link.call("train", train_content(1), first_run, owner_pid=owner)
    once = worker_link.call("train", train_content(2), first_run, owner_pid=owner)
    fresh = worker_link.call("train", train_content(1), next_run, owner_pid=owner)
    assert len(client_workers([owner])) == 1
    # the new run's client starts its privacy accounting from zero, not from run 5's
    assert fresh["metrics"]["local_epsilon"] < once["metrics"]["local_epsilon"]
