"""A collection's indexes, float16 shards and manifest, kept in step with its metadata.

:class:`IndexState` holds what an open collection has beside its SQLite file (see
:mod:`.layout` for the folder): the in-memory index per name, the shards they are built from,
the manifest that lists the files, and what changed since that manifest was written. It loads
the indexes on open (replaying newer commits, :mod:`.reconcile`), mirrors each committed
transaction (:meth:`IndexState.apply`), rebuilds an index whose type no longer fits its size,
and writes changed indexes under new names before switching the manifest to them
(:meth:`IndexState.persist`).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .._phases import phase
from .._version import __version__
from ..errors import CollectionError
from ..maintenance import fingerprint
from .ann import AUTO, SearchParams, choose_index, min_training_vectors, training_rows
from .autoindex import auto_index_type, measured_floor
from .autoselect import MEASURE_MIN_VECTORS
from .binding import (
    COLLECTION_ID_KEY,
    INDEX_FILES_KEY,
    SHARD_FILES_KEY,
    foreign_index,
    new_collection_id,
    recorded_shard_files,
    remember_index_files,
    remember_shard_files,
)
from .build import build_index, tune_index
from .layout import INDEX_NAMES, now, remove_unlisted_files
from .manifest import FORMAT_VERSION, Manifest
from .metadata import MetadataStore
from .reconcile import (
    append_new_vectors,
    compact_if_fragmented,
    forget_verified_shards,
    reconcile,
    repair_shards,
    unverified_shards,
)
from .shards import EmbeddingShards
from .vectors import VectorIndex, make_faiss_index

__all__ = ["HASH_ON_OPEN_MAX_BYTES", "SHARDED_BUILD_MIN_BYTES", "IndexState", "write_new_collection"]

logger = logging.getLogger(__name__)

#: Index files up to this size are checksummed on open (bigger ones by `check` only).
HASH_ON_OPEN_MAX_BYTES = 256 << 20
#: Above this many bytes of float32 vectors, reindexing an IVF type builds shard by shard on disk.
SHARDED_BUILD_MIN_BYTES = 2 << 30


class IndexState:
    """The indexes, shards and manifest of the collection in ``folder`` whose metadata is ``store``."""

    def __init__(self, folder: Path, manifest: Manifest, store: MetadataStore, *, fsync: bool,
                 mmap: bool = False) -> None:
        self.folder = folder
        self.manifest = manifest
        self.store = store
        self.fsync = fsync  # fsync index files, shards and the manifest
        self.mmap = mmap  # memory-map index files instead of reading them into RAM
        self.indexes: dict[str, VectorIndex] = {}
        self.shards = {n: EmbeddingShards(folder, n, manifest.dim, manifest.embeddings.get(n))
                       for n in INDEX_NAMES}
        self.dirty: set[str] = set()  # indexes changed since they were last written
        self.rebuild: set[str] = set()  # indexes to rebuild from the shards at the next persist
        self.built: dict[str, Any] = dict(manifest.build)  # how each index was built
        self.tuning: dict[str, Any] = dict(manifest.tuning)  # what tuning measured per index
        self.verified: set[str] = set()  # shards compared with the metadata since the last persist

    # -- loading ---------------------------------------------------------------------------
    def start_empty(self) -> None:
        """Empty indexes of the type the manifest asks for at size 0 (a new collection)."""
        self.indexes = {n: VectorIndex(self.manifest.dim, self.resolve_type(0)) for n in INDEX_NAMES}
        self.dirty.update(INDEX_NAMES)

    def load(self, *, writable: bool) -> None:
        """Load the index files the manifest names. A file that is missing, damaged or another
        collection's is replaced by an index rebuilt from the metadata; commits newer than the
        files are replayed (and, ``writable``, persisted)."""
        m = self.manifest
        stale = m.generation != self.store.generation
        for name in INDEX_NAMES:
            record = m.files.get(name)
            index = None
            if record is not None:
                try:
                    index = VectorIndex.load(
                        self.folder, record, m.dim, m.index_type_of(name), mmap=self.mmap,
                        verify_hash=not self.mmap and record.bytes <= HASH_ON_OPEN_MAX_BYTES,
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
                self.dirty.add(name)
                index = VectorIndex(m.dim, "Flat")
                if m.index_type_of(name) != "Flat":
                    self.rebuild.add(name)
            self.attach(name, index)
        if stale:
            added, removed = self.reconcile()
            logger.info("replayed %d additions and %d removals committed after the last index "
                        "write", added, removed)
            if writable:
                self.persist()

    def bind(self) -> None:
        """On a writable open of a collection made before binding: record its index files and
        embedding shards in the metadata and its id in the manifest (see
        :mod:`crossmodal_rag.store.binding`)."""
        if (self.manifest.collection_id and self.store.get_meta(INDEX_FILES_KEY)
                and self.store.get_meta(SHARD_FILES_KEY) is not None):
            return
        logger.info("%s: binding the manifest and index files to the metadata (collection id %s)",
                    self.folder, self.store.get_meta(COLLECTION_ID_KEY))
        self.persist()

    def settle_ids(self) -> None:
        """On a writable open: never give again an id the float16 shards hold (removed items of a
        collection made when ids could be reused), and finish a migration's shard comparison."""
        self.store.retire_ids_up_to(max(sh.max_id for sh in self.shards.values()))
        if unverified_shards(self.store):
            self.persist()

    def attach(self, name: str, index: VectorIndex) -> None:
        """Install ``index`` as index ``name``; PQ shortlists re-rank with the shard vectors."""
        shards, store, dim = self.shards[name], self.store, self.manifest.dim

        def exact(ids: np.ndarray) -> np.ndarray:
            try:
                return shards.lookup(ids)
            except (KeyError, CollectionError):  # not yet in a shard: read the commit log
                return store.vectors(np.asarray(ids).tolist(), dim)

        index.exact_vectors = exact
        self.indexes[name] = index

    # -- following the metadata ----------------------------------------------------------------
    def reconcile(self) -> tuple[int, int]:
        """Make the in-memory indexes hold exactly the committed items; returns (added, removed)."""
        with self.store.snapshot():
            done = reconcile(self.store, self.indexes, self.manifest.dim)
        self.dirty |= done.changed
        self.rebuild |= done.rebuild
        return done.added, done.removed

    def apply(self, added: dict[str, tuple[np.ndarray, np.ndarray]], removed: list[int]) -> None:
        """Mirror a committed metadata transaction: ``added`` maps index name -> (ids ``(N,)``,
        vectors ``(N, D)``); ``removed`` lists item ids."""
        if removed:
            ids = np.asarray(removed, dtype=np.int64)
            for name, index in self.indexes.items():
                self.dirty.add(name)
                if index.supports_remove:
                    index.remove(ids)
                else:  # a graph index is rebuilt from the shards at the next persist
                    self.rebuild.add(name)
        for name, (ids, vectors) in added.items():
            if len(ids) == 0:
                continue
            self.dirty.add(name)
            if self.indexes[name].is_trained:
                self.indexes[name].add(ids, vectors)
            else:
                self.rebuild.add(name)

    def sync_shards(self, name: str, live: np.ndarray) -> None:
        """Bring the float16 shards of index ``name`` up to the ``live`` ids: append what was
        committed since, compare them once after a migration (repairing the index if needed),
        and merge many small shards."""
        shards, dim = self.shards[name], self.manifest.dim
        append_new_vectors(self.store, shards, live, dim, fsync=self.fsync)
        if name in unverified_shards(self.store):
            repaired = repair_shards(self.store, name, shards, live, dim, fsync=self.fsync)
            self.verified.add(name)
            if repaired:
                self.rebuild.add(name)
                self.dirty.add(name)
        compact_if_fragmented(shards, live, fsync=self.fsync)

    # -- building --------------------------------------------------------------------------
    def resolve_type(self, n: int, name: str | None = None, *, fresh: bool = False,
                     target_recall: float | None = None, seed: int = 0) -> str:
        """The index type for an index of ``n`` vectors under the collection's request. ``auto``
        with ``name`` and at least :data:`.autoselect.MEASURE_MIN_VECTORS` vectors measures the
        candidate families on the index's own vectors (:func:`.autoindex.auto_index_type`; the
        choice is kept until the size halves or doubles, or ``fresh``)."""
        m = self.manifest
        if m.index_type == AUTO and name is not None and n >= MEASURE_MIN_VECTORS:
            other = self.store.ids("text" if name == "image" else "image")

            def other_vectors(count: int, rng: np.random.Generator) -> np.ndarray:
                picked = np.sort(rng.choice(other, size=min(count, len(other)), replace=False))
                return self.store.vectors(picked.tolist(), m.dim)

            spec, record = auto_index_type(
                self.shards[name], self.store.ids(name), previous=(self.built.get(name) or {}).get("auto"),
                other=other_vectors, max_memory=m.max_index_memory, fresh=fresh,
                target_recall=target_recall, seed=seed)
            if record is not None:
                self.built[name] = {**(self.built.get(name) or {}), "auto": record}
            return spec
        if m.index_type == AUTO:
            return choose_index(n, m.dim, m.max_index_memory)
        if n < min_training_vectors(make_faiss_index(m.dim, m.index_type)):
            return "Flat"  # too few vectors to train the requested type yet: search exactly
        return m.index_type

    def build(self, name: str, index_type: str, live: np.ndarray, *, seed: int = 0,
              tune: bool = True, target_recall: float = 0.95, sharded: bool | None = None,
              workers: int = 2) -> None:
        """Rebuild index ``name`` as ``index_type`` from the shards (training, tuning)."""
        probe = VectorIndex(self.manifest.dim, index_type)
        if sharded is None:
            sharded = len(live) * self.manifest.dim * 4 > SHARDED_BUILD_MIN_BYTES
        sharded = sharded and probe.kind == "ivf"  # e.g. a small caption index stays exact
        basename = f"{name}.{self.store.generation}.{secrets.token_hex(4)}"
        logger.info("building the %s index as %s over %d vectors%s", name, index_type, len(live),
                    " shard by shard on disk" if sharded else "")
        index, report = build_index(index_type, self.shards[name], live, seed=seed,
                                    sharded=sharded, out_dir=self.folder / "index",
                                    basename=basename, workers=workers)
        self.attach(name, index)
        auto = (self.built.get(name) or {}).get("auto")  # what auto measured (autoselect)
        keep = auto and auto.get("index_type") == index_type
        self.built[name] = report.to_dict() | ({"auto": auto} if keep else {})
        self.tuning.pop(name, None)
        if tune and index.kind in ("ivf", "hnsw") and len(live):
            queries, query_ids = self.tuning_queries(name, live, index, seed)
            result = tune_index(index, self.shards[name], live, queries, target_recall=target_recall,
                                query_ids=query_ids)
            index.params = measured_floor(self.built[name].get("auto"), index_type, index.params)
            self.tuning[name] = result.to_dict()
            logger.info("tuned the %s index: %s=%s (recall@10 %.3f, target %.2f)", name,
                        result.param, result.value,
                        result.measured[-1]["recall"] if result.measured else float("nan"),
                        target_recall)
        self.dirty.add(name)
        self.rebuild.discard(name)

    def tuning_queries(self, name: str, live: np.ndarray, index: VectorIndex, seed: int,
                       n: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """Held-out queries ``(n, D)``: stored vectors not used for training, half from the other
        modality (captions query images and the other way round) when it has any; and the ids
        ``(n,)`` under which they are stored in index ``name`` (-1 for the other modality's), so
        tuning leaves each query's own vector out of its results."""
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
        ids = [np.asarray(own, dtype=np.int64)]
        if n_other:
            picked = np.sort(rng.choice(other, size=n_other, replace=False))
            parts.append(self.store.vectors(picked.tolist(), self.manifest.dim))
            ids.append(np.full(n_other, -1, dtype=np.int64))
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32), np.concatenate(ids)

    # -- writing ---------------------------------------------------------------------------
    def remember_shards(self) -> None:
        """Record the checksums of the shards the next manifest lists (see
        :mod:`.binding`): those written here are known; a collection with no record yet has
        its shards hashed now (bound); in a bound collection a shard of unknown checksum stays
        unrecorded (not one it wrote)."""
        legacy = recorded_shard_files(self.store) is None
        current: dict[str, dict[str, str | None]] = {}
        for name, sh in self.shards.items():
            current[name] = {}
            for s in sh.shards:
                known = sh.hashes.get(s.path)
                if known is None and legacy:
                    try:
                        known = sh.digest(s)
                    except CollectionError as e:
                        logger.warning("%s", e)
                current[name][s.path] = known
        remember_shard_files(self.store, current)

    @phase("persist")
    def persist(self) -> None:
        """Bring the shards and indexes up to date, write changed indexes under new file names,
        then switch the manifest to them."""
        gen = self.store.generation
        for name in INDEX_NAMES:
            live = self.store.ids(name)
            self.sync_shards(name, live)
            try:
                want = self.resolve_type(len(live), name)
            except CollectionError as e:  # e.g. the memory budget no longer fits: keep the index
                logger.warning("%s index: %s", name, e)
                want = self.indexes[name].index_type
            if name in self.rebuild or want != self.indexes[name].index_type:
                self.build(name, want, live)
        files = {}
        for name, ix in self.indexes.items():
            record = self.manifest.files.get(name)
            if name in self.dirty or record is None:
                relpath = f"index/{name}.{gen}.faiss"
                if record is not None and record.path == relpath:
                    relpath = f"index/{name}.{gen}.{secrets.token_hex(4)}.faiss"
                record = ix.save(self.folder, relpath, fsync=self.fsync)
            files[name] = record
        remember_index_files(self.store, files)  # before the manifest names them
        self.remember_shards()
        self.manifest = replace(
            self.manifest, generation=gen, files=files, counts=self.store.counts(),
            updated_at=now(), library_version=__version__, format_version=FORMAT_VERSION,
            collection_id=self.store.get_meta(COLLECTION_ID_KEY) or self.manifest.collection_id,
            index_types={n: ix.index_type for n, ix in self.indexes.items()},
            search_params={n: ix.params.to_dict() for n, ix in self.indexes.items()},
            build={n: self.built[n] for n in INDEX_NAMES if n in self.built},
            tuning={n: self.tuning[n] for n in INDEX_NAMES if n in self.tuning},
            embeddings={n: list(sh.shards) for n, sh in self.shards.items()},
        )
        self.manifest.write(self.folder, fsync=self.fsync)
        self.dirty.clear()
        if self.verified:
            forget_verified_shards(self.store, self.verified)
            self.verified.clear()
        remove_unlisted_files(self.folder, self.manifest,
                              (f for sh in self.shards.values() for f in sh.files()))


def write_new_collection(target: Path, *, encoder: str, dim: int, probe: fingerprint.Fingerprint,
                         index_type: str, max_index_memory: int | None, fsync: str) -> Manifest:
    """Write an empty collection into ``target`` (a staging folder, see :mod:`.creation`):
    metadata holding the fingerprint ``probe`` of ``encoder`` (``dim``-d) and a new collection
    id, empty indexes, and the manifest last (it marks the folder as a collection). Returns
    the manifest."""
    store = MetadataStore(target, fsync=fsync)
    collection_id = new_collection_id()  # binds the manifest to the metadata
    with store.transaction():
        fingerprint.write(store, probe)
        store.set_meta(COLLECTION_ID_KEY, collection_id)
    manifest = Manifest(encoder=encoder, dim=dim, index_type=index_type,
                        max_index_memory=max_index_memory, library_version=__version__,
                        created_at=now(), updated_at=now(), collection_id=collection_id)
    state = IndexState(target, manifest, store, fsync=fsync != "off")
    state.start_empty()
    state.persist()
    store.close()
    return state.manifest
