"""Drive `flwr run` and read back the run's real status.

`flwr run --stream` exits 0 even when the run failed, so success is read from the SuperLink
(`flwr ls`), never from the exit code.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fl_app.run_files import write_private

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunResult:
    run_id: int | None
    status: str          # e.g. "finished:completed", "finished:failed"
    log: str

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


RAY_INLINE_BYTES = 4 * 1024 * 1024


def flwr_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for flwr commands: offline, no telemetry, no runtime `uv` installs."""
    env = dict(os.environ)
    env.update({
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    })
    # Ray passes a task's arguments and results of up to 100 KB inline and puts larger ones
    # (every model a message carries) in its shared-memory object store, a round trip more per
    # message to and from each simulation actor. Inline up to 4 MB: 12 -> 7 ms per 2NN message
    # (0.8 MB) here; the CNN's 6.6 MB measured no faster inline. Read by the process that
    # starts Ray (the simulation, via the SuperLink this starts) and passed on to its workers;
    # a value of the caller's own is kept.
    env.setdefault("RAY_max_direct_call_object_size", str(RAY_INLINE_BYTES))
    # The flwr executables live beside this interpreter even when the venv is not activated.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_superlink_env(home: Path, outputs: Path | None = None,
                        extra: dict[str, str] | None = None,
                        ports: tuple[int, int] | None = None) -> dict[str, str]:
    """`flwr_env` for a private local SuperLink: its own FLWR_HOME, where `flwr run` starts
    it, and its own HTTP and control ports (free ones unless `ports`), so that it never meets
    another's; FL_APP_OUTPUTS is `outputs` when given. The SuperLink's command line names
    `home`: stop it with `pids_with_cmdline(str(home / "local-superlink"))`."""
    http, control = ports or (free_port(), free_port())
    return flwr_env({"FLWR_HOME": str(home),
                     **({"FL_APP_OUTPUTS": str(outputs)} if outputs is not None else {}),
                     "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http),
                     "FLWR_LOCAL_CONTROL_API_PORT": str(control), **(extra or {})})


def toml_run_config(values: dict[str, str], path: Path) -> Path:
    """Write a run config as a TOML file (sidesteps shell and TOML quoting of overrides)."""
    return write_private(path, "".join(f"{k} = {json.dumps(str(v))}\n"
                                        for k, v in values.items()))


# What the app bundle (FAB) holds. `flwr run DIR` walks every file under DIR before it filters
# by .gitignore: with .venv inside the project that is ~50,000 files and 4-11 s per run.
APP_FILES = ("pyproject.toml", ".gitignore", "README.md", "fl_app", "conf")


@contextmanager
def staged_app(project: Path = PROJECT_ROOT) -> Iterator[Path]:
    """A temporary copy of just the app's files, for `flwr run` to bundle in milliseconds."""
    with tempfile.TemporaryDirectory(prefix="fl_app-") as tmp:
        staged = Path(tmp)
        for name in APP_FILES:
            source = project / name
            if source.is_dir():
                shutil.copytree(source, staged / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif source.is_file():
                shutil.copy2(source, staged / name)
        yield staged


def flwr_run(run_config_file: Path, num_supernodes: int, env: dict[str, str],
             project: Path = PROJECT_ROOT, superlink: str | None = None, echo: bool = True,
             timeout: float | None = None, client_cpus: float | None = None,
             client_gpus: float | None = None) -> RunResult:
    """`flwr run --stream` the project (its app files only), then ask the SuperLink how the
    run ended. `client_cpus` / `client_gpus`: the simulation's CPUs (Flower's default is 2) and
    GPUs (default 0) per ClientApp."""
    with staged_app(project) as app:
        cmd = ["flwr", "run", str(app)] + ([superlink] if superlink else [])
        cmd += ["--run-config", str(run_config_file), "--stream"]
        settings = [f"num-supernodes={num_supernodes}"] if num_supernodes else []
        settings += [f"client-resources-num-cpus={client_cpus:g}"] if client_cpus else []
        settings += [f"client-resources-num-gpus={client_gpus:g}"] if client_gpus else []
        if settings:
            cmd += ["--federation-config", " ".join(settings)]
        # Not cwd=app: the local SuperLink that `flwr run` may start inherits the working
        # directory, and would outlive this temporary folder (later runs then fail to launch).
        lines = _stream(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, cwd=project),
                        echo, timeout)
    log = "".join(lines)
    match = re.search(r"run\s+(\d+)", log)
    run_id = int(match.group(1)) if match else None
    return RunResult(run_id, run_status(run_id, env, superlink) if run_id else "not-started", log)


def _stream(proc: subprocess.Popen, echo: bool, timeout: float | None) -> list[str]:
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return lines


def run_status(run_id: int, env: dict[str, str], superlink: str | None = None) -> str:
    """The SuperLink's status of a run, e.g. 'finished:completed'."""
    cmd = ["flwr", "ls", *([superlink] if superlink else []), "--run-id", str(run_id),
           "--format", "json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60).stdout
    try:
        runs = json.loads(out[out.index("{"):]).get("runs", [])
    except ValueError:
        return f"unknown ({out.strip()[:200]})"
    return runs[0].get("status", "unknown") if runs else "unknown"
