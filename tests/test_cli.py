"""fl-app refuses bad command lines with one clear message and a non-zero exit, before any run."""

import subprocess
import sys
from pathlib import Path

import pytest

FL_APP = str(Path(sys.executable).parent / "fl-app")


@pytest.mark.parametrize("args,message", [
    (["strategy=nope"], "Available options in 'strategy'"),
    (["model=nope"], "Available options in 'model'"),
    (["nokey=3"], "Could not override 'nokey'"),
    (["lr=-1"], "fl-app: error: lr=-1 is invalid: it must be a finite number > 0."),
    (["engine=ray"], "fl-app: error: engine=ray is invalid: it must be auto, flower or inprocess."),
    (["num_clients=2", "min_clients=3"], "min_clients=3 exceeds num_clients=2"),
])
def test_bad_command_line_fails_fast_with_the_reason(args, message, tmp_path):
    proc = subprocess.run([FL_APP, *args, f"hydra.run.dir={tmp_path}"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1
    assert message in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
