"""Ingest: read a source, decode images in worker processes, embed in batches, commit.

Stages, named for what flows through them::

    read_source -> records -> (stat: skip unchanged files) -> DataLoader workers: read bytes,
    hash, decode, preprocess -> batches of pixels -> encoder -> SQLite transaction -> indexes

Each batch is one SQLite transaction, so a kill loses at most the batch in flight, and a re-run
resumes: files whose path, size and modification time are already recorded are skipped without
being read, and byte-identical files are stored once (SHA-256 of the contents).

Where the vectors come from is an :class:`Embedder`: by default this process (DataLoader workers
decode, the collection's encoder embeds each batch as it is committed);
:mod:`crossmodal_rag.ingestion.distributed` computes them on a Ray cluster beforehand. Either way the same
commit code runs, in source order, so the ids and metadata are the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .._phases import phase
from ..errors import ImageDecodeError
from ..progress import tqdm
from ..safe_io import MAX_IMAGE_BYTES, open_regular, read_capped
from ..search.calibration import write_calibration
from .capture import read_capture
from .capture_stage import backfill_captures, header_capture, placed, prune_missing
from .images import DEFAULT_MAX_IMAGE_PIXELS, decode_image
from .ocr_stage import OcrStage, stage_for
from .sources import ImageRecord, Problem, TextRecord, read_source

if TYPE_CHECKING:
    from ..encoders import ClipEncoder
    from ..store.manifest import Manifest
    from ..store.metadata import MetadataStore

__all__ = ["DecodeDataset", "Embedder", "IngestReport", "IngestSettings", "IngestTarget", "ingest"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestSettings:
    """How to ingest a source."""

    batch_size: int = 32  # images per encoder batch (and per SQLite transaction)
    workers: int | None = None  # decode processes; None = 1 when there is enough work, else 0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # refuse images declaring more pixels
    max_image_bytes: int = MAX_IMAGE_BYTES  # refuse image files larger than this
    image_root: str | None = None  # manifest/COCO image paths are relative to this folder
    allow_outside_root: bool = False  # accept manifest paths outside the root
    progress: bool = False  # show a progress bar on stderr
    ocr: bool | None = None  # read text in images: True/False (remembered), None: as remembered
    ocr_engine: str | None = None  # OCR engine (crossmodal_rag.ingestion.ocr.list_ocr_engines()); None: as remembered
    ocr_workers: int = 1  # images read at once (threads, one onnxruntime thread each)
    keep_missing: bool = False  # a folder source: keep the items of recorded files that are gone

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1, got {self.max_image_pixels}")
        if self.max_image_bytes < 1:
            raise ValueError(f"max_image_bytes must be >= 1, got {self.max_image_bytes}")
        if self.ocr_workers < 1:
            raise ValueError(f"ocr_workers must be >= 1, got {self.ocr_workers}")


@dataclass
class IngestReport:
    """What an ingest run did."""

    source: str
    images_added: int = 0
    captions_added: int = 0
    captions_removed: int = 0
    passages_added: int = 0
    unchanged: int = 0  # files skipped because path, size and mtime were already recorded
    duplicates: int = 0  # files whose contents were already stored under another path
    replaced: int = 0  # files whose contents changed since the last run
    skipped: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)  # decode wait vs encode vs write
    ocr: dict[str, Any] | None = None  # what OCR did (OcrReport.to_dict()); None: OCR was off
    pruned: int = 0  # recorded files under the folder that were gone, forgotten
    backfilled: int = 0  # older images whose capture metadata was read from their headers

    @property
    def indexed_anything(self) -> bool:
        return bool(self.images_added or self.captions_added or self.passages_added
                    or self.unchanged or self.duplicates)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [p.to_dict() for p in self.skipped]
        return d

    def summary(self) -> str:
        parts = [f"{self.images_added} images", f"{self.captions_added} captions",
                 f"{self.passages_added} passages added"]
        tail = [f"{self.unchanged} unchanged", f"{self.duplicates} duplicates",
                f"{self.replaced} changed", f"{len(self.skipped)} skipped"]
        if self.ocr is not None:
            parts.append(f"{self.ocr['texts_added']} texts read in images")
        if self.pruned:
            tail.append(f"{self.pruned} gone (pruned)")
        if self.backfilled:
            tail.append(f"{self.backfilled} back-filled")
        return f"{', '.join(parts)}; {', '.join(tail)} in {self.seconds:.1f}s"


# -- decode stage (runs in DataLoader workers) ----------------------------------------------
class DecodeDataset(Dataset):
    """Image files -> dicts of ``i``, ``pixels`` (``transform`` of the decoded image) and the
    file's ``size``, ``mtime_ns``, ``sha256``, ``width``, ``height``, ``format``; or ``error``
    (a one-line reason). Runs in DataLoader workers (and :mod:`crossmodal_rag.ingestion.distributed`'s)."""

    def __init__(self, paths: list[Path], transform: Any, max_pixels: int,
                 max_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.paths = paths
        self.transform = transform
        self.max_pixels = max_pixels
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        out: dict[str, Any] = {"i": i, "pixels": None, "error": None}
        try:
            # only a regular file (a FIFO named x.jpg would block here, holding the write lock),
            # and no more than max_bytes of it (a link to /dev/zero never ends)
            with open_regular(path, max_bytes=self.max_bytes, what="image file") as f:
                st = os.fstat(f.fileno())
                data = read_capped(f, path, self.max_bytes, "image file")
            out.update(size=len(data), mtime_ns=st.st_mtime_ns, sha256=hashlib.sha256(data).hexdigest())
            decoded = decode_image(data, str(path), max_pixels=self.max_pixels)
            out["pixels"] = self.transform(decoded.image)
            out.update(width=decoded.width, height=decoded.height, format=decoded.format)
            out["capture"] = read_capture(data, str(path), mtime=st.st_mtime_ns / 1e9).to_dict()
        except ImageDecodeError as e:
            out["error"] = e.reason
        except FileNotFoundError:
            out["error"] = "no such file"
        except IsADirectoryError:
            out["error"] = "is a directory, not an image file"
        except OSError as e:
            out["error"] = f"cannot read file: {e.strerror or e}"
        except Exception as e:  # a broken file must never stop the batch
            out["error"] = f"cannot preprocess image: {type(e).__name__}: {e}"
        return out


def _collate(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch


def _batches(paths: list[Path], transform: Any, settings: IngestSettings) -> Iterator[list[dict[str, Any]]]:
    workers = settings.workers
    if workers is None:
        workers = 1 if len(paths) > 2 * settings.batch_size and (os.cpu_count() or 1) > 1 else 0
    dataset = DecodeDataset(paths, transform, settings.max_image_pixels, settings.max_image_bytes)
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=workers,
                        collate_fn=_collate, prefetch_factor=4 if workers else None,
                        persistent_workers=False)
    yield from loader


# -- where vectors go and come from ----------------------------------------------------------
class IngestTarget(Protocol):
    """What ingest writes into: a collection opened writable (:class:`crossmodal_rag.Collection`)."""

    store: MetadataStore  # the commit log
    manifest: Manifest  # read for its ``dim``

    @property
    def encoder(self) -> ClipEncoder: ...

    def require_writable(self) -> None:
        """Raise unless opened for writing."""

    def apply(self, added: dict[str, tuple[np.ndarray, np.ndarray]], removed: list[int]) -> None:
        """Mirror a committed transaction in the in-memory indexes."""

    def persist(self) -> None:
        """Write the changed indexes and the manifest."""

    def remove(self, ids: list[int] | None = None, paths: list[str] | None = None) -> dict[str, Any]:
        """Remove items by id or source path, mirrored in the indexes, and persist."""


class Embedder(Protocol):
    """Gives ingest its vectors. :meth:`prepare` is called once, before anything is committed,
    with what will need vectors; then the commit asks for decoded image batches and vectors."""

    def prepare(self, texts: list[str], images: list[ImageRecord], settings: IngestSettings) -> None:
        """``texts``: passages to embed (images' captions come with ``images``, the files to embed)."""

    def image_batches(self, images: list[ImageRecord],
                      settings: IngestSettings) -> Iterable[list[dict[str, Any]]]:
        """``images`` in order, in batches of ``settings.batch_size``: per image a dict with ``i``
        (its position in ``images``) and either ``error`` (a one-line reason) or ``sha256``,
        ``size``, ``mtime_ns``, ``width``, ``height``, ``format`` and what :meth:`image_vectors`
        needs (``pixels`` ``(3, H, W)``, or a precomputed ``vector`` ``(D,)``)."""

    def image_vectors(self, decoded: list[dict[str, Any]]) -> np.ndarray:
        """Decoded images (dicts from :meth:`image_batches`) -> ``(N, D)`` float32, unit rows."""

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        """Texts (each fits the encoder's context) -> ``(N, D)`` float32, unit rows."""


class _LocalEmbedder:
    """Vectors computed in this process as the commit goes (DataLoader workers decode)."""

    def __init__(self, collection: IngestTarget) -> None:
        self.c = collection

    def prepare(self, texts: list[str], images: list[ImageRecord], settings: IngestSettings) -> None:
        pass

    def image_batches(self, images: list[ImageRecord],
                      settings: IngestSettings) -> Iterable[list[dict[str, Any]]]:
        encoder = self.c.encoder.load()
        return _batches([r.path for r in images], encoder.preprocess, settings)

    def image_vectors(self, decoded: list[dict[str, Any]]) -> np.ndarray:
        # torch tensors, or numpy arrays from an ONNX encoder's preprocessing
        return self.c.encoder.encode_pixels(torch.stack([torch.as_tensor(o["pixels"]) for o in decoded]))

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        return self.c.encoder.encode_texts(texts)


# -- the run ---------------------------------------------------------------------------------
@phase("ingest")
def ingest(collection: IngestTarget, source: str | Path, settings: IngestSettings | None = None, *,
           embedder: Embedder | None = None) -> IngestReport:
    """Add everything in ``source`` to ``collection`` (opened writable); see the module docstring.

    Bad items are skipped and listed in the report; the run goes on. ``embedder``: where the
    vectors come from (default: this process, with the collection's encoder).
    """
    settings = settings or IngestSettings()
    collection.require_writable()
    t0 = time.perf_counter()
    report = IngestReport(source=str(source))
    images: list[ImageRecord] = []
    texts: list[TextRecord] = []
    for rec in read_source(source, image_root=settings.image_root,
                           allow_outside_root=settings.allow_outside_root):
        if isinstance(rec, Problem):
            report.skipped.append(rec)
        elif isinstance(rec, ImageRecord):
            images.append(rec)
        else:
            texts.append(rec)
    writer = _Writer(collection, report, embedder or _LocalEmbedder(collection))
    writer.ocr = stage_for(collection, settings.ocr, settings.ocr_engine, settings.ocr_workers,
                           writer.embed_windows, max_pixels=settings.max_image_pixels,
                           max_bytes=settings.max_image_bytes, progress=settings.progress)
    try:
        if writer.ocr is not None:
            writer.ocr.backfill()  # images indexed before OCR was on, read while new ones embed
        passages = writer.new_passages(texts)
        todo, unchanged = writer.split_unchanged(images)
        writer.embedder.prepare([_passage_text(r) for _, r in passages], todo, settings)
        if passages:
            writer.add_passages(passages, settings)
        if images:
            writer.add_images(todo, unchanged, settings)
        if not settings.keep_missing and Path(source).is_dir():
            report.pruned = len(prune_missing(collection, Path(source)))
        report.backfilled = backfill_captures(collection, progress=settings.progress)
        if writer.ocr is not None:
            ocr_report = writer.ocr.finish()
            report.ocr = ocr_report.to_dict()
            report.skipped.extend(ocr_report.skipped)
    finally:
        if writer.ocr is not None:
            writer.ocr.close()
            writer.dirty = writer.dirty or writer.ocr.report.texts_added > 0
        if writer.dirty:  # score thresholds follow the collection's contents
            write_calibration(collection.store, collection.manifest.dim)
            collection.persist()
    report.seconds = time.perf_counter() - t0
    for p in report.skipped:
        logger.warning("skipped %s: %s", p.item, p.reason)
    return report


class _Writer:
    """Turns decoded batches into committed items and keeps the in-memory indexes in step."""

    def __init__(self, collection: IngestTarget, report: IngestReport, embedder: Embedder) -> None:
        self.c = collection
        self.store = collection.store
        self.report = report
        self.embedder = embedder
        self.dirty = False
        self.ocr: OcrStage | None = None  # reads the text in new images, when OCR is on
        self.timings = report.timings
        for key in ("read_source", "decode_wait", "encode_images", "encode_texts", "write"):
            self.timings.setdefault(key, 0.0)

    def embed_windows(self, texts: list[str]) -> dict[str, tuple[np.ndarray, list[tuple[str, np.ndarray]]]]:
        """text -> (its item vector = first window's, [(window text, vector) of the other windows]).

        Texts longer than the encoder's context are split into overlapping windows, each indexed
        (as a "window" row pointing to its item) so no part of a long text is unsearchable."""
        enc = self.c.encoder
        windows = {t: enc.text_windows(t) for t in texts}
        flat = [w for ws in windows.values() for w in ws]
        vecs = self._encode_texts(flat)
        out, n = {}, 0
        for t, ws in windows.items():
            out[t] = (vecs[n], [(w, vecs[n + j]) for j, w in enumerate(ws[1:], start=1)])
            n += len(ws)
        return out

    def _add_windows(self, item_id: int, rest: list[tuple[str, np.ndarray]],
                     added: list[tuple[int, np.ndarray]]) -> None:
        for text, vec in rest:
            wid = self.store.insert_item("window", vec, parent_id=item_id, text=text)
            added.append((wid, vec))

    def _encode_texts(self, texts: list[str]) -> np.ndarray:
        t = time.perf_counter()
        out = self.embedder.text_vectors(texts) if texts else np.zeros((0, self.c.manifest.dim), np.float32)
        self.timings["encode_texts"] += time.perf_counter() - t
        return out

    # -- passages --------------------------------------------------------------------------
    def new_passages(self, texts: list[TextRecord]) -> list[tuple[str, TextRecord]]:
        """(sha, record) of the passages not stored yet; the others count as duplicates."""
        seen: set[str] = set()
        new: list[tuple[str, TextRecord]] = []
        for rec in texts:
            sha = hashlib.sha256(json.dumps([rec.title, rec.text]).encode()).hexdigest()
            if sha in seen or self.store.item_by_sha("passage", sha) is not None:
                self.report.duplicates += 1
                continue
            seen.add(sha)
            new.append((sha, rec))
        return new

    def add_passages(self, new: list[tuple[str, TextRecord]], settings: IngestSettings) -> None:
        bar = _bar(len(new), "passages", settings.progress)
        step = max(settings.batch_size, 64)
        for start in range(0, len(new), step):
            chunk = new[start : start + step]
            embedded = self.embed_windows([_passage_text(r) for _, r in chunk])
            t = time.perf_counter()
            added: list[tuple[int, np.ndarray]] = []
            with self.store.transaction():
                for sha, r in chunk:
                    first, rest = embedded[_passage_text(r)]
                    item_id = self.store.insert_item("passage", first, sha256=sha, text=r.text, title=r.title,
                                                     ext_id=r.ext_id, origin=r.origin, extra=r.extra or None)
                    added.append((item_id, first))
                    self._add_windows(item_id, rest, added)
            self.c.apply({"text": (np.asarray([i for i, _ in added], np.int64),
                                   np.stack([v for _, v in added]))}, [])
            self.timings["write"] += time.perf_counter() - t
            self.dirty = True
            self.report.passages_added += len(chunk)
            bar.update(len(chunk))
        bar.close()

    # -- images ----------------------------------------------------------------------------
    def split_unchanged(
        self, images: list[ImageRecord]
    ) -> tuple[list[ImageRecord], list[tuple[int, ImageRecord]]]:
        """(files to read, (item id, record) of files whose path, size and mtime are recorded)."""
        todo: list[ImageRecord] = []
        unchanged: list[tuple[int, ImageRecord]] = []
        for rec in images:
            entry = self.store.path_entry(str(rec.path))
            if entry is not None:
                try:
                    st = rec.path.stat()
                except OSError:
                    st = None
                if st is not None and entry[1] == st.st_size and entry[2] == st.st_mtime_ns:
                    unchanged.append((entry[0], rec))
                    continue
            todo.append(rec)
        return todo, unchanged

    def add_images(self, todo: list[ImageRecord], unchanged: list[tuple[int, ImageRecord]],
                   settings: IngestSettings) -> None:
        self.report.unchanged += len(unchanged)
        for start in range(0, len(unchanged), 256):
            self._commit([], [(item_id, rec) for item_id, rec in unchanged[start : start + 256]])
        if not todo:
            return
        bar = _bar(len(todo), "images", settings.progress)
        t = time.perf_counter()
        for batch in self.embedder.image_batches(todo, settings):
            self.timings["decode_wait"] += time.perf_counter() - t
            decoded = []
            for out in batch:
                rec = todo[out["i"]]
                if out["error"]:
                    self.report.skipped.append(Problem(str(rec.path), out["error"]))
                else:
                    decoded.append((rec, out))
            self._commit(decoded, [])
            bar.update(len(batch))
            t = time.perf_counter()
        bar.close()

    def _commit(self, decoded: list[tuple[ImageRecord, dict[str, Any]]],
                known: list[tuple[int, ImageRecord]]) -> None:
        """One transaction: new images (decoded) and caption updates for known ones."""
        store = self.store
        # Which decoded files are new contents? (sha not stored and not earlier in this batch)
        new: list[tuple[ImageRecord, dict[str, Any]]] = []
        batch_sha: dict[str, ImageRecord] = {}
        links: list[tuple[ImageRecord, dict[str, Any], int | None]] = []
        for rec, out in decoded:
            existing = store.item_by_sha("image", out["sha256"])
            if existing is None and out["sha256"] not in batch_sha:
                batch_sha[out["sha256"]] = rec
                new.append((rec, out))
            else:
                links.append((rec, out, existing))
        image_vecs = np.zeros((0, self.c.manifest.dim), np.float32)
        # capture metadata: read by the decode workers, else (Ray) from the file's header here
        captures = placed([o["capture"] if "capture" in o else header_capture(rec.path) for rec, o in new])
        if new:
            t = time.perf_counter()
            image_vecs = self.embedder.image_vectors([o for _, o in new])
            self.timings["encode_images"] += time.perf_counter() - t
        # Captions to embed: for new images all of them; for known ones only the unseen ones.
        # (stored item id, or the sha of an image new in this batch; origin; caption text)
        caption_jobs: list[tuple[int | str, str, str]] = []
        for rec, out in new:
            caption_jobs.extend((out["sha256"], rec.origin, c) for c in rec.captions)
        known_caps: dict[int, dict[str, tuple[int, str | None]]] = {}
        for rec, out, existing in links:
            if existing is None:  # same contents as an image new in this batch
                caption_jobs.extend((out["sha256"], rec.origin, c) for c in rec.captions)
        for item_id, rec in known + [(e, r) for r, _, e in links if e is not None]:
            caps = known_caps.setdefault(item_id, store.captions_of(item_id))
            caption_jobs.extend((item_id, rec.origin, c) for c in rec.captions if c not in caps)
        unique_texts = list(dict.fromkeys(c for _, _, c in caption_jobs))
        text_vecs = self.embed_windows(unique_texts)

        t = time.perf_counter()
        added_images: list[tuple[int, np.ndarray]] = []
        added_texts: list[tuple[int, np.ndarray]] = []
        removed: list[int] = []
        with store.transaction():
            new_ids: dict[str, int] = {}
            for (rec, out), vec in zip(new, image_vecs, strict=True):
                removed += self._unlink_path(rec, out["sha256"])
                item_id = store.insert_item(
                    "image", vec, sha256=out["sha256"], width=out["width"], height=out["height"],
                    format=out["format"], size_bytes=out["size"], origin=rec.origin or None,
                    extra=rec.extra or None)
                new_ids[out["sha256"]] = item_id
                store.set_path(str(rec.path), item_id, out["size"], out["mtime_ns"])
                added_images.append((item_id, vec))
                self.report.images_added += 1
            store.write_captures((new_ids[o["sha256"]], cap) for (_, o), cap in zip(new, captures, strict=True))
            for rec, out, existing in links:
                item_id = existing if existing is not None else new_ids[out["sha256"]]
                previous = store.path_entry(str(rec.path))
                if previous is None or previous[0] != item_id:
                    removed += self._unlink_path(rec, out["sha256"])
                    self.report.duplicates += 1
                store.set_path(str(rec.path), item_id, out["size"], out["mtime_ns"])
            written: set[tuple[int, str]] = set()
            for key, origin, text in caption_jobs:
                owner = key if isinstance(key, int) else new_ids[key]
                if (owner, text) in written:
                    continue
                written.add((owner, text))
                first, rest = text_vecs[text]
                cid = store.insert_item("caption", first, parent_id=owner, text=text,
                                        origin=origin or None)
                added_texts.append((cid, first))
                self._add_windows(cid, rest, added_texts)
                self.report.captions_added += 1
            # Captions that came from the same caption file / manifest and are gone from it.
            for item_id, rec in known:
                if not rec.origin:
                    continue
                stale = [cid for text, (cid, origin) in known_caps[item_id].items()
                         if origin == rec.origin and text not in rec.captions]
                if stale:
                    removed += store.delete_items(stale)
                    self.report.captions_removed += len(stale)
        added: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, rows in (("image", added_images), ("text", added_texts)):
            if rows:
                added[name] = (np.asarray([r[0] for r in rows], np.int64), np.stack([r[1] for r in rows]))
        self.c.apply(added, removed)
        self.timings["write"] += time.perf_counter() - t
        if added or removed or decoded:
            self.dirty = True
        if self.ocr is not None:
            for rec, out in new:
                self.ocr.submit(new_ids[out["sha256"]], rec.path)
            self.ocr.drain()  # commit the text of the images read meanwhile

    def _unlink_path(self, rec: ImageRecord, sha: str) -> list[int]:
        """The file at rec.path now has other contents: drop its old item if nothing else uses it."""
        previous = self.store.path_entry(str(rec.path))
        if previous is None:
            return []
        old_id = previous[0]
        if self.store.item_by_sha("image", sha) == old_id:
            return []
        self.store.forget_path(str(rec.path))
        self.report.replaced += 1
        if self.store.paths_of(old_id):
            return []
        return self.store.delete_items([old_id])


def _passage_text(rec: TextRecord) -> str:
    return f"{rec.title}. {rec.text}" if rec.title else rec.text


def _bar(total: int, unit: str, enabled: bool) -> tqdm:
    return tqdm(total=total, unit=f" {unit}", disable=not enabled or total == 0, file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


