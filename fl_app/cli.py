"""`fl-app`: Hydra's command line for simulations and multirun sweeps.

Each Hydra job runs the job's overrides, composing exactly the config that
`flwr run . --run-config ...` would, and writes its outputs into the job's Hydra folder. By
default (engine=auto) the job runs the ServerApp loop and the ClientApp in this process
(`fl_app.inprocess`); with engine=flower, or engine=auto and RAY_ADDRESS set, it is one
`flwr run` of this project on Flower's simulation engine.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fl_app.config import (
    CONF_DIR,
    ConfigError,
    check,
    compose,
    num_supernodes,
    overrides_from_run_config,
)
from fl_app.deploy.runner import PROJECT_ROOT, flwr_env, flwr_run, toml_run_config
from fl_app.device import client_gpu_share
from fl_app.run_files import private_folder, write_private

DEFAULT_SUPERNODES = 10


class RunFailed(RuntimeError):
    """A run did not complete: the SuperLink's report, or the in-process run's error."""


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def simulate(cfg: DictConfig) -> float:
    """Run one simulation of the composed config; return its final test accuracy."""
    try:
        return _simulate(cfg)
    except (ConfigError, RunFailed) as err:
        # One clear line, not Hydra's report of a traceback.
        print(f"fl-app: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def _simulate(cfg: DictConfig) -> float:
    check(cfg)
    hc = HydraConfig.get()
    if cfg.resume:
        out, run_config, supernodes = _resumed_run(Path(cfg.resume), hc.overrides.task)
    else:
        out = Path(hc.runtime.output_dir).resolve()
        overrides = [o for o in hc.overrides.task if not o.startswith("output_dir=")]
        overrides.append(f"output_dir='{out}'")  # quoted: sweep folder names hold '=' and ','
        supernodes = num_supernodes(cfg)
        if cfg.num_clients is None and (count := _natural_clients(cfg)):
            overrides.append(f"num_clients={count}")  # one client per role, all of them
            supernodes = cfg.client_pool or count
        run_config = {"overrides": shlex.join(overrides)}
    # The engine is the run config's: a resumed run goes on with the one it was started with,
    # unless the command names another (its overrides come last).
    run_overrides = overrides_from_run_config(run_config)
    run_cfg = compose(run_overrides)
    engine = run_cfg.engine
    if engine_for(engine) == "inprocess":
        summary = _run_in_process(run_config, run_overrides, supernodes, out)
        print(f"fl-app: in-process run completed: test accuracy {summary['test_accuracy']:.4f} "
              f"after {summary['rounds']} rounds; outputs in {out}", flush=True)
        return summary["test_accuracy"]
    if engine == "auto":  # say why this run is not in-process, as runs without RAY_ADDRESS are
        print(f"fl-app: RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set: running on Flower's "
              "simulation engine, in that Ray cluster (engine=inprocess keeps the run here)",
              flush=True)
    if not (PROJECT_ROOT / "pyproject.toml").exists():
        raise RunFailed(f"fl-app needs the project folder (with pyproject.toml) at {PROJECT_ROOT}: "
                        "install it with `pip install -e .` from a clone, or run with "
                        "engine=inprocess.")
    run_config_file = toml_run_config(run_config, out / "run_config.toml")
    result = flwr_run(run_config_file, supernodes or DEFAULT_SUPERNODES, flwr_env(),
                      **client_resources(run_cfg))
    summary_file = out / "summary.json"
    if not result.ok or not summary_file.exists():
        raise RunFailed(f"Flower run {result.run_id} ended as '{result.status}'; its log is above "
                        f"and in {out}.")
    summary = json.loads(summary_file.read_text())
    print(f"fl-app: run {result.run_id} completed: test accuracy {summary['test_accuracy']:.4f} "
          f"after {summary['rounds']} rounds; outputs in {out}", flush=True)
    return summary["test_accuracy"]


def client_resources(cfg: DictConfig) -> dict[str, float]:
    """What each simulated client reserves on Flower's engine (flwr_run's client_cpus and
    client_gpus: --federation-config client-resources-num-cpus / -num-gpus)."""
    # One CPU per simulated client: Flower's default of 2 runs one client at a time here, and
    # measured 1.57x (CNN) / 2.2x (2NN) a plain PyTorch loop against about 1.2x with 1.
    # Ray hides the GPUs from actors that reserve none: a GPU run gives each client a share.
    return {"client_cpus": 1,
            "client_gpus": client_gpu_share(cfg.get("client_gpus"), cfg.get("device", "auto"))}


def _natural_clients(cfg: DictConfig) -> int | None:
    """With partitioner=natural, how many clients the dataset has (reads the dataset)."""
    from fl_app.data import DatasetUnavailable, natural_clients

    try:
        return natural_clients(cfg)
    except DatasetUnavailable as err:
        raise RunFailed(str(err)) from None


def engine_for(engine: str, environ: Mapping[str, str] = os.environ) -> str:
    """The engine `fl-app` runs a config's `engine` on. `auto` is the in-process engine, which
    starts in seconds and costs what a plain loop costs per round on a machine of a few cores,
    unless RAY_ADDRESS names a Ray cluster: Flower's simulation engine then attaches to it."""
    if engine != "auto":
        return engine
    return "flower" if environ.get("RAY_ADDRESS") else "inprocess"


