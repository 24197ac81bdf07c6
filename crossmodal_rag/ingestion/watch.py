"""``index --watch DIR``: a collection kept in step with its folder.

    poll the folder (names, sizes, modification times of images and .txt captions; no file read)
    -> a change seen -> wait until the folder holds still for ``debounce`` seconds (files being
       copied in) -> one ordinary ingest of the folder: new and changed files embedded, files that
       are gone pruned, a moved file linked to its stored image by its contents (not embedded
       again), captions re-read -> poll again

Every step is the ordinary ingest, so a kill at any moment leaves the collection as a killed
``index`` does (each batch one transaction; the next run resumes), and the next ``--watch``
starts with a catch-up ingest. Polling needs nothing from the operating system (inotify,
FSEvents) and works on network shares; a folder of 10,000 photos is listed in tens of
milliseconds (benchmarks/RESULTS.md), so a new photo is searchable within ``interval`` +
``debounce`` + its ingest.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .images import IMAGE_EXTENSIONS

if TYPE_CHECKING:
    from .runner import IngestReport, IngestSettings, IngestTarget

__all__ = ["WatchSettings", "folder_state", "watch"]

logger = logging.getLogger(__name__)

Snapshot = dict[str, tuple[int, int]]  # path -> (size, mtime_ns)


@dataclass(frozen=True)
class WatchSettings:
    """How often the folder is looked at."""

    interval: float = 1.0  # seconds between two looks at the folder
    debounce: float = 1.0  # a change is ingested once the folder held still this long

    def __post_init__(self) -> None:
        if not self.interval > 0 or not self.debounce >= 0:
            raise ValueError(f"interval must be > 0 and debounce >= 0, got {self.interval}, {self.debounce}")


def folder_state(folder: Path) -> Snapshot:
    """Every image file and ``.txt`` caption under ``folder`` (hidden folders left out, links
    not followed): path -> (size, modification time in ns)."""
    out: Snapshot = {}
    wanted = set(IMAGE_EXTENSIONS) | {".txt"}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if os.path.splitext(name)[1].lower() not in wanted:
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:  # gone between the listing and the stat
                continue
            out[path] = (st.st_size, st.st_mtime_ns)
    return out


def watch(target: IngestTarget, folder: str | Path, settings: IngestSettings,
          watch_settings: WatchSettings | None = None, *, stop: threading.Event | None = None,
          on_ingest: Callable[[IngestReport], None] | None = None) -> int:
    """Keep ``target`` (a collection opened writable) in step with ``folder`` until ``stop`` is
    set (or KeyboardInterrupt); ``on_ingest`` gets each ingest's report. Returns the number of
    ingests run (the first, a catch-up, included)."""
    from .runner import ingest

    ws = watch_settings or WatchSettings()
    stop = stop or threading.Event()
    root = Path(folder).expanduser().resolve()
    runs = 0
    seen: Snapshot | None = None
    while not stop.is_set():
        now = folder_state(root)
        if seen is not None and now == seen:
            stop.wait(ws.interval)
            continue
        if seen is not None:  # something changed: wait for the folder to hold still
            while not stop.wait(ws.debounce):
                later = folder_state(root)
                if later == now:
                    break
                now = later
            if stop.is_set():
                break
        report = ingest(target, root, settings)
        runs += 1
        seen = now
        logger.info("watch %s: %s", root, report.summary())
        if on_ingest is not None:
            on_ingest(report)
    return runs
