"""A real federation over TLS with SuperNode authentication: a SuperLink and 3 SuperNodes as
separate processes on loopback, each SuperNode holding only its own partition and served by
its fl-app-executor (LocalFederation's default)."""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from fl_app.deploy.credentials import make_supernode_keys
from fl_app.deploy.federation import LocalFederation
from fl_app.deploy.partitions import export
from fl_app.deploy.processes import alive
from fl_app.deploy.runner import toml_run_config

pytestmark = pytest.mark.e2e
# As scripts/local_federation.py runs it: one torch thread per process (three SuperNodes share
# two cores), and a 0.1 s poll for a SuperNode whose ClientApps Flower's SuperExec starts.
FAST = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("federation")
    superlink_cwd = work / "superlink-cwd"
    superlink_cwd.mkdir()
    # SuperNode 2 holds its own data folder instead of a partition id: both ways a real
    # deployment gives each machine its data.
    own_data = export(work / "data", 3, ["dataset=digits"])[2]
    fed = LocalFederation(work, num_supernodes=3, env=FAST, superlink_cwd=superlink_cwd,
                          data_dirs={2: own_data})
    fed.start()
    pids = [p.pid for p in fed.procs.values()]
    yield fed
    fed.stop()
    assert not any(alive(pid) for pid in pids)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _a_round_lost_a_node(out) -> bool:
    try:
        return any(r["lost_nodes"] for r in _rows(out))
    except ValueError:  # a line being written right now
        return False


def _run(fed, name, run_config, tmp_path):
    out = tmp_path / name
    values = dict(run_config)
    values["overrides"] = f"{values.get('overrides', '')} output_dir={out}".strip()
    result = fed.run(toml_run_config(values, tmp_path / f"{name}.toml"), timeout=600)
    return result, out


def test_superlink_speaks_only_tls_with_a_certificate_from_our_ca(federation):
    with pytest.raises(httpx.HTTPError):  # a plaintext client gets no answer
        httpx.get(f"http://{federation.address}/health", timeout=5)
    context = ssl.create_default_context(cafile=str(federation.creds / "ca.crt"))
    assert httpx.get(f"https://{federation.address}/health", verify=context, timeout=5).is_success


def test_supernode_with_an_unregistered_key_is_refused(federation, tmp_path):
    private, _ = make_supernode_keys(tmp_path, 1, start=99)[0]
    federation.start_supernode(99, key=private)
    deadline = time.time() + 60
    while federation.supernode_state(99) == "starting" and time.time() < deadline:
        time.sleep(0.5)
    federation.kill("supernode-99")
    assert federation.supernode_state(99) == "refused"
    assert "Failed to activate SuperNode" in (federation.logs / "supernode-99.log").read_text()


@pytest.mark.parametrize("strategy,overrides", [
    ("fedavg", ""),
    ("fedsgd", "strategy.server_lr=0.5 strategy.server_momentum=0"),
    ("dp_fedavg", "strategy.noise_multiplier=0.01 strategy.clip_norm=5"),
])
def test_each_strategy_completes_over_tls_and_learns(federation, tmp_path, strategy, overrides):
    result, out = _run(federation, strategy, {
        "strategy": strategy, "dataset": "digits",
        "overrides": f"num_rounds=2 lr=0.1 {overrides}"}, tmp_path)
    assert result.status == "finished:completed", result.log[-3000:]
    rows = _rows(out)
    assert [r["sampled"] for r in rows] == [3, 3] and all(not r["lost_nodes"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.3  # chance: 0.1; the initial model scores ~0.11
    # Every SuperNode's tasks ran in its fl-app-executor (no process per message).
    for i in range(3):
        log = (federation.logs / f"executor-{i}.log").read_text()
        assert re.search(r"fl-app-executor: task \d+ completed", log), f"executor-{i}: {log}"


def test_secure_aggregation_reaches_the_accuracy_of_the_same_run_without_it(federation,
                                                                            tmp_path):
    accuracy = {}
    for secagg in ("none", "secaggplus"):
        result, out = _run(federation, f"secagg-{secagg}", {
            "dataset": "digits", "secagg": secagg, "overrides": "num_rounds=2 lr=0.1"}, tmp_path)
        assert result.status == "finished:completed", result.log[-3000:]
        rows = _rows(out)
        assert all(not r["lost_nodes"] for r in rows)
        # the rounds of the secaggplus run went through the secure sum, with all 3 clients
        expected = [None, None] if secagg == "none" else [3, 3]
        assert [r.get("secagg_clients") for r in rows] == expected
        accuracy[secagg] = json.loads((out / "summary.json").read_text())["test_accuracy"]
    assert accuracy["none"] > 0.3
    assert abs(accuracy["secaggplus"] - accuracy["none"]) <= 0.01, accuracy


def test_killed_supernode_is_survived_logged_and_its_restart_rejoins(federation, tmp_path):
    out = tmp_path / "faults"

    def kill_after_round_1_then_restart_after_a_lost_round():
        metrics = out / "metrics.jsonl"
        while not metrics.exists():
            time.sleep(0.2)
        federation.kill("supernode-2")
        # Restart only once a round has gone without it; restarted earlier, it may rejoin in
        # time to answer the round it missed, and the loss is never seen.
        while not _a_round_lost_a_node(out):
            time.sleep(0.5)
        federation.restart_supernode(2)

    chaos = threading.Thread(target=kill_after_round_1_then_restart_after_a_lost_round,
                             daemon=True)
    chaos.start()
    result, out = _run(federation, "faults", {
        "dataset": "digits", "overrides": "num_rounds=6 lr=0.1 round_timeout=60"}, tmp_path)
    chaos.join(timeout=120)
    assert result.status == "finished:completed", result.log[-3000:]
    rows = _rows(out)
    lost_rounds = [r["round"] for r in rows if r["lost_nodes"]]
    assert lost_rounds, "no round recorded the killed SuperNode as lost"
    assert f"[round {lost_rounds[0]}] lost 1 of 3" in result.log
    rejoined = [r["round"] for r in rows
                if r["round"] > lost_rounds[0] and r["sampled"] == 3 and not r["lost_nodes"]]
    assert rejoined, f"the restarted SuperNode took part in no later round: {rows}"
    assert rows[-1]["test_accuracy"] > 0.5
    state = torch.load(out / "model.pt")
    assert all(np.isfinite(v.numpy()).all() for v in state.values())


def test_serverapp_writes_nothing_outside_its_output_folder(federation):
    # Runs above wrote their outputs where output_dir pointed; the SuperLink's own working
    # directory, where a relative path would have landed, stays empty.
    assert list(federation.superlink_cwd.iterdir()) == []


def test_a_federation_that_fails_to_start_leaves_no_process_behind(tmp_path, monkeypatch):
    fed = LocalFederation(tmp_path, num_supernodes=2, env=FAST)
    started = []

    def refused(public_key):  # the SuperLink, its SuperExec and the gateway are up by now
        started.extend(p.pid for p in fed.procs.values())
        return subprocess.CompletedProcess(["flwr"], 1, "", "registration refused")

    monkeypatch.setattr(fed, "register", refused)
    with pytest.raises(RuntimeError, match="Registering supernode-0 failed"):
        with fed:
            pass
    assert started, "the SuperLink was never started: the test proved nothing"
    assert not [pid for pid in started if alive(pid)]
    assert fed.procs == {}
