"""`fl-app` (engine=auto) and `fl-app engine=inprocess`: the app's simulation in the fl-app
process, no SuperLink, no Ray.

The command runs, learns, writes the outputs a `flwr run` writes, resumes, sweeps (each job as if
alone), fails in one line, and turns a failing ClientApp into an error reply as Flower does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fl_app import inprocess, server_loop
from fl_app.cli import engine_for
from fl_app.config import ConfigError

FL_APP = str(Path(sys.executable).parent / "fl-app")
SMALL = ["dataset=digits", "num_clients=4", "num_rounds=3", "lr=0.1"]


def _fl_app(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([FL_APP, *args, "engine=inprocess"], capture_output=True, text=True,
                          timeout=300)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_engine_auto_is_inprocess_unless_ray_address_names_a_cluster():
    assert engine_for("auto", {}) == "inprocess"
    assert engine_for("auto", {"RAY_ADDRESS": "127.0.0.1:6379"}) == "flower"
    assert engine_for("flower", {}) == "flower"
    assert engine_for("inprocess", {"RAY_ADDRESS": "127.0.0.1:6379"}) == "inprocess"


def test_fl_app_by_default_runs_inprocess_learns_writes_outputs_and_resumes(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([FL_APP, *SMALL, f"hydra.run.dir={out}"], capture_output=True,
                          text=True, timeout=300, env=env)  # no engine=: the default
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.6  # chance: 0.1
    assert (out / "model.pt").is_file() and (out / "run_config.json").is_file()
    assert f"fl-app: in-process run completed: test accuracy {summary['test_accuracy']:.4f}" \
        in proc.stdout
    log = proc.stdout + proc.stderr
    assert log.count("[round 3/3]") == 1  # Flower's log lines once, not also via Hydra

    proc = subprocess.run([FL_APP, f"resume='{out}'", "num_rounds=4",
                           f"hydra.run.dir={tmp_path / 'resume'}"], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming after round 3" in proc.stdout + proc.stderr
    assert "fl-app: in-process run completed" in proc.stdout
    assert [r["round"] for r in _rows(out)] == [1, 2, 3, 4]


def test_fl_app_inprocess_sweep_jobs_match_runs_alone(tmp_path):
    alone = tmp_path / "alone"
    assert _fl_app(*SMALL, f"hydra.run.dir={alone}").returncode == 0
    sweep = tmp_path / "sweep"
    # The DP job first: its clients and state must not leak into the FedAvg job after it.
    proc = _fl_app("-m", "strategy=dp_fedavg,fedavg", *SMALL, f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("fl-app: in-process run completed") == 2
    jobs = {json.loads((d / "summary.json").read_text())["output_dir"]: d
            for d in sweep.iterdir() if (d / "summary.json").is_file()}
    assert len(jobs) == 2
    fedavg = next(d for d in jobs.values() if d.name.endswith("strategy=fedavg"))
    dp = next(d for d in jobs.values() if d.name.endswith("strategy=dp_fedavg"))
    assert json.loads((dp / "summary.json").read_text())["epsilon"] > 0
    expected = [r["test_loss"] for r in _rows(alone)]
    assert [r["test_loss"] for r in _rows(fedavg)] == pytest.approx(expected, rel=1e-6)


def test_fl_app_inprocess_failure_is_one_line_and_a_nonzero_exit(tmp_path):
    # Offline, torchvision's MNIST cannot be fetched.
    out = tmp_path / "run"
    proc = _fl_app("dataset=mnist", f"dataset.root={tmp_path / 'empty'}", "num_clients=2",
                   "num_rounds=1", f"hydra.run.dir={out}")
    assert proc.returncode == 1
    assert "fl-app: error: the in-process run failed: DatasetUnavailable" in proc.stderr
    assert "Connect to the internet once" in proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "DatasetUnavailable" in (out / "traceback.txt").read_text()


def test_a_client_that_raises_is_an_error_reply_and_the_round_goes_on(tmp_path, monkeypatch):
    real = inprocess.client_app

    def node_0_crashes(message, context):
        if message.metadata.dst_node_id == 0:
            raise RuntimeError("disk full on node 0")
        return real(message, context)

    monkeypatch.setattr(inprocess, "client_app", node_0_crashes)
    summary = inprocess.run([*SMALL, f"output_dir={tmp_path}"])
    rows = _rows(tmp_path)
    assert [r["lost_nodes"] for r in rows] == [[0], [0], [0]]
    assert summary["test_accuracy"] > 0.5  # learnt from the three others


def test_every_client_raising_stops_the_run_with_their_reason(tmp_path, monkeypatch):
    def crash(message, context):
        raise RuntimeError("disk full")

    monkeypatch.setattr(inprocess, "client_app", crash)
    with pytest.raises(RuntimeError, match="all 4 clients failed.*RuntimeError: disk full"):
        inprocess.run([*SMALL, f"output_dir={tmp_path}"])


def test_flwr_run_refuses_the_inprocess_engine():
    context = Context(run_id=1, node_id=0, state=RecordDict(), node_config={},
                      run_config={"overrides": "engine=inprocess"})
    with pytest.raises(ConfigError, match="fl-app engine=inprocess"):
        server_loop.main(None, context)