def _run_in_process(run_config: dict, overrides: list[str], supernodes: int | None,
                    out: Path) -> dict:
    """The run of `run_config` (whose overrides are `overrides`) in this process
    (`fl_app.inprocess`); any failure becomes a RunFailed whose message names it, with the
    traceback saved in the run's folder."""
    from fl_app import inprocess  # torch and the strategies: only when this engine runs

    # Flower's logger prints the run as under `flwr run`; passed on to Hydra's handlers as
    # well, every line would show twice.
    logging.getLogger("flwr").propagate = False
    # As many clients as fl-app would start SuperNodes when the config leaves it to them.
    clients = None if compose(overrides).num_clients else supernodes or DEFAULT_SUPERNODES
    try:
        return inprocess.run(overrides, num_clients=clients, run_config=run_config)
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - reported in one line, traceback kept on disk
        write_private(private_folder(out) / "traceback.txt", traceback.format_exc())
        raise RunFailed(f"the in-process run failed: {type(err).__name__}: {err} "
                        f"(traceback in {out / 'traceback.txt'})") from err


def _resumed_run(folder: Path, overrides: list[str]) -> tuple[Path, dict, int]:
    """The run config and SuperNode count of the run in `folder`, set to resume it.

    Overrides given now (e.g. a larger num_rounds) are added after the run's own.
    """
    folder = folder.expanduser().resolve()
    saved = folder / "run_config.json"
    if not saved.is_file():
        raise ConfigError(f"Cannot resume {folder}: it holds no run_config.json. resume= takes "
                          "the output folder of an fl_app run that completed at least one round.")
    run_config = json.loads(saved.read_text())
    extra = [o for o in overrides if not o.startswith(("resume=", "output_dir="))]
    run_config["overrides"] = shlex.join(
        [*shlex.split(str(run_config.get("overrides", ""))), *extra, f"resume='{folder}'"])
    return folder, run_config, num_supernodes(OmegaConf.load(folder / "config.yaml"))


def honour_output_dir(argv: Sequence[str]) -> list[str]:
    """`argv` with `output_dir=DIR` made the job's own folder (`hydra.run.dir=DIR`), so that
    every file of the run, Hydra's included, lands where the user said. fl-app otherwise puts a
    run in Hydra's folder, and would drop the setting in silence; where it cannot be honoured
    (a sweep, a resumed run elsewhere, a second folder given) this raises ConfigError saying
    which setting to use instead."""
    given = {o.key_or_group: o for o in _overrides(argv)}
    wanted = given.get("output_dir")
    if wanted is None or wanted.value() is None:
        return list(argv)
    if wanted.is_sweep_override() or any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("output_dir= names one folder, but a -m sweep runs several jobs: use "
                          "hydra.sweep.dir=DIR instead (job k then writes DIR/k-<its overrides>).")
    folder = Path(str(wanted.value())).expanduser().resolve()
    resume = given.get("resume")
    if resume is not None and resume.value() is not None:
        if Path(str(resume.value())).expanduser().resolve() != folder:
            raise ConfigError(f"resume= goes on in the run's own folder ({resume.value()}); "
                              "output_dir= cannot move it: drop output_dir=, or copy the folder "
                              "and resume the copy.")
        return list(argv)
    run_dir = given.get("hydra.run.dir")
    if run_dir is not None:
        if Path(str(run_dir.value())).expanduser().resolve() != folder:
            raise ConfigError("output_dir= and hydra.run.dir= name different folders: give one.")
        return list(argv)
    escaped = str(folder).replace("\\", "\\\\").replace("'", "\\'")
    return [*argv, f"hydra.run.dir='{escaped}'"]


def _overrides(argv: Sequence[str]) -> list:
    """The Hydra overrides among `argv` (not its flags), parsed as Hydra parses them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    candidates = [a for a in argv if "=" in a and not a.startswith("-")]
    try:
        return OverridesParser.create().parse_overrides(candidates)
    except HydraException:
        return []  # Hydra itself reports the malformed override, in its own words


def main() -> None:
    # Everything this process creates (Hydra's run folder, .hydra/ and log files, and through
    # `flwr run` the run's outputs) is the user's alone: folders 0700, files 0600.
    os.umask(0o077)
    try:
        sys.argv[1:] = honour_output_dir(sys.argv[1:])
    except ConfigError as err:
        print(f"fl-app: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    simulate()


if __name__ == "__main__":
    main()
