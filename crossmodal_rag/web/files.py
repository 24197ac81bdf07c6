"""Served item files: a file is served only while it is the file that was indexed.

What identifies an indexed file: its resolved path, its size and ``mtime_ns`` (recorded per path
at ingest) and the SHA-256 of its contents (recorded per image item). To serve one, the file is
opened without following a final symlink and must be a regular file of the recorded size; then
its contents are hashed and compared with the recorded SHA-256. Hashing happens the first time
each on-disk version of a file is served in this process: a version is (device, inode, size,
mtime_ns, ctime_ns), and the kernel sets ctime on every write, rename and ``utime``, so a file
swapped in with its size and mtime put back is a new version and is hashed again. Verdicts are
cached per path (bounded). The bytes served are read from the file descriptor that was checked.

Items without a recorded hash (imported from precomputed embeddings) must match the recorded
size and ``mtime_ns``; one with neither is not served.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["FileChanged", "IndexedFile", "VerifiedFiles", "read_checked", "stream"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class IndexedFile:
    """What was recorded about an item's file when it was indexed."""

    path: str  # resolved path
    size: int | None  # bytes
    mtime_ns: int | None
    sha256: str | None  # hex digest of the contents; None for imported items


class FileChanged(Exception):
    """The file at an item's path is not the file that was indexed (``reason`` says why)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def _version(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VerifiedFiles:
    """Opens item files after checking they are still the indexed ones (thread-safe)."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._verdicts: OrderedDict[str, tuple[tuple[int, ...], str, bool]] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()
        self.hashed = 0  # files hashed so far (each version once)

    def open(self, rec: IndexedFile) -> BinaryIO:
        """The verified file, positioned at 0 (the caller closes it).

        Raises:
            FileNotFoundError: nothing at the path.
            FileChanged: something else than the indexed file is there.
        """
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(rec.path, flags)
        except FileNotFoundError:
            raise
        except OSError as e:  # ELOOP: a symlink now stands at the path
            raise FileChanged(rec.path, f"cannot be opened as a plain file ({e.strerror or e})") from e
        f = os.fdopen(fd, "rb")
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileChanged(rec.path, "is not a regular file")
            self._verify(rec, f, st)
            f.seek(0)
            return f
        except BaseException:
            f.close()
            raise

    def _verify(self, rec: IndexedFile, f: BinaryIO, st: os.stat_result) -> None:
        if rec.size is not None and st.st_size != rec.size:
            raise FileChanged(rec.path, f"size is {st.st_size} bytes, {rec.size} when indexed")
        if rec.sha256 is None:
            if rec.size is None or rec.mtime_ns is None:
                raise FileChanged(rec.path, "no size, modification time or hash was recorded to check it against")
            if st.st_mtime_ns != rec.mtime_ns:
                raise FileChanged(rec.path, "modified since it was indexed (mtime differs; no hash recorded)")
            return
        version = _version(st)
        with self._lock:
            cached = self._verdicts.get(rec.path)
        if cached is not None and cached[0] == version and cached[1] == rec.sha256:
            if not cached[2]:
                raise FileChanged(rec.path, "contents differ from the indexed file (SHA-256)")
            return
        digest = hashlib.sha256()
        for block in _blocks(f):
            digest.update(block)
        if _version(os.fstat(f.fileno())) != version:
            raise FileChanged(rec.path, "changed while it was being checked")
        ok = digest.hexdigest() == rec.sha256
        with self._lock:
            self.hashed += 1
            self._verdicts[rec.path] = (version, rec.sha256, ok)
            self._verdicts.move_to_end(rec.path)
            while len(self._verdicts) > self._max:
                self._verdicts.popitem(last=False)
        if not ok:
            logger.warning("not serving %s: its contents differ from the indexed file (SHA-256)", rec.path)
            raise FileChanged(rec.path, "contents differ from the indexed file (SHA-256)")


def _blocks(f: BinaryIO) -> Iterator[bytes]:
    while block := f.read(_CHUNK):
        yield block


def read_checked(f: BinaryIO, path: str) -> bytes:
    """The rest of the opened file ``f``; refused if it changed while being read."""
    before = _version(os.fstat(f.fileno()))
    data = f.read()
    if _version(os.fstat(f.fileno())) != before:
        raise FileChanged(path, "changed while it was being read")
    return data


def stream(f: BinaryIO) -> Iterator[bytes]:
    """The rest of ``f`` in blocks; closes it at the end."""
    try:
        yield from _blocks(f)
    finally:
        f.close()
