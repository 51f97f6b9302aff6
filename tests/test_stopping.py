"""Stop conditions: a fixed number of rounds, a target accuracy, or a loss plateau."""

import json

import pytest

from fl_app.config import ConfigError, compose
from fl_app.inprocess import run
from fl_app.stopping import FixedRounds, LossPlateau, TargetAccuracy


def _history(losses, accuracies=None):
    accuracies = accuracies or [0.0] * len(losses)
    return [{"round": i, "test_loss": loss, "test_accuracy": acc}
            for i, (loss, acc) in enumerate(zip(losses, accuracies, strict=True))]


def test_fixed_rounds_never_stops_early():
    assert FixedRounds().check(_history([1.0] * 50)) is None


def test_target_accuracy_stops_in_the_first_round_that_reaches_it():
    rule = TargetAccuracy(target=0.9)
    assert rule.check(_history([1, 1], [0.1, 0.89])) is None
    assert "round 2" in rule.check(_history([1, 1, 1], [0.1, 0.89, 0.9]))


def test_plateau_counts_rounds_since_the_best_loss_improved_by_min_delta():
    rule = LossPlateau(patience=2, min_delta=0.1)
    assert rule.check(_history([1.0, 0.8, 0.75])) is None       # 1 round without a 0.1 gain
    assert "for 2 rounds" in rule.check(_history([1.0, 0.8, 0.75, 0.71]))
    assert rule.check(_history([1.0, 0.8, 0.75, 0.69])) is None  # 0.69 beats 0.8 by 0.11


@pytest.mark.parametrize("bad", ["stopping=target_accuracy stopping.target=1.5",
                                 "stopping=plateau stopping.patience=0",
                                 "stopping=plateau stopping.min_delta=-1"])
def test_bad_stopping_settings_are_refused_at_compose_time_with_the_key(bad):
    key = bad.split()[1].split("=")[0]
    with pytest.raises(ConfigError, match=key):
        compose(bad.split())


def test_a_run_with_a_target_stops_early_and_records_why(tmp_path):
    summary = run(["dataset=digits", "lr=0.1", "num_rounds=30", "stopping=target_accuracy",
                   "stopping.target=0.8", f"output_dir={tmp_path}"], num_clients=5)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert summary["rounds"] < 30 and summary["stop_reason"].startswith("target_accuracy")
    assert rows[-1]["test_accuracy"] >= 0.8 > max(r["test_accuracy"] for r in rows[:-1])
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["stop_reason"] == summary["stop_reason"]


def test_a_run_without_early_stopping_says_it_ran_all_rounds(tmp_path):
    summary = run(["dataset=digits", "num_rounds=2", f"output_dir={tmp_path}"], num_clients=3)
    assert summary["rounds"] == 2 and summary["stop_reason"].startswith("num_rounds")
