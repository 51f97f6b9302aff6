"""Where the simulation's time goes: py-spy on the running processes, and the start-up's parts
measured alone.

- per message: a 2NN simulation with 20 clients and Flower's defaults; from the second round on
  py-spy samples (non-blocking, 100 Hz, CPU time only) the flwr-simulation process (ServerApp,
  simulation engine, Ray driver) and the Ray actor that runs the ClientApp. Each sample goes to
  the first group of GROUPS (in priority order) with a frame in its stack.
- start-up: fresh interpreters timing each import and a local `ray.init()` + first actor call.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.common import ROOT, Part, Row, fmt_s, python_child, read_stamps, simulate

PY_SPY = str(Path(sys.executable).parent / "py-spy")
RATE = 100  # samples per second; CPU-only sampling, so samples / RATE = CPU seconds

# (group, substring of a frame "function (file:line)"), in priority order: a sample goes to the
# first group with a frame anywhere in its stack (so torch frames under the local training loop
# count as training, and LinkState calls made by the engine's polling count as polling).
GROUPS = [
    ("local training (fl_app.training.train)", "train (fl_app/training.py"),
    ("central evaluation", "evaluate (fl_app/training.py"),
    ("engine: polling every node for messages (vce_api.add_messages_to_queue)",
     "add_messages_to_queue ("),
    ("engine: storing replies (vce_api.put_message_into_state)", "put_message_into_state ("),
    ("engine: worker threads (submit to Ray, wait, update Context)", "worker (flwr/server/"),
    ("ServerApp grid: push / pull messages", "send_and_receive ("),
    ("Array -> ndarray (np.load of Flower's bytes)", "numpy (flwr/app/message/array.py"),
    ("ndarray -> Array (np.save into Flower's bytes)", "from_numpy_ndarray ("),
    ("torch state_dict <-> ndarrays", "get_weights (fl_app/models.py"),
    ("torch state_dict <-> ndarrays", "set_weights (fl_app/models.py"),
    ("fl_app strategy (aggregate, checks)", "fl_app/strategies"),
    ("fl_app ClientApp bridge (client cache, build)", "fl_app/client_core.py"),
    ("Ray: (de)serialising task arguments and results", "serializ"),
    ("Ray: actor pool", "ray_actor.py"),
    ("Ray: driver / worker loop", "ray/_private/worker.py"),
    ("Flower's LinkState (message validation, copies)", "linkstate"),
    ("Flower Message / RecordDict handling", "flwr/app/"),
    ("Flower log uploader / parent-process monitor", "flwr/supercore/"),
    ("fl_app server loop", "fl_app/server_loop.py"),
    ("logging", "logging/__init__.py"),
    ("gRPC", "grpc"),
]


def summarise(raw: Path, top: int = 12) -> dict:
    groups, leaves, total = Counter(), Counter(), 0
    if not raw.exists():
        return {"samples": 0}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = stack.split(";")
        total += n
        leaves[frames[-1]] += n
        groups[next((g for g, key in GROUPS if key in stack), "other")] += n
    return {"samples": total, "cpu_seconds": total / RATE,
            "groups": {g: c / total for g, c in groups.most_common()} if total else {},
            "top_leaf_frames": [(f, c / total) for f, c in leaves.most_common(top)]}


def spy(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen([PY_SPY, "record", "-p", str(pid), "-d", str(int(seconds)), "-r",
                             str(RATE), "--nonblocking", "-f", "raw", "-o", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def per_message(work: Path, seconds: float = 8.0, rounds: int = 8) -> dict:
    """py-spy both processes for `seconds` from the start of round 2."""
    outs = {"simulation process": work / "spy-simulation.txt",
            "Ray actor (ClientApp)": work / "spy-actor.txt"}

    def watcher(stamps: Path, done) -> None:
        while not done.is_set():
            st = read_stamps(stamps)
            starts = [s for s in st if s["event"] == "round-start"]
            if len(starts) >= 2:
                sim_pid = starts[0]["pid"]
                actor = next((s["pid"] for s in st if s["event"] == "handler"), None)
                procs = [spy(sim_pid, seconds, outs["simulation process"])]
                if actor:
                    procs.append(spy(actor, seconds, outs["Ray actor (ClientApp)"]))
                for p in procs:
                    p.wait()
                return
            done.wait(0.2)

    run = simulate(work / "sim-profiled", ["model=mlp", f"num_rounds={rounds}"], 20,
                   watcher=watcher)
    return {name: summarise(path) for name, path in outs.items()} | {"ok": run.ok}


IMPORT = r"""
import json, sys, time
t = time.time()
__import__(sys.argv[1])
print(json.dumps({"seconds": time.time() - t}))
"""

RAY_INIT = r"""
import json, time
t0 = time.time()
import ray
t1 = time.time()
ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
t2 = time.time()
@ray.remote(num_cpus=2)
class A:
    def ping(self):
        return 1
