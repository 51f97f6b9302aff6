"""Item 1 (start-up): when the first training step runs after `fl-app` and after `flwr run`
start (2NN, 20 clients), each stage of a `flwr run` start-up, the same with Ray and then also
the SuperLink already running, and the start-up's costly pieces measured alone.

The time line is read from the stamps (scripts/bench/hook) of the simulation part's 2NN run
with Flower's defaults, or of a run of its own when the simulation part is not run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from bench.common import (
    ROOT,
    Part,
    RayHead,
    Row,
    SimRun,
    first,
    fmt_s,
    python_child,
    simulate,
    stamp_env,
    verdict,
)
from bench.sim import NUM_CLIENTS, fl_app_run, flower
from fl_app.deploy.processes import pids_with_cmdline, stop
from fl_app.deploy.runner import free_port

TARGET_FIRST_STEP = 10.0
# The plain-Flower time line, next to the stages it names.
PLAIN_MARKS = {"run submitted": "SuperLink ~4.5 s", "simulation process": "~8.7 s",
               "server code (ServerApp main)": "~10.5 s",
               "first training step (first backward pass)": "Ray actors ~9 s more, inside round 1"}

IMPORT = r"""
import json, sys, time
t = time.time()
__import__(sys.argv[1])
print(json.dumps({"seconds": time.time() - t}))
"""

SGD = r"""
import json, time, torch
model = torch.nn.Linear(2, 2)
t = time.time()
torch.optim.SGD(model.parameters(), lr=0.1)
print(json.dumps({"seconds": time.time() - t}))
"""

RAY_INIT = r"""
import json, time, ray
t = time.time()
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
print(json.dumps({"seconds": time.time() - t}))
ray.shutdown()
"""

FAB = r"""
import io, json, shutil, sys, tempfile, time, zipfile
from pathlib import Path
from flwr.cli.build import build_fab_from_disk
from flwr.cli.utils import collect_files
root = Path(sys.argv[1])
t = time.time(); fab = build_fab_from_disk(root); t_root = time.time() - t
n_root = len(collect_files(root))
names = [n for n in zipfile.ZipFile(io.BytesIO(fab)).namelist() if not n.startswith(".info")]
staged = Path(tempfile.mkdtemp())
for name in names + [".gitignore"]:
    if (root / name).exists():
        (staged / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, staged / name)
t = time.time(); build_fab_from_disk(staged); t_staged = time.time() - t
shutil.rmtree(staged)
print(json.dumps({"project dir": t_root, "project files walked": n_root,
                  "files in the FAB": len(names), "staged app dir": t_staged}))
