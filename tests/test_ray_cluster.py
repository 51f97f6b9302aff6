"""Flower's simulation runs on an existing Ray cluster: `ray start --head`, then `flwr run`, and
`fl-app` (whose default engine follows RAY_ADDRESS).

Flower 1.41's Ray backend calls `ray.init()` without an address
(flwr/server/superlink/fleet/vce/backend/raybackend.py, `RayBackend.init_ray`), and Ray then
connects to the cluster named by `RAY_ADDRESS` (ray/_private/worker.py, `init`). The variable
reaches `flwr-simulation` through the environment of the SuperLink that launches it, so it must
be set when that SuperLink starts. The proof below is the cluster's own record (its GCS job and
actor tables): a job whose driver is this run's `flwr-simulation` and the ClientAppActors that
served the clients, as many as the *cluster's* CPUs allow, not this machine's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fl_app.deploy.processes import alive, pids_with_cmdline, stop
from fl_app.deploy.runner import flwr_env, flwr_run, free_port, local_superlink_env, toml_run_config

pytestmark = pytest.mark.e2e

CLUSTER_CPUS = 4  # more than this machine has: the actor count shows whose resources were used
RAY = str(Path(sys.executable).parent / "ray")

# Read the cluster's job and actor tables from its GCS (no dashboard needed).
PROBE = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print("PROBE" + json.dumps({"jobs": state.jobs(), "actors": list(state.actors().values()),
                            "cpus": ray.cluster_resources().get("CPU")}, default=str))
"""


def _cluster_pids(temp_dir: Path, address: str) -> list[int]:
    # Every daemon of this cluster names its temp dir on its command line, except the Ray client
    # server, which names the GCS address; workers and agents are their children (stop() takes
    # descendants). Never `ray stop`: it stops every Ray instance of the user on this machine.
    return sorted(set(pids_with_cmdline(str(temp_dir)) + pids_with_cmdline(f"--address={address}")))


@pytest.fixture
def ray_head():
    # Short path: Ray's unix sockets live under it and must stay below 108 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="rayc", dir="/tmp"))
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
           f"--temp-dir={temp_dir}", f"--num-cpus={CLUSTER_CPUS}", "--num-gpus=0",
           "--include-dashboard=false", f"--dashboard-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}",
           f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
    address = None
    try:
        subprocess.run(cmd, env=flwr_env(), capture_output=True, text=True, timeout=120,
                       check=True)
        # `ray start --temp-dir` records the address there, not in /tmp/ray: no other Ray user
        # on this machine is pointed at this cluster.
        address = (temp_dir / "ray_current_cluster").read_text().strip()
        yield address
    finally:
        pids = _cluster_pids(temp_dir, address or str(temp_dir))
        stop(pids)
        assert not any(alive(p) for p in pids)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _probe(address: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, text=True,
                          timeout=120, env=flwr_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.split("PROBE", 1)[1])


def _env(tmp_path: Path, name: str, address: str) -> tuple[dict[str, str], Path, int]:
    home = tmp_path / name
    env = local_superlink_env(home, tmp_path / "outputs",
                              {"RAY_ADDRESS": address})  # set before the SuperLink starts
    return env, home, int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])


def _actors_of_run(seen: dict, port: int) -> list[dict]:
    ours = [job for job in seen["jobs"]
            if "flwr-simulation" in job.get("Entrypoint", "")
            and f"127.0.0.1:{port}" in job["Entrypoint"]]  # the run's own SuperLink
    assert len(ours) == 1, [job.get("Entrypoint") for job in seen["jobs"]]
    return [a for a in seen["actors"]
            if a["JobID"] == ours[0]["JobID"] and a["ActorClassName"] == "ClientAppActor"]


def test_flwr_run_and_fl_app_simulations_attach_to_a_running_ray_cluster(ray_head, tmp_path):
    env, home, port = _env(tmp_path, "flwr-home", ray_head)
    out = tmp_path / "out"
    config = toml_run_config({"dataset": "digits", "overrides": f"num_rounds=1 output_dir={out}"},
                             tmp_path / "run.toml")
    try:
        result = flwr_run(config, 3, env, echo=False, timeout=300)
    finally:
        stop(pids_with_cmdline(str(home / "local-superlink")))
    assert result.status == "finished:completed", result.log[-3000:]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1

    # docs/performance.md's command: with RAY_ADDRESS set, fl-app's default engine is Flower's.
    app_env, app_home, app_port = _env(tmp_path, "fl-app-home", ray_head)
    try:
        proc = subprocess.run([str(Path(sys.executable).parent / "fl-app"), "dataset=digits",
                               "num_clients=3", "num_rounds=1",
                               f"hydra.run.dir={tmp_path / 'fl-app'}"],
                              env=app_env, capture_output=True, text=True, timeout=300)
    finally:
        stop(pids_with_cmdline(str(app_home / "local-superlink")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"fl-app: RAY_ADDRESS={ray_head} is set: running on Flower's" in proc.stdout
    assert "fl-app: run" in proc.stdout and "in-process run" not in proc.stdout

    seen = _probe(ray_head)  # the cluster outlives the runs: Flower only disconnected from it
    assert seen["cpus"] == CLUSTER_CPUS
    # Flower sizes its actor pool from the cluster's nodes: 4 CPUs / 2 per client (its default)
    # for flwr run, 4 / 1 for fl-app (one CPU per client). A Ray of Flower's own on this 2-core
    # machine would have had room for one and two.
    assert len(_actors_of_run(seen, port)) == CLUSTER_CPUS // 2
    assert len(_actors_of_run(seen, app_port)) == CLUSTER_CPUS