a = A.remote()
ray.get(a.ping.remote())
t3 = time.time()
ray.get(a.ping.remote())
t4 = time.time()
ray.shutdown()
t5 = time.time()
print(json.dumps({"import ray": t1 - t0, "ray.init (local, fresh)": t2 - t1,
                  "first actor ready (new worker process)": t3 - t2,
                  "actor call round trip": t4 - t3, "ray.shutdown": t5 - t4}))
"""


FAB = r"""
import json, shutil, sys, tempfile, time, zipfile, io
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


SGD = r"""
import json, time, torch
model = torch.nn.Linear(2, 2)
t = time.time()
torch.optim.SGD(model.parameters(), lr=0.1)
print(json.dumps({"seconds": time.time() - t}))
"""


def startup_components() -> dict:
    out = {}
    t = time.time()
    python_child("print('{}')")
    out["python interpreter (nothing imported)"] = time.time() - t
    for module in ("flwr.cli.app", "flwr.superlink.cli", "flwr.simulation.app",
                   "flwr.supernode.cli", "ray", "torch", "hydra.compose", "fl_app.server_app",
                   "fl_app.server_loop", "fl_app.client_app", "fl_app.client_core"):
        code = f"import sys; sys.argv = ['x', {module!r}]\n" + IMPORT
        out[f"import {module}"] = python_child(code)["seconds"]
    out["first torch.optim.SGD(...) of a process (it imports torch._dynamo)"] = python_child(
        SGD)["seconds"]
    fab = python_child(f"import sys; sys.argv = ['x', {str(ROOT)!r}]\n" + FAB)
    out["flwr run: build the FAB from the project dir "
        f"({fab['project files walked']:,} files walked; a symlinked .venv is skipped)"] = \
        fab["project dir"]
    out[f"flwr run: build the FAB from a dir holding only its {fab['files in the FAB']} "
        "files"] = fab["staged app dir"]
    ray_tmp = tempfile.mkdtemp(prefix="fb", dir="/tmp")
    try:
        out |= python_child(RAY_INIT, env={"RAY_TMPDIR": ray_tmp})
    finally:
        from fl_app.deploy.processes import pids_with_cmdline, stop
        stop(pids_with_cmdline(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return out


def run(work: Path, profile_messages: bool = True) -> Part:
    part = Part()
    comps = startup_components()
    part.data["start-up components (fresh processes)"] = comps
    for name, seconds in comps.items():
        part.rows.append(Row(f"Start-up part, alone: {name}", fmt_s(seconds)))
    if profile_messages:
        work.mkdir(parents=True, exist_ok=True)
        spy = per_message(work)
        part.data["py-spy, 2NN simulation, 20 clients, rounds 2+"] = spy
        for proc in ("simulation process", "Ray actor (ClientApp)"):
            groups = spy.get(proc, {}).get("groups", {})
            top = "; ".join(f"{g} {share:.0%}" for g, share in list(groups.items())[:6])
            cpu = spy.get(proc, {}).get("cpu_seconds", 0.0)
            part.rows.append(Row(f"py-spy, 8 s of steady 2NN rounds, {proc}: {cpu:.1f} CPU-s, "
                                 "by group", top or "no samples"))
    return part
