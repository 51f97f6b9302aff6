"""Secure aggregation's cost (issue 18): round time and bytes per round with and without
`secagg=secaggplus`, for the 2NN (model=mlp) and the CNN, with 10 and 100 clients all sampled
every round (fraction_train=1), on `fl-app`'s in-process engine (clients one after another in
one process: the protocol's compute cost, no network).

Round time is the median of the rounds after the first (the first also builds the clients);
bytes per round are what the server sent plus received (all four protocol stages with secagg).
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
    result["round"] = median(result["round_seconds"][1:] or result["round_seconds"])
    return result


def run(work: Path, rounds: int = 3, sizes: tuple[int, ...] = (10, 100)) -> Part:
    work.mkdir(parents=True, exist_ok=True)
    part = Part()
    for model in MODELS:
        for clients in sizes:
            plain = _run(work / f"{model}-{clients}-plain", model, clients, rounds, False)
            secure = _run(work / f"{model}-{clients}-secagg", model, clients, rounds, True)
            ratio = secure["round"] / plain["round"]
            part.data[f"{model}-{clients}"] = {"plain": plain, "secagg": secure}
            measured = (f"{fmt_s(secure['round'])} vs {fmt_s(plain['round'])} per round "
                        f"({ratio:.2f}x); {_mb(secure['bytes_per_round'])} vs "
                        f"{_mb(plain['bytes_per_round'])} per round "
                        f"({secure['bytes_per_round'] / plain['bytes_per_round']:.2f}x); "
                        f"accuracy {secure['accuracy']:.3f} vs {plain['accuracy']:.3f}")
            target = model == "2NN" and clients == 10
            part.rows.append(Row(
                f"secagg: {model}, {clients} clients, secaggplus vs none (in-process)",
                measured + (verdict(ratio < TARGET) if target else ""),
                f"< {TARGET:g}x round time" if target else "",
                ok=ratio < TARGET if target else None))
    return part
