"""Guards of a metadata file read as hostile input: SQLite's files must be regular files of the
collection's own (:func:`check_files`), any one value is at most :data:`MAX_VALUE_BYTES`, and no
call of the store runs more than its budget of SQLite steps (:class:`StepBudget`)."""

from __future__ import annotations

import os
import sqlite3
import stat
from contextlib import suppress
from pathlib import Path

from ..errors import CollectionError

__all__ = ["DB_NAME", "MAX_VALUE_BYTES", "SQLITE_FILES", "StepBudget", "check_files"]

DB_NAME = "metadata.sqlite"
#: SQLite's files of a store: each must be a regular file (a link is refused, never followed).
SQLITE_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal")
#: Largest single value (text or blob) read or written: bounds the memory one row can take.
MAX_VALUE_BYTES = 256 << 20
#: SQLite VM steps any one call of the store may take (each call, transaction, snapshot and
#: inserted row starts afresh): this many, plus _STEPS_PER_BYTE per byte of the database (the
#: heaviest query here, ``PRAGMA integrity_check``, takes ~55 steps per row, a row is >= 8 bytes,
#: and the rows a transaction writes grow the file), so work on a legitimate file always
#: finishes, and a query on a hostile file stops (SQLite runs ~10^8 steps a second).
_BASE_STEPS = 1_000_000_000
_STEPS_PER_BYTE = 32
_STEPS_PER_CHECK = 100_000


class StepBudget:
    """Stops the connection's work after its budget of VM steps since the last :meth:`start`
    (called as each call of the store begins; SQLite's progress handler counts the steps). A
    trace callback would mark each statement exactly, but costs ~30 us per statement (it
    expands the statement's parameters, a vector's bytes as hex), tripling the cost of inserts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.used = 0
        self.exceeded = False
        self.limit = self._limit()

    def _limit(self) -> int:
        size = 0
        for name in (DB_NAME, f"{DB_NAME}-wal"):
            with suppress(OSError):
                size += os.stat(self.path.parent / name).st_size
        return _BASE_STEPS + _STEPS_PER_BYTE * size

    def install(self, conn: sqlite3.Connection) -> None:
        conn.set_progress_handler(self.step, _STEPS_PER_CHECK)

    def start(self) -> None:
        self.used = 0  # (``exceeded`` stays set until the error is reported: see ``damaged``)

    def step(self) -> int:
        self.used += _STEPS_PER_CHECK
        if self.used > self.limit:
            self.limit = self._limit()  # the file may have grown since
            if self.used > self.limit:
                self.exceeded = True
                return 1  # SQLite interrupts the statement
        return 0


def check_files(db: Path, readonly: bool) -> None:
        """The database and SQLite's files beside it (journal, WAL, shared memory) are regular
        files or absent: SQLite writes to them even for readers, so a planted link is refused."""
        if readonly and not db.exists() and not db.is_symlink():
            raise CollectionError(f"metadata file missing: {db}")
        for name in SQLITE_FILES:
            path = db.parent / name
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(mode):
                what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
                raise CollectionError(
                    f"{path} is {what}; a collection's metadata files must be regular files of its "
                    "own. Remove it (a link) or restore the file from a backup")
