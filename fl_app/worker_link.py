"""The ClientApp's side of the persistent client worker: find it, start it, hand it a message.

One worker per SuperNode and app version, serving every run (its clients are cached per run
config; a run's client state travels in the Context). It is found by a Unix socket whose name
is derived from the process that launched this `flwr-clientapp` (the SuperNode's executor,
alive as long as the SuperNode) and the app's code folder (one per FAB), in a folder only this
user can read. The first message starts the worker, retiring the SuperNode's workers of older
app versions; later messages connect in milliseconds. Messages travel as
Flower's own protobuf records (no pickle), framed by length.

Stdlib and flwr only: this runs in the short-lived process, before any torch is imported.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.serde import (
    context_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

APP_ROOT = Path(__file__).resolve().parent.parent  # the folder holding the fl_app package
NODE_CONFIG_KEY = "client-worker"
# Importing torch and building the first client; generous for a loaded machine.
START_TIMEOUT = float(os.environ.get("FL_APP_WORKER_START_TIMEOUT", "180"))
_FALSE = {"false", "0", "no", "off"}


def wanted(context: Context) -> bool:
    """Hand messages to a worker: in a `flwr-clientapp` process (one per message), unless the
    SuperNode was started with --node-config "client-worker=false"."""
    if Path(sys.argv[0]).name != "flwr-clientapp":
        return False
    return str(context.node_config.get(NODE_CONFIG_KEY, "true")).lower() not in _FALSE


def socket_dir() -> Path:
    folder = Path(tempfile.gettempdir()) / f"fl_app-workers-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise RuntimeError(f"{folder} must belong to this user and be private (chmod 700 it, "
                           "or remove it): client workers take messages through it.")
    return folder


def worker_key(owner_pid: int) -> str:
    text = f"{owner_pid}|{APP_ROOT}|{sys.executable}"
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------
# Framing: a 4-byte JSON header length, the header, then each blob as 8-byte length + bytes.
# ------------------------------------------------------------------------------------------

def send_frame(sock: socket.socket, header: dict, blobs: list[bytes]) -> None:
    head = json.dumps({**header, "blobs": len(blobs)}).encode()
    parts = [struct.pack("!I", len(head)), head]
    for blob in blobs:
        parts += [struct.pack("!Q", len(blob)), blob]
    sock.sendall(b"".join(parts))


def recv_frame(sock: socket.socket) -> tuple[dict, list[bytes]]:
    header = json.loads(_recv_exact(sock, struct.unpack("!I", _recv_exact(sock, 4))[0]))
    blobs = [_recv_exact(sock, struct.unpack("!Q", _recv_exact(sock, 8))[0])
             for _ in range(header["blobs"])]
    return header, blobs


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("the client worker closed the connection mid-message")
        got += n
    return bytes(buffer)


# ------------------------------------------------------------------------------------------
# The ClientApp's side
# ------------------------------------------------------------------------------------------

def call(kind: str, content: RecordDict, context: Context, owner_pid: int | None = None
         ) -> RecordDict:
    """Have the worker answer a `kind` ("train"/"evaluate") message; update `context.state`
    with the worker's; raise RuntimeError with the worker's reason if it failed.

    `owner_pid`: the process whose worker this is (default: the one that started this
    process, the SuperNode's executor); the worker ends with it."""
    with _connect(owner_pid or os.getppid()) as sock:
        send_frame(sock, {"kind": kind}, [
            recorddict_to_proto(content).SerializeToString(),
            context_to_proto(context).SerializeToString(),
        ])
        header, blobs = recv_frame(sock)
    if not header.get("ok"):
        raise RuntimeError(f"fl_app client worker: {header.get('error', 'failed')}")
    reply, state = (recorddict_from_proto(ProtoRecordDict.FromString(b)) for b in blobs)
    for key, record in state.items():
        context.state[key] = record
    return reply


def _connect(owner_pid: int) -> socket.socket:
    folder = socket_dir()
    key = worker_key(owner_pid)
    path = folder / f"{key}.sock"
    sock = _try_connect(path)
    if sock is not None:
        return sock
    with open(folder / f"{key}.lock", "w") as lock:  # one starter, however many messages
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _try_connect(path)
        if sock is None:
            sock = _start_and_connect(path, owner_pid, folder / f"{key}.log")
    return sock


def _try_connect(path: Path) -> socket.socket | None:
    if not path.exists():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return None
    return sock


def _start_and_connect(path: Path, owner_pid: int, log_path: Path) -> socket.socket:
    from fl_app.processes import client_workers, stop

    stop(client_workers([owner_pid]), grace=5)  # this SuperNode's, for older app code
    path.unlink(missing_ok=True)  # a worker that died leaves its socket file behind
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(APP_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(log_path, "ab") as log:
        # Its own session: the worker outlives this process, and no signal meant for this
        # process (or its terminal) reaches it. It ends itself when owner_pid ends.
        proc = subprocess.Popen(
            [sys.executable, "-m", "fl_app.client_worker", "--socket", str(path),
             "--owner-pid", str(owner_pid)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=str(APP_ROOT), start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        sock = _try_connect(path)
        if sock is not None:
            return sock
        if proc.poll() is not None:
            raise RuntimeError(f"fl_app client worker exited with code {proc.returncode} "
                               f"while starting; its log ({log_path}) ends with:\n"
                               f"{_tail(log_path)}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"fl_app client worker did not start within {START_TIMEOUT:g} s "
                       f"(FL_APP_WORKER_START_TIMEOUT); its log ({log_path}) ends with:\n"
                       f"{_tail(log_path)}")


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_bytes()[-size:].decode(errors="replace")
    except OSError:
        return "(no log)"
