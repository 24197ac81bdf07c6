"""A collection's write lock: an advisory ``flock`` on ``DIR/.lock``.

The kernel drops the lock when its process dies, so a crash never leaves a stale lock behind;
the pid written into the file is only for the error message. A lock file removed while it was
being locked (a creation's cleanup removes the lock files of interrupted creations) is not held:
``acquire`` locks the file that is there.

The lock file is opened without following a symbolic link (``O_NOFOLLOW``) and without blocking
(``O_NONBLOCK``), and only a regular file with one link is written: a link planted at ``DIR/.lock``
(``ln -s ~/victim DIR/.lock``) is refused, never truncated through.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from .errors import CollectionError, CollectionLockedError

__all__ = ["WriteLock"]

_FLAGS = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
          | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))


class WriteLock:
    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self._fd: int | None = None

    def _refused(self, what: str) -> CollectionError:
        return CollectionError(
            f"{self.path} is {what}, not the collection's own lock file (a regular file); it was "
            "not opened for writing. Remove it, then try again")

    def _open(self) -> int:
        """The lock file's descriptor: created if absent; a link, a FIFO, a device, a folder or
        a file with other hard links is refused."""
        try:
            fd = os.open(self.path, _FLAGS, 0o644)
        except OSError:
            if os.path.islink(self.path):  # ELOOP (Linux) or EMLINK (BSD): O_NOFOLLOW refused it
                raise self._refused("a symbolic link") from None
            if os.path.isdir(self.path):
                raise self._refused("a folder") from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise self._refused("not a regular file" if not stat.S_ISREG(st.st_mode)
                                else f"a file with {st.st_nlink} hard links")
        return fd

    def acquire(self) -> None:
        fd = self._open()
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
            linked = os.path.samestat(os.fstat(fd), os.lstat(self.path))
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
