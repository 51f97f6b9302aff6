#!/usr/bin/env python
"""A real federation on this machine with one command: TLS, SuperNode authentication, N SuperNodes.

    python scripts/local_federation.py strategy=fedsgd model=cnn num_rounds=5
    python scripts/local_federation.py --supernodes 5 --keep     # stay up for more `flwr run`s
    python scripts/local_federation.py --no-executor model=cnn   # Flower's process per message
    python scripts/local_federation.py dataset=shakespeare model=char_lstm partitioner=natural
                                            # one SuperNode per speaking role

Creates credentials, starts a SuperLink, its fleet gateway (the only address SuperNodes dial)
and the SuperNodes (each with its own partition and its fl-app-executor, which keeps the
ClientApp loaded across messages) as separate processes, registers the SuperNodes' keys, runs
this app with the given Hydra overrides, prints where logs and outputs are, and stops
everything it started at the end or on Ctrl-C. Exits 1 if the run did not complete.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

from fl_app.config import ConfigError, compose
from fl_app.data import DatasetUnavailable, natural_clients
from fl_app.deploy.federation import CONNECTION, LocalFederation
from fl_app.deploy.runner import PROJECT_ROOT, toml_run_config

# Flower-supported settings for --no-executor: flower-superexec polls for work every 0.1 s
# instead of 1 s, and one torch thread per ClientApp so three of them do not oversubscribe two
# cores (measured effect: small). fl-app-executor polls every 0.05 s and shares the cores itself.
FAST = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", "OMP_NUM_THREADS": "1"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fl-app")
    parser.add_argument("--supernodes", type=int, default=None,
                        help="default: 3, or with partitioner=natural one per client of the "
                             "dataset (per role of dataset=shakespeare)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="credentials, logs, FLWR_HOME and outputs (default: "
                             "outputs/federation/<date>_<time>)")
    parser.add_argument("--keep", action="store_true",
                        help="after the run, keep the federation up until Ctrl-C")
    parser.add_argument("--no-executor", action="store_true",
                        help="no fl-app-executor: Flower's own SuperExec starts a fresh "
                             "ClientApp process for every message (the plain Flower path; "
                             "slower rounds)")
    parser.add_argument("--database", action="store_true",
                        help="the SuperLink keeps its state in SQLite (superlink.db)")
    args = parser.parse_args()
    try:
        args.supernodes = supernodes_for(args.overrides, args.supernodes)
    except (ConfigError, DatasetUnavailable) as err:
        print(f"local_federation: {err}", file=sys.stderr)
        return 1
    workdir = (args.workdir or PROJECT_ROOT / "outputs" / "federation"
               / f"{datetime.now():%Y-%m-%d_%H-%M-%S}").resolve()
    out = workdir / "outputs"
    executor = not args.no_executor
    fed = LocalFederation(workdir, args.supernodes, env=FAST, executor=executor,
                          database=args.database)
    # Ctrl-C or a kill: leave through `finally`, which stops every process started here.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        fed.start()
        print(f"SuperLink {fed.address} (TLS, SuperNode authentication; Control and Runtime "
              f"APIs) with {args.supernodes} SuperNodes"
              + (" and their executors" if executor else "")
              + f" dialling its fleet gateway {fed.fleet_address} (Fleet API only)"
              + f"\n  logs:    {fed.logs}\n  outputs: {out}\n"
              f"  CLI:     FLWR_HOME={fed.env['FLWR_HOME']} flwr run . {CONNECTION}", flush=True)
        overrides = [*args.overrides, f"output_dir='{out}'"]
        run_config = toml_run_config({"overrides": shlex.join(overrides)}, workdir / "run.toml")
        result = fed.run(run_config, echo=True)
        print(f"\nRun {result.run_id}: {result.status}. Outputs in {out}; logs in {fed.logs}")
        if args.keep:
            print("Federation up; Ctrl-C stops it.", flush=True)
            while True:
                time.sleep(3600)
        return 0 if result.ok else 1
    except KeyboardInterrupt:
        return 130
    finally:
        print("Stopping the SuperNodes and the SuperLink...", flush=True)
        fed.stop()


def supernodes_for(overrides: list[str], requested: int | None) -> int:
    """How many SuperNodes to start: with partitioner=natural, one per client of the dataset
    (each SuperNode serves one partition, and the server refuses any other count); else
    `requested`, by default 3."""
    roles = natural_clients(compose(overrides))
    if roles is None:
        return requested or 3
    if requested not in (None, roles):
        raise ConfigError(f"partitioner=natural runs one client per role, and this dataset has "
                          f"{roles}: pass --supernodes {roles} (or leave it out).")
    return roles


if __name__ == "__main__":
    sys.exit(main())
