"""Secure aggregation's cost (issue 18): round time and bytes per round with and without
`secagg=secaggplus`, for the 2NN (model=mlp) and the CNN, with 10 and 100 clients all sampled
every round (fraction_train=1), on `fl-app`'s in-process engine (clients one after another in
one process: the protocol's compute cost, no network).

Round time is the fastest of the rounds after the first (the first also builds the clients),
over `repeats` runs of each, plain and secagg alternating: on a machine other jobs load, a CNN
round was seen to take 7 s or 100 s, and the fastest round is the one least inflated. Bytes per
round are what the server sent plus received (all four protocol stages with secagg).
At 10 clients every client holds a share of every other (num_shares=null: SecAgg); at 100 each
has 10 ring neighbours (num_shares=11, SecAgg+): with one share per client a 100-client round
spends minutes in Shamir sharing alone (pycryptodome, pure Python).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench.common import Part, Row, fl_app_default, fmt_s, median, verdict

MODELS = {"2NN": "model=mlp", "CNN": "model=cnn"}
TARGET = 2.0  # 2NN round overhead at 10 clients


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MB"


def _run(out: Path, model: str, clients: int, rounds: int, secagg: bool) -> dict:
    overrides = [MODELS[model], f"num_clients={clients}", f"num_rounds={rounds}",
                 "fraction_train=1.0", "min_clients=2"]
    if secagg:
        overrides += ["secagg=secaggplus"] + (["secagg.num_shares=11"] if clients > 10 else [])
    result = fl_app_default(out, overrides)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    result["bytes_per_round"] = median([r["bytes_sent"] + r["bytes_received"] for r in rows])
    return result


def _fastest(runs: list[dict]) -> dict:
    """The runs' figures, with `round` the fastest round after each run's first."""
    rounds = [t for r in runs for t in (r["round_seconds"][1:] or r["round_seconds"])]
    return {**runs[-1], "round": min(rounds), "all_round_seconds": [r["round_seconds"]
                                                                     for r in runs]}


def run(work: Path, rounds: int = 3, sizes: tuple[int, ...] = (10, 100),
        repeats: int = 2) -> Part:
    work.mkdir(parents=True, exist_ok=True)
    part = Part()
    for model in MODELS:
        for clients in sizes:
            runs: dict[bool, list[dict]] = {False: [], True: []}
            for i in range(repeats):
                for secagg in (False, True):
                    name = f"{model}-{clients}-{'secagg' if secagg else 'plain'}-{i}"
                    runs[secagg].append(_run(work / name, model, clients, rounds, secagg))
            plain, secure = _fastest(runs[False]), _fastest(runs[True])
            ratio = secure["round"] / plain["round"]
            part.data[f"{model}-{clients}"] = {"plain": plain, "secagg": secure}
            measured = (f"{fmt_s(secure['round'])} vs {fmt_s(plain['round'])} per round "
                        f"({ratio:.2f}x); {_mb(secure['bytes_per_round'])} vs "
                        f"{_mb(plain['bytes_per_round'])} per round "
                        f"({secure['bytes_per_round'] / plain['bytes_per_round']:.2f}x); "
                        f"accuracy {secure['accuracy']:.3f} vs {plain['accuracy']:.3f}")
            target = model == "2NN" and clients == 10
            part.rows.append(Row(
                f"secagg: {model}, {clients} clients, secaggplus vs none (in-process, fastest "
                f"round of {repeats} x {rounds - 1})",
                measured + (verdict(ratio < TARGET) if target else ""),
                f"< {TARGET:g}x round time" if target else "",
                ok=ratio < TARGET if target else None))
    return part
