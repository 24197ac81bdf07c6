"""Safe file I/O: reading a file a user named (only a regular file, never more than a cap), and
replacing a file whole (:func:`atomic_write`).

Ingest, queries and importers read paths that come from folders and manifests, that is, from
anyone. A named pipe called ``x.jpg`` would block a plain ``open`` forever (while ingest holds
the collection's write lock), and a symlink to ``/dev/zero`` would be read until memory runs
out. So every such read goes through :func:`open_regular` / :func:`read_regular`:

* symlinks are followed (linking an image to another regular file is legitimate), but the file
  finally reached must be a regular file: checked with ``stat`` before opening (a device is never
  opened) and again with ``fstat`` on the opened descriptor (the path may have been swapped);
* the file is opened with ``O_NONBLOCK``, so a FIFO swapped in at the last moment cannot block;
* its size is checked against the cap before reading, and at most cap + 1 bytes are read, so a
  file that grows while it is read is refused too.

Every file the package replaces (a collection's manifest, index files and float16 shards, the
text space, thumbnails, chat sessions, training checkpoints' pointers and metrics, prefix
checkpoints, joined model files) is written through :func:`atomic_write`::

    bytes -> .NAME.PID.RANDOM.tmp beside NAME (O_CREAT | O_EXCL | O_NOFOLLOW) -> flush, fsync
          -> os.replace(tmp, NAME) -> fsync the folder

so a reader, or the next run after a crash at any point, finds the old file or the new one,
never a mix; a link planted at any name is never written through. A failure inside the block
removes the temporary file and leaves ``NAME`` as it was; a kill leaves at most a ``.tmp`` file
beside it (a collection's own folders are swept of them on the next writable open).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import CrossmodalError

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_JSON_BYTES",
    "MAX_TEXT_FILE_BYTES",
    "FileReadError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_regular",
    "fsync_dir",
    "open_regular",
    "read_capped",
    "read_regular",
    "read_regular_text",
]

#: Largest image file read (512 MiB; a 268-megapixel JPEG is far smaller).
MAX_IMAGE_BYTES = 512 * 1024 * 1024
#: Largest whole JSON document read at once (a COCO captions file, a session): 1 GiB.
MAX_JSON_BYTES = 1024 * 1024 * 1024
#: Largest small text file read whole (a same-stem caption file, a queries file, a draft): 64 MiB.
MAX_TEXT_FILE_BYTES = 64 * 1024 * 1024

_CHUNK = 1 << 20
_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


class FileReadError(CrossmodalError, OSError):
    """A named file is not a regular file, or is larger than the limit; ``reason`` says which.

    An :class:`OSError` (code ``EINVAL`` or ``EFBIG``), so code that handles unreadable files
    handles these too; ``strerror`` is the one-line reason.
    """

    def __init__(self, path: str | os.PathLike[str], reason: str, code: int = errno.EINVAL) -> None:
        super().__init__(code, reason, str(path))
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check(path: str | os.PathLike[str], st: os.stat_result, max_bytes: int | None, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise FileReadError(path, f"is {_kind(st.st_mode)}, not a regular {what}; only regular files are read")
    if max_bytes is not None and st.st_size > max_bytes:
        raise FileReadError(path, f"{what} of {st.st_size} bytes exceeds the limit of {max_bytes} bytes",
                            errno.EFBIG)


def check_regular(path: str | os.PathLike[str], *, max_bytes: int | None = None,
                  what: str = "file") -> os.stat_result:
    """``stat`` of ``path`` (links followed) if it is a regular file of at most ``max_bytes``.

    Raises:
        FileReadError: not a regular file, or too large.
        OSError: the usual reasons (no such file, ...).
    """
    st = os.stat(path)
    _check(path, st, max_bytes, what)
    return st


def open_regular(path: str | os.PathLike[str], *, max_bytes: int | None = None,
                 what: str = "file") -> BinaryIO:
    """Open ``path`` for binary reading if it is (or links to) a regular file of at most ``max_bytes``.

    Raises:
        FileReadError: not a regular file (a FIFO, a device, a directory, ...), or too large.
        OSError: the usual reasons (no such file, permission denied, ...).
    """
    check_regular(path, max_bytes=max_bytes, what=what)  # a device or FIFO is never even opened
    fd = os.open(path, _OPEN_FLAGS)
    try:
        _check(path, os.fstat(fd), max_bytes, what)  # the path may have changed since the stat
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(f: BinaryIO, path: str | os.PathLike[str], max_bytes: int, what: str = "file") -> bytes:
    """The rest of ``f``; raises :class:`FileReadError` once more than ``max_bytes`` arrive."""
    size = os.fstat(f.fileno()).st_size
    data = f.read(min(size, max_bytes))  # one allocation of the expected size
    while True:
        if len(data) > max_bytes:
            break
        more = f.read(min(_CHUNK, max_bytes + 1 - len(data)))
        if not more:
            return data
        data += more  # the file grew since its size was read
    raise FileReadError(path, f"{what} grew past the limit of {max_bytes} bytes while being read",
                        errno.EFBIG)


def read_regular(path: str | os.PathLike[str], *, max_bytes: int, what: str = "file") -> bytes:
    """The contents of the regular file at ``path`` (at most ``max_bytes``); see :func:`open_regular`."""
    with open_regular(path, max_bytes=max_bytes, what=what) as f:
        return read_capped(f, path, max_bytes, what)


def read_regular_text(path: str | os.PathLike[str], *, max_bytes: int = MAX_TEXT_FILE_BYTES,
                      what: str = "file") -> str:
    """:func:`read_regular` decoded as UTF-8 (raises ``UnicodeDecodeError`` if it is not)."""
    return read_regular(Path(path), max_bytes=max_bytes, what=what).decode("utf-8")


# -- replacing a file whole ----------------------------------------------------------------------

_WRITE_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
#: Tries at a fresh temporary name when one is taken (a planted file or link, a stale leftover).
_NAME_TRIES = 16


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename (or a creation) inside folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _create_temp(path: Path, mode: int) -> tuple[int, Path]:
    """A new file beside ``path``, created exclusively and never through a link: a descriptor
    open for writing and its name, ``.NAME.PID.RANDOM.tmp``."""
    for _ in range(_NAME_TRIES):
        tmp = path.with_name(f".{path.name[:200]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _WRITE_FLAGS, mode), tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name beside it after {_NAME_TRIES} tries",
                          str(path))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], *, fsync: bool = True, sync_folder: bool | None = None,
                 mode: int = 0o644) -> Iterator[BinaryIO]:
    """Replace ``path`` whole with what the block writes to the yielded binary file.

    The file is a new temporary one beside ``path`` (see the module docstring); when the block
    ends without an exception it is flushed, fsynced (``fsync``), renamed over ``path`` and the
    folder fsynced (``sync_folder``, default ``fsync``: pass False when the caller fsyncs the
    folder once after several files). An exception inside the block, or a failed write, removes
    the temporary file and leaves ``path`` untouched. ``mode``: the new file's permissions (less
    the umask); ``0o600`` for files only their owner should read.
    """
    path = Path(path)
    fd, tmp = _create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync if sync_folder is None else sync_folder:
        fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True,
                       mode: int = 0o644) -> None:
    """:func:`atomic_write` of ``data``."""
    with atomic_write(path, fsync=fsync, mode=mode) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = True,
                      mode: int = 0o644, encoding: str = "utf-8") -> None:
    """:func:`atomic_write` of ``text``, encoded."""
    atomic_write_bytes(path, text.encode(encoding), fsync=fsync, mode=mode)
