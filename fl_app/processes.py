"""Find and stop, by PID, the processes we started and everything they spawned."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _ppid_map() -> dict[int, int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name in field 2 may hold spaces: split after its closing parenthesis.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    return parents


def descendants(pid: int) -> list[int]:
    parents, found, frontier = _ppid_map(), [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def pids_with_cmdline(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


def client_workers(owners: list[int] | None = None) -> list[int]:
    """The fl_app client workers (fl_app.client_worker) serving any of the processes `owners`
    (all of this machine's when None): they run in sessions of their own, outside their
    SuperNode's process tree."""
    owned = None if owners is None else {str(pid) for pid in owners}
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "fl_app.client_worker" in args and "--owner-pid" in args:
            index = args.index("--owner-pid") + 1
            if index < len(args) and (owned is None or args[index] in owned):
                found.append(int(cmdline.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def stop(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM each process, its descendants and the client workers they own, then SIGKILL
    what is still alive."""
    tree = list(dict.fromkeys(p for pid in pids for p in [pid, *descendants(pid)]))
    tree += [w for w in client_workers(tree) if w not in tree]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(alive(p) for p in tree):
            time.sleep(0.2)
