"""Auditing an index file against the metadata: the ids it holds and the vector under each id.

Used by :meth:`crossmodal_rag.collection.Collection.check`, on an index loaded fresh from its
file (memory-mapped, read-only), never on the collection's in-memory indexes (which are
reconciled with the metadata on open and would always agree).

How vectors are compared, for every index type: the index's own ``reconstruct`` gives the vector
it holds for an id (IVF indexes get a hash-table direct map, in memory only, to find ids). An
exact index (Flat, HNSW over flat storage, IVF-Flat) holds the metadata vector itself or its
float16 copy from the embedding shards (indexes are rebuilt from those), so it must match within
the float16 precision. A quantised index (PQ, SQ, OPQ) holds a code; the reference is what the
index's own codec makes of the same vector (``sa_decode(sa_encode(v))``, of the metadata vector
and of its float16 copy): the stored reconstruction may be at most a little farther from the
metadata vector than that. A vector replaced by another unrelated one lands far outside that
bound; one swapped with a near neighbour closer than the codec's own error cannot be told apart
by any codec-level comparison, and is not. A NaN anywhere counts as a difference.

Beside that comparison (of every id up to :data:`CHECK_ALL_MAX_VECTORS`, a seeded sample
beyond), every stored vector's values are checked, not a sample: the float16 shards in one
vectorised pass over their memory maps (:func:`audit_shards`, finite and of unit norm within
:data:`~.shards.UNIT_NORM_TOLERANCE`), and every vector an index can reconstruct
(:func:`index_faults`: finite; of unit norm too where the index stores vectors exactly).
:func:`audit_shards` also says which shard files cannot be used (unreadable, of another shape or
dtype, not written by this collection) and which live ids would have to come from the metadata
instead: what ``reindex`` rebuilds, or refuses to build from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import faiss
import numpy as np

from ..errors import CollectionError
from .binding import foreign_shard, recorded_shard_files
from .manifest import ShardFile
from .shards import UNIT_NORM_TOLERANCE, EmbeddingShards, VectorFaults, vector_faults
from .vectors import VectorIndex

if TYPE_CHECKING:
    from .metadata import MetadataStore

__all__ = [
    "CHECK_ALL_MAX_VECTORS",
    "MAX_NAMED",
    "METADATA_NORM_TOLERANCE",
    "ShardAudit",
    "VectorAudit",
    "audit_shards",
    "audit_vectors",
    "examples",
    "id_disagreement",
    "index_faults",
    "metadata_faults",
    "name_items",
    "sample_ids",
]

#: Indexes of up to this many vectors are compared in full; larger ones by a seeded random sample
#: of this many. A defect touching 1 vector in 10,000 is then missed with probability
#: (1 - 1e-4) ** 200,000 ~ 2e-9.
CHECK_ALL_MAX_VECTORS = 200_000
#: float16 copies of unit vectors differ from the float32 ones by under 5e-4 per component.
FLOAT16_ATOL = 2e-3
#: A stored code may be this much farther from the metadata vector than the codec's own
#: round trip of it (relative, absolute): room for float16 input and ties between codes.
_CODEC_SLACK = (1.25, 0.01)
#: The metadata's float32 vectors are written unit-norm by the encoders (and the importer).
METADATA_NORM_TOLERANCE = 1e-3
_CHUNK = 10_000
_EXAMPLES = 5
#: Items named one by one (id and path) in a message about bad vectors; the rest are counted.
MAX_NAMED = 10


@dataclass
class VectorAudit:
    """What comparing one index's vectors found."""

    compared: int  # ids whose vectors were compared
    total: int  # ids in the metadata
    bad_index: list[int] = field(default_factory=list)  # index vector != metadata vector
    bad_shards: list[int] = field(default_factory=list)  # float16 copy != metadata vector
    unsupported: str = ""  # why the index's vectors could not be read back (then not compared)
    bad_metadata: VectorFaults | None = None  # compared ids whose metadata vector is unusable


def sample_ids(ids: np.ndarray, max_vectors: int | None, seed: int) -> np.ndarray:
    """All ``ids`` if there are at most ``max_vectors`` (None: no limit), else a seeded sample."""
    if max_vectors is None or len(ids) <= max_vectors:
        return ids
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ids, size=max_vectors, replace=False))


