"""`fl-app-report`: plots and a markdown table from fl_app run folders.

    fl-app-report RUN_OR_SWEEP_DIR [MORE_DIRS ...] [--out DIR] [--target 0.9] [--labels k1,k2]

Reads each run's `config.yaml`, `metrics.jsonl` and `summary.json` (a run folder is any folder
with a `metrics.jsonl`, found recursively under sweep folders) and writes `accuracy.png`,
`loss.png`, `epsilon.png` (DP runs only) and `results.md` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from fl_app.run_files import open_private, write_private

# Central DP first; otherwise the worst client's own ε (privacy=dpsgd or local).
EPSILON_KEYS = ("train_epsilon", "train_dpsgd_epsilon_max", "train_local_epsilon_max")
# Differ between every pair of runs without saying anything about them.
NOT_LABELS = {"output_dir"}


class ReportError(Exception):
    """Bad input: reported as one line and exit code 2."""


@dataclass
class Run:
    """One run folder: its config, its metrics rows (one per round, in order) and summary."""

    path: Path
    config: dict
    rows: list[dict]
    summary: dict
    label: str = ""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(rounds, values) of the rows that have a number for `key`."""
        pts = [(r["round"], r[key]) for r in self.rows if _is_number(r.get(key))]
        return [p[0] for p in pts], [p[1] for p in pts]

    @property
    def epsilon_key(self) -> str | None:
        return next((k for k in EPSILON_KEYS if self.series(k)[0]), None)


def _is_number(value: object) -> bool:
    # NaN/inf (a diverged loss) would break the plot's scaling; bools are not metrics.
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def find_runs(folders: Sequence[Path]) -> list[Path]:
    """Run folders in `folders` or anywhere below them, each once, in sorted order per argument."""
    found: list[Path] = []
    for folder in folders:
        if not folder.exists():
            raise ReportError(f"{folder} does not exist")
        if not folder.is_dir():
            raise ReportError(f"{folder} is not a folder")
        runs = sorted(p.parent for p in folder.rglob("metrics.jsonl"))
        if not runs:
            raise ReportError(f"no runs (folders with a metrics.jsonl) in {folder}")
        found += [r for r in runs if r not in found]
    return found


