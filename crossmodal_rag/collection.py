"""A collection: a versioned folder holding CLIP embeddings of images and texts, searchable.

Layout of ``DIR``::

    manifest.json           format version, encoder spec, dimension, index type, counts, and the
                            index files that reflect metadata generation N (replaced atomically)
    metadata.sqlite         items, captions, source paths, hashes and vectors (the commit log)
    index/image.N.faiss     FAISS index of image vectors (+ image.N.*.ivfdata: on-disk lists)
    index/text.N.faiss      FAISS index of caption and passage vectors
    embeddings/{image,text}/NNNNNN.f16.npy, .ids.npy
                            float16 copies of all vectors, in append-only shards: indexes are
                            rebuilt from them (``reindex``) without re-encoding
    .lock                   write lock (one writer at a time)

Crash safety: an item is committed when its SQLite transaction commits. Index files are
written under new names and the manifest is switched to them afterwards, so a kill at any point
leaves the last manifest's files intact; on open, any commits newer than the index files are
replayed from SQLite (``reconcile``), so nothing committed is lost. A new collection is built in
a staging folder beside ``DIR`` and renamed into place, so ``DIR`` is complete or absent
(:mod:`crossmodal_rag.store.creation`).
"""

from __future__ import annotations

import logging
import secrets
import shutil
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from PIL import Image

from . import fingerprint
from ._phases import phase
from ._version import __version__
from .calibration import write_calibration
from .encoders import DEFAULT_MODEL, ClipEncoder, load_encoder, parse_model_spec
from .errors import CollectionError, EncoderMismatchError, QueryError
from .filters import allowed_ids, parse_where
from .images import DEFAULT_MAX_IMAGE_PIXELS
from .lock import WriteLock
from .query import clip_term, embed_query
from .search import Hit, check_target, resolve_min_score, search_vectors
from .store.ann import (
    AUTO,
    SearchParams,
    choose_index,
    min_training_vectors,
    parse_memory,
    training_rows,
)
from .store.audit import CHECK_ALL_MAX_VECTORS, audit_vectors, examples, id_disagreement, sample_ids
from .store.binding import (
    COLLECTION_ID_KEY,
    INDEX_FILES_KEY,
    check_collection_id,
    foreign_index,
    new_collection_id,
    remember_index_files,
)
from .store.build import build_index, tune_index
from .store.creation import Creation, clear_interrupted_creation
from .store.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, check_own_folders
from .store.metadata import UNVERIFIED_SHARDS_KEY, Item, MetadataStore
from .store.shards import EmbeddingShards
from .store.summary import describe
from .store.vectors import VectorIndex, make_faiss_index

__all__ = ["CheckReport", "Collection"]

logger = logging.getLogger(__name__)

