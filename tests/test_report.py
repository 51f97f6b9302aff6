"""fl-app-report turns real run folders into valid plots and a table true to metrics.jsonl."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fl_app.inprocess import run
from fl_app.report import differing_keys, label_runs, load_run, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three real 3-round runs on digits: two in a Hydra-like sweep folder, one DP run beside it."""
    root = tmp_path_factory.mktemp("runs")
    sweep = root / "multirun" / "2026-01-01" / "12-00-00"
    folders = {"fedavg": sweep / "0-strategy=fedavg", "fedsgd": sweep / "1-strategy=fedsgd",
               "dp": root / "dp"}
    extra = {"fedavg": ["lr=0.1"], "fedsgd": ["strategy=fedsgd"], "dp": ["strategy=dp_fedavg"]}
    # A tiny MLP: one thread is faster, and far faster on a busy shared CPU than two.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, folder in folders.items():
            run(["dataset=digits", "num_rounds=3", *extra[name], f"output_dir='{folder}'"],
                num_clients=3)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "sweep": sweep, **folders}


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def table_rows(results_md: Path) -> dict[str, dict[str, str]]:
    """results.md as {strategy column: {header: cell}}."""
    lines = results_md.read_text().splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    head = cells[0]
    assert set(lines[1]) <= {"|", "-"}
    return {row[1]: dict(zip(head, row, strict=True)) for row in cells[2:]}


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.width > 100 and img.height > 100


STRATEGY = {"fedavg": "WeightedFedAvg", "fedsgd": "GradientAveraging",
            "dp": "DPNoise(WeightedFedAvg)"}


def test_report_writes_valid_plots_and_one_table_row_per_run(runs, tmp_path, capsys):
    assert main([str(runs["sweep"]), str(runs["dp"]), "--out", str(tmp_path)]) == 0

    for name in ("accuracy.png", "loss.png", "epsilon.png"):
        assert_valid_png(tmp_path / name)
    rows = table_rows(tmp_path / "results.md")
    assert set(rows) == set(STRATEGY.values())
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'accuracy.png'}" in printed
    assert (tmp_path / "results.md").read_text() in printed


def test_table_final_and_best_accuracy_rounds_and_epsilon_come_from_metrics(runs, tmp_path):
    main([str(runs["sweep"]), str(runs["dp"]), "--out", str(tmp_path)])
    rows = table_rows(tmp_path / "results.md")

    for name, strategy in STRATEGY.items():
        row, history = rows[strategy], metrics(runs[name])
        summary = json.loads((runs[name] / "summary.json").read_text())
        assert row["final accuracy"] == f"{history[-1]['test_accuracy']:.4f}"
        assert row["best accuracy"] == f"{max(r['test_accuracy'] for r in history):.4f}"
        assert row["rounds"] == "3"
        assert row["dataset"] == "digits"
        assert row["stop reason"] == summary["stop_reason"]
        assert row["wall time (s)"] == f"{summary['seconds']:.1f}"
    final_epsilon = metrics(runs["dp"])[-1]["train_epsilon"]
    assert rows["DPNoise(WeightedFedAvg)"]["final ε"] == f"{final_epsilon:.3f}"
    assert rows["WeightedFedAvg"]["final ε"] == rows["GradientAveraging"]["final ε"] == "–"


def test_rounds_to_target_is_the_first_round_whose_accuracy_reaches_it(runs, tmp_path):
    history = metrics(runs["fedavg"])
    target = history[1]["test_accuracy"]  # reached in round 2 at the latest
    expected = next(r["round"] for r in history if r["test_accuracy"] >= target)

    main([str(runs["fedavg"]), "--out", str(tmp_path), "--target", str(target)])
    assert table_rows(tmp_path / "results.md")["WeightedFedAvg"][f"rounds to {target:g}"] \
        == str(expected)

    main([str(runs["fedavg"]), "--out", str(tmp_path), "--target", "1.01"])
    assert table_rows(tmp_path / "results.md")["WeightedFedAvg"]["rounds to 1.01"] \
        == "not reached"


def test_sweep_folders_are_searched_recursively_and_the_report_lands_there(runs, capsys):
    assert main([str(runs["root"])]) == 0

    assert len(table_rows(runs["root"] / "results.md")) == 3
    assert_valid_png(runs["root"] / "accuracy.png")


def test_without_dp_runs_no_epsilon_plot_is_written_and_the_report_says_so(runs, tmp_path,
                                                                           capsys):
    assert main([str(runs["sweep"]), "--out", str(tmp_path)]) == 0

    assert not (tmp_path / "epsilon.png").exists()
    assert "epsilon.png not written" in capsys.readouterr().out
    assert_valid_png(tmp_path / "accuracy.png")


def test_labels_are_the_config_values_that_differ_between_runs(runs):
    loaded = [load_run(runs[name]) for name in ("fedavg", "fedsgd", "dp")]

    # A swapped strategy is one label, not each of its settings; output_dir never is one.
    assert differing_keys([r.config for r in loaded]) == ["strategy", "lr"]
    label_runs(loaded)
    assert [r.label for r in loaded] == ["strategy=WeightedFedAvg lr=0.1",
                                         "strategy=GradientAveraging lr=0.05",
                                         "strategy=DPNoise(WeightedFedAvg) lr=0.05"]


def test_labels_fall_back_to_folder_names_when_the_chosen_keys_do_not_tell_runs_apart(runs):
    loaded = [load_run(runs[name]) for name in ("fedsgd", "dp")]

    label_runs(loaded, ["lr"])  # both lr=0.05
    assert [r.label for r in loaded] == ["1-strategy=fedsgd", "dp"]


def test_a_resumed_run_keeps_the_last_row_of_each_round(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["fedavg"], resumed)
    last = metrics(resumed)[-1] | {"test_accuracy": 0.1234}
    with (resumed / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(last) + "\n")

    loaded = load_run(resumed)
    assert [r["round"] for r in loaded.rows] == [1, 2, 3]
    assert loaded.rows[-1]["test_accuracy"] == 0.1234


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nope", "does not exist"),
    (lambda tmp: tmp, "no runs"),
])
def test_a_missing_or_empty_folder_is_one_line_and_exit_code_2(make, message, tmp_path, capsys):
    assert main([str(make(tmp_path))]) == 2

    err = capsys.readouterr().err
    assert err.startswith("fl-app-report: error: ") and message in err
    assert len(err.strip().splitlines()) == 1


def test_an_unknown_label_key_is_one_line_and_exit_code_2(runs, tmp_path, capsys):
    assert main([str(runs["fedavg"]), "--out", str(tmp_path), "--labels", "nokey"]) == 2
    assert "nokey" in capsys.readouterr().err


def test_python_m_fl_app_report_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fl_app.report", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"fl-app-report: error: {tmp_path / 'nope'} does not exist"
