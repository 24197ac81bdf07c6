"""The OCR stage of ingest: images' text read on worker threads while ingest embeds, then
committed as ``ocr`` text items linked to their images.

Flow::

    image committed (item id, path) -> submit() -> worker thread: safe decode -> OCR engine
        -> OcrResult -> drain() (ingest's thread): embed the text (windowed like captions)
        -> one transaction: an ``ocr`` item (+ windows) per image with text, an OCR-run row per
           image read (with or without text) -> text index

An image is read once: the run rows say which images were read, so a later ``index --ocr``
reads only new or changed files and back-fills the images indexed before OCR was on. A file
that cannot be read now is skipped with a reason and tried again next time; so is an image
outside the OCR budget (:mod:`crossmodal_rag.ingestion.ocr_budget`: thinner than 8 pixels or more
elongated than 32:1), refused before the engine allocates anything.

OCR (onnxruntime) and the encoder (torch) each use their own threads, so the OCR of one batch
overlaps the decoding and embedding of the next; ``drain`` commits whatever is finished after
each image batch, and ``finish`` waits for the rest.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import ImageDecodeError
from ..progress import tqdm
from ..safe_io import MAX_IMAGE_BYTES
from ..store import ocr as ocr_sql
from .images import DEFAULT_MAX_IMAGE_PIXELS, load_image
from .ocr import OcrEngine, OcrResult, OcrSettings, create_ocr_engine
from .ocr_budget import OcrInputError
from .sources import Problem

if TYPE_CHECKING:
    from ..store.metadata import MetadataStore

__all__ = ["OCR_META_KEY", "OCR_ORIGIN_PREFIX", "OcrReport", "OcrStage", "OcrStore", "remember_settings",
           "remembered_settings", "stage_for"]

logger = logging.getLogger(__name__)

#: ``origin`` of an ``ocr`` item: this prefix and the engine's name.
OCR_ORIGIN_PREFIX = "ocr:"

# (item vector, [(window text, vector), ...]) of each text, as the runner's embed_windows gives them
EmbedWindows = Callable[[list[str]], dict[str, tuple[np.ndarray, list[tuple[str, np.ndarray]]]]]
# the collection's apply(): mirror committed rows in the in-memory indexes
Apply = Callable[[dict[str, tuple[np.ndarray, np.ndarray]], list[int]], None]


class OcrTarget(Protocol):
    """What :func:`stage_for` needs of the collection (:class:`crossmodal_rag.Collection`)."""

    store: MetadataStore  # the commit log, where the OCR setting is remembered

    def apply(self, added: dict[str, tuple[np.ndarray, np.ndarray]], removed: list[int]) -> None: ...


class OcrStore(Protocol):
    """What the stage needs of the metadata store (:class:`~crossmodal_rag.store.metadata.MetadataStore`)."""

    def transaction(self) -> AbstractContextManager[Any]: ...

    def insert_item(self, kind: str, vector: np.ndarray, **fields: Any) -> int: ...


@dataclass
class OcrReport:
    """What the OCR stage did in one ingest."""

    images_read: int = 0  # images OCR'd (with or without text)
    texts_added: int = 0  # images with text: one ``ocr`` item each
    lines: int = 0  # recognised lines kept
    skipped: list[Problem] = field(default_factory=list)  # unreadable now; tried again next run
    seconds: float = 0.0  # OCR time summed over workers

    def to_dict(self) -> dict[str, Any]:
        return {"images_read": self.images_read, "texts_added": self.texts_added,
                "lines": self.lines, "skipped": [p.to_dict() for p in self.skipped],
                "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class _Done:
    item_id: int
    path: str
    result: OcrResult | None  # None: failed (``error`` says why)
    error: str | None
    seconds: float


class OcrStage:
    """Runs an :class:`OcrEngine` over committed images on worker threads; commits the text."""

    def __init__(self, engine: OcrEngine, store: OcrStore, embed_windows: EmbedWindows,
                 apply: Apply, *, workers: int = 1, commit_every: int = 16,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES,
                 progress: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"OCR workers must be >= 1, got {workers}")
        if hasattr(engine, "load"):
            engine.load()  # a missing engine is an error now, not after the images are embedded
        self.engine = engine
        self.store = store
        self.embed_windows = embed_windows
        self.apply = apply
        self.commit_every = max(1, commit_every)
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes
        self.report = OcrReport()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ocr")
        self._pending: deque[Future[_Done]] = deque()
        self._queued: set[int] = set()
        self._bar = tqdm(total=0, desc="ocr", unit=" img", disable=not progress, leave=False)

    # -- producer side (ingest's thread) ---------------------------------------------------
    def submit(self, item_id: int, path: str | Path) -> None:
        """Queue an image item for reading (once per item per run)."""
        if item_id in self._queued:
            return
        self._queued.add(item_id)
        self._pending.append(self._pool.submit(self._read, item_id, str(path)))
        self._bar.total += 1
        self._bar.refresh()

    def backfill(self) -> int:
        """Queue every stored image that was never read; returns how many."""
        todo = [(i, p) for i, p in ocr_sql.ocr_pending(self.store) if i not in self._queued]
        for item_id, path in todo:
            self.submit(item_id, path)
        return len(todo)

    def _read(self, item_id: int, path: str) -> _Done:
        t = time.perf_counter()
        try:
            decoded = load_image(path, max_pixels=self.max_pixels, max_bytes=self.max_bytes,
                                 max_aspect_ratio=None)  # unpadded: the engine bounds its own input
            result = self.engine.read(decoded.image, original_size=(decoded.width, decoded.height))
            return _Done(item_id, path, result, None, time.perf_counter() - t)
        except ImageDecodeError as e:
            return _Done(item_id, path, None, e.reason, time.perf_counter() - t)
        except OcrInputError as e:  # outside the OCR budget (too thin, too elongated)
            return _Done(item_id, path, None, str(e), time.perf_counter() - t)
        except Exception as e:  # an engine failure on one image must not stop the ingest
            if isinstance(e, ImportError):
                raise
            reason = f"OCR failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            return _Done(item_id, path, None, reason, time.perf_counter() - t)

    # -- consumer side (ingest's thread) ---------------------------------------------------
    def drain(self, wait: bool = False) -> None:
        """Commit the finished results (all of them, waiting, when ``wait``), in batches."""
        batch: list[_Done] = []
        while self._pending and (wait or self._pending[0].done()):
            batch.append(self._pending.popleft().result())  # an ImportError surfaces here
            if len(batch) >= self.commit_every:
                self._commit(batch)
                batch = []
        if batch:
            self._commit(batch)

    def finish(self) -> OcrReport:
        """Wait for every queued image, commit, stop the workers; the report."""
        try:
            self.drain(wait=True)
        finally:
            self.close()
        return self.report

    def close(self) -> None:
        for f in self._pending:
            f.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._bar.close()

    def _commit(self, batch: list[_Done]) -> None:
        ok = [d for d in batch if d.result is not None]
        for d in batch:
            self.report.seconds += d.seconds
            if d.error is not None:
                self.report.skipped.append(Problem(d.path, d.error))
                logger.debug("no OCR for %s: %s", d.path, d.error)
        texts = list(dict.fromkeys(d.result.text for d in ok if d.result.text))
        vectors = self.embed_windows(texts) if texts else {}
        added: list[tuple[int, np.ndarray]] = []
        with self.store.transaction():
            for d in ok:
                result = d.result
                if result.text:
                    first, rest = vectors[result.text]
                    oid = self.store.insert_item(
                        "ocr", first, parent_id=d.item_id, text=result.text,
                        origin=OCR_ORIGIN_PREFIX + result.engine, extra={"ocr": result.to_dict()})
                    added.append((oid, first))
                    for text, vec in rest:
                        wid = self.store.insert_item("window", vec, parent_id=oid, text=text)
                        added.append((wid, vec))
                ocr_sql.record_ocr_run(self.store, d.item_id, result.engine, len(result.lines))
        if added:
            self.apply({"text": (np.asarray([i for i, _ in added], np.int64),
                                 np.stack([v for _, v in added]))}, [])
        for d in ok:
            self.report.images_read += 1
            self.report.lines += len(d.result.lines)
            self.report.texts_added += bool(d.result.text)
        self._bar.update(len(batch))


# -- the collection's OCR setting, remembered in its metadata ------------------------------------
#: Meta key of the OCR settings later ingests use (absent: OCR off).
OCR_META_KEY = "ocr_settings"


def remembered_settings(store: Any) -> OcrSettings | None:
    """The OCR settings a collection's ingests use, or None when OCR is off for it."""
    raw = store.get_meta(OCR_META_KEY)
    if not raw:
        return None
    try:
        return OcrSettings.from_dict(json.loads(raw))
    except (ValueError, TypeError) as e:
        logger.warning("ignoring the collection's stored OCR settings (%s); OCR is off until "
                       "`index --ocr` stores new ones", e)
        return None


