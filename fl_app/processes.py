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


def client_workers(owners: list[int] | None = None) -> list[int]:
    """The fl_app client workers (fl_app.client_worker) serving any of the processes `owners`
    (all of this machine's when None): they run in sessions of their own, outside their
    SuperNode's process tree."""
    owned = None if owners is None else {str(pid) for pid in owners}
    found = []
    for pid, args in _command_lines():
        if "fl_app.client_worker" in args and "--owner-pid" in args:
            index = args.index("--owner-pid") + 1
            if index < len(args) and (owned is None or args[index] in owned):
                found.append(pid)
    return found


def executors() -> list[int]:
    """This machine's fl-app-executor processes (fl_app.executor)."""
    return [pid for pid, args in _command_lines()
            if "fl_app.executor" in args or any(a.endswith("/fl-app-executor") for a in args[:2])]


def share_cores(torch) -> int:
    """Train with this machine's cores divided among its client workers and executors, unless
    FL_APP_TORCH_THREADS says otherwise; return the thread count.

    Several SuperNodes on one machine (a test federation, a lab box) each with torch's default
    of one thread per core oversubscribe it: 3 SuperNodes on 2 cores made a CNN round ~2x
    slower (the issue's measurement). A SuperNode alone on its machine still gets every core.
    """
    wanted = int(os.environ.get("FL_APP_TORCH_THREADS", "0"))
    if not wanted:
        trainers = len(client_workers()) + len(executors())
        wanted = max(1, (os.cpu_count() or 1) // max(1, trainers))
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return wanted


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
