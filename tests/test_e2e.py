"""Real `flwr run` simulations and the `fl-app` command, checked by the SuperLink's run status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fl_app.deploy.runner import flwr_run, toml_run_config
from fl_app.models import MLP

pytestmark = pytest.mark.e2e
SMALL = "num_rounds=3 lr=0.1"


def _run(flwr_home, tmp_path, run_config: dict, supernodes: int = 4):
    out = tmp_path / "out"
    values = dict(run_config)
    values["overrides"] = f"{values.get('overrides', '')} output_dir={out}".strip()
    result = flwr_run(toml_run_config(values, tmp_path / "run.toml"), supernodes, flwr_home,
                      echo=False, timeout=600)
    return result, out


def test_flwr_run_simulation_completes_learns_and_writes_outputs(flwr_home, tmp_path):
    result, out = _run(flwr_home, tmp_path, {"dataset": "digits", "overrides": SMALL})
    assert result.status == "finished:completed", result.log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["test_accuracy"] > 0.6  # chance: 0.1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert rows[-1]["test_loss"] < rows[0]["test_loss"]
    config = (out / "config.yaml").read_text()
    assert "num_clients: 4" in config and "WeightedFedAvg" in config
    model = MLP([1, 8, 8], 10)
    model.load_state_dict(torch.load(out / "model.pt"))  # a real, loadable state_dict
    assert "[round 3/3]" in result.log and "final test accuracy" in result.log


def test_flwr_run_with_a_bad_config_is_reported_failed_with_the_reason(flwr_home, tmp_path):
    result, out = _run(flwr_home, tmp_path, {"dataset": "digits",
                                             "overrides": "num_clients=7 node_wait_timeout=5"})
    assert result.status == "finished:failed"
    assert "Only 4 SuperNode(s) connected" in result.log
    assert not (out / "summary.json").exists()


def test_fl_app_sweeps_strategies_one_output_folder_each(flwr_home, tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [str(Path(sys.executable).parent / "fl-app"), "-m", "engine=flower",
           "strategy=fedavg,fedsgd,dp_fedavg", "dataset=digits", "num_clients=4",
           *SMALL.split(), f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, env=flwr_home, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = {json.loads(p.read_text())["output_dir"]: json.loads(p.read_text())
                 for p in sweep.glob("*/summary.json")}
    assert len(summaries) == 3
    by_strategy = {OmegaConf.load(Path(d) / "config.yaml").strategy._target_.rsplit(".", 1)[1]: s
                   for d, s in summaries.items()}
    assert set(by_strategy) == {"WeightedFedAvg", "GradientAveraging", "DPNoise"}
    assert by_strategy["WeightedFedAvg"]["test_accuracy"] > 0.6
    assert by_strategy["GradientAveraging"]["test_accuracy"] > 0.3
    assert by_strategy["DPNoise"]["epsilon"] > 0
    assert proc.stdout.count("fl-app: run") == 3

    # One documented command continues a run from its folder, here for one more round, on the
    # engine the run was started with.
    fedavg = Path(by_strategy["WeightedFedAvg"]["output_dir"])
    cmd = [str(Path(sys.executable).parent / "fl-app"), f"resume='{fedavg}'", "num_rounds=4",
           f"hydra.run.dir={tmp_path / 'resume'}"]
    proc = subprocess.run(cmd, env=flwr_home, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming after round 3" in proc.stdout and "fl-app: run" in proc.stdout
    rows = [json.loads(line) for line in (fedavg / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((fedavg / "summary.json").read_text())["rounds"] == 4


def test_fl_app_with_a_client_pool_trains_a_population_on_4_supernodes(flwr_home, tmp_path):
    # fl-app starts client_pool SuperNodes, not num_clients; each round samples 4 of the 40.
    cmd = [str(Path(sys.executable).parent / "fl-app"), "engine=flower", "dataset=digits",
           "num_clients=40",
           "client_pool=4", "fraction_train=0.1", *SMALL.split(),
           f"hydra.run.dir={tmp_path / 'pool'}"]
    proc = subprocess.run(cmd, env=flwr_home, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "pool"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sampled"] for r in rows] == [4, 4, 4] and not any(r["lost_nodes"] for r in rows)
    assert rows[-1]["test_accuracy"] > 0.3  # chance: 0.1; 4 clients of 36 images a round
    assert "sampled 4 clients" in proc.stdout and "Only 4 SuperNode" not in proc.stdout


def test_fl_app_reports_a_failed_run_and_exits_nonzero(flwr_home, tmp_path):
    # Offline, torchvision's MNIST cannot be fetched: the ServerApp fails, and so must fl-app.
    cmd = [str(Path(sys.executable).parent / "fl-app"), "engine=flower", "dataset=mnist",
           "num_clients=2",
           f"dataset.root={tmp_path / 'empty'}", "num_rounds=1",
           f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, env=flwr_home, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "fl-app: error: Flower run" in proc.stderr and "finished:failed" in proc.stderr
    assert "Connect to the internet once" in proc.stdout