def id_disagreement(held: np.ndarray, live: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ids in the index only, ids in the metadata only)``, both sorted."""
    return (np.setdiff1d(held, live, assume_unique=True), np.setdiff1d(live, held, assume_unique=True))


def examples(ids: np.ndarray | list[int]) -> str:
    """A few ids for a message: ``"3, 7, 9 and 12 more"``."""
    ids = [int(i) for i in ids]
    more = f" and {len(ids) - _EXAMPLES} more" if len(ids) > _EXAMPLES else ""
    return ", ".join(map(str, ids[:_EXAMPLES])) + more


def _reader(index: faiss.Index) -> Callable[[np.ndarray], np.ndarray] | None:
    """ids -> the vectors ``(n, d)`` ``index`` holds for them, or None if it cannot say."""
    ivf = faiss.try_extract_index_ivf(index)
    try:
        if ivf is not None:
            ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # in memory: the file is untouched
        index.reconstruct_batch(np.zeros(0, np.int64))
    except RuntimeError:
        return None
    return lambda ids: index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))


def _codec(index: faiss.Index) -> Callable[[np.ndarray], np.ndarray] | None:
    """``x -> sa_decode(sa_encode(x))`` of the index's codec (None: the codec is exact or
    unknown, compared as exact)."""
    target = index
    if hasattr(index, "id_map"):
        target = faiss.downcast_index(index.index)
        if isinstance(target, faiss.IndexHNSW):
            target = faiss.downcast_index(target.storage)
    if isinstance(target, faiss.IndexFlat):
        return None
    try:
        target.sa_decode(target.sa_encode(np.zeros((1, index.d), np.float32)))
    except RuntimeError:
        return None
    return lambda x: target.sa_decode(target.sa_encode(np.ascontiguousarray(x, dtype=np.float32)))


def audit_vectors(
    index: VectorIndex | None, ids: np.ndarray, metadata: Callable[[np.ndarray], np.ndarray],
    shards: EmbeddingShards, held_by_shards: np.ndarray,
) -> VectorAudit:
    """Compare, for each of ``ids`` (sorted), the metadata vector with the index's vector (ids
    the index holds; None: no index to compare) and with its float16 shard copy (ids in
    ``held_by_shards``).

    ``metadata``: ids -> float32 vectors ``(n, d)`` as committed.
    """
    audit = VectorAudit(compared=len(ids), total=len(ids))
    read = None if index is None else _reader(index.index)
    if index is not None and read is None:
        audit.unsupported = f"a {type(faiss.downcast_index(index.index)).__name__} index cannot reconstruct"
    codec = None if read is None else _codec(index.index)  # type: ignore[union-attr]
    in_index = np.zeros(0, np.int64) if read is None else index.ids()  # type: ignore[union-attr]
    slack, floor = _CODEC_SLACK
    bad_meta: list[VectorFaults] = []
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        meta = metadata(chunk)
        faults = vector_faults(chunk, meta, METADATA_NORM_TOLERANCE)
        bad_meta.append(faults)
        sharded = np.isin(chunk, held_by_shards)
        copies = np.full_like(meta, np.nan)
        if sharded.any():
            copies[sharded] = shards.lookup(chunk[sharded])
            off = ~(np.abs(copies[sharded] - meta[sharded]).max(axis=1) <= FLOAT16_ATOL)  # NaN: off
            audit.bad_shards += chunk[sharded][off].tolist()
            sharded[np.flatnonzero(sharded)[off]] = False  # a wrong copy is no reference below
        if read is None:
            continue
        here = np.isin(chunk, in_index)
        if not here.any():
            continue
        got, want = read(chunk[here]), meta[here]
        err = np.linalg.norm(got - want, axis=1)
        if codec is None:  # exact: the vector itself or its float16 copy
            bound = np.full(len(want), FLOAT16_ATOL)
        else:
            refs = [codec(want)]
            has_copy = sharded[here]
            if has_copy.any():
                ref16 = refs[0].copy()
                ref16[has_copy] = codec(copies[here][has_copy])
                refs.append(ref16)
            own = np.max([np.linalg.norm(r - want, axis=1) for r in refs], axis=0)
            bound = own * slack + floor
        audit.bad_index += chunk[here][~(err <= bound)].tolist()  # NaN: bad
    audit.bad_metadata = VectorFaults(
        np.concatenate([f.nonfinite for f in bad_meta] or [np.zeros(0, np.int64)]),
        np.concatenate([f.off_norm for f in bad_meta] or [np.zeros(0, np.int64)]))
    return audit


def index_faults(index: VectorIndex) -> tuple[VectorFaults, str]:
    """``(faults, "")``: every vector ``index`` holds that is not finite, or (where it stores
    vectors exactly) not of unit norm; ``(no faults, why)`` when it cannot reconstruct them."""
    none = VectorFaults(np.zeros(0, np.int64), np.zeros(0, np.int64))
    read = _reader(index.index)
    if read is None:
        return none, f"a {type(faiss.downcast_index(index.index)).__name__} index cannot reconstruct"
    tolerance = UNIT_NORM_TOLERANCE if _codec(index.index) is None else None
    ids = index.ids()
    parts = [vector_faults(ids[s : s + _CHUNK], read(ids[s : s + _CHUNK]), tolerance)
             for s in range(0, len(ids), _CHUNK)]
    if not parts:
        return none, ""
    return VectorFaults(np.concatenate([f.nonfinite for f in parts]),
                        np.concatenate([f.off_norm for f in parts])), ""


def metadata_faults(store: MetadataStore, ids: np.ndarray, dim: int) -> VectorFaults:
    """The ``ids`` whose committed (metadata) vector is unreadable, not finite or not of unit
    norm (unreadable ones count as not finite)."""
    nonfinite: list[np.ndarray] = []
    off_norm: list[np.ndarray] = []
    for start in range(0, len(ids), _CHUNK):
        chunk = np.asarray(ids[start : start + _CHUNK], dtype=np.int64)
        vectors, unreadable = store.vectors_as_stored(chunk.tolist(), dim)
        vectors[unreadable] = np.nan
        faults = vector_faults(chunk, vectors, METADATA_NORM_TOLERANCE)
        nonfinite.append(faults.nonfinite)
        off_norm.append(faults.off_norm)
    empty = np.zeros(0, np.int64)
    return VectorFaults(np.concatenate(nonfinite or [empty]), np.concatenate(off_norm or [empty]))


@dataclass
class ShardAudit:
    """What :func:`audit_shards` found in one index's float16 shards."""

    unusable: list[tuple[ShardFile, str]]  # shard files not to build from, and why
    faults: VectorFaults  # live ids whose float16 vector (in a readable shard) is bad
    missing: np.ndarray  # live ids no usable shard holds: rebuilt from the metadata
    bad_metadata: VectorFaults  # of ``missing``, those whose metadata vector is bad too

    @property
    def reembed(self) -> np.ndarray:
        """Ids that only re-embedding can repair (no good copy to build from), sorted."""
        return np.union1d(self.faults.ids, self.bad_metadata.ids)