_INDEX_NAMES = ("image", "text")
#: Index files up to this size are checksummed on open (bigger ones by `check` only).
_HASH_ON_OPEN_MAX_BYTES = 256 << 20
#: Above this many bytes of float32 vectors, reindexing an IVF type builds shard by shard on disk.
_SHARDED_BUILD_MIN_BYTES = 2 << 30
#: More shards than this, averaging under a quarter of the shard size, are compacted on persist.
_MAX_SMALL_SHARDS = 64

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
        mmap: bool = False,
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
        self._mmap = mmap
        self.indexes: dict[str, VectorIndex] = {}
        self.shards = {n: EmbeddingShards(folder, n, manifest.dim, manifest.embeddings.get(n))
                       for n in _INDEX_NAMES}
        self._dirty: set[str] = set()  # indexes changed since they were last written
        self._rebuild: set[str] = set()  # indexes to rebuild from the shards at the next persist
        self._built: dict[str, Any] = dict(manifest.build)
        self._tuning: dict[str, Any] = dict(manifest.tuning)
        self._verified: set[str] = set()  # shards compared with the metadata since the last persist

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    @phase("create")
    def create(
        cls, folder: str | Path, model: str = DEFAULT_MODEL, *, index_type: str = AUTO,
        max_index_memory: int | str | None = None, device: str | None = None,
        fsync: FsyncPolicy = "full",
    ) -> Collection:
        """Create an empty collection in ``folder`` (new or empty) for encoder ``model``.

        ``index_type`` is ``"auto"`` (chosen from the vector count and ``max_index_memory``, e.g.
        ``"4G"``; see :mod:`crossmodal_rag.store.ann`) or a FAISS index-factory string. Loads the
        encoder (to learn its dimension and fingerprint it).
        """
        _check_fsync(fsync)
        folder = Path(folder).expanduser().resolve()
        if (folder / MANIFEST_NAME).exists():
            raise CollectionError(f"{folder} already holds a collection; open it instead")
        clear_interrupted_creation(folder)  # refuses a folder holding anything else
        spec = parse_model_spec(model)
        encoder = load_encoder(spec, device)
        probe = fingerprint.compute(encoder)  # both towers
        budget = parse_memory(max_index_memory)
        if index_type != AUTO:
            make_faiss_index(encoder.dim, index_type)  # validates the type before anything is written
        creation = Creation(folder)  # a locked staging folder beside `folder` (see store.creation)
        target, lock = creation.target, creation.lock
        try:
            store = MetadataStore(target, fsync=fsync)
            collection_id = new_collection_id()  # binds the manifest to the metadata
            with store.transaction():
                fingerprint.write(store, probe)
                store.set_meta(COLLECTION_ID_KEY, collection_id)
            manifest = Manifest(encoder=str(spec), dim=encoder.dim, index_type=index_type,
                                max_index_memory=budget, library_version=__version__,
                                created_at=_now(), updated_at=_now(), collection_id=collection_id)
            coll = cls(target, manifest, store, writable=True, lock=lock, model=str(spec),
                       device=device, fsync=fsync)
            coll._encoder = encoder
            coll.indexes = {n: VectorIndex(encoder.dim, coll._resolve_type(0)) for n in _INDEX_NAMES}
            coll._dirty.update(_INDEX_NAMES)
            coll.persist()  # the manifest is written last: it marks the folder as a collection
            store.close()
            creation.finish(fsync=fsync != "off")  # renamed into place: complete, or not there
            coll = cls(folder, coll.manifest, MetadataStore(folder, fsync=fsync), writable=True,
                       lock=lock, model=str(spec), device=device, fsync=fsync)
            coll._encoder = encoder
            coll._load_indexes()
        except BaseException:
            creation.abandon()
            raise
        return coll

    @classmethod
    def open(
        cls, folder: str | Path, *, model: str | None = None, writable: bool = False,
        device: str | None = None, fsync: FsyncPolicy = "full", mmap: bool = False,
    ) -> Collection:
        """Open an existing collection.

        Args:
            model: the encoder to use; default the one the collection was built with. Another
                encoder is refused (:class:`EncoderMismatchError`) unless it gives the same
                embeddings.
            writable: take the write lock (refused while another process writes).
            mmap: memory-map the index files instead of reading them into RAM, so a collection
                larger than RAM can be searched (pages come from disk on first touch).
        """
        _check_fsync(fsync)
        folder = Path(folder).expanduser().resolve()
        manifest = Manifest.read(folder)
        lock = None
        if writable:
            lock = WriteLock(folder)
            lock.acquire()
        try:
            if writable:
                check_own_folders(folder)  # a writer writes and deletes in index/ and embeddings/
            store = MetadataStore(folder, readonly=not writable, fsync=fsync)
            try:
                check_collection_id(manifest, store)
                coll = cls(folder, manifest, store, writable=writable, lock=lock,
                           model=manifest.encoder, device=device, fsync=fsync, mmap=mmap)
                if writable and not store.get_meta(COLLECTION_ID_KEY):  # made before ids
                    store.put_meta(COLLECTION_ID_KEY, manifest.collection_id or new_collection_id())
                if model is not None:
                    coll._use_model(model)
                coll._load_indexes()
                if writable:
                    coll._settle_ids()
                    coll._bind()
            except BaseException:
                store.close()
                raise
        except BaseException:
            if lock:
                lock.release()
            raise
        return coll

    @classmethod
    def open_or_create(
        cls, folder: str | Path, model: str | None = None, *, index_type: str = AUTO,
        max_index_memory: int | str | None = None, device: str | None = None,
        fsync: FsyncPolicy = "full",
    ) -> Collection:
        """Open ``folder`` for writing, or create it with ``model`` if it holds no collection.
        (``index_type`` and ``max_index_memory`` apply to a new collection; change an existing
        one's with :meth:`reindex`.)"""
        if (Path(folder).expanduser() / MANIFEST_NAME).is_file():
            return cls.open(folder, model=model, writable=True, device=device, fsync=fsync)
        return cls.create(folder, model or DEFAULT_MODEL, index_type=index_type,
                          max_index_memory=max_index_memory, device=device, fsync=fsync)

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
        """Refuse ``encoder`` unless it reproduces the collection's fingerprint (both towers;
        see :mod:`crossmodal_rag.fingerprint`)."""
        hint = (f"{self.folder} was built with {self.manifest.encoder}; search it with that "
                "encoder (leave out --model) or index into a new collection")
        if encoder.dim != self.manifest.dim:
            raise EncoderMismatchError(
                f"encoder {asked} makes {encoder.dim}-d embeddings but {self.folder} holds "
                f"{self.manifest.dim}-d ones. {hint}"
            )
        stored = fingerprint.read(self.store)
        if stored is None:
            logger.warning("%s holds no encoder fingerprint; %s cannot be verified", self.folder, asked)
            return
        fresh = fingerprint.compute(encoder)
        problem = fingerprint.mismatch(stored, fresh)
        if problem:
            raise EncoderMismatchError(
                f"encoder {asked} gives different embeddings from the one that built the "
                f"collection ({problem}). {hint}"
            )
        if stored.image is None:
            self._record_image_probe(stored, fresh, asked)

    def _record_image_probe(self, stored: fingerprint.Fingerprint, fresh: fingerprint.Fingerprint,
                            asked: str) -> None:
        """A collection made before image probes: its text probe matched. Its own encoder, used
        writable, records the image probe (no item changes: the generation stays); otherwise the
        image tower goes unverified, with a warning."""
        if self.writable and asked == self.manifest.encoder:
            with self.store.snapshot():
                fingerprint.write(self.store, replace(stored, image=fresh.image))
            logger.info("%s: recorded the image-tower fingerprint of its encoder %s", self.folder, asked)
            return
        logger.warning(
            "%s was made before image fingerprints: the image tower of %s cannot be verified for "
            "this older collection (its text tower matches). Open it writable once with its own "
            "encoder (e.g. `crossmodal-rag index` into it) to record one", self.folder, asked)

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
                    index = VectorIndex.load(
                        self.folder, record, m.dim, m.index_type_of(name), mmap=self._mmap,
                        verify_hash=not self._mmap and record.bytes <= _HASH_ON_OPEN_MAX_BYTES,
                        params=SearchParams.from_dict(m.search_params.get(name)),
                    )
                    foreign = foreign_index(self.store, name, record,
                                            live=None if stale else lambda n=name: len(self.store.ids(n)))
                    if foreign:
                        index = None
                        raise CollectionError(foreign)
                except CollectionError as e:
                    logger.warning("%s; rebuilding it from the metadata", e)
            if index is None:
                stale = True
                self._dirty.add(name)
                index = VectorIndex(m.dim, "Flat")
                if m.index_type_of(name) != "Flat":
                    self._rebuild.add(name)
            self._attach(name, index)
        if stale:
            added, removed = self.reconcile()
            logger.info("replayed %d additions and %d removals committed after the last index "
                        "write", added, removed)
            if self.writable:
                self.persist()

    def _bind(self) -> None:
        """On a writable open of a collection made before binding: record its index files in the
        metadata and its id in the manifest (see :mod:`crossmodal_rag.store.binding`)."""
        if self.manifest.collection_id and self.store.get_meta(INDEX_FILES_KEY):
            return
        logger.info("%s: binding the manifest and index files to the metadata (collection id %s)",
                    self.folder, self.store.get_meta(COLLECTION_ID_KEY))
        self.persist()

    def _attach(self, name: str, index: VectorIndex) -> None:
        """Install ``index`` as index ``name``; PQ shortlists re-rank with the shard vectors."""
        shards, store, dim = self.shards[name], self.store, self.manifest.dim

        def exact(ids: np.ndarray) -> np.ndarray:
            try:
                return shards.lookup(ids)
            except (KeyError, CollectionError):  # not yet in a shard: read the commit log
                return store.vectors(np.asarray(ids).tolist(), dim)

        index.exact_vectors = exact
        self.indexes[name] = index

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
            if len(extra) or len(missing):
                self._dirty.add(name)
            if len(extra):
                if index.supports_remove:
                    removed += index.remove(extra)
                else:  # graphs cannot forget; hits on removed items are skipped until rebuilt
                    self._rebuild.add(name)
            if len(missing) and not index.is_trained:
                self._rebuild.add(name)
                continue
            for start in range(0, len(missing), 10_000):
                chunk = missing[start : start + 10_000]
                index.add(chunk, self.store.vectors(chunk.tolist(), self.manifest.dim))
            added += len(missing)
        return added, removed

    def _resolve_type(self, n: int) -> str:
        """The index type for an index of ``n`` vectors under the collection's request."""
        m = self.manifest
        if m.index_type == AUTO:
            return choose_index(n, m.dim, m.max_index_memory)
        if n < min_training_vectors(make_faiss_index(m.dim, m.index_type)):
            return "Flat"  # too few vectors to train the requested type yet: search exactly
        return m.index_type

    def _sync_shards(self, name: str, live: np.ndarray) -> None:
        """Append the vectors committed since the last shard to the float16 shards: the ids above
        the shards' highest, as ids are never given twice. A collection made before that (schema
        version 1) may hold a removed item's vector under a reused id: compared once, and fixed."""
        shards = self.shards[name]
        new = live[live > shards.max_id]
        for start in range(0, len(new), 100_000):
            chunk = new[start : start + 100_000]
            shards.append(chunk, self.store.vectors(chunk.tolist(), self.manifest.dim),
                          fsync=self._fsync)
        if name in self._unverified_shards():
            self._repair_shards(name, live)
        if len(shards.shards) > _MAX_SMALL_SHARDS and len(shards) < len(shards.shards) * 25_000:
            shards.compact(live, fsync=self._fsync)  # many small ingests: merge their shards

    def _unverified_shards(self) -> set[str]:
        """Indexes whose shards a migration from schema version 1 left to compare."""
        return {n for n in (self.store.get_meta(UNVERIFIED_SHARDS_KEY) or "").split(",") if n}

    def _repair_shards(self, name: str, live: np.ndarray) -> None:
        """Compare every live float16 copy of index ``name`` with its metadata vector; rewrite the
        copies that differ (a removed item's vector kept under its reused id) and rebuild the
        index from the corrected shards (an index built from them holds the old vectors too)."""
        shards, dim = self.shards[name], self.manifest.dim
        held = shards.held_ids()
        logger.info("comparing the %s embedding shards with the metadata once (collection made "
                    "before item ids were never reused)", name)
        audit = audit_vectors(None, np.intersect1d(live, held),
                              lambda chunk: self.store.vectors(chunk.tolist(), dim), shards, held)
        self._verified.add(name)
        if not audit.bad_shards:
            return
        bad = np.asarray(sorted(audit.bad_shards), dtype=np.int64)
        logger.warning("%s embedding shards held another item's vector under %d reused id(s) "
                       "(e.g. %s); rewritten from the metadata, rebuilding the %s index", name,
                       len(bad), examples(bad), name)
        shards.compact(live, fsync=self._fsync, replace=bad,
                       vectors_of=lambda ids: self.store.vectors(ids.tolist(), dim))
        self._rebuild.add(name)
        self._dirty.add(name)

    def _settle_ids(self) -> None:
        """On a writable open: never give again an id the float16 shards hold (removed items of a
        collection made when ids could be reused), and finish a migration's shard comparison."""
        self.store.retire_ids_up_to(max(sh.max_id for sh in self.shards.values()))
        if self._unverified_shards():
            self.persist()

    def _forget_verified_shards(self) -> None:
        """After the manifest lists the compared (and fixed) shards: record them as verified."""
        if self._verified:
            left = self._unverified_shards() - self._verified
            self.store.put_meta(UNVERIFIED_SHARDS_KEY, ",".join(sorted(left)) or None)
            self._verified.clear()

    def _build(self, name: str, index_type: str, live: np.ndarray, *, seed: int = 0,
               tune: bool = True, target_recall: float = 0.95, sharded: bool | None = None,
               workers: int = 2) -> None:
        """Rebuild index ``name`` as ``index_type`` from the shards (training, tuning)."""
        probe = VectorIndex(self.manifest.dim, index_type)
        if sharded is None:
            sharded = len(live) * self.manifest.dim * 4 > _SHARDED_BUILD_MIN_BYTES
        sharded = sharded and probe.kind == "ivf"  # e.g. a small caption index stays exact
        basename = f"{name}.{self.store.generation}.{secrets.token_hex(4)}"
        logger.info("building the %s index as %s over %d vectors%s", name, index_type, len(live),
                    " shard by shard on disk" if sharded else "")
        index, report = build_index(index_type, self.shards[name], live, seed=seed,
                                    sharded=sharded, out_dir=self.folder / "index",
                                    basename=basename, workers=workers)
        self._attach(name, index)
        self._built[name] = report.to_dict()
        self._tuning.pop(name, None)
        if tune and index.kind in ("ivf", "hnsw") and len(live):
            queries = self._tuning_queries(name, live, index, seed)
            result = tune_index(index, self.shards[name], live, queries, target_recall=target_recall)
            self._tuning[name] = result.to_dict()
            logger.info("tuned the %s index: %s=%s (recall@10 %.3f, target %.2f)", name,
                        result.param, result.value,
                        result.measured[-1]["recall"] if result.measured else float("nan"),
                        target_recall)
        self._dirty.add(name)
        self._rebuild.discard(name)

    def _tuning_queries(self, name: str, live: np.ndarray, index: VectorIndex, seed: int,
                        n: int = 500) -> np.ndarray:
        """Held-out queries: stored vectors not used for training, half from the other modality
        (captions query images and the other way round) when it has any."""
        rng = np.random.default_rng(seed + 1)
        trained_on = training_rows(len(live), make_faiss_index(self.manifest.dim, index.index_type), seed) \
            if index.kind == "ivf" else np.zeros(0, np.int64)
        pool = np.setdiff1d(np.arange(len(live)), trained_on)
        if len(pool) == 0:
            pool = np.arange(len(live))
        other = self.store.ids("text" if name == "image" else "image")
        n_other = min(len(other), n // 2)
        own = live[np.sort(rng.choice(pool, size=min(len(pool), n - n_other), replace=False))]
        parts = [self.shards[name].lookup(own)]
        if n_other:
            picked = np.sort(rng.choice(other, size=n_other, replace=False))
            parts.append(self.store.vectors(picked.tolist(), self.manifest.dim))
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    @phase("persist")
    def persist(self) -> None:
        """Bring the shards and indexes up to date, write changed indexes under new file names,
        then switch the manifest to them."""
        self.require_writable()
        gen = self.store.generation
        for name in _INDEX_NAMES:
            live = self.store.ids(name)
            self._sync_shards(name, live)
            try:
                want = self._resolve_type(len(live))
            except CollectionError as e:  # e.g. the memory budget no longer fits: keep the index
                logger.warning("%s index: %s", name, e)
                want = self.indexes[name].index_type
            if name in self._rebuild or want != self.indexes[name].index_type:
                self._build(name, want, live)
        files = {}
        for name, ix in self.indexes.items():
            record = self.manifest.files.get(name)
            if name in self._dirty or record is None:
                relpath = f"index/{name}.{gen}.faiss"
                if record is not None and record.path == relpath:
                    relpath = f"index/{name}.{gen}.{secrets.token_hex(4)}.faiss"
                record = ix.save(self.folder, relpath, fsync=self._fsync)
            files[name] = record
        remember_index_files(self.store, files)  # before the manifest names them
        self.manifest = replace(
            self.manifest, generation=gen, files=files, counts=self.store.counts(),
            updated_at=_now(), library_version=__version__, format_version=FORMAT_VERSION,
            collection_id=self.store.get_meta(COLLECTION_ID_KEY) or self.manifest.collection_id,
            index_types={n: ix.index_type for n, ix in self.indexes.items()},
            search_params={n: ix.params.to_dict() for n, ix in self.indexes.items()},
            build={n: self._built[n] for n in _INDEX_NAMES if n in self._built},
            tuning={n: self._tuning[n] for n in _INDEX_NAMES if n in self._tuning},
            embeddings={n: list(sh.shards) for n, sh in self.shards.items()},
        )
        self.manifest.write(self.folder, fsync=self._fsync)
        self._dirty.clear()
        self._forget_verified_shards()
        self._remove_unlisted_files()

    def _remove_unlisted_files(self) -> None:
        keep = {f.path for f in self.manifest.files.values()}
        keep |= {f.data_path for f in self.manifest.files.values() if f.data_path}
        for sh in self.shards.values():
            keep |= sh.files()
        for sub in ("index", "embeddings/image", "embeddings/text"):
            folder = self.folder / sub
            if not folder.is_dir():
                continue
            for stale in folder.iterdir():
                rel = f"{sub}/{stale.name}"
                if rel in keep:
                    continue
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)

    @phase("reindex")
    def reindex(
        self, index_type: str | None = None, *, max_index_memory: int | str | None = None,
        seed: int = 0, tune: bool = True, target_recall: float = 0.95, sharded: bool | None = None,
        workers: int = 2,
    ) -> dict[str, Any]:
        """Rebuild both indexes from the float16 shards, without re-encoding anything.

        ``index_type``: ``"auto"`` or a FAISS factory string (default: keep the current request);
        ``max_index_memory`` bounds ``auto``. Training samples are drawn from ``seed``; IVF and
        HNSW search settings are tuned to ``target_recall`` (recall@10 against exact search on
        held-out queries) and stored as defaults. ``sharded`` (default: automatic for IVF types
        over 2 GiB of vectors) adds shards separately and merges the inverted lists on disk.
        The shards are compacted (removed items dropped) first. Returns what was built.
        """
        self.require_writable()
        if not 0.0 < target_recall <= 1.0:
            raise CollectionError(f"target recall must be in (0, 1], got {target_recall}")
        budget = parse_memory(max_index_memory) if max_index_memory is not None \
            else self.manifest.max_index_memory
        request = index_type or self.manifest.index_type
        if request != AUTO:
            make_faiss_index(self.manifest.dim, request)
        if request != AUTO:
            probe = VectorIndex(self.manifest.dim, request)
            if sharded and probe.kind != "ivf":
                raise CollectionError(f"--sharded builds IVF index types; {request!r} is not one")
            need = min_training_vectors(probe.index)
            largest = max(len(self.store.ids(n)) for n in _INDEX_NAMES)
            if largest < need:
                raise CollectionError(
                    f"index type {request!r} needs at least {need:,} vectors to train; the largest "
                    f"index of {self.folder} holds {largest:,}. Use --index auto, Flat, HNSW32 or "
                    "fewer IVF lists"
                )
        self.manifest = replace(self.manifest, index_type=request, max_index_memory=budget)
        for name in _INDEX_NAMES:
            live = self.store.ids(name)
            self._sync_shards(name, live)
            if len(self.shards[name]) != len(live):
                self.shards[name].compact(live, fsync=self._fsync)
            want = self._resolve_type(len(live))
            self._build(name, want, live, seed=seed, tune=tune, target_recall=target_recall,
                        sharded=sharded, workers=workers)
        self.persist()
        return {n: {"index_type": self.indexes[n].index_type, "count": len(self.indexes[n]),
                    "search_params": self.indexes[n].params.to_dict(),
                    "build": self._built.get(n), "tuning": self._tuning.get(n)}
                for n in _INDEX_NAMES}

    def tune(self, *, target_recall: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """Re-tune the search settings of the approximate indexes (no rebuild); stores and
        returns what was measured per index."""
        self.require_writable()
        if not 0.0 < target_recall <= 1.0:
            raise CollectionError(f"target recall must be in (0, 1], got {target_recall}")
        for name, index in self.indexes.items():
            live = self.store.ids(name)
            self._sync_shards(name, live)
            if index.kind not in ("ivf", "hnsw") or not len(live):
                continue
            queries = self._tuning_queries(name, live, index, seed)
            index.params = SearchParams(rerank=index.params.rerank)
            self._tuning[name] = tune_index(index, self.shards[name], live, queries,
                                            target_recall=target_recall).to_dict()
            self._dirty.add(name)
        self.persist()
        return {n: {"index_type": ix.index_type, "search_params": ix.params.to_dict(),
                    "tuning": self._tuning.get(n)} for n, ix in self.indexes.items()}

    def set_search_params(self, params: SearchParams, index: str | None = None) -> None:
        """Store ``params`` as the default search settings of one index (or both), persisted."""
        self.require_writable()
        for name in [index] if index else list(_INDEX_NAMES):
            if name not in self.indexes:
                raise CollectionError(f"unknown index {name!r}; choose image or text")
            self.indexes[name].params = self.indexes[name].params.merged(params)
            self._dirty.add(name)
        self.persist()

    def require_writable(self) -> None:
        if not self.writable:
            raise CollectionError(f"{self.folder} is open read-only; open it with writable=True")

    # -- reading ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def info(self) -> dict[str, Any]:
        """The manifest plus live counts (:func:`crossmodal_rag.store.summary.read_summary`
        reads the same without opening the collection)."""
        return describe(self.folder, self.manifest, self.store)

    def get(self, ids: int | list[int]) -> list[Item]:
        """Items by id, in the order asked (missing ids are left out)."""
        ids_list = [ids] if isinstance(ids, int) else list(ids)
        found = self.store.get_items(ids_list)
        return [found[i] for i in ids_list if i in found]

    def check(self, *, verify_hash: bool = True, max_vectors: int | None = CHECK_ALL_MAX_VECTORS,
              seed: int = 0) -> CheckReport:
        """Verify that what is stored agrees: the index files the manifest on disk names (loaded
        fresh, not the in-memory indexes, which are reconciled on open), the float16 shards and
        the metadata. Every id is compared, and every vector (the metadata's, its float16 copy,
        the index's) for indexes of up to ``max_vectors`` vectors (None: no limit); larger ones
        by a random sample of that many drawn from ``seed``, said so in the notes. Reads only.
        See :mod:`crossmodal_rag.store.audit` for how each index type's vectors are compared."""
        report = CheckReport(ok=True)
        report.problems.extend(self.store.integrity_problems())
        try:
            m, disk, shards, held, problems = self._stored(verify_hash)
        except CollectionError as e:  # the manifest itself
            report.problems.append(str(e))
            report.ok = False
            return report
        report.problems.extend(problems)
        with self.store.snapshot():  # one consistent view of the metadata (a writer may run)
            pending = self.store.generation - m.generation
            if pending:
                report.notes.append(f"{pending} metadata commit(s) newer than the index files; they "
                                    "are replayed from the metadata on open")
            for name in _INDEX_NAMES:
                live = self.store.ids(name)
                index = disk.get(name)
                if index is not None:
                    report.counts[f"{name}_index"] = len(index)
                    self._check_ids(name, m.files[name].path, index, live, pending, report)
                self._check_vectors(name, index, shards[name], held[name],
                                    sample_ids(live, max_vectors, seed), len(live), seed, report)
                self._check_shards(name, shards[name], held[name], live, report)
            report.counts = {**self.store.counts(), **report.counts}
        report.ok = not report.problems
        return report

    def _stored(self, verify_hash: bool, attempts: int = 3) -> tuple[
            Manifest, dict[str, VectorIndex], dict[str, EmbeddingShards], dict[str, np.ndarray], list[str]]:
        """The manifest on disk now, its index files (memory-mapped) and its shards (mapped, so
        files a writer replaces meanwhile stay readable), and the problems loading them. Read
        again if a writer switched the manifest while the files were being opened."""
        for _ in range(attempts):
            m = Manifest.read(self.folder)  # before the metadata snapshot: never newer than it
            check_collection_id(m, self.store)
            disk: dict[str, VectorIndex] = {}
            problems: list[str] = []
            for name in _INDEX_NAMES:
                record = m.files.get(name)
                if record is None:
                    problems.append(f"manifest lists no {name} index file")
                    continue
                try:
                    disk[name] = VectorIndex.load(self.folder, record, m.dim, m.index_type_of(name),
                                                  verify_hash=verify_hash, mmap=True)
                except CollectionError as e:
                    problems.append(str(e))
                    continue
                foreign = foreign_index(self.store, name, record)
                if foreign:
                    problems.append(f"{foreign}; it was not used (rebuilt from the metadata on open)")
                    del disk[name]
            shards = {n: EmbeddingShards(self.folder, n, m.dim, m.embeddings.get(n)) for n in _INDEX_NAMES}
            held = {}
            for name, sh in shards.items():
                try:
                    held[name] = sh.held_ids()
                except CollectionError as e:
                    problems.append(str(e))
                    held[name] = np.zeros(0, np.int64)
            if not problems or Manifest.read(self.folder).to_dict() == m.to_dict():
                break
        return m, disk, shards, held, problems

    def _check_ids(self, name: str, path: str, index: VectorIndex, live: np.ndarray, pending: int,
                   report: CheckReport) -> None:
        """The ids of the index file against the metadata's: equal unless commits are pending."""
        extra, missing = id_disagreement(index.ids(), live)
        if not len(extra) and not len(missing):
            return
        parts = [f"{len(extra)} id(s) in the index file only"
                 + (f" (e.g. {examples(extra)})" if len(extra) else ""),
                 f"{len(missing)} in the metadata only" + (f" (e.g. {examples(missing)})" if len(missing) else "")]
        what = f"{name} index ({path}, {len(index)} ids) and the metadata ({len(live)} ids) differ: {', '.join(parts)}"
        if pending:  # removals and additions since the index was written: expected
            report.notes.append(f"{what}; expected, as {pending} commit(s) are newer than the index")
        else:
            report.problems.append(f"{what}; rebuild the index with `crossmodal-rag reindex {self.folder}`")

    def _check_vectors(self, name: str, index: VectorIndex | None, shards: EmbeddingShards,
                       held: np.ndarray, ids: np.ndarray, total: int, seed: int,
                       report: CheckReport) -> None:
        """Each sampled id's metadata vector against its float16 copy and the index's vector."""
        dim = self.manifest.dim
        audit = audit_vectors(index, ids, lambda chunk: self.store.vectors(chunk.tolist(), dim),
                              shards, held)
        how = (f"all {len(ids)} of {total}" if len(ids) == total else
               f"{len(ids)} of {total}")
        sampled = "" if len(ids) == total else f" (seeded random sample, seed {seed})"
        against = "the float16 shards" + ("" if index is None or audit.unsupported else " and the index file")
        report.notes.append(f"{name} index: compared {how} {name} vectors{sampled} of the metadata "
                            f"with {against}")
        if audit.unsupported:
            report.notes.append(f"{name} index vectors not compared: {audit.unsupported}")
        if audit.bad_index:
            report.problems.append(
                f"{name} index: {len(audit.bad_index)} of {len(ids)} vector(s) compared differ from "
                f"the metadata beyond the precision of its codes (e.g. {examples(audit.bad_index)}); "
                f"rebuild it with `crossmodal-rag reindex {self.folder}`")
        if audit.bad_shards:
            report.problems.append(
                f"{name} embedding shards: {len(audit.bad_shards)} of {len(np.intersect1d(ids, held))} "
                f"float16 copies differ from the metadata vectors (e.g. {examples(audit.bad_shards)}); "
                "`reindex` builds from these copies: remove and re-add those items first")

    def _check_shards(self, name: str, shards: EmbeddingShards, held: np.ndarray, live: np.ndarray,
                      report: CheckReport) -> None:
        """Every live item committed before the last shard write has a float16 copy."""
        unsharded = np.setdiff1d(live, held)
        # committed after the last persist: the next writer syncs them; only a gap is a problem
        behind = unsharded[unsharded <= shards.max_id]
        if len(behind):
            report.problems.append(f"{len(behind)} {name} item(s) are missing from the embedding "
                                   f"shards (e.g. {examples(behind)}); run `crossmodal-rag reindex "
                                   f"{self.folder}`")

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
        return embed_query(lambda: self.encoder, text, image, plus=plus, minus=minus,
                           max_image_pixels=max_image_pixels)

    def clip_query(self, text: str) -> str:
        """One query term as the encoder gets it (cut to ``query.MAX_TERM_CHARS``, with a warning)."""
        return clip_term(text, lambda: self.encoder)

    def resolve_min_score(self, min_score: float | str | None, *, query_is_image: bool,
                          target: str) -> float | None:
        """A number, ``"auto"`` (the calibrated threshold), or None (no threshold)."""
        return resolve_min_score(min_score, self.store, self.manifest.dim,
                                 query_is_image=query_is_image, target=target)

    def search(
        self, query: str | None = None, *, image: str | Path | Image.Image | None = None,
        k: int = 10, target: str = "images", where: list[str] | str | None = None,
        min_score: float | str | None = None, plus: list[str] | None = None,
        minus: list[str] | None = None, params: SearchParams | None = None,
    ) -> list[Hit]:
        """Search by text (with arithmetic), by image, or both; ``target`` is ``"images"``,
        ``"texts"`` or ``"all"``; ``where`` filters by metadata (:mod:`crossmodal_rag.filters`);
        ``min_score`` drops weaker hits (a number, or ``"auto"`` for the calibrated threshold);
        ``params`` overrides the stored ``nprobe`` / ``ef_search`` / ``rerank`` for this search.

        Example: ``Collection.open("photos").search("a cat on a sofa", k=5)``.
        """
        check_target(target)
        threshold = self.resolve_min_score(min_score, query_is_image=image is not None, target=target)
        vector = self.embed_query(query, image, plus=plus, minus=minus)
        return self.search_vectors(vector[None, :], k=k, target=target, where=where,
                                   min_score=threshold, params=params)[0]

    def search_vectors(
        self, vectors: np.ndarray, *, k: int = 10, target: str = "images",
        where: list[str] | str | None = None, min_score: float | None = None,
        params: SearchParams | None = None,
    ) -> list[list[Hit]]:
        """Search with precomputed query embeddings ``(Q, D)``; one hit list per row."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if vectors.shape[1] != self.manifest.dim:
            raise QueryError(f"query vectors are {vectors.shape[1]}-d; this collection is "
                             f"{self.manifest.dim}-d")
        conditions = parse_where(where)
        allowed = allowed_ids(self.store, conditions) if conditions else None
        return search_vectors(self.indexes, self.store, vectors, k, target, allowed, min_score,
                              params=params)

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
        if self.indexes["image"].kind != "flat":  # approximate indexes: compare exactly instead
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.manifest.dim))
            for start in range(0, len(ids), 10_000):
                chunk = ids[start : start + 10_000]
                index.add_with_ids(self.store.vectors(chunk.tolist(), self.manifest.dim), chunk)
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
            for name, index in self.indexes.items():
                self._dirty.add(name)
                if index.supports_remove:
                    index.remove(ids)
                else:  # a graph index is rebuilt from the shards at the next persist
                    self._rebuild.add(name)
        for name, (ids, vectors) in added.items():
            if len(ids) == 0:
                continue
            self._dirty.add(name)
            if self.indexes[name].is_trained:
                self.indexes[name].add(ids, vectors)
            else:
                self._rebuild.add(name)

    @phase("remove")
    def remove(self, ids: list[int] | None = None, paths: list[str] | None = None) -> dict[str, Any]:
        """Remove items by id and/or by source path, then persist.

        Removing a path that is one of several copies of the same image only forgets that path.
        Returns ``{"removed": [ids...], "unknown": [ids or paths not found]}``.
        """
        self.require_writable()
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
        if gone:
            write_calibration(self.store, self.manifest.dim)  # thresholds follow the contents
        self.persist()
        return {"removed": gone, "unknown": unknown}


def _check_fsync(fsync: str) -> None:
    if fsync not in FSYNC_POLICIES:
        raise CollectionError(f"unknown fsync policy {fsync!r}; choose one of {', '.join(FSYNC_POLICIES)}")


def open_collection(folder: str | Path, **kwargs: Any) -> Collection:
    """Shorthand for :meth:`Collection.open`."""
    return Collection.open(folder, **kwargs)


