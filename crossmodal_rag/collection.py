"""A collection: a versioned folder holding CLIP embeddings of images and texts, searchable.

Layout of ``DIR``::

    manifest.json           format version, encoder spec, dimension, index type, counts, and the
                            index files that reflect metadata generation N (replaced atomically)
    metadata.sqlite         items, captions, source paths, hashes and vectors (the commit log)
    index/image.N.faiss     FAISS index of image vectors
    index/text.N.faiss      FAISS index of caption and passage vectors
    .lock                   write lock (one writer at a time)

Crash safety: an item is committed when its SQLite transaction commits. Index files are
written under new names and the manifest is switched to them afterwards, so a kill at any point
leaves the last manifest's files intact; on open, any commits newer than the index files are
replayed from SQLite (``reconcile``), so nothing committed is lost.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from ._version import __version__
from .calibration import auto_threshold
from .encoders import DEFAULT_MODEL, ClipEncoder, load_encoder, parse_model_spec
from .errors import CollectionError, EncoderMismatchError, ImageDecodeError, QueryError
from .filters import allowed_ids, parse_where
from .images import DEFAULT_MAX_IMAGE_PIXELS, load_image
from .lock import WriteLock
from .query import combine, parse_query
from .search import Hit, check_target, search_vectors
from .store.manifest import MANIFEST_NAME, Manifest
from .store.metadata import Item, MetadataStore
from .store.vectors import VectorIndex

__all__ = ["CheckReport", "Collection"]

logger = logging.getLogger(__name__)

#: Texts whose embeddings fingerprint the encoder that built a collection.
PROBE_TEXTS = ("a photo of a dog", "a red car parked on a street", "an empty white page")
_PROBE_MIN_COSINE = 0.99
#: Text queries are cut to this many characters (CLIP reads 77 tokens; this is far beyond).
MAX_QUERY_CHARS = 4096
_INDEX_NAMES = ("image", "text")

#: Durability: "full" fsyncs SQLite commits (synchronous=FULL), index files, the manifest and
#: their folder; "normal" fsyncs index files and the manifest but lets SQLite's WAL sync at
#: checkpoints (a power cut may lose the last commits, never consistency); "off" fsyncs
#: nothing (safe against process crashes and kills, not against power loss).
FsyncPolicy = Literal["full", "normal", "off"]
FSYNC_POLICIES = ("full", "normal", "off")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class CheckReport:
    """Result of :meth:`Collection.check`."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes, "counts": self.counts}


