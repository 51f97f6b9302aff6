"""fl-app-executor: SuperNodes in `--isolation process` whose ClientApp tasks run in one
persistent process each, over a real SuperLink (TLS, SuperNode authentication), with TLS
between each executor and its SuperNode's Runtime API and a shared SuperExec secret."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode, SubStatus
from strategy_helpers import record, set_task_identity

from fl_app.deploy import executor as executor_module
from fl_app.deploy.executor import Executor, parse_args, share_cores
from fl_app.deploy.federation import CONNECTION, LocalFederation
from fl_app.deploy.processes import alive, stop
from fl_app.deploy.runner import PROJECT_ROOT, flwr_run, staged_app, toml_run_config


@pytest.mark.parametrize("argv, complaint", [
    ([], "exactly one of --insecure"),
    (["--insecure", "--root-certificates", "ca.crt"], "exactly one of --insecure"),
    (["--root-certificates", "/nonexistent/ca.crt"], "/nonexistent/ca.crt is not a file"),
    (["--insecure", "--superexec-auth-secret-file", "/nonexistent/s"], "is not a file"),
])
def test_bad_arguments_get_one_clear_error(argv, complaint, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert complaint in capsys.readouterr().err


class Restarted(Exception):
    pass


def test_a_task_of_another_app_version_restarts_the_process_with_that_task(monkeypatch):
    ex = Executor("127.0.0.1:1", insecure=True)  # never contacted: acquire and run are faked
    tasks = iter([("t1", "hash-a"), None, ("t2", "hash-a"), ("t3", "hash-b")])
    ran: list[str] = []

    def run_task(token: str) -> None:
        ran.append(token)
        ex.app, ex.fab_hash = object(), "hash-a"

    def execv(path: str, args: list[str]) -> None:
        raise Restarted(args)

    monkeypatch.setattr(ex, "acquire", lambda: next(tasks))
    monkeypatch.setattr(ex, "run_task", run_task)
    monkeypatch.setattr(executor_module.time, "sleep", lambda s: None)
    monkeypatch.setattr(executor_module.os, "execv", execv)
    monkeypatch.setattr(executor_module.sys, "argv",
                        ["fl-app-executor", "--insecure", "--token", "t0"])
    with pytest.raises(Restarted) as restart:
        ex.serve()
    assert ran == ["t1", "t2"]  # the same version runs here; the other one is not run here
    args = restart.value.args[0]
    assert args[1:3] == ["-m", "fl_app.deploy.executor"]
    assert args[3:] == ["--insecure", "--token", "t3"]  # the old --token is not passed on


class FakeHeartbeat:
    is_running = False

    def __init__(self, *args) -> None:
        pass

    def start(self) -> None:
        pass


def test_a_failing_task_goes_back_as_an_error_naming_the_reason_and_the_next_task_runs(
        monkeypatch) -> None:
    """The executor runs the app's real ClientApp in its own process; the SuperNode's side
    (its Runtime API) is faked."""
    from fl_app.client_app import app
    from fl_app.client_core import build_client
    from fl_app.config import compose

    set_task_identity(monkeypatch)
    monkeypatch.setenv("FL_APP_TORCH_THREADS", "1")
    client = build_client(compose(["dataset=digits"]), 1, 4)
    good = dict(zip(client.keys, client.get_parameters({}), strict=True))
    tasks = iter([{"not-a-layer": np.zeros(3, np.float32)}, good])
    context = Context(run_id=5, node_id=3, state=RecordDict(), run_config={"dataset": "digits"},
                      node_config={"partition-id": 1, "num-partitions": 4})

    def pull_task_input(client):
        message = Message(RecordDict({"arrays": record(next(tasks)),
                                      "config": ConfigRecord({"server-round": 1})}),
                          dst_node_id=3, message_type="train")
        return message, context, SimpleNamespace(fab_id="", fab_version=""), None

    replies, outputs = [], []
    ex = Executor("127.0.0.1:1", insecure=True)
    monkeypatch.setattr(ex, "_client", lambda interceptors: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(ex, "_load", lambda *fab: app)
    monkeypatch.setattr(executor_module, "HeartbeatSender", FakeHeartbeat)
    monkeypatch.setattr(executor_module, "pull_task_input", pull_task_input)
    monkeypatch.setattr(executor_module, "push_message",
                        lambda client, reply, context: replies.append(reply))
    monkeypatch.setattr(executor_module, "push_task_output",
                        lambda client, context, status, details: outputs.append(status))
    ex.run_task("t1")
    ex.run_task("t2")
    assert replies[0].has_error() and "not-a-layer" in replies[0].error.reason
    assert replies[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert not replies[1].has_error() and replies[1].content["metrics"]["num-examples"] > 0
    assert outputs == [SubStatus.FAILED, SubStatus.COMPLETED]
    assert ex.tasks == 2


class FakeTorch:
    def __init__(self) -> None:
        self.threads = 8

    def get_num_threads(self) -> int:
        return self.threads

    def set_num_threads(self, n: int) -> None:
        self.threads = n


def test_executors_on_one_machine_share_its_cores_unless_told(monkeypatch) -> None:
    monkeypatch.delenv("FL_APP_TORCH_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.setattr(executor_module, "executors", lambda: [11, 12, 13])
    torch = FakeTorch()
    assert share_cores(torch) == 2 and torch.threads == 2  # 8 cores, 3 executors
    monkeypatch.setattr(executor_module, "executors", lambda: [11])
    assert share_cores(torch) == 8  # alone on its machine: every core
    monkeypatch.setenv("FL_APP_TORCH_THREADS", "3")
    assert share_cores(torch) == 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("executor-federation")
    fed = LocalFederation(work, num_supernodes=2, executor=True)
    fed.start()
    yield fed
    pids = [p.pid for p in fed.procs.values()]
    fed.stop()
    assert not any(alive(pid) for pid in pids)


def _tasks_done(fed: LocalFederation, index: int) -> int:
    log = (fed.logs / f"executor-{index}.log").read_text()
    return len(re.findall(r"fl-app-executor: task \d+ completed", log))


def _run(fed: LocalFederation, tmp_path: Path, rounds: int, project: Path = PROJECT_ROOT):
    out = tmp_path / f"out-{project.name}"
    overrides = shlex.join([f"num_rounds={rounds}", f"output_dir={out}"])
    config = toml_run_config({"overrides": overrides}, tmp_path / "run.toml")
    result = flwr_run(config, 0, fed.env, project=project, superlink=CONNECTION, echo=False,
                      timeout=600)
    assert result.ok, result.log[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.e2e
def test_executors_run_every_clientapp_task_and_the_model_learns(federation, tmp_path):
    rows = _run(federation, tmp_path, rounds=3)
    assert rows[-1]["test_accuracy"] > rows[0]["test_accuracy"] > 0.5
    # Two SuperNodes, 3 rounds, every node sampled: 6 train messages, each run by the one
    # executor of its SuperNode (no SuperExec runs in --isolation process).
    assert [_tasks_done(federation, i) for i in (0, 1)] == [3, 3]
    assert all(alive(federation.procs[f"executor-{i}"].pid) for i in (0, 1))
    # The executors reached the SuperNodes' Runtime APIs over TLS: plain HTTP gets no answer.
    supernode = federation.procs["supernode-0"].args
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{supernode[supernode.index('--port') + 1]}/", timeout=5)


@pytest.mark.e2e
def test_a_new_app_version_is_loaded_from_its_fab_in_the_same_process(federation, tmp_path):
    if _tasks_done(federation, 0) == 0:  # this test alone: load version 1 first
        _run(federation, tmp_path, rounds=1)
    marker = tmp_path / "new-version-loaded"
    before = [federation.procs[f"executor-{i}"].pid for i in (0, 1)]
    with staged_app() as project:  # a copy of the app's files, made version 2
        code = f"\nimport os as _os\nopen({str(marker)!r}, 'a').write(f'{{_os.getpid()}}\\n')\n"
        with (project / "fl_app" / "client_app.py").open("a") as f:
            f.write(code)
        _run(federation, tmp_path, rounds=1, project=project)
    # Each executor restarted itself in place (same PID) and ran version 2's own code.
    assert sorted(int(pid) for pid in marker.read_text().split()) == sorted(before)
    for i in (0, 1):
        assert "restarting to load it" in (federation.logs / f"executor-{i}.log").read_text()


def test_a_plain_interrupt_is_no_refusal() -> None:
    """Ctrl-C or the parent process ending: the executor exits quietly (status 0)."""
    args = parse_args(["--insecure"])
    assert executor_module._refusal(KeyboardInterrupt(), args) is None


@pytest.mark.e2e
@pytest.mark.parametrize("secret", [None, b"not the SuperNode's secret"], ids=["none", "wrong"])
def test_an_executor_without_the_supernodes_secret_is_refused_with_one_clear_error(
        federation, tmp_path, secret) -> None:
    """The SuperNodes run with --superexec-auth-secret-file (their executors, which trained the
    model above, hold it): another local process cannot take their tasks."""
    supernode = federation.procs["supernode-0"].args
    assert "--superexec-auth-secret-file" in supernode
    cmd = ["fl-app-executor", "--root-certificates", str(federation.creds / "ca.crt"),
           "--runtime-api-address", f"127.0.0.1:{supernode[supernode.index('--port') + 1]}"]
    if secret is not None:
        (tmp_path / "secret").write_bytes(secret)
        cmd += ["--superexec-auth-secret-file", str(tmp_path / "secret")]
    proc = subprocess.Popen(cmd, env=federation.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        stop([proc.pid])
    assert proc.returncode == 1, out
    assert "refused this executor (SuperExec authentication failed)" in out
    assert ("is not the one the SuperNode was given" in out) == (secret is not None)
    assert "Traceback" not in out
