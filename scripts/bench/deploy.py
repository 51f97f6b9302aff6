"""Item 4: a round with 3 SuperNodes on loopback (TLS + SuperNode authentication, the
project's `LocalFederation`) against the same round in simulation, and where the round floor
sits: SuperNodes with fl-app-executor (the project's default), then as Flower runs them alone.

The parts of a deployment round are read, for each SuperNode, from the stamps
(scripts/bench/hook) of the ClientApp process it started and from the arrival time of its log
lines (the logs are tailed every 0.05 s; every process runs with PYTHONUNBUFFERED=1):

  round starts (the ServerApp pushes 3 Messages to the SuperLink)
  → the SuperNode has its message (log: "Receiving: train message")
  → a fresh `flwr-clientapp` process starts (SuperExec polled its SuperNode and spawned it;
    meanwhile the SuperNode pulls the message's arrays, log: "Received successfully")
  → flwr imported (its entry point module)
  → app loading starts (it has pulled Message, Context and FAB from the SuperNode)
  → torch imported → the ClientApp module imported → the train handler runs
  → the training loop is entered → the first backward pass (the first step really runs:
    building torch.optim.SGD first imports torch._dynamo) … the last step ends
  → the SuperNode has sent the reply (log: "Sent successfully")
  → the round ends (every reply at the ServerApp, aggregated, evaluated)

With fl-app-executor (SuperNodes in `--isolation process`) no process starts per message: the
stages from "train handler runs" on are stamped in the node's executor.

Each stage is the median, over steady rounds and SuperNodes, of when it was reached; stages
are listed in the order of those medians. A last row measures the 2NN with the SuperLink's
state in SQLite (`--database`) instead of in memory.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from pathlib import Path

from bench.common import (
    Part,
    Row,
    fmt_s,
    median,
    read_stamps,
    simulate,
    spans,
    stamp_env,
    verdict,
)
from fl_app.deploy.federation import LocalFederation
from fl_app.deploy.runner import toml_run_config

TARGET_RATIO, TARGET_FLOOR = 2.0, 5.0
NAMES = {"cnn": "CNN", "mlp": "2NN"}


class LogTail(threading.Thread):
    """Timestamps every new line of the files in `folder` (polled every `interval`)."""

    def __init__(self, folder: Path, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.folder, self.interval = folder, interval
        self.lines: list[tuple[float, str, str]] = []  # (time, file stem, line)
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, str] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.poll()
            self._halt.wait(self.interval)
        self.poll()

    def poll(self) -> None:
        now = time.time()
        for path in sorted(self.folder.glob("*.log")):
            offset = self._offsets.get(path, 0)
            try:
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except OSError:
                continue
            self._offsets[path] = offset + len(chunk)
            text = self._partial.get(path, "") + chunk.decode(errors="replace")
            *complete, self._partial[path] = text.split("\n")
            self.lines += [(now, path.stem, line) for line in complete]

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _breakdown(stamps: list[dict], tail: LogTail, ports: dict[str, str]) -> list[dict]:
    """Per steady-state round and SuperNode: when each stage was reached, in seconds after the
    round started. `ports`: SuperNode log name -> the port its ClientApps connect to."""
    rounds = spans(stamps, "round")
    out = []
    for _, r0, r1 in rounds[1:]:
        for node, port in ports.items():
            def first_after(ts, r0=r0, r1=r1):
                ts = [t for t in ts if r0 <= t <= r1]
                return (min(ts) - r0) if ts else None

            # The node's ClientApp processes: one per message, or its fl-app-executor.
            pids = {s["pid"] for s in stamps if s["event"] == "process-start"
                    and str(s.get("api") or "").endswith(f":{port}")}
            st = [s for s in stamps if s["pid"] in pids]

            def logged(text, node=node):
                return first_after([t for t, name, line in tail.lines
                                    if name == node and text in line])

            def stamped(event, st=st):
                return first_after([s["t"] for s in st if s["event"] == event])

            out.append({
                "SuperNode has the message (log: Receiving)": logged("Receiving:"),
                "flwr-clientapp process started": stamped("process-start"),
                "SuperNode has pulled the message's arrays (log: Received successfully)":
                    logged("Received successfully"),
                "flwr imported (flwr-clientapp's entry point)": stamped("flwr-entry"),
                "app loading starts (Message, Context and FAB pulled)": stamped("app-load"),
                "torch imported": stamped("torch"),
                "ClientApp module imported": stamped("imports"),
                "train handler runs": stamped("handler"),
                "training loop entered": stamped("train-start"),
                "first training step (first backward pass)": stamped("backward"),
                "last training step ends": stamped("train-end"),
                "SuperNode has sent the reply": logged("Sent successfully"),
                "round ends (all replies at the ServerApp, aggregated, evaluated)": r1 - r0,
            })
    return out


def deployment(work: Path, runs: dict[str, list[str]], env: dict[str, str] | None = None,
               **federation) -> dict[str, dict]:
    """One `flwr run` per entry of `runs` (name -> Hydra overrides) on one LocalFederation
    (3 SuperNodes; `federation`: its options); per run its round times, its wall time and the
    per-SuperNode stage breakdown of its steady rounds."""
    stamps = work / "stamps.jsonl"
    # Unbuffered output: the SuperNodes' log lines reach their files (and get their time) at once.
    fed_env = {**stamp_env(stamps), "PYTHONUNBUFFERED": "1", **(env or {})}
    results = {}
    with LocalFederation(work, 3, env=fed_env, **federation) as fed:
        ports = {name: proc.args[proc.args.index("--port") + 1]
                 for name, proc in fed.procs.items() if name.startswith("supernode")}
        tail = LogTail(fed.logs)
        tail.start()
        try:
            for name, overrides in runs.items():
                out = work / f"out-{name}"
                config = toml_run_config(
                    {"overrides": shlex.join([*overrides, f"output_dir={out}"])},
                    work / f"{name}.toml")
                start = time.time()
                result = fed.run(config, timeout=900)
                if not result.ok:
                    raise RuntimeError(f"deployment {name} failed: {result.status}\n"
                                       f"{result.log[-3000:]}")
                rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
                results[name] = {"rounds": [r["seconds"] for r in rows],
                                  "wall": time.time() - start,
                                  "steady": median([r["seconds"] for r in rows[1:]]),
                                  "started": start}
        finally:
            tail.stop()
    st = read_stamps(stamps)
    ends = [r["started"] for r in results.values()][1:] + [float("inf")]
    for r, end in zip(results.values(), ends, strict=True):
        # An fl-app-executor started with the federation, before this run: keep its start.
        in_run = [s for s in st if r["started"] <= s["t"] < end or s["event"] == "process-start"]
        r["breakdown"] = _breakdown(in_run, tail, ports)
    return results


# The two ways a SuperNode runs this project's ClientApps: `--isolation process` with
# fl-app-executor running every task in one process (the default), and Flower's own
# SuperExec starting a fresh `flwr-clientapp` process per message.
# Keyed by the label in the table; each with its work folder's name (it ends up in a Hydra
# override, where a comma would split the value) and LocalFederation's options.
MODES = {" with fl-app-executor": ("executor", {}),
         ", plain Flower": ("plain-flower", {"executor": False})}


def run(work: Path, rounds: int = 3, models=("cnn", "mlp")) -> Part:
    part = Part()
    sim_cnn = simulate(work / "sim-cnn-3", ["model=cnn", f"num_rounds={rounds}"], 3)
    if not sim_cnn.ok:
        raise RuntimeError(f"3-client CNN simulation failed: {sim_cnn.status}")
    part.data["simulation cnn 3 clients"] = {"rounds": [r["seconds"] for r in sim_cnn.rounds]}
    for mode, (folder, options) in MODES.items():
        runs = deployment(work / f"deploy-{folder}",
                          {m: [f"model={m}", f"num_rounds={rounds}"] for m in models}, **options)
        for model in models:
            d = runs[model]
            part.data[f"deployment{mode} {model}"] = d
            print(f"  deployment{mode} {model}: steady {d['steady']:.2f} s/round", flush=True)
            if model == "cnn":
                ratio = d["steady"] / sim_cnn.steady_round()
                ok = ratio <= TARGET_RATIO
                part.rows.append(Row(f"Deployment{mode}, 3 SuperNodes (TLS + auth, loopback), "
                                     "CNN: steady round vs the same round in simulation",
                                     f"{ratio:.2f}× ({fmt_s(d['steady'])} vs "
                                     f"{fmt_s(sim_cnn.steady_round())})" + verdict(ok),
                                     f"≤ {TARGET_RATIO:.0f}×",
                                     "4.7× the plain loop; ~16 s floor", ok=ok))
            else:
                ok = d["steady"] <= TARGET_FLOOR
                part.rows.append(Row(f"Deployment{mode}, 3 SuperNodes, {NAMES[model]}: steady "
                                     "round (the floor)", fmt_s(d["steady"]) + verdict(ok),
                                     f"≤ {TARGET_FLOOR:.0f} s", "~16 s", ok=ok))
            _stage_rows(part, f"{NAMES[model]}{mode},", d["breakdown"])
    # What a SuperLink with --database costs: every array of every message goes through SQLite.
    if "mlp" in models:
        d = deployment(work / "deploy-database", {"mlp": ["model=mlp", f"num_rounds={rounds}"]},
                       database=True)["mlp"]
        part.data["deployment mlp, SuperLink --database"] = d
        print(f"  deployment mlp, SuperLink --database: steady {d['steady']:.2f} s/round",
              flush=True)
        part.rows.append(Row("  2NN floor, default SuperNodes, the SuperLink with --database "
                             "(SQLite) instead of in memory", fmt_s(d["steady"]),
                             f"≤ {TARGET_FLOOR:.0f} s"))
    return part


def _stage_rows(part: Part, label: str, stages: list[dict]) -> None:
    """One row per stage of a deployment round: the median over steady rounds and SuperNodes
    of when it was reached (each SuperNode's own chain, so stages come in order)."""
    if stages:
        previous = 0.0
        medians = {name: median([s[name] for s in stages if s[name] is not None])
                   for name in stages[0]}
        for name, t in sorted(medians.items(), key=lambda kv: kv[1]):
            if t != t:  # no value (NaN)
                continue
            part.rows.append(Row(f"    {label} round, at {t:5.2f} s: {name} "
                                 f"(+{t - previous:.2f} s)", ""))
            previous = max(previous, t)
