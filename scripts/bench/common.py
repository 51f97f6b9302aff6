"""What every benchmark part shares: result rows, time stamps, process-tree memory, and a
`flwr run` simulation driven with a time line of what happened when."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fl_app.deploy.processes import descendants, pids_with_cmdline, stop
from fl_app.deploy.runner import (
    flwr_env,
    free_port,
    local_superlink_env,
    run_status,
    toml_run_config,
)

ROOT = Path(__file__).resolve().parents[2]
HOOK = Path(__file__).resolve().parent / "hook"  # sitecustomize.py: the stamps


@dataclass
class Row:
    """One line of the results table."""

    figure: str
    measured: str
    target: str = ""
    plain_flower: str = ""
    ok: bool | None = None  # meets the target (None: no target, or informative only)


@dataclass
class Part:
    """What a part returns: table rows and everything measured (for the JSON)."""

    rows: list[Row] = field(default_factory=list)
    data: dict = field(default_factory=dict)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


def fmt_mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f} MB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GB"


def verdict(ok: bool | None) -> str:
    return "" if ok is None else (" ✓" if ok else " ✗")


# ------------------------------------------------------------------------------------------
# Stamps (scripts/bench/hook/sitecustomize.py)
# ------------------------------------------------------------------------------------------

def stamp_env(stamps: Path) -> dict[str, str]:
    """Environment that makes every Python process started with it write stamps to `stamps`."""
    path = os.environ.get("PYTHONPATH", "")
    return {"FL_APP_BENCH_STAMPS": str(stamps),
            "PYTHONPATH": f"{HOOK}{os.pathsep}{path}" if path else str(HOOK)}


def read_stamps(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return sorted(rows, key=lambda r: r["t"])


def first(stamps: list[dict], event: str, after: float = 0.0, **match) -> float | None:
    for s in stamps:
        if s["event"] == event and s["t"] >= after and all(s.get(k) == v for k, v in match.items()):
            return s["t"]
    return None


def spans(stamps: list[dict], name: str) -> list[tuple[int, float, float]]:
    """(pid, start, end) of every `name-start` .. `name-end` pair."""
    open_, out = {}, []
    for s in stamps:
        if s["event"] == f"{name}-start":
            open_[s["pid"]] = s["t"]
        elif s["event"] == f"{name}-end" and s["pid"] in open_:
            out.append((s["pid"], open_.pop(s["pid"]), s["t"]))
    return out


def process_starts(stamps: list[dict], argv0: str) -> list[dict]:
    return [s for s in stamps if s["event"] == "process-start"
            and any(argv0 in a for a in s.get("argv", []))]


# ------------------------------------------------------------------------------------------
# Memory of a process tree
# ------------------------------------------------------------------------------------------

def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB of one process; PSS splits shared pages (torch's libraries, Ray's
    shared-memory object store) between the processes that map them, so sums do not
    double-count."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return rss, pss


class TreeMemory:
    """Samples, in a thread, the summed RSS and PSS of every process that `roots()` returns
    and of all their descendants; keeps the peaks."""

    def __init__(self, roots, interval: float = 0.5) -> None:
        self.roots, self.interval = roots, interval
        self.peak_rss = self.peak_pss = 0  # bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = set()
            for root in self.roots():
                pids.add(root)
                pids.update(descendants(root))
            sizes = [_memory_kb(pid) for pid in pids]
            self.peak_rss = max(self.peak_rss, 1024 * sum(r for r, _ in sizes))
            self.peak_pss = max(self.peak_pss, 1024 * sum(p for _, p in sizes))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------------------------
# A `flwr run` simulation with a time line
# ------------------------------------------------------------------------------------------

@dataclass
class SimRun:
    ok: bool
    status: str
    started: float               # when `flwr run` was started (time.time())
    exited: float                # when it exited
    lines: list[tuple[float, str]]
    stamps: list[dict]
    rounds: list[dict]           # metrics.jsonl
    peak_rss: int = 0
    peak_pss: int = 0

    def line_time(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    def steady_round(self) -> float:
        """Median wall time of the rounds after the first (the first carries start-up)."""
        return median([r["seconds"] for r in self.rounds[1:]])

    def timeline(self) -> dict[str, float | None]:
        """Seconds after `flwr run` started at which each stage was reached."""
        def rel(t):
            return None if t is None else t - self.started
        st = self.stamps
        round_spans = spans(st, "round")
        workers = process_starts(st, "default_worker.py")
        worker_pids = {s["pid"] for s in workers}
        sim = process_starts(st, "flwr-simulation")
        sim_pid = sim[0]["pid"] if sim else None
        ray_daemons = [s for s in st if s["event"] == "process-start"
                       and s.get("argv") and s["argv"][0] in ("monitor.py", "dashboard.py",
                                                               "log_monitor.py")]
        return {
            "superlink process": rel(next((s["t"] for s in process_starts(st, "flower-superlink")),
                                          None)),
            "run submitted": rel(self.line_time("Successfully started run")),
            "simulation process": rel(sim[0]["t"] if sim else None),
            "simulation process has imported the app": rel(first(st, "imports", pid=sim_pid)),
            "server code (ServerApp main)": rel(first(st, "server-run")),
            "round 1 starts": rel(round_spans[0][1] if round_spans else None),
            "Ray starting (its first Python daemon)": rel(ray_daemons[0]["t"] if ray_daemons
                                                          else None),
            "first Ray worker process": rel(workers[0]["t"] if workers else None),
            "actor has imported the ClientApp (flwr, torch, fl_app)": rel(next(
                (s["t"] for s in st if s["event"] == "imports" and s["pid"] in worker_pids),
                None)),
            "first message at the ClientApp": rel(first(st, "handler")),
            "ClientApp enters its training loop": rel(first(st, "train-start")
                                                      or first(st, "gradient-start")),
            "first training step (first backward pass)": rel(first(st, "backward")),
            "round 1 ends": rel(round_spans[0][2] if round_spans else None),
            "last round ends": rel(round_spans[-1][2] if round_spans else None),
            "flwr run exits": rel(self.exited),
        }


def simulate(work: Path, overrides: list[str], num_supernodes: int,
             federation: dict[str, str] | None = None, env: dict[str, str] | None = None,
             run_config: dict[str, str] | None = None, sample_memory: bool = False,
             timeout: float = 900, watcher=None, home: Path | None = None,
             ports: tuple[int, int] | None = None, keep_superlink: bool = False,
             stamps: Path | None = None) -> SimRun:
    """`flwr run` this project as a simulation from a fresh FLWR_HOME (so the local SuperLink
    starts as it does on a user's first run), with stamps on; stop the SuperLink afterwards.

    `watcher(stamps_path, done_event)`, if given, runs in a thread during the run (profiling).
    `home` + `ports` + `keep_superlink`: a later run can reuse the same local SuperLink.
    `stamps`: a stamps file shared with processes started elsewhere (a Ray head's workers, a
    SuperLink kept from an earlier run); only the stamps written during this run are kept.
    """
    work.mkdir(parents=True, exist_ok=True)
    home = home or work / "flwr-home"
    out, stamps = work / "out", stamps or work / "stamps.jsonl"
    ports = ports or (free_port(), free_port())
    # Ray's files (and its session) under our own folder: the Ray processes of this run are
    # then recognisable by that path, and no other Ray on this machine is picked up.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fb", dir="/tmp"))
    full_env = local_superlink_env(home, work / "outputs", {
        "RAY_TMPDIR": str(ray_tmp), **stamp_env(stamps), **(env or {})}, ports)
    values = {**(run_config or {}),
              "overrides": shlex.join([*overrides, f"output_dir={out}"])}
    config = toml_run_config(values, work / "run.toml")
    fed = {"num-supernodes": str(num_supernodes), **(federation or {})}
    cmd = ["flwr", "run", str(ROOT), "--run-config", str(config), "--stream",
           "--federation-config", " ".join(f"{k}={v}" for k, v in fed.items())]

    superlink_marker = str(home / "local-superlink")
    lines: list[tuple[float, str]] = []
    started = time.time()
    proc = subprocess.Popen(cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)

    def roots():
        return [proc.pid, *pids_with_cmdline(superlink_marker), *pids_with_cmdline(str(ray_tmp))]

    memory = TreeMemory(roots) if sample_memory else None
    done = threading.Event()
    watch = threading.Thread(target=watcher, args=(stamps, done), daemon=True) if watcher else None
    try:
        if memory:
            memory.__enter__()
        if watch:
            watch.start()
        deadline = started + timeout
        for line in proc.stdout:
            lines.append((time.time(), line))
            if time.time() > deadline:
                break
        proc.wait(timeout=max(1.0, deadline - time.time()))
        exited = time.time()
    finally:
        done.set()
        if watch:
            watch.join()
        if memory:
            memory.__exit__()
        if proc.poll() is None:
            proc.kill()
            exited = time.time()
        log = "".join(line for _, line in lines)
        run_id = next((int(w) for _, line in lines if "Successfully started run" in line
                       for w in line.split() if w.isdigit()), None)
        status = run_status(run_id, full_env) if run_id else "not-started"
        stop(([] if keep_superlink else pids_with_cmdline(superlink_marker))
             + pids_with_cmdline(str(ray_tmp)))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    metrics = out / "metrics.jsonl"
    rounds = [json.loads(r) for r in metrics.read_text().splitlines()] if metrics.exists() else []
    (work / "flwr-run.log").write_text(log)
    result = SimRun(status == "finished:completed", status, started, exited, lines,
                    [s for s in read_stamps(stamps) if s["t"] >= started], rounds)
    if memory:
        result.peak_rss, result.peak_pss = memory.peak_rss, memory.peak_pss
    return result


def fl_app_default(out: Path, overrides: list[str], env: dict[str, str] | None = None) -> dict:
    """`fl-app` as a user types it, with its default engine (auto: in-process; RAY_ADDRESS is
    left out so that it stays so), outputs in `out`: its rounds' seconds (from metrics.jsonl),
    final accuracy, first training step and exit, both counted from when the command started
    (stamps), and the peak memory of its process tree."""
    stamps = out.with_suffix(".stamps.jsonl")
    stamps.parent.mkdir(parents=True, exist_ok=True)  # every process of the run appends to it
    stamps.unlink(missing_ok=True)
    cmd = [str(Path(sys.executable).parent / "fl-app"), *overrides, f"hydra.run.dir={out}"]
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**base, **(env or {}), **stamp_env(stamps)})
    with TreeMemory(lambda: [proc.pid]) as memory:
        log, _ = proc.communicate(timeout=1800)
    finished = time.time()
    if proc.returncode != 0 or "fl-app: in-process run completed" not in log:
        raise RuntimeError(f"fl-app {' '.join(overrides)} failed, or did not run in-process:\n"
                           f"{log[-3000:]}")
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    step = first(read_stamps(stamps), "backward")
    return {"round_seconds": [r["seconds"] for r in rows],
            "accuracy": rows[-1]["test_accuracy"], "command_seconds": finished - started,
            "first_step_after": step - started if step else None,
            "peak_pss": memory.peak_pss, "peak_rss": memory.peak_rss}


def python_child(code: str, env: dict[str, str] | None = None, timeout: float = 300) -> dict:
    """Run `code` in a fresh interpreter of this venv; it prints one JSON object last."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class RayHead:
    """`ray start --head` on this machine with its own temp dir and ports; stopped by PID (the
    processes that name its temp dir or its address), never with `ray stop`, which would stop
    every Ray instance of the user."""

    def __init__(self, num_cpus: int | None = None, env: dict[str, str] | None = None) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fbh", dir="/tmp"))
        self.num_cpus, self.env = num_cpus, env or {}
        self.address: str | None = None

    def __enter__(self) -> RayHead:
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray, "start", "--head", f"--port={free_port()}", f"--temp-dir={self.temp_dir}",
               "--include-dashboard=false", f"--dashboard-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
        if self.num_cpus:
            cmd.append(f"--num-cpus={self.num_cpus}")
        try:
            # The head's environment is its workers' (Flower only adds PYTHONPATH to it).
            subprocess.run(cmd, env=flwr_env(self.env), capture_output=True, text=True,
                           timeout=180, check=True)
            self.address = (self.temp_dir / "ray_current_cluster").read_text().strip()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        pids = pids_with_cmdline(str(self.temp_dir))
        if self.address:
            pids += pids_with_cmdline(f"--address={self.address}")
        stop(pids)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
