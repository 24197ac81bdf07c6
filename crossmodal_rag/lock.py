"""A collection's write lock: an advisory ``flock`` on ``DIR/.lock``.

The kernel drops the lock when its process dies, so a crash never leaves a stale lock behind;
the pid written into the file is only for the error message. A lock file removed while it was
being locked (a creation's cleanup removes the lock files of interrupted creations) is not held:
``acquire`` locks the file that is there.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import CollectionLockedError

__all__ = ["WriteLock"]


class WriteLock:
    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise CollectionLockedError(
                f"{self.path.parent} is being written by another process (pid {holder}); "
                "wait for it to finish, then try again"
            ) from None
        try:
            linked = os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            linked = False
        if not linked:  # removed between open and lock: lock the file there now (if any)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            return self.acquire()
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def moved_to(self, folder: Path) -> None:
        """The folder holding the lock file was renamed to ``folder`` (the lock stays held)."""
        self.path = folder / ".lock"

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None