def remember_settings(store: Any, settings: OcrSettings | None) -> None:
    """Turn OCR on (with ``settings``) or off (None) for the collection's later ingests."""
    store.put_meta(OCR_META_KEY, None if settings is None else
                   json.dumps(settings.to_dict(), sort_keys=True))


def stage_for(collection: OcrTarget, enabled: bool | None, engine: str | None, workers: int,
              embed_windows: EmbedWindows, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
              max_bytes: int = MAX_IMAGE_BYTES, progress: bool = False) -> OcrStage | None:
    """The OCR stage of one ingest, or None when OCR is off.

    ``enabled``: True turns OCR on for this collection (remembered, so later ingests read
    images too, and the images indexed before are read now), False turns it off (remembered),
    None does what the collection remembers. ``engine`` overrides the remembered engine.
    """
    store = collection.store
    settings = remembered_settings(store)
    if enabled is False:
        if settings is not None:
            remember_settings(store, None)
        return None
    if enabled is None and settings is None:
        return None
    if engine is not None:
        settings = OcrSettings(**{**(settings.to_dict() if settings else {}), "engine": engine})
    settings = settings or OcrSettings()
    stage = OcrStage(create_ocr_engine(settings), store, embed_windows, collection.apply,
                     workers=workers, max_pixels=max_pixels, max_bytes=max_bytes, progress=progress)
    if settings != remembered_settings(store):  # only once the engine loaded
        remember_settings(store, settings)
    return stage
