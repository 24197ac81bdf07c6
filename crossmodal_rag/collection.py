"""A collection: a versioned folder holding CLIP embeddings of images and texts, searchable.

:class:`Collection` is the facade: it opens, creates and closes a collection (the folder layout
and its crash safety: :mod:`crossmodal_rag.store.layout`) and hands each job to the module that
owns it:

- writing the indexes, shards and manifest: :mod:`crossmodal_rag.store.persist` (following the
  metadata: :mod:`crossmodal_rag.store.reconcile`);
- adding files: :mod:`crossmodal_rag.ingestion.runner`; removing items: :mod:`crossmodal_rag.maintenance.removal`;
  score thresholds: :mod:`crossmodal_rag.search.calibration`;
- searching (one entry point, :meth:`Collection.search`): :mod:`crossmodal_rag.search`; query
  embedding: :mod:`crossmodal_rag.search.query`; the text space: :mod:`crossmodal_rag.search.text_space`;
- reindex, tune, near-duplicates: :mod:`crossmodal_rag.maintenance.indexes`; check: :mod:`crossmodal_rag.maintenance.check`;
- the encoder, checked against the collection's fingerprint: :mod:`crossmodal_rag.maintenance.bound_encoder`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ._phases import phase
from .encoders import DEFAULT_MODEL, ClipEncoder, load_encoder, parse_model_spec
from .errors import CollectionError
from .ingestion.images import DEFAULT_MAX_IMAGE_PIXELS
from .lock import WriteLock
from .maintenance import fingerprint, indexes, removal
from .maintenance.bound_encoder import BoundEncoder
from .maintenance.check import CheckReport, check_collection
from .search import SearchRequest, SearchResult, engine
from .search.dense import resolve_min_score
from .search.hits import Hit
from .search.query import clip_term, embed_query
from .search.text_space import SyncReport, TextSpace, open_text_space, sync_text_space
from .store.ann import AUTO, SearchParams, parse_memory
from .store.audit import CHECK_ALL_MAX_VECTORS
from .store.binding import COLLECTION_ID_KEY, check_collection_id, new_collection_id
from .store.creation import Creation, clear_interrupted_creation
from .store.layout import FSYNC_POLICIES, FsyncPolicy, check_fsync
from .store.manifest import MANIFEST_NAME, Manifest, check_own_folders
from .store.metadata import Item, MetadataStore
from .store.persist import IndexState, write_new_collection
from .store.shards import EmbeddingShards
from .store.summary import describe
from .store.vectors import VectorIndex, make_faiss_index

if TYPE_CHECKING:
    from .ingestion.runner import IngestReport

__all__ = ["FSYNC_POLICIES", "CheckReport", "Collection", "FsyncPolicy", "open_collection"]

logger = logging.getLogger(__name__)


class Collection:
    """An open collection. Use :meth:`create` or :meth:`open`; close it (or use ``with``)."""

    def __init__(
        self, folder: Path, manifest: Manifest, store: MetadataStore, *, writable: bool,
        lock: WriteLock | None, model: str, device: str | None, fsync: FsyncPolicy,
        mmap: bool = False,
    ) -> None:
        self.folder = folder
        self.store = store
        self.writable = writable
        self._lock = lock
        self.state = IndexState(folder, manifest, store, fsync=fsync != "off", mmap=mmap)
        self.bound = BoundEncoder(folder, store, manifest.encoder, manifest.dim, writable=writable,
                                  device=device, model=model)
        self._device = device
        self._space: tuple[int, TextSpace | None] | None = None  # (manifest stamp, open text space)

    @property
    def manifest(self) -> Manifest:
        """The manifest as last written (or read)."""
        return self.state.manifest

    @property
    def indexes(self) -> dict[str, VectorIndex]:
        """Index name (``image``, ``text``) -> its in-memory index."""
        return self.state.indexes

    @property
    def shards(self) -> dict[str, EmbeddingShards]:
        """Index name -> the float16 copies of its vectors."""
        return self.state.shards

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
        check_fsync(fsync)
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
        try:
            manifest = write_new_collection(creation.target, encoder=str(spec), dim=encoder.dim,
                                            probe=probe, index_type=index_type,
                                            max_index_memory=budget, fsync=fsync)
            creation.finish(fsync=fsync != "off")  # renamed into place: complete, or not there
            coll = cls(folder, manifest, MetadataStore(folder, fsync=fsync), writable=True,
                       lock=creation.lock, model=str(spec), device=device, fsync=fsync)
            coll.bound.loaded = encoder
            coll.state.load(writable=True)
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
        check_fsync(fsync)
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
                    coll.bound.use(model)
                coll.state.load(writable=writable)
                if writable:
                    coll.state.settle_ids()
                    coll.state.bind()
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

    def require_writable(self) -> None:
        """Raise :class:`CollectionError` unless the collection was opened for writing."""
        if not self.writable:
            raise CollectionError(f"{self.folder} is open read-only; open it with writable=True")

    # -- encoder (bound_encoder) -------------------------------------------------------------
    @property
    def encoder(self) -> ClipEncoder:
        """The collection's encoder (loaded and fingerprint-checked on first use)."""
        return self.bound.get()

    def check_compatible(self, other: Collection) -> None:
        """Refuse (``EncoderMismatchError``) unless ``other``'s encoder embeds like ours, so
        vectors from one can query the other (e.g. a separate knowledge collection)."""
        if other.manifest.encoder == self.manifest.encoder and other.manifest.dim == self.manifest.dim:
            return
        self.bound.verify(other.encoder, asked=f"{other.manifest.encoder} (of {other.folder})")

    # -- indexes (store.persist) and maintenance -----------------------------------------------
    def reconcile(self) -> tuple[int, int]:
        """Make the in-memory indexes hold exactly the committed items; returns (added, removed)."""
        return self.state.reconcile()

    def persist(self) -> None:
        """Bring the shards and indexes up to date, write changed indexes under new file names,
        then switch the manifest to them (:meth:`crossmodal_rag.store.persist.IndexState.persist`);
        then the text space, when the collection has one, follows the texts (new ones embedded,
        removed ones dropped). Every writer (add, remove, import, repair) ends here, so the vector
        index, the keyword index (written with the metadata) and the text space stay in step."""
        self.require_writable()
        self.state.persist()
        try:
            self._keep_text_space()
        except CollectionError as e:  # the indexes are written; `reindex` rebuilds a refused space
            logger.warning("%s", e)

    def apply(self, added: dict[str, tuple[np.ndarray, np.ndarray]], removed: list[int]) -> None:
        """Mirror a committed metadata transaction in the in-memory indexes."""
        self.state.apply(added, removed)

    @phase("reindex")
    def reindex(
        self, index_type: str | None = None, *, max_index_memory: int | str | None = None,
        seed: int = 0, tune: bool = True, target_recall: float = 0.95, sharded: bool | None = None,
        workers: int = 2, repair: bool = False,
    ) -> dict[str, Any]:
        """Rebuild both indexes from the float16 shards, without re-encoding anything (see
        :func:`crossmodal_rag.maintenance.indexes.reindex`); a stored vector that is not finite or not
        of unit norm is refused. ``repair``: re-embed such items from their sources first (see
        :func:`crossmodal_rag.maintenance.repair.repair_vectors`; the report's ``"repair"``). Returns what
        was built."""
        self.require_writable()
        repaired = None
        if repair:
            from .maintenance.repair import repair_vectors

            repaired = repair_vectors(self)
        report = indexes.reindex(self.state, index_type, max_index_memory=max_index_memory, seed=seed,
                                     tune=tune, target_recall=target_recall, sharded=sharded,
                                     workers=workers)
        if repaired is not None:
            report["repair"] = repaired.to_dict()
        text = self._keep_text_space(rebuild_refused=True)  # a refused text space is rebuilt
        if text.spec is not None:
            report["text_space"] = {"spec": text.spec, "added": text.added, "removed": text.removed,
                                    "rebuilt": text.rebuilt}
        return report

    def tune(self, *, target_recall: float = 0.95, seed: int = 0) -> dict[str, Any]:
        """Re-tune the search settings of the approximate indexes (no rebuild); stores and
        returns what was measured per index."""
        self.require_writable()
        return indexes.tune(self.state, target_recall=target_recall, seed=seed)

    def set_search_params(self, params: SearchParams, index: str | None = None) -> None:
        """Store ``params`` as the default search settings of one index (or both), persisted."""
        self.require_writable()
        indexes.set_search_params(self.state, params, index)

    def near_duplicates(self, threshold: float = 0.95) -> list[list[int]]:
        """Groups of image ids whose embeddings have cosine >= ``threshold`` (linked
        transitively), largest groups first. Byte-identical files are already one item."""
        return indexes.near_duplicates(self.store, self.indexes, self.manifest.dim, threshold)

    def check(self, *, verify_hash: bool = True, max_vectors: int | None = CHECK_ALL_MAX_VECTORS,
              seed: int = 0) -> CheckReport:
        """Verify that the index files the manifest on disk names, the float16 shards and the
        metadata agree (see :func:`crossmodal_rag.maintenance.check.check_collection`). Reads only."""
        return check_collection(self.folder, self.store, self.manifest.dim, verify_hash=verify_hash,
                                max_vectors=max_vectors, seed=seed)

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

    # -- searching -------------------------------------------------------------------------
    def embed_query(
        self, text: str | None = None, image: str | Path | Image.Image | None = None,
        *, plus: list[str] | None = None, minus: list[str] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> np.ndarray:
        """A query embedding ``(D,)`` from a text, an image (path or PIL image), or both.

        Text queries support arithmetic (``"a cat" + "snow" - "indoors"``, ``2:cat``; see
        :mod:`crossmodal_rag.search.query`); ``plus``/``minus`` add or subtract more texts. The result is
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

    def search(self, request: SearchRequest | str | None = None, /, **options: Any) -> SearchResult:
        """Search the collection: the one entry point of every front end.

        ``request`` is a :class:`~crossmodal_rag.search.SearchRequest`, or a text query; keyword
        ``options`` set (or override) its fields: ``image`` (a path or PIL image), ``vector``,
        ``plus``/``minus``, ``target`` (``"images"``, ``"texts"``, ``"all"``), ``mode``
        (:data:`~crossmodal_rag.search.MODES`, default ``"auto"``), ``k``, ``where`` (metadata
        filters, :mod:`crossmodal_rag.search.filters`), ``min_score`` (a number or ``"auto"``),
        ``params`` (``nprobe`` / ``ef_search`` / ``rerank`` for this search), ``text_space``.

        Returns a :class:`~crossmodal_rag.search.SearchResult`: a sequence of
        :class:`~crossmodal_rag.search.Hit` records, best first, with ``mode`` (the mode that ran)
        and ``threshold`` (``min_score`` as a number). A text query for texts goes to the text
        space when the collection has one (:mod:`crossmodal_rag.search.routing`).

        Example: ``for hit in Collection.open("photos").search("a cat on a sofa", k=5): ...``
        """
        return engine.run(self, SearchRequest.of(request, **options))

    def search_vectors(
        self, vectors: np.ndarray, *, k: int = 10, target: str = "images",
        where: list[str] | str | None = None, min_score: float | None = None,
        params: SearchParams | None = None,
    ) -> list[list[Hit]]:
        """Dense search with many precomputed CLIP query embeddings ``(Q, D)`` at once (one FAISS
        call per index); one hit list per row. The batch form of
        ``search(SearchRequest(vector=row, mode="dense", ...))`` for training and batching."""
        request = SearchRequest(k=k, target=target, where=where or (), params=params, mode="dense")  # type: ignore[arg-type]
        return engine.run_vectors(self, vectors, request, min_score)

    # -- the text space (index --text-model) -------------------------------------------------
    @property
    def text_space(self) -> TextSpace | None:
        """The collection's text space, or None: opened on first use, again when its manifest
        changes (another process re-embedded it)."""
        manifest = self.folder / "text_space" / "manifest.json"
        try:
            stamp = manifest.stat().st_mtime_ns
        except OSError:
            stamp = -1
        if self._space is None or self._space[0] != stamp:
            self._space = (stamp, open_text_space(self) if stamp != -1 else None)
        return self._space[1]

    @property
    def text_model(self) -> str | None:
        """The sentence encoder of the text space (None: the collection has none)."""
        space = self.text_space
        return space.spec if space is not None else None

    def set_text_model(self, spec: str | None, *, rebuild: bool = False) -> SyncReport:
        """Embed the collection's texts with the sentence encoder ``spec`` in a text space of their
        own (``"none"`` removes it; None keeps the current one): a new spec embeds every text, the
        same one only what changed (``rebuild``: everything). Later writes keep it in step."""
        self.require_writable()
        return self._keep_text_space(spec, rebuild=rebuild)

    def _keep_text_space(self, spec: str | None = None, *, rebuild: bool = False,
                         rebuild_refused: bool = False) -> SyncReport:
        try:
            return sync_text_space(self, spec, rebuild=rebuild, rebuild_refused=rebuild_refused)
        finally:
            self._space = None

    # -- writing ---------------------------------------------------------------------------
    def add(self, source: str | Path, **settings: Any) -> IngestReport:
        """Ingest ``source`` (see :func:`crossmodal_rag.ingestion.runner.ingest` for the settings)."""
        from .ingestion.runner import IngestSettings, ingest  # loads torch: only when adding

        return ingest(self, source, IngestSettings(**settings))

    @phase("remove")
    def remove(self, ids: list[int] | None = None, paths: list[str] | None = None) -> dict[str, Any]:
        """Remove items by id and/or by source path, then persist (see
        :func:`crossmodal_rag.maintenance.removal.remove`). Returns ``{"removed": [...], "unknown": [...]}``."""
        return removal.remove(self, ids, paths)


def open_collection(folder: str | Path, **kwargs: Any) -> Collection:
    """Shorthand for :meth:`Collection.open`."""
    return Collection.open(folder, **kwargs)
