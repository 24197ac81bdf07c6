"""The capture stage of ingest: capture metadata placed and stored, old images back-filled, files
that are gone pruned.

- New images: the decode workers read each file's capture metadata from the bytes they already
  hold (:func:`.capture.read_capture`); :func:`placed` adds the place names of the GPS
  coordinates (:mod:`.places`, one k-d tree query per batch) before the batch commits.
- Back-fill (:func:`backfill_captures`): images indexed before capture metadata existed (schema
  version 5) get it on the next plain ``index`` run, from their headers only (no pixel is
  decoded, nothing is embedded again), with a progress bar.
- Pruning (:func:`prune_missing`): ``index DIR`` forgets the recorded files under ``DIR`` that no
  longer exist (an image stays while another of its paths exists), unless ``--keep-missing``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import CrossmodalError
from ..progress import tqdm
from ..safe_io import MAX_IMAGE_BYTES, open_regular
from .capture import read_capture_file
from .places import reverse_geocode

if TYPE_CHECKING:
    from ..store.metadata import MetadataStore

__all__ = ["BACKFILL_BATCH", "CaptureTarget", "backfill_captures", "header_capture", "placed", "prune_missing"]

logger = logging.getLogger(__name__)

#: Images whose headers are read and committed per transaction while back-filling.
BACKFILL_BATCH = 512

_geocoder_missing = False  # logged once per process


class CaptureTarget(Protocol):
    """What this stage reads and changes of a collection opened writable (the ingest's target)."""

    store: MetadataStore

    def remove(self, ids: list[int] | None = None, paths: list[str] | None = None) -> dict[str, Any]:
        """Remove items by id or source path, mirrored in the indexes, and persist."""


def placed(captures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``captures`` (dicts of :class:`.capture.Capture` fields) with ``city``, ``region``,
    ``country`` and ``country_name`` added where their coordinates name a place. Without the
    geocoder installed, the coordinates are kept and a warning is logged once."""
    global _geocoder_missing
    todo = [i for i, c in enumerate(captures) if c.get("lat") is not None and c.get("lon") is not None]
    if not todo or _geocoder_missing:
        return captures
    try:
        places = reverse_geocode([(captures[i]["lat"], captures[i]["lon"]) for i in todo])
    except CrossmodalError as e:
        _geocoder_missing = True
        logger.warning("places are not named: %s", e)
        return captures
    out = list(captures)
    for i, place in zip(todo, places, strict=True):
        if place is not None:
            out[i] = {**captures[i], "city": place.city, "region": place.region,
                      "country": place.country, "country_name": place.country_name}
    return out


def backfill_captures(target: CaptureTarget, *, progress: bool = False) -> int:
    """Read the capture metadata of every image that has none yet (headers only), place and store
    it; returns how many images were read. An unreadable file gets an empty row (no date, no
    place) and a logged reason, so it is not read again."""
    store = target.store
    pending = store.captures_pending()
    if not pending:
        return 0
    bar = tqdm(total=len(pending), unit=" headers", desc="capture metadata", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    done = 0
    try:
        for start in range(0, len(pending), BACKFILL_BATCH):
            rows = [(item_id, header_capture(path)) for item_id, path in pending[start:start + BACKFILL_BATCH]]
            filled = placed([r for _, r in rows])
            with store.transaction():
                store.write_captures(zip([i for i, _ in rows], filled, strict=True))
            done += len(rows)
            bar.update(len(rows))
    finally:
        bar.close()
    logger.info("capture metadata back-filled for %d image(s)", done)
    return done


def header_capture(path: str | Path) -> dict[str, Any]:
    """The capture fields of the image file at ``path``, from its header (empty if unreadable)."""
    try:
        with open_regular(path, max_bytes=MAX_IMAGE_BYTES, what="image file") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            return read_capture_file(f, str(path), mtime=mtime).to_dict()
    except (OSError, CrossmodalError) as e:
        logger.info("%s: capture metadata not read: %s", path, str(e)[:160])
        return {}


def prune_missing(target: CaptureTarget, folder: Path) -> list[str]:
    """Forget the recorded files under ``folder`` that are gone (their images are removed unless
    another recorded path still holds them); returns the paths forgotten."""
    root = str(folder.resolve())
    gone = [p for p in target.store.paths_under(root) if not os.path.lexists(p)]
    if gone:
        target.remove(paths=gone)
        logger.info("%d file(s) under %s are gone: forgotten", len(gone), root)
    return gone