def audit_shards(store: MetadataStore, name: str, shards: EmbeddingShards, live: np.ndarray,
                 dim: int, *, new_from: int | None = None) -> ShardAudit:
    """Inspect the shards of index ``name`` for the ``live`` ids (sorted), reading only: which
    shard files cannot be used (unreadable, of another shape or dtype, or -- in a collection
    that records them -- not one it wrote), the live ids whose stored vector is not finite or
    not of unit norm (in every readable shard), and the live ids that would have to be rebuilt
    from the metadata, with those whose metadata vector is bad too. ``new_from``: ids above it
    are not expected in the shards yet (committed since; the next persist appends them)."""
    recorded = recorded_shard_files(store)
    unusable: list[tuple[ShardFile, str]] = []
    readable: list[ShardFile] = []
    for shard in shards.shards:
        why = shards.unusable(shard)
        if why is None:
            readable.append(shard)
            try:
                why = foreign_shard(store, name, shard, lambda s=shard: shards.digest(s), recorded)
            except CollectionError as e:  # unreadable now: one more reason
                why = str(e)
        if why is not None:
            unusable.append((shard, why))
    look = EmbeddingShards(shards.folder, name, shards.dim, readable)
    faults = look.scan(live)
    dropped = {s.path for s, _ in unusable}
    kept = EmbeddingShards(shards.folder, name, shards.dim, [s for s in readable if s.path not in dropped])
    missing = np.setdiff1d(live, kept.held_ids(), assume_unique=True)
    if new_from is not None:
        missing = missing[missing <= new_from]
    return ShardAudit(unusable, faults, missing, metadata_faults(store, missing, dim))


def name_items(store: MetadataStore, ids: np.ndarray | list[int], limit: int = MAX_NAMED) -> str:
    """Up to ``limit`` of ``ids`` with what each is (``"3 (/photos/cat.jpg)"``, ``"7 (caption of
    /photos/cat.jpg)"``, ``"9 (passage 'Title')"``), then how many more."""
    ids = [int(i) for i in ids]
    shown = ids[:limit]
    try:
        items = store.get_items(shown)
    except CollectionError:  # a damaged row: name the ids alone
        items = {}
    parts = []
    for i in shown:
        item = items.get(i)
        if item is None:
            parts.append(str(i))
        elif item.kind == "image":
            parts.append(f"{i} ({item.path})" if item.path else f"{i} (image)")
        elif item.kind == "passage":
            label = item.title or item.ext_id or (item.text or "")[:40]
            parts.append(f"{i} (passage {label!r})")
        else:
            parts.append(f"{i} ({item.kind} of {item.path})" if item.path else f"{i} ({item.kind})")
    more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
    return ", ".join(parts) + more
