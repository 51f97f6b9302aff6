"""A SuperNode's persistent client worker: torch imported, clients built and warm, once.

    python -m fl_app.client_worker --socket PATH --owner-pid PID

Started by `fl_app.worker_link` on a run's first message at a SuperNode; it answers every
later message of that run over the Unix socket PATH, one at a time (a SuperNode hands out one
message at a time), with the same code a simulation actor runs (`client_core.handle`). It ends
when the process PID ends (the SuperNode's executor) or after FL_APP_WORKER_IDLE seconds
(default 600) without a message, and removes its socket.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import struct
import threading
import time
import traceback
from pathlib import Path

from flwr.common.serde import context_from_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fl_app.processes import alive, share_cores
from fl_app.worker_link import recv_frame, send_frame

IDLE_SECONDS = float(os.environ.get("FL_APP_WORKER_IDLE", "600"))


def _remove_files(path: Path) -> None:
    """The socket, its lock and this worker's log: a worker that ended cleanly leaves nothing
    (one that crashed keeps its log for the message's error to point at)."""
    for suffix in (".sock", ".lock", ".log"):
        path.with_suffix(suffix).unlink(missing_ok=True)


def _watch_owner(owner_pid: int, path: Path) -> None:
    """End this process soon after its owner (the SuperNode's side) is gone."""
    while alive(owner_pid):  # a zombie owner counts as gone
        time.sleep(0.5)
    _remove_files(path)
    os._exit(0)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)  # runs serve's finally: the socket and its files are removed


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def _answer(conn: socket.socket, handle) -> None:
    header, (content_blob, context_blob) = recv_frame(conn)
    try:
        import torch

        share_cores(torch)
        content = recorddict_from_proto(ProtoRecordDict.FromString(content_blob))
        context = context_from_proto(ProtoContext.FromString(context_blob))
        reply = handle(header["kind"], content, context)
    except Exception as err:  # noqa: BLE001 - the reason goes back as the message's error
        traceback.print_exc()
        send_frame(conn, {"ok": False, "error": f"{type(err).__name__}: {err}"}, [])
        return
    send_frame(conn, {"ok": True}, [recorddict_to_proto(reply).SerializeToString(),
                                    recorddict_to_proto(context.state).SerializeToString()])


def serve(path: Path, owner_pid: int) -> None:
    # First of all: stopped by PID (a test, the federation helper), even while still
    # importing torch, it leaves no files behind.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    server, clean = None, False
    try:
        from fl_app.client_core import handle  # the slow imports (torch), once for the run

        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.unlink(missing_ok=True)
        server.bind(str(path))
        os.chmod(path, 0o600)
        server.listen(8)
        server.settimeout(1.0)
        threading.Thread(target=_watch_owner, args=(owner_pid, path), daemon=True).start()
        print(f"fl_app client worker {os.getpid()}: serving {path} for process {owner_pid}",
              flush=True)
        last = time.monotonic()
        while time.monotonic() - last < IDLE_SECONDS:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                if _same_user(conn):
                    _answer(conn, handle)
            last = time.monotonic()
        clean = True
    except SystemExit:
        clean = True
        raise
    finally:
        if server is not None:
            server.close()
        if clean:
            _remove_files(path)
        else:  # a crash: keep the log, which the ClientApp's error points at
            path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--owner-pid", type=int, required=True)
    args = parser.parse_args()
    serve(args.socket, args.owner_pid)


if __name__ == "__main__":
    main()
