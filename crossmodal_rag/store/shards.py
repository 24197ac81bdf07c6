"""Float16 embedding shards: every committed vector, on disk, in append-only ``.npy`` files.

Layout inside a collection::

    embeddings/image/000000.f16.npy   float16 (n, dim) vectors
    embeddings/image/000000.ids.npy   int64 (n,) item ids, ascending

Shards are written when the collection persists (for the items committed since the last shard)
and by bulk imports; the manifest lists the current ones. They let an index be rebuilt with
another type (``crossmodal-rag reindex``) or built shard by shard without re-encoding anything
and without holding all vectors in RAM: shards are memory-mapped when read. Removed items stay in
old shards until :meth:`EmbeddingShards.compact` rewrites them; the metadata decides what is live.
Float16 keeps ~3 significant digits: cosine scores from shard vectors differ from float32 ones
by about 1e-3 at most.

Each shard's checksum (:meth:`EmbeddingShards.digest`: sha256 of its vectors file then its ids
file) is computed as it is written and recorded in the metadata
(:func:`crossmodal_rag.store.binding.remember_shard_files`), so a shard the collection did not
write (copied from another collection, edited) is told apart. :meth:`EmbeddingShards.scan`
checks every stored vector's values (finite, unit norm within :data:`UNIT_NORM_TOLERANCE`) in
one vectorised pass over the memory maps; :meth:`EmbeddingShards.rewrite` rewrites the shards
whole, in id order, taking the vectors of ids that must change from elsewhere (the metadata, a
re-embedding).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CollectionError
from ..safe_io import atomic_write, fsync_dir
from .manifest import ShardFile

__all__ = ["UNIT_NORM_TOLERANCE", "EmbeddingShards", "ShardFile", "VectorFaults", "vector_faults"]

logger = logging.getLogger(__name__)

#: Vectors per shard written by compaction and imports (~100 MB of float16 at d=512).
DEFAULT_SHARD_SIZE = 100_000


#: A stored vector whose norm differs from 1 by more than this is reported (and not built
#: from): float16 copies of unit vectors keep their norm within ~5e-4 of 1 (each component is
#: rounded to 11 significant bits), so a zero, denormal or rescaled row stands far outside it.
UNIT_NORM_TOLERANCE = 1e-2
_SCAN_CHUNK = 65_536  # rows converted to float32 at a time by scan()


class _Hashing:
    """A file object that feeds what is written to it to a hash as well."""

    def __init__(self, f: Any, digest: Any) -> None:
        self.f, self.digest = f, digest

    def write(self, data: Any) -> int:
        self.digest.update(data)
        return self.f.write(data)


def _save_npy(path: Path, array: np.ndarray, fsync: bool, digest: Any = None) -> None:
    with atomic_write(path, fsync=fsync, sync_folder=False) as f:  # the caller fsyncs the folder
        np.save(f if digest is None else _Hashing(f, digest), array, allow_pickle=False)


#: Up to this many ids, :meth:`EmbeddingShards.lookup` reads row by row (re-rank shortlists).
_ROW_BY_ROW = 128


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass
class VectorFaults:
    """Ids whose stored vectors are unusable, by fault."""

    nonfinite: np.ndarray  # (n,) int64: a NaN or an infinity in the vector
    off_norm: np.ndarray  # (m,) int64: finite, but the norm is not 1 within the tolerance

    @property
    def ids(self) -> np.ndarray:
        """All faulty ids, sorted."""
        return np.union1d(self.nonfinite, self.off_norm)

    def __len__(self) -> int:
        return len(self.nonfinite) + len(self.off_norm)


def vector_faults(ids: np.ndarray, vectors: np.ndarray, tolerance: float | None = UNIT_NORM_TOLERANCE
                  ) -> VectorFaults:
    """Which of ``vectors`` ``(n, d)`` (any float dtype) under ``ids`` ``(n,)`` are not finite,
    and (``tolerance`` not None) which finite ones are not of unit norm within ``tolerance``."""
    x = np.asarray(vectors, dtype=np.float32)
    # one pass: a row whose squared norm is finite has only finite components (NaN and infinity
    # carry through the sum); only the rest are looked at component by component
    with np.errstate(over="ignore", invalid="ignore"):
        squared = np.einsum("ij,ij->i", x, x) if x.ndim == 2 else np.zeros(len(x), np.float32)
        finite = np.isfinite(squared)
        if not finite.all():  # NaN or infinity, or finite components too large to square
            rows = np.flatnonzero(~finite)
            finite[rows] = np.isfinite(x[rows]).all(axis=1)
        off = np.zeros(len(x), bool)
        if tolerance is not None:
            off = finite & ~(np.abs(np.sqrt(squared) - 1.0) <= tolerance)
    ids = np.asarray(ids, dtype=np.int64)
    return VectorFaults(ids[~finite], ids[off])


class EmbeddingShards:
    """The shards of one index (``"image"`` or ``"text"``) of a collection."""

    def __init__(self, folder: Path, name: str, dim: int, shards: list[ShardFile] | None = None) -> None:
        self.folder = Path(folder)
        self.name = name
        self.dim = int(dim)
        self.shards: list[ShardFile] = list(shards or [])
        self.hashes: dict[str, str] = {}  # vectors file path -> digest, of shards written here
        self._lookup: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._opened: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # path -> (ids, vectors) maps

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def max_id(self) -> int:
        return max((s.max_id for s in self.shards), default=-1)

    def _next_name(self) -> str:
        used = {Path(s.path).name.split(".")[0] for s in self.shards}
        seq = 0
        if used:
            seq = max(int(u) for u in used if u.isdigit()) + 1
        return f"{seq:06d}"

    def append(self, ids: np.ndarray, vectors: np.ndarray, *, fsync: bool = True) -> ShardFile | None:
        """Write ``vectors`` ``(n, dim)`` under ascending ``ids`` as a new shard."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) == 0:
            return None
        vectors = np.asarray(vectors)
        if vectors.shape != (len(ids), self.dim):
            raise CollectionError(f"shard vectors of shape {vectors.shape} do not fit {len(ids)} "
                                  f"ids of a {self.dim}-d collection")
        order = np.argsort(ids, kind="stable")
        record = self._write(self._next_name(), ids[order], vectors[order], fsync)
        self.shards.append(record)
        self._lookup = None
        return record

    def _write(self, stem: str, ids: np.ndarray, vectors: np.ndarray, fsync: bool) -> ShardFile:
        sub = self.folder / "embeddings" / self.name
        sub.mkdir(parents=True, exist_ok=True)
        vec_path, ids_path = sub / f"{stem}.f16.npy", sub / f"{stem}.ids.npy"
        digest = hashlib.sha256()
        _save_npy(vec_path, np.asarray(vectors, dtype=np.float16), fsync, digest)
        _save_npy(ids_path, np.asarray(ids, dtype=np.int64), fsync, digest)
        if fsync:
            fsync_dir(sub)
        record = ShardFile(path=str(vec_path.relative_to(self.folder)),
                           ids_path=str(ids_path.relative_to(self.folder)), count=len(ids),
                           min_id=int(ids.min()), max_id=int(ids.max()))
        self.hashes[record.path] = digest.hexdigest()
        return record

    def digest(self, shard: ShardFile) -> str:
        """sha256 of the shard's vectors file followed by its ids file, as read from disk now
        (raises CollectionError when they cannot be read)."""
        digest = hashlib.sha256()
        for rel in (shard.path, shard.ids_path):
            try:
                with open(self.folder / rel, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
            except OSError as e:
                raise CollectionError(f"embedding shard {self.folder / rel} is unreadable: {e}") from e
        return digest.hexdigest()

    def unusable(self, shard: ShardFile) -> str | None:
        """Why ``shard`` cannot be read as the manifest describes it (unreadable, another shape
        or dtype, e.g. a shard of another dimension), or None."""
        try:
            self._map(shard)
        except CollectionError as e:
            return str(e)
        return None

    def without(self, dropped: list[ShardFile]) -> None:
        """Stop using the ``dropped`` shards (their ids then count as not held)."""
        gone = {s.path for s in dropped}
        self.shards = [s for s in self.shards if s.path not in gone]
        self._lookup = None
        self._opened.clear()

    def scan(self, live: np.ndarray | None = None, tolerance: float | None = UNIT_NORM_TOLERANCE
             ) -> VectorFaults:
        """The ``live`` ids (sorted; None: all) whose stored float16 vectors are not finite or
        not of unit norm (:func:`vector_faults`), in one pass over the memory-mapped shards."""
        nonfinite: list[np.ndarray] = []
        off_norm: list[np.ndarray] = []
        for shard in self.shards:
            ids, vecs = self._open(shard)
            for start in range(0, shard.count, _SCAN_CHUNK):
                part_ids = ids[start : start + _SCAN_CHUNK]
                rows = vecs[start : start + _SCAN_CHUNK]
                if live is not None and len(live):
                    at = np.minimum(np.searchsorted(live, part_ids), len(live) - 1)
                    keep = live[at] == part_ids
                    if not keep.all():
                        part_ids, rows = part_ids[keep], rows[keep]
                elif live is not None:
                    continue
                faults = vector_faults(part_ids, rows, tolerance)
                nonfinite.append(faults.nonfinite)
                off_norm.append(faults.off_norm)
        empty = np.zeros(0, np.int64)
        return VectorFaults(np.unique(np.concatenate(nonfinite or [empty])),
                            np.unique(np.concatenate(off_norm or [empty])))

    def _open(self, shard: ShardFile) -> tuple[np.ndarray, np.ndarray]:
        """Memory maps of a shard's ids and vectors, kept open (re-ranking reads them per query)."""
        cached = self._opened.get(shard.path)
        if cached is not None:
            return cached
        opened = self._map(shard)
        if len(self._opened) >= 4096:
            self._opened.clear()
        self._opened[shard.path] = opened
        return opened

    def _map(self, shard: ShardFile) -> tuple[np.ndarray, np.ndarray]:
        vec_path, ids_path = self.folder / shard.path, self.folder / shard.ids_path
        try:
            ids = np.load(ids_path, mmap_mode="r", allow_pickle=False)
            vecs = np.load(vec_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:  # EOFError: an empty file
            raise CollectionError(f"embedding shard {vec_path} is unreadable: {e}; "
                                  "`crossmodal-rag reindex` rebuilds it from the metadata") from e
        if vecs.shape != (shard.count, self.dim) or ids.shape != (shard.count,):
            raise CollectionError(f"embedding shard {vec_path} holds {vecs.shape}, the manifest "
                                  f"says ({shard.count}, {self.dim}); `crossmodal-rag reindex` "
                                  "rebuilds it from the metadata")
        if vecs.dtype != np.float16 or ids.dtype != np.int64:
            raise CollectionError(f"embedding shard {vec_path} holds {vecs.dtype} vectors and "
                                  f"{ids.dtype} ids, not float16 and int64; `crossmodal-rag "
                                  "reindex` rebuilds it from the metadata")
        # plain arrays over the maps (np.memmap's indexing costs ~10 us a call; re-ranking indexes
        # rows one by one); the maps stay open as their base
        return np.asarray(ids), np.asarray(vecs)

    def iter_chunks(self, live: np.ndarray | None = None, chunk: int = 65_536
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids (n,), float32 unit vectors (n, dim))`` for every live id, shard by shard.

        ``live`` (sorted int64) keeps only those ids; None keeps all.
        """
        for shard in self.shards:
            ids, vecs = self._open(shard)
            for start in range(0, shard.count, chunk):
                part_ids = np.asarray(ids[start : start + chunk])
                keep = np.ones(len(part_ids), bool) if live is None else np.isin(part_ids, live)
                if keep.any():
                    yield part_ids[keep], _normalise(vecs[start : start + chunk][keep])

    def held_ids(self) -> np.ndarray:
        """All ids in the shards, sorted."""
        if not self.shards:
            return np.zeros(0, dtype=np.int64)
        return np.sort(np.concatenate([np.asarray(self._open(s)[0]) for s in self.shards]))

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Float32 unit vectors ``(len(ids), dim)`` of ``ids``; raises KeyError for ids not held."""
        if self._lookup is None:
            all_ids, where_shard, where_row = [], [], []
            for n, shard in enumerate(self.shards):
                sid = np.asarray(self._open(shard)[0])
                all_ids.append(sid)
                where_shard.append(np.full(len(sid), n, dtype=np.int32))
                where_row.append(np.arange(len(sid), dtype=np.int64))
            cat = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
            order = np.argsort(cat, kind="stable")
            self._lookup = (cat[order],
                            (np.concatenate(where_shard) if where_shard else np.zeros(0, np.int32))[order],
                            (np.concatenate(where_row) if where_row else np.zeros(0, np.int64))[order])
        sorted_ids, shard_of, row_of = self._lookup
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(sorted_ids, ids)
        pos = np.minimum(pos, max(len(sorted_ids) - 1, 0))
        if len(sorted_ids) == 0 or not np.array_equal(sorted_ids[pos], ids):
            raise KeyError("ids not in the embedding shards")
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if len(ids) <= _ROW_BY_ROW:  # a re-rank shortlist: one row read per id beats masks per shard
            views: dict[int, np.ndarray] = {}
            for j, (n, r) in enumerate(zip(shard_of[pos].tolist(), row_of[pos].tolist(), strict=True)):
                vecs = views.get(n)
                if vecs is None:
                    vecs = views[n] = self._open(self.shards[n])[1]
                out[j] = vecs[r]
        else:
            for n in np.unique(shard_of[pos]):
                mask = shard_of[pos] == n
                _, vecs = self._open(self.shards[int(n)])
                out[mask] = vecs[row_of[pos][mask]]
        return _normalise(out)  # as iter_chunks does: the same vectors, bit for bit

    def compact(self, live: np.ndarray, *, shard_size: int = DEFAULT_SHARD_SIZE,
                fsync: bool = True, replace: np.ndarray | None = None,
                vectors_of: Callable[[np.ndarray], np.ndarray] | None = None) -> list[ShardFile]:
        """Rewrite the shards holding only ``live`` ids, ``shard_size`` per file; returns the new
        records. New files get new names; the old ones stay until the manifest stops listing them.

        ``replace`` (sorted ids) with ``vectors_of`` (ids -> float32 ``(n, dim)``): write those
        ids' vectors from ``vectors_of`` instead of their old copies, in the same place."""
        first = int(self._next_name())
        fresh: list[ShardFile] = []
        buf_ids: list[np.ndarray] = []
        buf_vecs: list[np.ndarray] = []
        for ids, vecs in self.iter_chunks(live, chunk=shard_size):
            if replace is not None and vectors_of is not None:
                swap = np.isin(ids, replace)
                if swap.any():
                    vecs[swap] = _normalise(vectors_of(ids[swap]))
            buf_ids.append(ids)
            buf_vecs.append(vecs.astype(np.float16))
            if sum(len(b) for b in buf_ids) >= shard_size:
                fresh.append(self._write(f"{first + len(fresh):06d}", np.concatenate(buf_ids),
                                         np.concatenate(buf_vecs), fsync))
                buf_ids, buf_vecs = [], []
        if buf_ids:
            fresh.append(self._write(f"{first + len(fresh):06d}", np.concatenate(buf_ids),
                                     np.concatenate(buf_vecs), fsync))
        self.shards = fresh
        self._lookup = None
        self._opened.clear()
        return fresh

    def rewrite(self, live: np.ndarray, vectors_of: Callable[[np.ndarray], np.ndarray], *,
                replace: np.ndarray | None = None, shard_size: int = DEFAULT_SHARD_SIZE,
                fsync: bool = True) -> list[ShardFile]:
        """Rewrite the shards to hold exactly the ``live`` ids (sorted), in id order,
        ``shard_size`` per file: each id's vector from the shards in use, or from ``vectors_of``
        (ids -> float32 ``(n, dim)``) for the ids they do not hold and those in ``replace``.
        New files get new names; the old ones stay until the manifest stops listing them."""
        live = np.asarray(live, dtype=np.int64)
        held = self.held_ids()
        fresh_ids = np.setdiff1d(live, held, assume_unique=True)
        if replace is not None:
            fresh_ids = np.union1d(fresh_ids, np.intersect1d(live, replace))
        first = int(self._next_name())
        fresh: list[ShardFile] = []
        for start in range(0, len(live), shard_size):
            ids = live[start : start + shard_size]
            new = np.isin(ids, fresh_ids)
            vecs = np.empty((len(ids), self.dim), dtype=np.float32)
            if (~new).any():
                vecs[~new] = self.lookup(ids[~new])
            if new.any():
                vecs[new] = _normalise(vectors_of(ids[new]))
            fresh.append(self._write(f"{first + len(fresh):06d}", ids, vecs, fsync))
        self.shards = fresh
        self._lookup = None
        self._opened.clear()
        return fresh

    def files(self) -> set[str]:
        return {p for s in self.shards for p in (s.path, s.ids_path)}
