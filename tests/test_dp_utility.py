"""The utility script behind docs/privacy.md's utility table runs every row end to end."""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from strategy_helpers import set_task_identity

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "dp_utility.py"


def test_utility_script_runs_every_row_and_writes_table_results_and_figure(
        tmp_path, monkeypatch, capsys) -> None:
    set_task_identity(monkeypatch)  # the script sets it too; monkeypatch restores it afterwards
    threads = torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("dp_utility", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setattr(sys, "argv", ["dp_utility.py", "--rounds", "1", "--clients", "200",
                                      "--fraction", "0.02", "--out", str(tmp_path)])
    try:
        script.main()
    finally:
        torch.set_num_threads(threads)

    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == set(script.ROWS)
    assert all(len(r["history"]) == 1 for r in results.values())
    assert "user-level" in results["dp_fedavg_hi"]["epsilon"]
    assert "example-level" in results["dpsgd"]["epsilon"]
    for row in ("secagg_distributed", "secagg_distributed_rdp"):
        assert "vs. the server" in results[row]["epsilon"]
    assert "per client vs. the server" in results["local_lo"]["epsilon"]
    assert (tmp_path / "dp_utility.png").stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "| run | test accuracy | mean of the last 10 rounds | ε | settings | time |" in table
    assert table.count("(round 1)") == len(script.ROWS)
