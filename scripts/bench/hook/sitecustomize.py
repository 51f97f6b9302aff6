"""Benchmark time stamps from inside every process of a run (imported at interpreter start).

Active only when FL_APP_BENCH_STAMPS names a file: `scripts/bench.py` puts this folder on
PYTHONPATH for the processes it starts (SuperLink, flwr-simulation, Ray workers, SuperNodes,
flwr-clientapp), and each one appends JSON lines {"t", "pid", "event", ...} to that file. The
app's code is not changed: a few fl_app functions are wrapped when their module is imported.

Events: process-start (with argv); flwr-entry (the process's flwr entry-point module has been
imported: flwr-clientapp's, flwr-simulation's); app-load (the first `import fl_app...` begins);
torch (torch has been imported); imports (fl_app.client_core, with flwr and torch, has been
imported); server-run; round-start / round-end; handler (the ClientApp's train handler asked
for its client: the Message has arrived); train-start / train-end (the local SGD loop);
gradient-start / gradient-end; backward (the process's first backward pass: its first
training step really runs; stamped once per process).
"""

from __future__ import annotations

import json
import os
import sys
import time

_PATH = os.environ.get("FL_APP_BENCH_STAMPS")


def stamp(event: str, **fields) -> None:
    line = json.dumps({"t": time.time(), "pid": os.getpid(), "event": event, **fields})
    with open(_PATH, "a") as f:  # one short write per line: lines from processes do not mix
        f.write(line + "\n")


def _timed(fn, name: str):
    def wrapper(*args, **kwargs):
        stamp(f"{name}-start")
        try:
            return fn(*args, **kwargs)
        finally:
            stamp(f"{name}-end")
    wrapper.__wrapped__ = fn
    return wrapper


def _entered(fn, name: str):
    def wrapper(*args, **kwargs):
        stamp(name)
        return fn(*args, **kwargs)
    wrapper.__wrapped__ = fn
    return wrapper


# module -> [(attribute, wrapper factory, event name)]. Only attributes the app looks up as
# module globals at call time are wrapped, so wrapping the module attribute takes effect.
_PATCHES = {
    "fl_app.training": [("train", _timed, "train"), ("gradient", _timed, "gradient")],
    "fl_app.client_core": [("_client", _entered, "handler")],
    "fl_app.server_loop": [("train_round", _timed, "round"), ("run", _entered, "server-run")],
}


# Modules whose import completion is stamped (event name).
_IMPORTED = {"flwr.supernode.cli": "flwr-entry", "flwr.simulation.app": "flwr-entry",
             "torch": "torch"}
_seen: set[str] = set()


def _first_backward(backward):
    done = []

    def wrapper(self, *args, **kwargs):
        if not done:
            done.append(True)
            stamp("backward")
        return backward(self, *args, **kwargs)
    wrapper.__wrapped__ = backward
    return wrapper


def _patch(module) -> None:
    if module.__name__ == "torch":
        module.Tensor.backward = _first_backward(module.Tensor.backward)
    if module.__name__ in _IMPORTED:
        stamp(_IMPORTED[module.__name__])
    for attr, factory, event in _PATCHES.get(module.__name__, []):
        fn = getattr(module, attr, None)
        if callable(fn) and not hasattr(fn, "__wrapped__"):
            setattr(module, attr, factory(fn, event))
    if module.__name__ == "fl_app.client_core":
        stamp("imports")  # the client's module imports flwr and torch at its top


if _PATH:
    import importlib.abc

    class _PostImport(importlib.abc.MetaPathFinder):
        """Wraps the functions above right after their module has executed."""

        def find_spec(self, name, path=None, target=None):
            if name == "fl_app" and name not in _seen:
                _seen.add(name)
                stamp("app-load")
            if name not in _PATCHES and name not in _IMPORTED:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    break
            else:
                return None
            exec_module = spec.loader.exec_module

            def exec_and_patch(module, _exec=exec_module):
                _exec(module)
                _patch(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, _PostImport())
    _api = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1])
                 if a == "--runtime-api-address"), None)  # which SuperNode started it
    stamp("process-start", argv=[os.path.basename(a) for a in sys.argv[:2]], api=_api)
