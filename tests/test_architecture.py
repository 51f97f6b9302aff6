"""The package's shape, as DESIGN.md states it: no import loops, pure PyTorch files import no
Flower, strategies import no torch, the server side never imports the client side, and no
feature is recognised by the string of a class name.

The import graph is read from the source (every `import`, also those inside functions, since a
lazy import still makes a loop); "imports no torch" is checked by importing in a fresh process.
"""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fl_app"

# What runs on the server and must never pull in a client's code.
SERVER_SIDE = ("fl_app.server_loop", "fl_app.server_app", "fl_app.strategies",
               "fl_app.privacy.central", "fl_app.secagg.server", "fl_app.secagg.round",
               "fl_app.secagg.replies", "fl_app.checkpoint")
CLIENT_SIDE = ("fl_app.client_core", "fl_app.client_app", "fl_app.secagg.client",
               "fl_app.privacy.client")
PURE_TORCH = ("fl_app.models", "fl_app.training")
# Numpy-only server code: imported without torch (a server process need not load it for them).
NO_TORCH = ("fl_app.strategies", "fl_app.strategies.fedavg", "fl_app.strategies.fedsgd",
            "fl_app.privacy.central", "fl_app.secagg.server", "fl_app.secagg.round",
            "fl_app.client_app", "fl_app.config")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The fl_app modules (and other top-level packages) `name` imports, anywhere in it."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            found.add(base)
            # `from fl_app.secagg import client` imports the module fl_app.secagg.client
            found |= {f"{base}.{alias.name}" for alias in node.names
                      if f"{base}.{alias.name}" in MODULES}
    return found


GRAPH = {name: {m for m in imports_of(name) if m in MODULES and m != name} for name in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_package_has_no_import_loops():
    loops = sorted({tuple(sorted((a, b))) for a in GRAPH for b in reachable(a)
                    if a in reachable(b) and a != b
                    # a package's __init__ re-exporting its own modules is not a loop
                    and not (b.startswith(a + ".") or a.startswith(b + "."))})
    assert loops == []


@pytest.mark.parametrize("server", SERVER_SIDE)
def test_the_server_side_never_imports_the_client_side(server):
    reached = reachable(server) | {server}
    assert sorted(reached & set(CLIENT_SIDE)) == []


@pytest.mark.parametrize("module", PURE_TORCH)
def test_pure_pytorch_files_import_no_flower(module):
    assert not any(m == "flwr" or m.startswith("flwr.") for m in imports_of(module))


def test_strategies_and_server_side_numpy_code_import_no_torch():
    code = (f"import sys; import {', '.join(NO_TORCH)}; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


# A class recognised by its name: `...endswith("DPNoise")`, `startswith("fl_app.strategies.")`,
# `type(x).__name__ == "InMemoryGrid"`.
CLASS_NAME_MATCH = re.compile(
    r"""(endswith|startswith)\(\s*\(?\s*["'](fl_app\.|flwr\.|[A-Z][A-Za-z]+["'])"""
    r"""|__name__\s*==\s*["'][A-Z]""")


# The executor forgets fl_app's own modules (sys.modules) between runs, and the one-off converter
# reads old pickles, whose only account of an object is its class path: names as data, not a
# feature check.
ALLOWED = {"fl_app.deploy.executor: startswith(\"fl_app.",
           "fl_app.convert_pickle_checkpoint: startswith(\"flwr."}


def test_no_feature_is_recognised_by_the_string_of_a_class_name():
    found = {f"{module_name(p)}: {m.group(0)}" for p in PACKAGE.rglob("*.py")
             for m in CLASS_NAME_MATCH.finditer(p.read_text())}
    assert sorted(found - ALLOWED) == []


def test_the_class_name_check_would_catch_what_it_looks_for():
    for line in ('str(t).endswith("DPNoise")', 'target.startswith("fl_app.strategies.")',
                 'type(grid).__name__ == "InMemoryGrid"',
                 'any(t.endswith("GradientAveraging") for t in targets)'):
        assert CLASS_NAME_MATCH.search(line), line
