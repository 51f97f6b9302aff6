#!/usr/bin/env python
"""Every performance figure of the project, measured side by side in one run (issue 6).

    python scripts/bench.py                                  # all parts
    python scripts/bench.py --parts aggregate,datapath      # some of them

Parts, each the source of a table or figure in docs/performance.md (secagg: docs/privacy.md):
sim (20-client round time vs a plain PyTorch loop), startup (when the first training step
runs, each start-up stage, and the start-up's pieces alone), aggregate (strategies vs a NumPy
weighted average, memory vs C), scale (1,000 and 10,000 clients), deploy (3 SuperNodes vs
simulation, the round floor and its stages), datapath (Message → first training step), device
(2NN and CNN round time in-process, CPU vs GPU where there is one), secagg (round time and
bytes with and without secure aggregation, 2NN and CNN, 10 and 100 clients).

Prints one table (figure | measured | target | plain Flower, from the issue) and writes it, with
the machine and, for each part, when, under which load and by which command it was measured,
to docs/bench/results.md, and every number to docs/bench/results.json. Each part is saved as
soon as it is done; parts not run now are kept from earlier runs (`--fresh` drops them), so one
part can be re-measured alone. Benchmarks print figures; tests check correctness: nothing here
asserts a timing. Every process started is stopped by PID (local SuperLinks by their
FLWR_HOME, Ray by its own temp dir), never by name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.common import Part, Row  # noqa: E402

# Also the order of the results table.
ALL = ["sim", "startup", "aggregate", "scale", "deploy", "datapath", "device", "secagg"]
ROOT = Path(__file__).resolve().parent.parent


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in
                Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), 0)
    versions = {}
    for name in ("flwr", "torch", "ray", "numpy"):
        try:
            from importlib.metadata import version
            versions[name] = version(name)
        except Exception:  # noqa: BLE001
            versions[name] = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 2**30, 1),
            "python": platform.python_version(), "load_average_at_start": os.getloadavg(),
            **versions}


def table(rows: list[Row]) -> str:
    out = ["| figure | measured | target | plain-Flower figure (issue) |", "|---|---|---|---|"]
    for r in rows:
        cells = [r.figure, r.measured, r.target, r.plain_flower]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(out)


def write(out: Path, parts: dict[str, dict]) -> str:
    """Write results.json (every part: its rows, data, command, machine and load) and
    results.md (one table, then when and how each part was measured); return the table."""
    rows = [Row(**r) for name in ALL if name in parts for r in parts[name]["rows"]]
    text = table(rows)
    runs = []
    for name in ALL:
        if name not in parts:
            continue
        m = parts[name]["machine"]
        load = " / ".join(f"{x:.1f}" for x in m["load_average_at_start"])
        runs.append(f"| {name} | {parts[name]['finished']} | {parts[name]['seconds']:.0f} s | "
                    f"{load} | {m['torch_threads']} | `{parts[name]['command']}` |")
    m = next(iter(parts.values()))["machine"]
    header = (
        "# Benchmark results\n\n"
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; Python {m['python']}, "
        f"flwr {m['flwr']}, torch {m['torch']}, ray {m['ray']}, numpy {m['numpy']}. "
        "✓ / ✗: meets / misses the target. Plain-Flower figures are the issue's measurements "
        "of Flower without this project's work. Times taken with a load average above the "
        "core count are inflated.\n\n")
    how = ("\n\n| part | measured | took | load average at its start | torch threads | "
           "command |\n|---|---|---|---|---|---|\n" + "\n".join(runs) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(header + text + how)
    (out / "results.json").write_text(json.dumps({"parts": parts}, indent=2, default=str))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(ALL),
                        help=f"comma-separated, from {ALL} (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--rounds-cnn", type=int, default=3)
    parser.add_argument("--rounds-mlp", type=int, default=4)
    parser.add_argument("--deploy-rounds", type=int, default=3)
    parser.add_argument("--agg-sizes", default="10,100,1000")
    parser.add_argument("--secagg-rounds", type=int, default=3)
    parser.add_argument("--scale-sizes", default="1000,10000")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch/OpenMP threads in every process (OMP_NUM_THREADS, "
                             "FL_APP_TORCH_THREADS); default: torch's own (one per core). On a "
                             "machine other jobs load, 2 OpenMP threads per process can make "
                             "a CNN step 10x slower: use 1 there")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    parser.add_argument("--fresh", action="store_true",
                        help="drop the parts of earlier runs from results.json (default: keep "
                             "them, replacing only the parts run now)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(ALL)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {ALL}")

    if args.torch_threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FL_APP_TORCH_THREADS"):
            os.environ[var] = str(args.torch_threads)  # inherited by every process started
    work = Path(tempfile.mkdtemp(prefix="fl_bench_"))
    info = machine()
    info["torch_threads"] = args.torch_threads or "torch's default (one per core)"
    started = time.time()
    print(f"bench: parts {parts}; work folder {work}; load average {os.getloadavg()}",
          flush=True)
    script = Path(sys.argv[0]).resolve()
    script = script.relative_to(ROOT) if script.is_relative_to(ROOT) else script
    command = "python " + " ".join(shlex.quote(str(a)) for a in [script, *sys.argv[1:]])
    previous = args.out / "results.json"
    saved: dict[str, dict] = {}
    if previous.exists() and not args.fresh:
        try:
            saved = json.loads(previous.read_text()).get("parts", {})
            # This format only, and parts that still exist.
            saved = {k: v for k, v in saved.items() if "machine" in v and k in ALL}
        except ValueError:
            saved = {}

    def attempt(name: str, fn) -> None:
        """Run one part and save it at once; a part that fails is reported in the table,
        the others still run."""
        t0 = time.time()
        info["load_average_at_start"] = os.getloadavg()
        print(f"bench: {name} ...", flush=True)
        try:
            part = fn()
        except Exception as err:  # noqa: BLE001 - one broken part must not lose the rest
            traceback.print_exc()
            part = Part([Row(f"{name}: FAILED", f"{type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200] if str(err) else ''}")])
        saved[name] = {"rows": [vars(r) for r in part.rows], "data": part.data,
                       "command": command, "machine": dict(info),
                       "finished": f"{datetime.now():%Y-%m-%d %H:%M}",
                       "seconds": time.time() - t0}
        write(args.out, saved)
        print(f"bench: {name} done in {time.time() - t0:.0f} s", flush=True)

    try:
        if "aggregate" in parts:
            from bench import aggregate
            sizes = tuple(int(c) for c in args.agg_sizes.split(","))
            attempt("aggregate", lambda: aggregate.run(sizes))
        if "datapath" in parts:
            from bench import datapath
            attempt("datapath", lambda: datapath.run(work / "datapath"))
        sim_part, sim_run = None, None
        if "sim" in parts:
            from bench import sim

            def simulation() -> Part:
                nonlocal sim_part, sim_run
                sim_part, sim_run = sim.run(work / "sim", args.rounds_cnn, args.rounds_mlp)
                return sim_part
            attempt("sim", simulation)
        if "startup" in parts:
            from bench import startup
            attempt("startup", lambda: startup.run(work / "startup", args.rounds_mlp, sim_run,
                                                   sim_part.data if sim_part else None))
        if "scale" in parts:
            from bench import scale
            sizes = tuple(int(n) for n in args.scale_sizes.split(","))
            attempt("scale", lambda: scale.run(work / "scale", sizes))
        if "deploy" in parts:
            from bench import deploy
            attempt("deploy", lambda: deploy.run(work / "deploy", args.deploy_rounds))
        if "device" in parts:
            from bench import device
            attempt("device", lambda: device.run(work / "device", args.rounds_cnn,
                                                 args.rounds_mlp))
        if "secagg" in parts:
            from bench import secagg
            attempt("secagg", lambda: secagg.run(work / "secagg", args.secagg_rounds))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    if saved:
        print("\n" + write(args.out, saved) + "\n")
    print(f"bench: wrote {args.out / 'results.md'} and results.json "
          f"({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
