#!/usr/bin/env python
"""Wall time of one round with 3 clients: simulation vs a real 3-SuperNode deployment (TLS+auth):
SuperNodes with fl-app-executor (`--isolation process`, the project's default), SuperNodes as
Flower runs them alone (a fresh ClientApp process per message), and a SuperLink with
`--database`.

    python scripts/bench_round.py [--rounds 4] [hydra overrides...]

Prints, for each mode, the first round (start-up included), the median of the later rounds
(steady state) and the whole `flwr run`. Every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import tempfile
import time
from pathlib import Path

from fl_app.deploy.federation import LocalFederation
from fl_app.deploy.processes import pids_with_cmdline, stop
from fl_app.deploy.runner import flwr_run, local_superlink_env, toml_run_config


def _round_times(out: Path) -> list[float]:
    rows = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(row)["seconds"] for row in rows]


def simulation(work: Path, overrides: list[str]) -> tuple[list[float], float]:
    home = work / "flwr-home"
    env = local_superlink_env(home)
    out = work / "out"
    config = toml_run_config({"overrides": shlex.join([*overrides, f"output_dir={out}"])},
                             work / "run.toml")
    try:
        start = time.time()
        result = flwr_run(config, 3, env, echo=False)
        wall = time.time() - start
    finally:
        stop(pids_with_cmdline(str(home / "local-superlink")))
    assert result.ok, result.log[-2000:]
    return _round_times(out), wall


def deployment(work: Path, overrides: list[str], **federation) -> tuple[list[float], float]:
    out = work / "out"
    with LocalFederation(work, 3, **federation) as fed:
        config = toml_run_config({"overrides": shlex.join([*overrides, f"output_dir={out}"])},
                                 work / "run.toml")
        start = time.time()
        result = fed.run(config)
        wall = time.time() - start
    assert result.ok, result.log[-2000:]
    return _round_times(out), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("overrides", nargs="*", default=[])
    args = parser.parse_args()
    overrides = ["model=mlp", "dataset=mnist5k", f"num_rounds={args.rounds}", *args.overrides]
    modes = {
        "simulation (Ray, 3 clients)": lambda w: simulation(w, overrides),
        "deployment, fl-app-executor": lambda w: deployment(w, overrides),
        "deployment, plain Flower": lambda w: deployment(w, overrides, executor=False),
        "deployment, SuperLink --database": lambda w: deployment(w, overrides, database=True),
    }
    print(f"{'mode':36} {'round 1 (s)':>12} {'later rounds, median (s)':>26} {'flwr run (s)':>13}")
    for name, measure in modes.items():
        with tempfile.TemporaryDirectory() as tmp:
            times, wall = measure(Path(tmp))
        print(f"{name:36} {times[0]:12.2f} {statistics.median(times[1:]):26.2f} {wall:13.1f}",
              flush=True)


if __name__ == "__main__":
    main()
