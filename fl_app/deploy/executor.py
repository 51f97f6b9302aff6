"""fl-app-executor: a SuperNode's ClientApp executor that stays up between messages.

    flower-supernode --isolation process --port 9094 ...   # its Runtime API: 127.0.0.1:9094
    fl-app-executor --runtime-api-address 127.0.0.1:9094 --insecure

With `--isolation process`, Flower leaves running ClientApps to a process of the user's.
Flower's own, `flower-superexec`, starts a fresh `flwr-clientapp` process for every message
(0.4 s to start, 1.9 s to import flwr, then torch and the app). This executor asks the
SuperNode for ClientApp tasks as `flower-superexec` does and runs each one here, with Flower's
own task steps: pull the Message, Context and FAB; run the ClientApp; push the reply and the
Context; send heartbeats meanwhile. flwr, torch, the app and its clients load once, for every
message of every run of one app version.

The app's modules come from the FAB (as in `flwr-clientapp`), not from this package: a task of
another app version (FAB hash) makes the process re-execute itself, keeping its PID, so two
versions of the app's modules never mix.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.interceptors.http.superexec_auth import SuperExecAuthHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fl_app.deploy.processes import executors

# An idle executor asks for a task this often: one small local HTTP call (flower-superexec's
# default is 1 s). 0.05 s measured no slower than 0.25 s, with three executors on 2 cores.
POLL_SECONDS = 0.05


class Executor:
    """Acquires the SuperNode's ClientApp tasks and runs them here, one at a time."""

    def __init__(self, address: str, insecure: bool, root_certificates: Path | None = None,
                 auth_secret: bytes | None = None) -> None:
        self.address, self.insecure = address, insecure
        self.certificates = root_certificates.read_bytes() if root_certificates else None
        interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if auth_secret:
            interceptors.append(SuperExecAuthHttpInterceptor(
                master_secret=auth_secret,
                protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"})))
        self.runtime = self._client(interceptors)
        self.fab_hash: str | None = None  # the app version loaded in this process
        self.app: ClientApp | None = None
        self.tasks = 0

    def _client(self, interceptors: list) -> RuntimeHttpClient:
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.insecure,
            root_certificates=self.certificates, interceptors=interceptors,
            retry_invoker=make_simple_http_retry_invoker())

    def acquire(self) -> tuple[str, str] | None:
        """(token, FAB hash) of the SuperNode's next ClientApp task, or None."""
        res = self.runtime.AcquireTask(AcquireTaskRequest(
            supported_task_types=[TaskType.CLIENT_APP.value]))
        if res.HasField("task") and res.token:
            return res.token, res.task.fab_hash
        return None

    def serve(self, first_token: str | None = None) -> None:
        if first_token:
            self.run_task(first_token)
        while True:
            task = self.acquire()
            if task is None:
                time.sleep(POLL_SECONDS)
                continue
            token, fab_hash = task
            if self.app is not None and fab_hash != self.fab_hash:
                self.restart(token)
            self.run_task(token)

    def restart(self, token: str) -> None:
        """Run the task of `token` in a fresh copy of this process (same PID and arguments)."""
        log(INFO, "fl-app-executor: a task of another app version: restarting to load it")
        args = sys.argv[1:]
        if "--token" in args:
            del args[args.index("--token"):args.index("--token") + 2]
        os.execv(sys.executable, [sys.executable, "-m", "fl_app.deploy.executor", *args,
                                  "--token", token])

    def run_task(self, token: str) -> None:
        """One ClientApp task, as `flwr.supernode.runtime.run_clientapp` runs it in Flower's
        per-message process, minus the process."""
        started = time.monotonic()
        client = self._client([RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                               RuntimeTokenHttpInterceptor(token)])
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = reply = None
        context: Context | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            app = self._load(run.fab_id, run.fab_version, fab)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - the reason goes back to the ServerApp
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            details = f"{type(ex)}:<'{ex}'>"
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            if reply is not None and context is not None:
                try:
                    push_message(client, reply, context)
                except Exception as ex:  # noqa: BLE001 - the task is reported failed below
                    log(ERROR, "Failed to push the reply", exc_info=ex)
                    status, details = SubStatus.FAILED, f"pushing the reply failed: {ex}"
            push_task_output(client, context, status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        self.tasks += 1
        log(INFO, "fl-app-executor: task %d %s in %.2f s", self.tasks, status,
            time.monotonic() - started)

    def _load(self, fab_id: str, fab_version: str, fab) -> ClientApp:
        if self.app is None:
            install_from_fab(fab.content, skip_prompt=True)
            # The app's package must come from the FAB's folder, which Flower puts first on
            # sys.path; this module's own import of fl_app would shadow it.
            for name in [m for m in sys.modules if m == "fl_app" or m.startswith("fl_app.")]:
                del sys.modules[name]
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.app, self.fab_hash = load(fab_id, fab_version, fab.hash_str), fab.hash_str
            import torch  # the app's own import: share the cores before any client is built

            share_cores(torch)
        return self.app


def share_cores(torch) -> int:
    """Train with this machine's cores divided among its fl-app-executors (this one among
    them), unless FL_APP_TORCH_THREADS says otherwise; return the thread count.

    Several SuperNodes on one machine (a test federation, a lab box) each with torch's default
    of one thread per core oversubscribe it: 3 SuperNodes on 2 cores made a CNN round ~2x
    slower (the issue's measurement). A SuperNode alone on its machine still gets every core.
    """
    wanted = int(os.environ.get("FL_APP_TORCH_THREADS", "0"))
    if not wanted:
        wanted = max(1, (os.cpu_count() or 1) // max(1, len(executors())))
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


def pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, object, object]:
    """The task's Message, Context, Run and FAB (Flower's `pull_task_input`), retrying an
    array the SuperNode is still pulling from the SuperLink after 0.02 s instead of 1 s: the
    task exists from the moment the SuperNode has the message, before its arrays."""
    res = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id, TaskIdentity.run_id = res.task_id, res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("The SuperNode had no message for this task")
    node, tree = Node(node_id=context.node_id), pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree, make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node,
                                                  context.run_id),
        return_type=Message, initial_backoff=0.02, backoff_cap=0.2)
    message.metadata.__dict__["_message_id"] = tree.object_id  # as Flower's own does
    return message, context, run_from_proto(res.run), fab_from_proto(res.fab)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fl-app-executor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime-api-address", default="127.0.0.1:9094",
                        help="the SuperNode's Runtime API, its --host:--port (default "
                             "%(default)s)")
    parser.add_argument("--insecure", action="store_true",
                        help="plain HTTP to the Runtime API (a SuperNode without --ssl-certfile)")
    parser.add_argument("--root-certificates", type=Path,
                        help="the CA certificate of the Runtime API's TLS (a SuperNode with "
                             "--ssl-certfile)")
    parser.add_argument("--superexec-auth-secret-file", type=Path,
                        help="the secret file the SuperNode was given, if any")
    parser.add_argument("--parent-pid", type=int, help="end when this process ends")
    parser.add_argument("--token", help=argparse.SUPPRESS)  # a task taken before a restart
    args = parser.parse_args(argv)
    if args.insecure == (args.root_certificates is not None):
        parser.error("give exactly one of --insecure (a SuperNode without --ssl-certfile) and "
                     "--root-certificates CA_FILE (a SuperNode with --ssl-certfile)")
    for path in (args.root_certificates, args.superexec_auth_secret_file):
        if path is not None and not path.is_file():
            parser.error(f"{path} is not a file")
    return args