"""


def _with_argv(code: str, *args: str) -> str:
    return f"import sys; sys.argv = {['bench', *args]!r}\n" + code


def components() -> dict[str, float]:
    """The pieces of a start-up that docs/performance.md names, each in a fresh interpreter."""
    out = {}
    for module in ("flwr.simulation.app", "torch"):
        out[f"import {module}"] = python_child(_with_argv(IMPORT, module))["seconds"]
    out["first torch.optim.SGD(...) of a process (it imports torch._dynamo)"] = python_child(
        SGD)["seconds"]
    fab = python_child(_with_argv(FAB, str(ROOT)))
    out["flwr run: build the FAB from the project dir "
        f"({fab['project files walked']:,} files walked; a symlinked .venv is skipped)"] = \
        fab["project dir"]
    out[f"flwr run: build the FAB from a dir holding only its {fab['files in the FAB']} "
        "files"] = fab["staged app dir"]
    ray_tmp = tempfile.mkdtemp(prefix="fb", dir="/tmp")  # its processes are found by this path
    try:
        out["ray.init() (local, fresh)"] = python_child(
            RAY_INIT, env={"RAY_TMPDIR": ray_tmp})["seconds"]
    finally:
        stop(pids_with_cmdline(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return out


def warm_starts(work: Path) -> dict[str, dict]:
    """First training step when Ray, then also the SuperLink, are already running: a Ray head
    started beforehand (`ray start --head`, reached through RAY_ADDRESS), a 1-round 2NN run
    from a fresh FLWR_HOME, then a second run on the SuperLink the first one left running.
    All their processes stamp into one file (the head's workers and the kept SuperLink keep
    the environment they were started with)."""
    out = {}
    work.mkdir(parents=True, exist_ok=True)
    home, ports = work / "warm-home", (free_port(), free_port())
    stamps = work / "warm-stamps.jsonl"
    with RayHead(env=stamp_env(stamps)) as head:
        for name, keep in (("Ray cluster already running", True),
                           ("Ray cluster and local SuperLink already running", False)):
            run = simulate(work / f"warm-{keep}", ["model=mlp", "num_rounds=1"], NUM_CLIENTS,
                           env={"RAY_ADDRESS": head.address}, home=home, ports=ports,
                           keep_superlink=keep, stamps=stamps)
            out[name] = run.timeline() | {"ok": run.ok}
    return out


def _first_step_row(label: str, step: float | None, plain_flower: str) -> Row:
    ok = step is not None and step <= TARGET_FIRST_STEP
    return Row(label, (fmt_s(step) if step else "?") + verdict(ok),
               f"≤ {TARGET_FIRST_STEP:.0f} s", plain_flower, ok=ok)


def run(work: Path, rounds: int, sim_run: SimRun | None = None,
        sim_data: dict | None = None) -> Part:
    """`sim_run` / `sim_data`: the simulation part's 2NN run with Flower's defaults and its
    data (plain loop, fl-app); measured here when not given."""
    work.mkdir(parents=True, exist_ok=True)
    sim_data = sim_data or {}
    run = sim_run or flower("mlp", rounds, work, None)
    part = Part()
    tl = run.timeline()
    part.data["timeline"] = tl
    part.rows.append(_first_step_row("Start-up: first training step after `flwr run` starts "
                                     "(2NN, 20 clients, defaults)",
                                     tl["first training step (first backward pass)"], "~22 s"))
    plain_first = sim_data.get("plain loop mlp", {}).get("first_step_after")
    if plain_first is not None:
        part.rows.append(Row("  plain loop: first training step after the process starts",
                             fmt_s(plain_first), "", "~3 s"))
    engine = sim_data.get("fl-app (in-process) mlp") or fl_app_run("mlp", 2, work)
    part.data["fl-app (in-process)"] = engine
    part.rows.append(_first_step_row("Start-up: first training step after `fl-app` (in-process) "
                                     "starts (2NN, 20 clients)", engine["first_step_after"],
                                     "~22 s"))
    previous = 0.0
    for name, t in sorted(((n, t) for n, t in tl.items() if t is not None),
                          key=lambda item: item[1]):
        if name in ("last round ends", "flwr run exits"):
            continue
        part.rows.append(Row(f"  at {t:5.1f} s: {name} (+{t - previous:.1f} s)", "", "",
                             PLAIN_MARKS.get(name, "")))
        previous = max(previous, t)
    first_handler, first_train = first(run.stamps, "handler"), first(run.stamps, "backward")
    if first_handler and first_train:
        part.rows.append(Row("  first message at the ClientApp → its first training step",
                             fmt_s(first_train - first_handler)))
    for name, warm in warm_starts(work).items():
        part.data[f"timeline, {name}"] = warm
        step = warm.get("first training step (first backward pass)")
        part.rows.append(Row(f"  first training step, {name} (RAY_ADDRESS)",
                             fmt_s(step) if step else f"? (run ok: {warm['ok']})"))
    comps = components()
    part.data["start-up components (fresh processes)"] = comps
    for name, seconds in comps.items():
        part.rows.append(Row(f"Start-up part, alone: {name}", fmt_s(seconds)))
    return part
