"""Phase markers: which write operation a process is in, for crash trials and debugging.

The write operations (``create``, ``ingest``, ``remove``, ``reindex``, the ``persist`` they end
with, and ``create.folder``: a new collection's folder from its staging to its rename) log their start and end at DEBUG level. With ``CROSSMODAL_RAG_PHASE_FILE=PATH`` set, each
marker is also appended to ``PATH`` as one line ``start|end|abort PHASE PID UNIX_TIME``, by a
single ``write(2)`` on an ``O_APPEND`` file, so a SIGKILL never leaves half a line and the last
lines of the file say which phases the process was in when it was killed
(``benchmarks/crash_trials.py`` reads them).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["PHASE_FILE_ENV", "mark", "phase"]

logger = logging.getLogger(__name__)

PHASE_FILE_ENV = "CROSSMODAL_RAG_PHASE_FILE"


def mark(event: str, name: str) -> None:
    """Record ``event`` (``start``, ``end`` or ``abort``) of phase ``name``."""
    logger.debug("phase %s: %s", name, event)
    path = os.environ.get(PHASE_FILE_ENV)
    if not path:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{event} {name} {os.getpid()} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark a phase around a block, or a function (``@phase("remove")``)."""
    mark("start", name)
    try:
        yield
    except BaseException:
        mark("abort", name)
        raise
    mark("end", name)
