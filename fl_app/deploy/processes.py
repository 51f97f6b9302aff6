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
    return [pid for pid, args in _command_lines()
            if text in " ".join(args) and pid != os.getpid()]


def _command_lines() -> list[tuple[int, list[str]]]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            found.append((int(cmdline.parent.name),
                          cmdline.read_bytes().decode(errors="replace").split("\0")))
        except OSError:
            continue
    return found


def executors() -> list[int]:
    """This machine's fl-app-executor processes (fl_app.deploy.executor)."""
    return [pid for pid, args in _command_lines()
            if "fl_app.deploy.executor" in args
            or any(a.endswith("/fl-app-executor") for a in args[:2])]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def stop(pids: list[int], grace: float = 10.0) -> None:
    """SIGTERM each process and its descendants, then SIGKILL what is still alive."""
    tree = list(dict.fromkeys(p for pid in pids for p in [pid, *descendants(pid)]))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(alive(p) for p in tree):
            time.sleep(0.2)