class Collection:
    """An open collection. Use :meth:`create` or :meth:`open`; close it (or use ``with``)."""

    def __init__(
        self, folder: Path, manifest: Manifest, store: MetadataStore, *, writable: bool,
        lock: WriteLock | None, model: str, device: str | None, fsync: FsyncPolicy,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.store = store
        self.writable = writable
        self._lock = lock
        self._model = model
        self._device = device
        self._fsync = fsync != "off"
        self._encoder: ClipEncoder | None = None
        self.indexes: dict[str, VectorIndex] = {}

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls, folder: str | Path, model: str = DEFAULT_MODEL, *, index_type: str = "Flat",
        device: str | None = None, fsync: FsyncPolicy = "full",
    ) -> Collection:
        """Create an empty collection in ``folder`` (new or empty) for encoder ``model``.

        Loads the encoder (to learn its dimension and fingerprint it).
        """
        _check_fsync(fsync)
        folder = Path(folder).expanduser().resolve()
        if (folder / MANIFEST_NAME).exists():
            raise CollectionError(f"{folder} already holds a collection; open it instead")
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise CollectionError(
                f"{folder} exists and is not an empty folder; choose a new folder for the collection"
            )
        spec = parse_model_spec(model)
        encoder = load_encoder(spec, device)
        probe = encoder.encode_texts(list(PROBE_TEXTS))
        VectorIndex(encoder.dim, index_type)  # validates the index type before anything is written
        folder.mkdir(parents=True, exist_ok=True)
        lock = WriteLock(folder)
        lock.acquire()
        try:
            store = MetadataStore(folder, fsync=fsync)
            with store.transaction():
                store.set_meta("encoder_probe", json.dumps(probe.round(6).tolist()))
            manifest = Manifest(encoder=str(spec), dim=encoder.dim, index_type=index_type,
                                library_version=__version__, created_at=_now(), updated_at=_now())
            coll = cls(folder, manifest, store, writable=True, lock=lock, model=str(spec),
                       device=device, fsync=fsync)
            coll._encoder = encoder
            coll.indexes = {n: VectorIndex(encoder.dim, index_type) for n in _INDEX_NAMES}
            coll.persist()  # the manifest is written last: it marks the folder as a collection
        except BaseException:
            lock.release()
            raise
        return coll

    @classmethod
    def open(
        cls, folder: str | Path, *, model: str | None = None, writable: bool = False,
        device: str | None = None, fsync: FsyncPolicy = "full",
    ) -> Collection:
        """Open an existing collection.

        Args:
            model: the encoder to use; default the one the collection was built with. Another
                encoder is refused (:class:`EncoderMismatchError`) unless it gives the same
                embeddings.
            writable: take the write lock (refused while another process writes).
        """
        _check_fsync(fsync)
        folder = Path(folder).expanduser().resolve()
        manifest = Manifest.read(folder)
        lock = None
        if writable:
            lock = WriteLock(folder)
            lock.acquire()
        try:
            store = MetadataStore(folder, readonly=not writable, fsync=fsync)
            coll = cls(folder, manifest, store, writable=writable, lock=lock,
                       model=manifest.encoder, device=device, fsync=fsync)
            if model is not None:
                coll._use_model(model)
            coll._load_indexes()
        except BaseException:
            if lock:
                lock.release()
            raise
        return coll

    @classmethod
    def open_or_create(
        cls, folder: str | Path, model: str | None = None, *, index_type: str = "Flat",
        device: str | None = None, fsync: FsyncPolicy = "full",
    ) -> Collection:
        """Open ``folder`` for writing, or create it with ``model`` if it holds no collection."""
        if (Path(folder).expanduser() / MANIFEST_NAME).is_file():
            return cls.open(folder, model=model, writable=True, device=device, fsync=fsync)
        return cls.create(folder, model or DEFAULT_MODEL, index_type=index_type, device=device,
                          fsync=fsync)

    def close(self) -> None:
        self.store.close()
        if self._lock:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Collection({str(self.folder)!r}, encoder={self.manifest.encoder!r})"

    def __len__(self) -> int:
        return sum(len(ix) for ix in self.indexes.values())

    # -- encoder ---------------------------------------------------------------------------
    def _use_model(self, model: str) -> None:
        spec = str(parse_model_spec(model))
        if spec == self.manifest.encoder:
            return
        encoder = load_encoder(spec, self._device)
        self._verify_encoder(encoder, asked=spec)  # raises unless the embeddings match
        logger.warning("encoder %s differs in name from %s but gives the same embeddings",
                       spec, self.manifest.encoder)
        self._model = spec
        self._encoder = encoder

    def _verify_encoder(self, encoder: ClipEncoder, asked: str) -> None:
        hint = (f"{self.folder} was built with {self.manifest.encoder}; search it with that "
                "encoder (leave out --model) or index into a new collection")
        if encoder.dim != self.manifest.dim:
            raise EncoderMismatchError(
                f"encoder {asked} makes {encoder.dim}-d embeddings but {self.folder} holds "
                f"{self.manifest.dim}-d ones. {hint}"
            )
        stored = self.store.get_meta("encoder_probe")
        if stored:
            probe = encoder.encode_texts(list(PROBE_TEXTS))
            cosine = float((probe * np.asarray(json.loads(stored), dtype=np.float32)).sum(1).min())
            if cosine < _PROBE_MIN_COSINE:
                raise EncoderMismatchError(
                    f"encoder {asked} gives different embeddings from the one that built the "
                    f"collection (probe cosine {cosine:.3f}). {hint}"
                )

    def check_compatible(self, other: Collection) -> None:
        """Refuse (``EncoderMismatchError``) unless ``other``'s encoder embeds like ours, so
        vectors from one can query the other (e.g. a separate knowledge collection)."""
        if other.manifest.encoder == self.manifest.encoder and other.manifest.dim == self.manifest.dim:
            return
        self._verify_encoder(other.encoder, asked=f"{other.manifest.encoder} (of {other.folder})")

    @property
    def encoder(self) -> ClipEncoder:
        """The collection's encoder (loaded and fingerprint-checked on first use)."""
        if self._encoder is None:
            encoder = load_encoder(self._model, self._device)
            self._verify_encoder(encoder, asked=self._model)
            self._encoder = encoder
        return self._encoder

    # -- indexes ---------------------------------------------------------------------------
    def _load_indexes(self) -> None:
        m = self.manifest
        stale = m.generation != self.store.generation
        for name in _INDEX_NAMES:
            record = m.files.get(name)
            index = None
            if record is not None:
                try:
                    index = VectorIndex.load(self.folder, record, m.dim, m.index_type, verify_hash=True)
                except CollectionError as e:
                    logger.warning("%s; rebuilding it from the metadata", e)
            stale = stale or index is None
            self.indexes[name] = index or VectorIndex(m.dim, m.index_type)
        if stale:
            added, removed = self.reconcile()
            logger.info("replayed %d additions and %d removals committed after the last index "
                        "write", added, removed)
            if self.writable:
                self.persist()

    def reconcile(self) -> tuple[int, int]:
        """Make the in-memory indexes hold exactly the committed items; returns (added, removed)."""
        with self.store.snapshot():
            return self._reconcile_in_snapshot()

    def _reconcile_in_snapshot(self) -> tuple[int, int]:
        added = removed = 0
        for name in _INDEX_NAMES:
            index = self.indexes[name]
            want, have = self.store.ids(name), index.ids()
            extra = np.setdiff1d(have, want, assume_unique=True)
            missing = np.setdiff1d(want, have, assume_unique=True)
            removed += index.remove(extra)
            for start in range(0, len(missing), 10_000):
                chunk = missing[start : start + 10_000]
                index.add(chunk, self.store.vectors(chunk.tolist(), self.manifest.dim))
            added += len(missing)
        return added, removed

    def persist(self) -> None:
        """Write the indexes under new file names, then switch the manifest to them."""
        self._require_writable()
        gen = self.store.generation
        files = {n: ix.save(self.folder, f"index/{n}.{gen}.faiss", fsync=self._fsync)
                 for n, ix in self.indexes.items()}
        self.manifest = replace(self.manifest, generation=gen, files=files,
                                counts=self.store.counts(), updated_at=_now(),
                                library_version=__version__)
        self.manifest.write(self.folder, fsync=self._fsync)
        keep = {f.path for f in files.values()}
        for stale in (self.folder / "index").glob("*"):
            if f"index/{stale.name}" not in keep:
                stale.unlink(missing_ok=True)

    def _require_writable(self) -> None:
        if not self.writable:
            raise CollectionError(f"{self.folder} is open read-only; open it with writable=True")

    # -- reading ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def info(self) -> dict[str, Any]:
        """The manifest plus live counts."""
        d = self.manifest.to_dict()
        d["path"] = str(self.folder)
        d["counts"] = self.counts()
        d["pending_generations"] = self.store.generation - self.manifest.generation
        return d

    def get(self, ids: int | list[int]) -> list[Item]:
        """Items by id, in the order asked (missing ids are left out)."""
        ids_list = [ids] if isinstance(ids, int) else list(ids)
        found = self.store.get_items(ids_list)
        return [found[i] for i in ids_list if i in found]

    def check(self, *, verify_hash: bool = True) -> CheckReport:
        """Verify that manifest, index files and metadata agree (index ids == metadata ids)."""
        report = CheckReport(ok=True)
        m = self.manifest
        report.problems.extend(self.store.integrity_problems())
        for name in _INDEX_NAMES:
            record = m.files.get(name)
            if record is None:
                report.problems.append(f"manifest lists no {name} index file")
                continue
            try:
                VectorIndex.load(self.folder, record, m.dim, m.index_type, verify_hash=verify_hash)
            except CollectionError as e:
                report.problems.append(str(e))
        pending = self.store.generation - m.generation
        if pending:
            report.notes.append(f"{pending} metadata commit(s) newer than the index files; they "
                                "are replayed from the metadata on open")
        with self.store.snapshot():
            # Commits that landed since this collection was opened (a writer may be running) are
            # taken in first, so the comparison is within one consistent snapshot.
            self._reconcile_in_snapshot()
            for name in _INDEX_NAMES:
                want, have = self.store.ids(name), self.indexes[name].ids()
                if not np.array_equal(want, have):
                    report.problems.append(
                        f"{name} index holds {len(have)} ids, metadata {len(want)}; "
                        f"{len(np.setdiff1d(want, have))} missing, {len(np.setdiff1d(have, want))} extra"
                    )
                    continue
                sample = want[:: max(1, len(want) // 64)][:64]
                if len(sample):
                    stored = self.store.vectors(sample.tolist(), m.dim)
                    indexed = np.stack([self.indexes[name].reconstruct(int(i)) for i in sample])
                    if m.index_type == "Flat" and not np.allclose(stored, indexed, atol=1e-5):
                        report.problems.append(f"{name} index vectors differ from the stored ones")
        report.counts = self.counts()
        report.ok = not report.problems
        return report

    # -- searching -------------------------------------------------------------------------
    def embed_query(
        self, text: str | None = None, image: str | Path | Image.Image | None = None,
        *, plus: list[str] | None = None, minus: list[str] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> np.ndarray:
        """A query embedding ``(D,)`` from a text, an image (path or PIL image), or both.

        Text queries support arithmetic (``"a cat" + "snow" - "indoors"``, ``2:cat``; see
        :mod:`crossmodal_rag.query`); ``plus``/``minus`` add or subtract more texts. The result is
        the normalised weighted sum of the terms' embeddings.
        """
        texts: list[str] = []
        weights: list[float] = []
        if text is not None:
            for term in parse_query(text):
                texts.append(self._clip_query(term.text))
                weights.append(term.weight)
        for extra, sign in ((plus or [], 1.0), (minus or [], -1.0)):
            for t in extra:
                if not t or not str(t).strip():
                    raise QueryError("empty --plus/--minus text")
                texts.append(self._clip_query(" ".join(str(t).split())))
                weights.append(sign)
        vectors = []
        if image is not None:
            if isinstance(image, Image.Image):
                pil = image.convert("RGB")
            else:
                try:
                    pil = load_image(image, max_pixels=max_image_pixels).image
                except ImageDecodeError as e:
                    raise QueryError(f"query image {e.path}: {e.reason}") from e
            vectors.append(self.encoder.encode_images([pil]))
            weights.insert(0, 1.0)
        elif text is None:
            raise QueryError("empty query: give a text to search for, or an image with --image")
        if texts:
            vectors.append(self.encoder.encode_texts(texts))
        stacked = np.concatenate(vectors)
        if len(weights) == 1 and weights[0] == 1.0:
            return stacked[0]
        return combine(stacked, weights)

    def _clip_query(self, text: str) -> str:
        if len(text) > MAX_QUERY_CHARS:
            logger.warning("query of %d characters truncated to %d (the encoder reads at most %d "
                           "tokens)", len(text), MAX_QUERY_CHARS, self.encoder.max_text_tokens)
            return text[:MAX_QUERY_CHARS]
        return text

    def resolve_min_score(self, min_score: float | str | None, *, query_is_image: bool,
                          target: str) -> float | None:
        """A number, ``"auto"`` (the calibrated threshold), or None (no threshold)."""
        if min_score is None or min_score == "":
            return None
        if isinstance(min_score, str):
            if min_score.strip().lower() == "auto":
                return auto_threshold(self, query_is_image, target)
            try:
                return float(min_score)
            except ValueError:
                raise QueryError(f"min score must be a number or 'auto', got {min_score!r}") from None
        return float(min_score)

    def search(
        self, query: str | None = None, *, image: str | Path | Image.Image | None = None,
        k: int = 10, target: str = "images", where: list[str] | str | None = None,
        min_score: float | str | None = None, plus: list[str] | None = None,
        minus: list[str] | None = None,
    ) -> list[Hit]:
        """Search by text (with arithmetic), by image, or both; ``target`` is ``"images"``,
        ``"texts"`` or ``"all"``; ``where`` filters by metadata (:mod:`crossmodal_rag.filters`);
        ``min_score`` drops weaker hits (a number, or ``"auto"`` for the calibrated threshold).

        Example: ``Collection.open("photos").search("a cat on a sofa", k=5)``.
        """
        check_target(target)
        threshold = self.resolve_min_score(min_score, query_is_image=image is not None, target=target)
        vector = self.embed_query(query, image, plus=plus, minus=minus)
        return self.search_vectors(vector[None, :], k=k, target=target, where=where,
                                   min_score=threshold)[0]

    def search_vectors(
        self, vectors: np.ndarray, *, k: int = 10, target: str = "images",
        where: list[str] | str | None = None, min_score: float | None = None,
    ) -> list[list[Hit]]:
        """Search with precomputed query embeddings ``(Q, D)``; one hit list per row."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.shape[1] != self.manifest.dim:
            raise QueryError(f"query vectors are {vectors.shape[1]}-d; this collection is "
                             f"{self.manifest.dim}-d")
        conditions = parse_where(where)
        allowed = allowed_ids(self.store, conditions) if conditions else None
        return search_vectors(self.indexes, self.store, vectors, k, target, allowed, min_score)

    def near_duplicates(self, threshold: float = 0.95) -> list[list[int]]:
        """Groups of image ids whose embeddings have cosine >= ``threshold`` (linked
        transitively), largest groups first. Byte-identical files are already one item."""
        if not -1.0 <= threshold <= 1.0:
            raise QueryError(f"threshold must be between -1 and 1, got {threshold}")
        ids = self.store.ids("image")
        if len(ids) < 2:
            return []
        parent = {int(i): int(i) for i in ids}

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        index = self.indexes["image"].index
        for start in range(0, len(ids), 1024):
            chunk = ids[start : start + 1024]
            vecs = self.store.vectors(chunk.tolist(), self.manifest.dim)
            lims, _, found = index.range_search(vecs, float(threshold) - 1e-6)
            for row, item_id in enumerate(chunk):
                for other in found[lims[row] : lims[row + 1]]:
                    if int(other) != int(item_id):
                        a, b = find(int(item_id)), find(int(other))
                        if a != b:
                            parent[max(a, b)] = min(a, b)
        groups: dict[int, list[int]] = {}
        for i in parent:
            groups.setdefault(find(i), []).append(i)
        return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))

    # -- writing ---------------------------------------------------------------------------
    def add(self, source: str | Path, **settings: Any):  # -> IngestReport
        """Ingest ``source`` (see :func:`crossmodal_rag.ingest.ingest` for the settings)."""
        from .ingest import IngestSettings, ingest

        return ingest(self, source, IngestSettings(**settings))

    def apply(self, added: dict[str, tuple[np.ndarray, np.ndarray]], removed: list[int]) -> None:
        """Mirror a committed metadata transaction in the in-memory indexes."""
        if removed:
            ids = np.asarray(removed, dtype=np.int64)
            for index in self.indexes.values():
                index.remove(ids)
        for name, (ids, vectors) in added.items():
            self.indexes[name].add(ids, vectors)

    def remove(self, ids: list[int] | None = None, paths: list[str] | None = None) -> dict[str, Any]:
        """Remove items by id and/or by source path, then persist.

        Removing a path that is one of several copies of the same image only forgets that path.
        Returns ``{"removed": [ids...], "unknown": [ids or paths not found]}``.
        """
        self._require_writable()
        unknown: list[Any] = []
        with self.store.transaction():
            targets: set[int] = set()
            if ids:
                found = self.store.get_items(ids)
                unknown.extend(i for i in ids if i not in found)
                targets.update(found)
            for p in paths or []:
                key = str(Path(p).expanduser().resolve())
                entry = self.store.path_entry(key)
                if entry is None:
                    unknown.append(p)
                    continue
                self.store.conn.execute("DELETE FROM paths WHERE path = ?", (key,))
                if not self.store.paths_of(entry[0]):
                    targets.add(entry[0])
            gone = self.store.delete_items(sorted(targets))
        self.apply({}, gone)
        self.persist()
        return {"removed": gone, "unknown": unknown}


def _check_fsync(fsync: str) -> None:
    if fsync not in FSYNC_POLICIES:
        raise CollectionError(f"unknown fsync policy {fsync!r}; choose one of {', '.join(FSYNC_POLICIES)}")


def open_collection(folder: str | Path, **kwargs: Any) -> Collection:
    """Shorthand for :meth:`Collection.open`."""
    return Collection.open(folder, **kwargs)


