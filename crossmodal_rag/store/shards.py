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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import CollectionError
from .manifest import ShardFile, fsync_dir, open_new_file

__all__ = ["EmbeddingShards", "ShardFile"]

logger = logging.getLogger(__name__)

#: Vectors per shard written by compaction and imports (~100 MB of float16 at d=512).
DEFAULT_SHARD_SIZE = 100_000


def _save_npy(path: Path, array: np.ndarray, fsync: bool) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with os.fdopen(open_new_file(tmp), "wb") as f:  # never through a planted link
            np.save(f, array, allow_pickle=False)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: Up to this many ids, :meth:`EmbeddingShards.lookup` reads row by row (re-rank shortlists).
_ROW_BY_ROW = 128


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class EmbeddingShards:
    """The shards of one index (``"image"`` or ``"text"``) of a collection."""

    def __init__(self, folder: Path, name: str, dim: int, shards: list[ShardFile] | None = None) -> None:
        self.folder = Path(folder)
        self.name = name
        self.dim = int(dim)
        self.shards: list[ShardFile] = list(shards or [])
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
        _save_npy(vec_path, np.asarray(vectors, dtype=np.float16), fsync)
        _save_npy(ids_path, np.asarray(ids, dtype=np.int64), fsync)
        if fsync:
            fsync_dir(sub)
        return ShardFile(path=str(vec_path.relative_to(self.folder)),
                         ids_path=str(ids_path.relative_to(self.folder)), count=len(ids),
                         min_id=int(ids.min()), max_id=int(ids.max()))

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
        except (OSError, ValueError) as e:
            raise CollectionError(f"embedding shard {vec_path} is unreadable: {e}; rebuild the "
                                  "shards with `crossmodal-rag reindex`") from e
        if vecs.shape != (shard.count, self.dim) or ids.shape != (shard.count,):
            raise CollectionError(f"embedding shard {vec_path} holds {vecs.shape}, the manifest "
                                  f"says ({shard.count}, {self.dim})")
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

    def files(self) -> set[str]:
        return {p for s in self.shards for p in (s.path, s.ids_path)}
