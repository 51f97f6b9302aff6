"""A real federation on this machine: one SuperLink and N SuperNodes as separate processes.

The same processes, flags and files a multi-machine deployment uses (TLS, SuperNode
authentication, one data partition per SuperNode), on loopback, each SuperNode served by an
`fl-app-executor` (its ClientApp stays loaded across messages) unless told to run Flower's
own process per message. As in a deployment, SuperNodes dial the fleet gateway (the Fleet API
only), while the SuperLink's own port, with its Control and Runtime APIs, is what the `flwr`
CLI and the ServerApp's SuperExec use. Used by `scripts/local_federation.py` and by the
deployment tests; every process it starts is stopped by PID.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

from fl_app.deploy.credentials import (
    make_supernode_keys,
    make_supernode_tls,
    make_tls,
    write_private,
)
from fl_app.deploy.processes import stop
from fl_app.deploy.runner import RunResult, flwr_env, flwr_run, free_port, run_status

CONNECTION = "fl-app-local"
# Stopped in this order: what depends on a process goes before it.
STOP_ORDER = ("executor-", "supernode-", "fleet-gateway", "serverapp-superexec", "superlink")


class LocalFederation:
    """SuperLink + SuperNodes under `workdir` (credentials, FLWR_HOME, logs, outputs)."""

    def __init__(self, workdir: Path, num_supernodes: int = 3, tls: bool = True,
                 auth: bool = True, env: dict[str, str] | None = None,
                 superlink_cwd: Path | None = None,
                 data_dirs: dict[int, Path] | None = None, executor: bool = True,
                 database: bool = False) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS: Flower refuses it otherwise.")
        self.workdir = Path(workdir).resolve()
        self.num_supernodes, self.tls, self.auth = num_supernodes, tls, auth
        self.creds, self.logs = self.workdir / "credentials", self.workdir / "logs"
        self.superexec_secret = self.creds / "superexec.secret"
        # The SuperLink's own Runtime API takes tasks only from the SuperExec holding this.
        self.superlink_secret = self.creds / "superlink-superexec.secret"
        self.creds.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        # address: the SuperLink's port (Fleet, Control and Runtime APIs), private: the flwr
        # CLI and the ServerApp's SuperExec use it. fleet_address: the gateway SuperNodes dial.
        self.port, self.fleet_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.fleet_address = f"127.0.0.1:{self.fleet_port}"
        self.superlink_cwd = superlink_cwd or self.workdir
        self.env = flwr_env({"FLWR_HOME": str(self.workdir / "flwr-home"), **(env or {})})
        self.data_dirs = data_dirs or {}  # SuperNodes that hold their own data folder
        # executor: SuperNodes in --isolation process, each served by an fl-app-executor (over
        # TLS to the SuperNode's Runtime API when tls). The two share a secret (Flower's
        # SuperExec authentication), so no other local process can take the node's tasks.
        # executor=False: the plain Flower path, a fresh flwr-clientapp process per message.
        # database: the SuperLink keeps its state in SQLite (it survives a restart) instead of
        # in memory (Flower's default); every array of every message then goes through it.
        self.executor, self.database = executor, database
        self.procs: dict[str, subprocess.Popen] = {}
        self.log_offsets: dict[str, int] = {}  # where each process's latest start begins

    # -- credentials and CLI configuration -------------------------------------------------
    def write_credentials(self) -> None:
        if self.tls and not (self.creds / "ca.crt").exists():
            make_tls(self.creds, ["127.0.0.1", "localhost"])
        if self.tls and self.executor:  # each SuperNode's Runtime API gets its own certificate
            missing = [i for i in range(self.num_supernodes)
                       if not (self.creds / f"supernode-{i}-runtime.pem").exists()]
            make_supernode_tls(self.creds, missing)
        if self.auth and not (self.creds / "supernode-0.key").exists():
            make_supernode_keys(self.creds, self.num_supernodes)
        for secret in (self.superexec_secret, self.superlink_secret):
            if not secret.exists():
                write_private(secret, secrets.token_bytes(32))
        home = Path(self.env["FLWR_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        security = (f'root-certificates = "{self.creds / "ca.crt"}"' if self.tls
                    else "insecure = true")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\n{security}\n')

    # -- processes -------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str], cwd: Path | None = None) -> subprocess.Popen:
        path = self.logs / f"{name}.log"
        self.log_offsets[name] = path.stat().st_size if path.exists() else 0
        log = path.open("ab")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd or self.workdir, start_new_session=True)
        self.procs[name] = proc
        return proc

    def start_superlink(self) -> None:
        """The SuperLink on loopback, its ServerApp SuperExec, and the fleet gateway.

        `--isolation process` with a SuperExec secret: the SuperLink starts no SuperExec of its
        own (Flower's would hold no secret, and the Runtime API would hand the ServerApp's task,
        with every client's reply, to any caller); the one started here holds the secret.
        """
        tls = ([str(self.creds / "ca.crt"), str(self.creds / "server.pem"),
                str(self.creds / "server.key")] if self.tls else [])
        cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation", "--isolation", "process",
               "--superexec-auth-secret-file", str(self.superlink_secret)]
        if self.database:
            cmd += ["--database", str(self.workdir / "superlink.db")]
        if self.tls:
            cmd += ["--ssl-ca-certfile", tls[0], "--ssl-certfile", tls[1], "--ssl-keyfile", tls[2]]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        superlink = self._spawn("superlink", cmd, cwd=self.superlink_cwd)
        self._wait_for_port(self.port, "superlink")
        self._spawn("serverapp-superexec", [
            "flower-superexec", "--runtime-api-address", self.address,
            *(["--root-certificates", tls[0]] if self.tls else ["--insecure"]),
            "--superexec-auth-secret-file", str(self.superlink_secret),
            "--parent-pid", str(superlink.pid)], cwd=self.superlink_cwd)
        self._spawn("fleet-gateway", [
            sys.executable, "-m", "fl_app.deploy.fleet_gateway",
            "--listen", self.fleet_address, "--superlink", self.address,
            *(["--ssl-ca-certfile", tls[0], "--ssl-certfile", tls[1], "--ssl-keyfile", tls[2]]
              if self.tls else ["--insecure"])])
        self._wait_for_port(self.fleet_port, "fleet-gateway")

    def register(self, public_key: Path) -> subprocess.CompletedProcess:
        """Authorize a SuperNode's public key with the SuperLink (`flwr supernode register`)."""
        return subprocess.run(["flwr", "supernode", "register", str(public_key), CONNECTION],
                              env=self.env, capture_output=True, text=True, timeout=60)

    def supernode_cmd(self, index: int, key: Path | None = None) -> list[str]:
        data = (f'data-dir="{self.data_dirs[index]}"' if index in self.data_dirs
                else f"partition-id={index} num-partitions={self.num_supernodes}")
        cmd = ["flower-supernode", "--superlink", self.fleet_address, "--port", str(free_port()),
               "--max-wait-time", "30", "--node-config", data]
        cmd += (["--root-certificates", str(self.creds / "ca.crt")] if self.tls
                else ["--insecure"])
        key = key or (self.creds / f"supernode-{index}.key" if self.auth else None)
        if key:
            cmd += ["--auth-supernode-private-key", str(key)]
        if self.executor:
            cmd += ["--isolation", "process",
                    "--superexec-auth-secret-file", str(self.superexec_secret)]
            if self.tls:  # the executor talks to the SuperNode's Runtime API over TLS too
                runtime = self.creds / f"supernode-{index}-runtime"
                if not runtime.with_suffix(".pem").exists():  # a SuperNode added later
                    make_supernode_tls(self.creds, [index])
                cmd += ["--ssl-certfile", str(runtime.with_suffix(".pem")),
                        "--ssl-keyfile", str(runtime.with_suffix(".key")),
                        "--ssl-ca-certfile", str(self.creds / "ca.crt")]
        return cmd

    def start_supernode(self, index: int, key: Path | None = None) -> subprocess.Popen:
        proc = self._spawn(f"supernode-{index}", self.supernode_cmd(index, key))
        if self.executor:
            runtime_api = f"127.0.0.1:{proc.args[proc.args.index('--port') + 1]}"
            security = (["--root-certificates", str(self.creds / "ca.crt")] if self.tls
                        else ["--insecure"])
            self._spawn(f"executor-{index}", [
                "fl-app-executor", *security, "--runtime-api-address", runtime_api,
                "--superexec-auth-secret-file", str(self.superexec_secret),
                "--parent-pid", str(proc.pid)])
        return proc

    def restart_supernode(self, index: int, timeout: float = 120) -> subprocess.Popen:
        """Start a SuperNode again until the SuperLink lets it back in.

        The SuperLink refuses to activate a node whose previous session it still counts as
        online (until two heartbeats, up to ~60 s, are missed), and the SuperNode then exits:
        retry, as a supervisor (systemd's Restart=on-failure) would.
        """
        deadline = time.time() + timeout
        while True:
            proc = self.start_supernode(index)
            while proc.poll() is None and self.supernode_state(index) == "starting":
                time.sleep(0.5)
            if self.supernode_state(index) == "joined":
                return proc
            self.kill(f"supernode-{index}")  # its SuperExec child outlives a refused start
            if time.time() > deadline:
                raise RuntimeError(f"supernode-{index} could not rejoin within {timeout} s")
            time.sleep(2)

    def supernode_state(self, index: int) -> str:
        """'joined', 'refused' or 'starting', from the log of the SuperNode's latest start."""
        name = f"supernode-{index}"
        with (self.logs / f"{name}.log").open("rb") as f:
            f.seek(self.log_offsets.get(name, 0))
            log = f.read().decode(errors="replace")
        if "SuperNode ID" in log:
            return "joined"
        return "refused" if "Exit Code" in log else "starting"

    def start(self) -> LocalFederation:
        """Credentials, SuperLink, key registration, every SuperNode: ready for `run`.

        If any step fails, every process already started is stopped before the error is
        raised: neither `with` (whose __exit__ never runs when __enter__ raises) nor a fixture
        that never reaches its yield would stop them."""
        try:
            self.write_credentials()
            self.start_superlink()
            if self.auth:
                for i in range(self.num_supernodes):
                    result = self.register(self.creds / f"supernode-{i}.pub")
                    if result.returncode != 0:
                        raise RuntimeError(f"Registering supernode-{i} failed: "
                                           f"{result.stdout}{result.stderr}")
            for i in range(self.num_supernodes):
                self.start_supernode(i)
        except BaseException:
            self.stop()
            raise
        return self

    def kill(self, name: str) -> None:
        for each in (name, name.replace("supernode-", "executor-")):
            if each in self.procs:
                _stop_tree(self.procs.pop(each), grace=0)

    def stop(self) -> None:
        """Stop every process started here, each with its children: executors, SuperNodes,
        the gateway, the ServerApp SuperExec, then the SuperLink."""
        rank = {name: next(i for i, prefix in enumerate(STOP_ORDER) if name.startswith(prefix))
                for name in self.procs}
        for name in sorted(self.procs, key=rank.__getitem__):
            _stop_tree(self.procs[name], grace=10)
        self.procs.clear()

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- runs ------------------------------------------------------------------------------
    def run(self, run_config_file: Path, echo: bool = False,
            timeout: float | None = None) -> RunResult:
        return flwr_run(run_config_file, 0, self.env, superlink=CONNECTION, echo=echo,
                        timeout=timeout)

    def status(self, run_id: int) -> str:
        return run_status(run_id, self.env, CONNECTION)

    def _wait_for_port(self, port: int, name: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}; see "
                                   f"{self.logs / (name + '.log')}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{name} did not open port {port} within {timeout} s")


def _stop_tree(proc: subprocess.Popen, grace: float) -> None:
    """Stop the process and everything it spawned, by PID, then reap it."""
    stop([proc.pid], grace=grace)
    proc.wait(timeout=5)
