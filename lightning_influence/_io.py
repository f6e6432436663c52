"""Atomic file writes: a temporary file in the target's folder, fsync, then a rename, so an
interruption never leaves a truncated file under the final name."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO


@contextmanager
def atomic_open(path: str, binary: bool = False, what: str = "the file") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it is flushed, synced
    and renamed to ``path``; on any exception (``KeyboardInterrupt`` included) it is removed
    and ``path`` is left as it was. An unwritable folder raises a clear ``OSError``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    except OSError as err:
        raise OSError(err.errno, f"can't save {what} to {path}: its folder {folder} is not a writable "
                                 f"directory ({err.strerror})") from err
    try:
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="")) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _mode_for(path))  # mkstemp makes 0600: give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _mode_for(path: str) -> int:
    """The permission bits a plain ``open(path, "w")`` leaves: an existing file keeps its own,
    a new one gets ``0o666`` less the process umask."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
