"""The modules Flower loads (pyproject's serverapp and clientapp) import no torch: Flower's
simulation starts Ray only after loading them, and a deployed SuperNode loads the ClientApp in
a fresh process for every message."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["fl_app.server_app", "fl_app.client_app"])
def test_flower_entry_module_imports_no_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_server_app_main_runs_the_server_loop(monkeypatch):
    from fl_app import server_app, server_loop

    calls = []
    monkeypatch.setattr(server_loop, "main", lambda grid, context: calls.append((grid, context)))
    server_app.main("grid", "context")
    assert calls == [("grid", "context")]
