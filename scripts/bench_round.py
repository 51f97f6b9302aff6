#!/usr/bin/env python
"""Wall time of one round with 3 clients: simulation vs a real 3-SuperNode deployment (TLS+auth):
SuperNodes with fl-app-executor (`--isolation process`, the project's default), SuperNodes as
Flower runs them alone (a fresh ClientApp process per message), and a SuperLink with
`--database`.

    python scripts/bench_round.py [--rounds 4] [hydra overrides...]

Prints, for each mode, the first round (start-up included), the median of the later rounds
(steady state) and the whole `flwr run`. The runs are scripts/bench's (`bench.common.simulate`,
`bench.deploy.deployment`, which `python scripts/bench.py --parts deploy` also uses). Every
process it starts is stopped.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench.common import simulate
from bench.deploy import deployment


def simulation(work: Path, overrides: list[str]) -> tuple[list[float], float]:
    run = simulate(work, overrides, 3)
    if not run.ok:
        raise SystemExit(f"bench_round: the simulation failed ({run.status}); log: "
                         f"{work / 'flwr-run.log'}")
    return [r["seconds"] for r in run.rounds], run.exited - run.started


def deployed(work: Path, overrides: list[str], **federation) -> tuple[list[float], float]:
    result = deployment(work, {"run": overrides}, **federation)["run"]
    return result["rounds"], result["wall"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("overrides", nargs="*", default=[])
    args = parser.parse_args()
    overrides = ["model=mlp", "dataset=mnist5k", f"num_rounds={args.rounds}", *args.overrides]
    modes = {
        "simulation (Ray, 3 clients)": lambda w: simulation(w, overrides),
        "deployment, fl-app-executor": lambda w: deployed(w, overrides),
        "deployment, plain Flower": lambda w: deployed(w, overrides, executor=False),
        "deployment, SuperLink --database": lambda w: deployed(w, overrides, database=True),
    }
    print(f"{'mode':36} {'round 1 (s)':>12} {'later rounds, median (s)':>26} {'flwr run (s)':>13}")
    for name, measure in modes.items():
        with tempfile.TemporaryDirectory() as tmp:
            times, wall = measure(Path(tmp))
        print(f"{name:36} {times[0]:12.2f} {statistics.median(times[1:]):26.2f} {wall:13.1f}",
              flush=True)


if __name__ == "__main__":
    main()
