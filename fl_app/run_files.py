"""A run folder's files are the user's alone: the folder 0700, every file 0600 from the start.

A run folder holds the model, the metrics, the config and the checkpoint (with the privacy
state, which is only for whoever ran it).
Files are created with their final mode by `os.open`, never written first and chmod-ed after,
so no other user can open one in between; a file an older run left is tightened as it is
rewritten.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

FOLDER_MODE = 0o700
FILE_MODE = 0o600
_FLAGS = {"w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND}


def private_folder(path: Path) -> Path:
    """`path` as a folder only its owner can enter (created with its parents if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=FOLDER_MODE, exist_ok=True)
    os.chmod(path, FOLDER_MODE)  # an existing folder, or a umask that took bits away
    return path


def open_private(path: Path, mode: str = "w") -> IO:
    """`open(path, mode)` for "w", "a", "wb" or "ab", the file created 0600 (and an existing
    one made 0600)."""
    fd = os.open(path, _FLAGS[mode[0]], FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"}))
    except BaseException:
        os.close(fd)
        raise


def write_private(path: Path, data: str | bytes) -> Path:
    """Write `data` (text or bytes) to `path` so that only its owner can ever read it.

    The file is created 0600 by the `open` call itself, under a temporary name, then renamed
    over `path`: an existing file of wider mode is replaced, not rewritten, so whoever had
    opened it never reads the new contents, and a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def private_umask() -> Iterator[None]:
    """Files and folders created inside, by libraries that open their own (TensorBoard's
    event files, Hydra's), are 0600 / 0700 from the start. The umask is the process's: use it
    around the creation only."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)