def load_run(path: Path) -> Run:
    """Read a run folder; config.yaml and summary.json may be missing (a run that died)."""
    by_round: dict[int, dict] = {}
    for line in (path / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
        if isinstance(row, dict) and "round" in row:
            by_round[row["round"]] = row  # a resumed run repeats rounds: the last row wins
    config = _read(path / "config.yaml", yaml.safe_load)
    summary = _read(path / "summary.json", json.loads)
    return Run(path, config, [by_round[r] for r in sorted(by_round)], summary)


def _read(file: Path, parse: Callable[[str], dict | None]) -> dict:
    return (parse(file.read_text()) or {}) if file.exists() else {}


def describe(node: object) -> str:
    """A config value for a label: a `_target_` node as its class, e.g. DPNoise(WeightedFedAvg)."""
    if isinstance(node, dict):
        if "_target_" in node:
            name = str(node["_target_"]).rsplit(".", 1)[-1]
            inner = node.get("strategy")  # a wrapper strategy (DP) names what it wraps
            return f"{name}({describe(inner)})" if isinstance(inner, dict) else name
        if "name" in node:
            return str(node["name"])
    return str(node)


def lookup(config: dict, key: str) -> object:
    """config["a"]["b"] for key "a.b"; None when absent."""
    node: object = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def differing_keys(configs: Sequence[dict]) -> list[str]:
    """Config keys whose values differ between the runs, a swapped group as one key."""
    flat = [_flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    differ = [k for k in keys
              if k not in NOT_LABELS and len({repr(f.get(k)) for f in flat}) > 1]
    # strategy._target_ differing means another strategy: say that, not each of its settings.
    groups = [k.rsplit(".", 1)[0] for k in differ if k.endswith(("._target_", ".name"))]
    groups = [g for g in dict.fromkeys(groups) if not any(g.startswith(o + ".") for o in groups)]
    named = [next((g for g in groups if k.startswith(g + ".")), k) for k in differ]
    return list(dict.fromkeys(named))


def _flatten(node: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def label_runs(runs: Sequence[Run], keys: Sequence[str] | None = None) -> None:
    """Label each run by `keys`, by default the differing config values, else its folder name."""
    if keys is None:
        keys = differing_keys([r.config for r in runs]) if len(runs) > 1 else []
    for key in keys:
        if all(lookup(r.config, key) is None for r in runs):
            raise ReportError(f"no run's config.yaml has the key '{key}' (--labels takes keys "
                              "like strategy, lr, strategy.server_lr)")
    for run in runs:
        run.label = " ".join(f"{k.removesuffix('._target_')}={describe(lookup(run.config, k))}"
                             for k in keys)
    if len({r.label for r in runs}) < len(runs) or not keys:
        for run in runs:
            run.label = run.path.name


def rounds_to(run: Run, target: float) -> int | None:
    """The first round whose test accuracy reaches `target`, or None."""
    rounds, accs = run.series("test_accuracy")
    return next((r for r, a in zip(rounds, accs, strict=True) if a >= target), None)


def table(runs: Sequence[Run], target: float) -> str:
    """results.md: one markdown row per run."""
    head = ["run", "strategy", "dataset", "final accuracy", "best accuracy",
            f"rounds to {target:g}", "rounds", "wall time (s)", "final ε", "stop reason"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in runs:
        _, accs = run.series("test_accuracy")
        reached = rounds_to(run, target)
        eps = run.series(run.epsilon_key)[1][-1] if run.epsilon_key else None
        seconds = run.summary.get("seconds", sum(r.get("seconds") or 0 for r in run.rows))
        cells = [run.label, describe(run.config.get("strategy", "–")),
                 describe(run.config.get("dataset", "–")),
                 f"{accs[-1]:.4f}" if accs else "–", f"{max(accs):.4f}" if accs else "–",
                 "not reached" if reached is None else str(reached),
                 str(run.rows[-1]["round"] if run.rows else 0), f"{seconds:.1f}",
                 "–" if eps is None else f"{eps:.3f}",
                 str(run.summary.get("stop_reason", "– (no summary.json)"))]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")
                                         for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: Sequence[Run], key: str | None, ylabel: str, file: Path) -> bool:
    """One line per run of `key` (None: each run's ε key) vs round; False if nothing to plot."""
    # Figure + the Agg canvas directly: no pyplot state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for run in runs:
        rounds, values = run.series(key or run.epsilon_key or "")
        if rounds:
            ax.plot(rounds, values, marker="o" if len(rounds) <= 30 else None, label=run.label)
            drawn += 1
    if not drawn:
        return False
    ax.set(xlabel="round", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    with open_private(file, "wb") as f:  # 0600, as the run files it is drawn from
        fig.savefig(f, dpi=120, format=file.suffix.lstrip(".") or "png")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="fl-app-report", description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders or sweep folders")
    parser.add_argument("--out", type=Path,
                        help="where to write (default: the folder given, or the common parent)")
    parser.add_argument("--target", type=float, default=0.9,
                        help="test accuracy for the rounds-to-target column (default 0.9)")
    parser.add_argument("--labels", help="config keys that label runs, e.g. strategy,lr")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(p) for p in find_runs(args.folders)]
        label_runs(runs, args.labels.split(",") if args.labels else None)
    except (ReportError, OSError, yaml.YAMLError) as err:
        print(f"fl-app-report: error: {err}", file=sys.stderr)
        return 2
    out = args.out or Path(os.path.commonpath([p.resolve() for p in args.folders]))
    out.mkdir(mode=0o700, parents=True, exist_ok=True)

    written = []
    for key, ylabel, name in [("test_accuracy", "test accuracy", "accuracy.png"),
                              ("test_loss", "test loss", "loss.png"),
                              (None, "ε", "epsilon.png")]:
        if plot(runs, key, ylabel, out / name):
            written.append(out / name)
        else:
            print(f"fl-app-report: no run has {ylabel} values: {name} not written")
    results = table(runs, args.target)
    write_private(out / "results.md", results)
    written.append(out / "results.md")
    print("\n".join(f"wrote {p}" for p in written) + "\n\n" + results, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
