"""Creating a collection folder atomically, and clearing what a killed creation left behind.

A new collection ``NAME`` is built in a hidden sibling folder ``.NAME.creating-<16 hex digits>``
(same parent, so same filesystem) under that folder's own write lock, and renamed to ``NAME``
once its manifest is written: ``NAME`` appears complete or not at all. An existing empty
``NAME`` is replaced by the rename (its permission bits are kept). Where a rename cannot work
(``NAME`` is a mount point, or its parent cannot be written) the collection is built in place,
manifest last.

What a killed creation leaves is recognised and removed, with a warning, by the next creation:

- staging siblings of ``NAME`` whose write lock no process holds;
- in ``NAME`` itself, a creation in place that never wrote its manifest (also one made by a
  version that always created in place).

Only folders holding nothing but the files a creation writes, and whose metadata file holds no
items, count as leftovers. A user's file, or a collection that lost its manifest but whose
metadata holds items, is refused and never deleted.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import sqlite3
import stat
from pathlib import Path

from .._phases import mark
from ..errors import CollectionError, CollectionLockedError
from ..lock import WriteLock
from ..safe_io import fsync_dir
from .manifest import MANIFEST_NAME
from .metadata import DB_NAME

__all__ = ["Creation", "clear_interrupted_creation"]

logger = logging.getLogger(__name__)

_STAGING_SUFFIX = re.compile(r"[0-9a-f]{16}")
_TOP_FILES = frozenset({".lock", DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", f"{DB_NAME}-journal"})
_TMP_MANIFEST = re.compile(rf"\.{re.escape(MANIFEST_NAME)}\..+\.tmp")
_INDEX_FILE = re.compile(r"\.?(image|text)\.\d+(\.[0-9a-f]+)?\.faiss(\.\d+(\.[0-9a-f]+)?\.tmp)?")


def _not_empty(folder: Path) -> CollectionError:
    return CollectionError(
        f"{folder} exists and is not an empty folder; choose a new folder for the collection"
    )


def _holds_rows(db: Path) -> bool:
    """Whether SQLite file ``db`` holds any row outside its ``meta`` table and its virtual tables
    (an empty full-text index keeps bookkeeping rows in its shadow tables; its rows mirror the
    items anyway). An unreadable file counts as holding rows: it is not ours to delete. Call
    under the folder's lock: a plain connection, so commits still in a killed writer's WAL are
    seen (and checkpointed)."""
    try:
        conn = sqlite3.connect(db, timeout=30.0)
        try:
            rows = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall()
            virtual = [n for n, sql in rows if str(sql).lstrip()[:20].upper().startswith("CREATE VIRTUAL")]
            tables = [n for n, _ in rows if n != "meta" and not n.startswith("sqlite_")
                      and not any(n == v or n.startswith(f"{v}_") for v in virtual)]
            return any(
                conn.execute('SELECT EXISTS (SELECT 1 FROM "{}")'.format(t.replace('"', '""'))).fetchone()[0]
                for t in tables
            )
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return True


def _only_creation_files(folder: Path, *, manifest_ok: bool) -> bool:
    """Whether ``folder`` holds only files that creating a collection writes (with
    ``manifest_ok``, up to and including its manifest). Looks at names only: see
    :func:`_is_leftover` for the whole test."""
    index_files = False
    for entry in folder.iterdir():
        name = entry.name
        if entry.is_symlink():
            return False
        if entry.is_file() and (name in _TOP_FILES or _TMP_MANIFEST.fullmatch(name)
                                or (manifest_ok and name == MANIFEST_NAME)):
            continue
        if entry.is_dir() and name == "index":
            for f in entry.iterdir():
                if f.is_symlink() or not f.is_file() or not _INDEX_FILE.fullmatch(f.name):
                    return False
                index_files = True
            continue
        if entry.is_dir() and name == "embeddings":
            for sub in entry.iterdir():
                if sub.is_symlink() or not sub.is_dir() or sub.name not in ("image", "text") \
                        or any(sub.iterdir()):
                    return False
            continue
        return False
    if (folder / DB_NAME).is_file():
        return True
    # killed before the metadata file was made: only the lock and empty folders can be there
    return not index_files and not (folder / MANIFEST_NAME).exists() \
        and not any((folder / n).exists() for n in _TOP_FILES - {".lock"})


def _is_leftover(folder: Path, *, manifest_ok: bool) -> bool:
    """Only creation files, and a metadata file (if any) without items. Call under the lock."""
    if not _only_creation_files(folder, manifest_ok=manifest_ok):
        return False
    db = folder / DB_NAME
    return not db.is_file() or not _holds_rows(db)


def _empty(folder: Path) -> None:
    """Delete what ``_only_creation_files`` accepted, the lock file last."""
    for entry in folder.iterdir():
        if entry.name == ".lock":
            continue
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    (folder / ".lock").unlink(missing_ok=True)


def clear_interrupted_creation(folder: Path) -> None:
    """Make sure ``folder`` is absent or empty: an interrupted creation in it is removed (with a
    warning); anything else is refused with :class:`CollectionError` and left as it is."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise _not_empty(folder)
    if not any(folder.iterdir()):
        return
    if not _only_creation_files(folder, manifest_ok=False):
        raise _not_empty(folder)
    lock = WriteLock(folder)
    lock.acquire()  # refused while a process still writes there
    try:
        if not _only_creation_files(folder, manifest_ok=False):  # look again, under the lock
            raise _not_empty(folder)
        if (folder / DB_NAME).is_file() and _holds_rows(folder / DB_NAME):
            raise CollectionError(
                f"{folder} holds collection metadata with items but no {MANIFEST_NAME} (a damaged "
                "collection?); nothing was deleted. Restore its manifest from a backup, or choose "
                "a new folder for the collection"
            )
        logger.warning("%s held an interrupted creation of a collection (no manifest, no items); "
                       "cleaned it up", folder)
        _empty(folder)
    finally:
        lock.release()


