"""fl-app honours output_dir= (the run's files land there) or refuses it with one line naming
the setting to use instead: a folder the user gave is never dropped in silence."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fl_app.cli import honour_output_dir
from fl_app.config import ConfigError

FL_APP = str(Path(sys.executable).parent / "fl-app")
TINY = ["dataset=digits", "model=logreg", "num_clients=3", "lr=0.1"]


def test_output_dir_becomes_the_jobs_own_folder(tmp_path):
    argv = ["model=cnn", f"output_dir={tmp_path}/run"]
    assert honour_output_dir(argv) == [*argv, f"hydra.run.dir='{tmp_path}/run'"]


def test_a_folder_with_quotes_and_equals_signs_reaches_hydra_quoted(tmp_path):
    folder = tmp_path / "it's a=b,c"
    argv = honour_output_dir([f"output_dir='{str(folder).replace(chr(39), chr(92) + chr(39))}'"])
    assert argv[-1] == "hydra.run.dir='" + str(folder).replace("'", "\\'") + "'"


@pytest.mark.parametrize("argv", [[], ["num_rounds=3"], ["output_dir=null"]])
def test_without_output_dir_the_command_line_is_unchanged(argv):
    assert honour_output_dir(argv) == argv


@pytest.mark.parametrize("argv,says", [
    (["-m", "strategy=fedavg,fedsgd", "output_dir=/tmp/x"], "use hydra.sweep.dir=DIR instead"),
    (["output_dir=/tmp/a,/tmp/b"], "use hydra.sweep.dir=DIR instead"),
    (["resume=/tmp/run", "output_dir=/tmp/elsewhere"], "output_dir= cannot move it"),
    (["output_dir=/tmp/a", "hydra.run.dir=/tmp/b"], "name different folders: give one"),
])
def test_an_output_dir_that_cannot_be_honoured_is_refused(argv, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        honour_output_dir(argv)


@pytest.mark.parametrize("argv", [
    ["resume=/tmp/run", "output_dir=/tmp/run"], ["output_dir=/tmp/a", "hydra.run.dir=/tmp/a"]])
def test_an_output_dir_that_agrees_with_the_run_is_accepted(argv):
    assert honour_output_dir(argv) == argv


def test_fl_app_writes_every_output_into_output_dir_and_resumes_there(tmp_path):
    cwd, out = tmp_path / "cwd", tmp_path / "my run"
    cwd.mkdir()
    proc = subprocess.run([FL_APP, *TINY, "num_rounds=1", f"output_dir={out}"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"outputs in {out}" in proc.stdout
    assert {"summary.json", "model.pt", "checkpoint.json", "config.yaml", ".hydra"} <= {
        p.name for p in out.iterdir()}
    assert list(cwd.iterdir()) == []  # no outputs/<date>/<time> folder beside it
    again = subprocess.run([FL_APP, f"resume={out}", f"output_dir={out}", "num_rounds=2"],
                           cwd=cwd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_fl_app_refuses_an_output_dir_in_a_sweep_with_one_line(tmp_path):
    proc = subprocess.run([FL_APP, "-m", "strategy=fedavg,fedsgd", f"output_dir={tmp_path}/x"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "fl-app: error: output_dir= names one folder, but a -m sweep runs several jobs: use "
        "hydra.sweep.dir=DIR instead (job k then writes DIR/k-<its overrides>)."]
    assert not (tmp_path / "x").exists() and not (tmp_path / "multirun").exists()
