"""Fixtures for end-to-end runs: an isolated FLWR_HOME whose local SuperLink is stopped by PID."""

from __future__ import annotations

import socket

import pytest

from fl_app.processes import pids_with_cmdline, stop
from fl_app.runner import flwr_env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def flwr_home(tmp_path_factory):
    """Environment for `flwr` commands with a private FLWR_HOME and private local ports.

    `flwr run` starts a detached local SuperLink that outlives the command; it is found by its
    database path (inside this FLWR_HOME) and stopped with everything it spawned.
    """
    home = tmp_path_factory.mktemp("flwr_home")
    env = flwr_env({
        "FLWR_HOME": str(home),
        "FL_APP_OUTPUTS": str(home / "outputs"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
    })
    yield env
    stop(pids_with_cmdline(str(home / "local-superlink")))