def _staging_siblings(folder: Path) -> list[Path]:
    prefix = f".{folder.name}.creating-"
    if not folder.parent.is_dir():
        return []
    return [p for p in folder.parent.iterdir()
            if p.name.startswith(prefix) and _STAGING_SUFFIX.fullmatch(p.name[len(prefix):])
            and p.is_dir() and not p.is_symlink()]


def remove_stale_staging(folder: Path) -> None:
    """Remove the staging siblings of ``folder`` left by killed creations (unlocked, and holding
    only creation files); ones being built right now hold their lock and are kept."""
    for staging in _staging_siblings(folder):
        if not _only_creation_files(staging, manifest_ok=True):
            logger.debug("kept %s: it holds files a creation does not write", staging)
            continue
        lock = WriteLock(staging)
        try:
            lock.acquire()
        except (CollectionLockedError, FileNotFoundError):  # being built, or just removed
            continue
        try:
            if _is_leftover(staging, manifest_ok=True):
                shutil.rmtree(staging)
                logger.warning("removed %s, left by a creation of %s that was interrupted",
                               staging, folder)
        finally:
            lock.release()


class Creation:
    """Where a new collection for ``folder`` is built (:attr:`target`), locked.

    Write the collection into ``target`` (manifest last), close its metadata store, then call
    :meth:`finish`; on any failure call :meth:`abandon`.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.finished = False
        remove_stale_staging(folder)
        self.staged = not (folder.is_dir() and os.path.ismount(folder))
        if self.staged:
            try:
                self.target, self.lock = self._make_staging()
            except OSError as e:  # e.g. the parent cannot be written
                if not folder.is_dir():
                    raise CollectionError(f"cannot create the collection folder {folder}: {e}") from e
                logger.info("building %s in place (no staging folder beside it: %s)", folder, e)
                self.staged = False
        if not self.staged:
            self.target, self.lock = folder, self._lock_in_place()
        mark("start", "create.folder")

    def _make_staging(self) -> tuple[Path, WriteLock]:
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            staging = self.folder.parent / f".{self.folder.name}.creating-{secrets.token_hex(8)}"
            staging.mkdir()
            lock = WriteLock(staging)
            try:
                lock.acquire()
            except FileNotFoundError:  # another creation's cleanup took it before it was locked
                continue
            return staging, lock
        raise CollectionError(f"could not make a staging folder beside {self.folder}; try again")

    def _lock_in_place(self) -> WriteLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = WriteLock(self.folder)
        lock.acquire()
        if any(p.name != ".lock" for p in self.folder.iterdir()):
            lock.release()
            raise _not_empty(self.folder)
        return lock

    def finish(self, *, fsync: bool) -> None:
        """Move the built collection into place (a rename; nothing to do when built in place)."""
        if not self.staged:
            self.finished = True
            mark("end", "create.folder")
            return
        try:
            if self.folder.is_dir():
                os.chmod(self.target, stat.S_IMODE(self.folder.stat().st_mode))
            os.rename(self.target, self.folder)  # replaces an empty folder, refuses a full one
        except OSError as e:
            if self.folder.exists() and (not self.folder.is_dir() or any(self.folder.iterdir())):
                raise CollectionError(f"{self.folder} was filled by another process while the "
                                      "collection was created; open it, or choose a new folder") from e
            raise CollectionError(f"cannot move the new collection into {self.folder}: {e}") from e
        self.staged = False
        self.target = self.folder
        self.lock.moved_to(self.folder)
        if fsync:
            fsync_dir(self.folder.parent)
        self.finished = True
        mark("end", "create.folder")

    def abandon(self) -> None:
        """Release the lock and remove a staging folder that was not moved into place."""
        if not self.finished:
            mark("abort", "create.folder")
        self.lock.release()
        if self.staged:
            shutil.rmtree(self.target, ignore_errors=True)