def _listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
    except (OSError, ValueError):
        return False
    return True


def _refusal(error: BaseException, args: argparse.Namespace) -> str | None:
    """The error to exit with when the SuperNode refused this executor, else None.

    Flower's HTTP retry answers a 401 by sending its own process SIGINT, so a refusal arrives
    as a KeyboardInterrupt raised while handling the 401, or (when the signal comes a moment
    late, as on a loaded machine) as the 401 itself; without this check a refused executor
    would exit 0 as if stopped on purpose, or blame the network.
    """
    cause = error if isinstance(error, httpx.HTTPStatusError) else error.__context__
    if not (isinstance(cause, httpx.HTTPStatusError) and cause.response.status_code == 401):
        return None
    if not cause.request.url.path.endswith("/acquire-task"):
        return (f"fl-app-executor: the SuperNode at {args.runtime_api_address} refused a task's "
                f"token ({cause.request.url.path}: 401 Unauthorized); the task may have "
                "expired. Start the executor again.")
    given = args.superexec_auth_secret_file
    fix = (f"the secret in {given} is not the one the SuperNode was given" if given else
           "the SuperNode was started with --superexec-auth-secret-file; give the executor the "
           "same file")
    return (f"fl-app-executor: the SuperNode at {args.runtime_api_address} refused this "
            f"executor (SuperExec authentication failed): {fix}.")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.parent_pid is not None:
        start_parent_process_monitor(args.parent_pid)
    secret = (args.superexec_auth_secret_file.read_bytes()
              if args.superexec_auth_secret_file else None)
    if not _listening(args.runtime_api_address):
        log(WARNING, "fl-app-executor: nothing answers at %s yet; waiting for it. The SuperNode "
            "must run with --isolation process, its Runtime API on that --host and --port.",
            args.runtime_api_address)
    executor = Executor(args.runtime_api_address, args.insecure, args.root_certificates, secret)
    log(INFO, "fl-app-executor %d: running the ClientApp tasks of the SuperNode at %s",
        os.getpid(), args.runtime_api_address)
    try:
        executor.serve(args.token)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, the parent process ended, or a refusal
        refusal = _refusal(interrupt, args)
        if refusal:
            sys.exit(refusal)
    except httpx.HTTPError as err:
        if refusal := _refusal(err, args):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Flower's SIGINT may still be on its way
            sys.exit(refusal)
        sys.exit(f"fl-app-executor: the SuperNode's Runtime API at {args.runtime_api_address} "
                 f"stopped answering ({err}). Is the SuperNode running with --isolation "
                 "process, on that --host and --port?")


if __name__ == "__main__":
    main()
