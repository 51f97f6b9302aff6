"""Fixtures for end-to-end runs: an isolated FLWR_HOME whose local SuperLink is stopped by PID;
runs train on the CPU unless a test names its device."""

from __future__ import annotations

import os

import pytest

from fl_app.deploy.processes import pids_with_cmdline, stop
from fl_app.deploy.runner import local_superlink_env

# Expected values in the tests were computed on the CPU; on a machine with a GPU, device=auto
# would train there and differ in the last digits. Tests of the GPU path name device= themselves.
os.environ.setdefault("FL_APP_DEVICE", "cpu")


@pytest.fixture(scope="session")
def flwr_home(tmp_path_factory):
    """Environment for `flwr` commands with a private FLWR_HOME and private local ports.

    `flwr run` starts a detached local SuperLink that outlives the command; it is found by its
    database path (inside this FLWR_HOME) and stopped with everything it spawned.
    """
    home = tmp_path_factory.mktemp("flwr_home")
    env = local_superlink_env(home, home / "outputs")
    yield env
    stop(pids_with_cmdline(str(home / "local-superlink")))
