"""FAISS vector indexes keyed by item id, with checked, atomic saves and loads."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..errors import CollectionError
from ..safe_io import atomic_write
from .ann import SearchParams, describe_index, min_training_vectors, search_parameters
from .filtered import id_selector, search_filtered, unique_ids
from .manifest import IndexFile
from .threads import NUMPY_MAX_QUERIES as _NUMPY_MAX_QUERIES
from .threads import single_thread_if as _single_thread_if

__all__ = ["VectorIndex"]

logger = logging.getLogger(__name__)

# faiss-cpu switches exact search to BLAS only from 20 queries by default; on small CPUs BLAS
# already wins from a handful (see shared PERFORMANCE notes), so batched queries use it sooner.
_BLAS_THRESHOLD = 4
# PQ shortlists are re-ranked with exact vectors: fetch k x this many candidates by default.
DEFAULT_PQ_RERANK = 8
#: Longest FAISS factory string accepted. FAISS parses it with std::regex, whose recursion
#: overflows the stack (the process dies) on strings of ~100k characters; real ones are short.
MAX_INDEX_TYPE_CHARS = 256


def make_faiss_index(dim: int, index_type: str) -> faiss.Index:
    """A FAISS index for a factory string: IVF types keep ids natively, others get ``IDMap2``."""
    if not index_type or index_type.strip().lower() == "auto" or "IDMap" in index_type:
        raise CollectionError(f"invalid FAISS index type {index_type!r}: give a factory string "
                              "such as Flat, HNSW32, IVF1024,Flat or IVF1024,PQ64np")
    if len(index_type) > MAX_INDEX_TYPE_CHARS:
        raise CollectionError(f"invalid FAISS index type {index_type[:40]!r}... ({len(index_type)} characters): "
                              f"the limit is {MAX_INDEX_TYPE_CHARS} (MAX_INDEX_TYPE_CHARS)")
    try:
        probe = faiss.index_factory(dim, index_type, faiss.METRIC_INNER_PRODUCT)
        if faiss.try_extract_index_ivf(probe) is not None:
            return probe
        return faiss.index_factory(dim, f"IDMap2,{index_type}", faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
        raise CollectionError(f"invalid FAISS index type {index_type!r}: {msg}") from e


@contextlib.contextmanager
def silence_c_stdout() -> Iterator[None]:
    """Discard what C++ code prints (file descriptors 1 and 2) while inside: FAISS prints notes
    about on-disk inverted lists, which must not mix with a command's results. Errors still
    arrive as exceptions."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # pragma: no cover - no standard streams at all
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).fflush(None)  # C's buffers are written out while they point at null
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _looks_like_faiss(header: bytes) -> bool:
    """FAISS files start with a four-letter ASCII tag such as IxM2, IwFl, IwPQ or IxPT."""
    return len(header) == 4 and header[:1] == b"I" and header.isalnum()


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class VectorIndex:
    """An inner-product FAISS index keyed by int64 ids.

    ``index_type`` is a FAISS index-factory string (see :mod:`crossmodal_rag.store.ann`). IVF
    types keep the ids in their inverted lists; the others are wrapped in ``IDMap2``. Vectors are
    expected L2-normalised, so scores are cosine similarities. Types that need training are
    trained by :meth:`train` (or on the first :meth:`add`).
    """

    def __init__(self, dim: int, index_type: str = "Flat", index: faiss.Index | None = None,
                 params: SearchParams | None = None) -> None:
        self.dim = int(dim)
        self.index_type = index_type
        if index is None:
            index = make_faiss_index(self.dim, index_type)
        self.index = index
        self.params = params or SearchParams()  # stored defaults (nprobe, ef_search, rerank)
        #: ids -> exact float32 vectors ``(n, dim)``, used to re-rank PQ shortlists
        self.exact_vectors: Callable[[np.ndarray], np.ndarray] | None = None
        self.mmapped = False

    def _describe(self) -> dict[str, Any]:
        """:func:`describe_index` of the index in use, worked out once per index object: a search
        asks for it three times, and each asks FAISS through SWIG (about 0.05 ms a query of a
        0.2 ms HNSW search; benchmarks/RESULTS.md, "auto by measurement")."""
        cached = self.__dict__.get("_described")
        if cached is None or cached[0] is not self.index:
            cached = self._described = (self.index, describe_index(self.index))
        return cached[1]

    @property
    def kind(self) -> str:
        """``flat``, ``hnsw``, ``ivf`` (or a FAISS class name for other types)."""
        return str(self._describe()["kind"])

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    @property
    def supports_remove(self) -> bool:
        return self.kind != "hnsw"

    @property
    def uses_pq(self) -> bool:
        return bool(self._describe().get("pq"))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        """All ids held, sorted, int64."""
        if len(self) == 0:
            return np.zeros(0, dtype=np.int64)
        if hasattr(self.index, "id_map"):
            return np.sort(faiss.vector_to_array(self.index.id_map).astype(np.int64))
        invlists = faiss.extract_index_ivf(self.index).invlists
        parts = []
        for lst in range(invlists.nlist):
            size = invlists.list_size(lst)
            if size:
                ptr = invlists.get_ids(lst)
                parts.append(faiss.rev_swig_ptr(ptr, size).astype(np.int64))
                invlists.release_ids(lst, ptr)
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def train(self, vectors: np.ndarray) -> None:
        """Train an index type that needs it (IVF centroids, PQ codebooks) on ``(N, dim)``."""
        if self.index.is_trained:
            return
        need = min_training_vectors(self.index)
        if len(vectors) < need:
            raise CollectionError(
                f"index type {self.index_type!r} needs at least {need:,} training vectors, got "
                f"{len(vectors):,}; use --index auto or Flat for a collection this small"
            )
        self.index.train(_f32(vectors))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` ``(N, dim)`` under ``ids`` ``(N,)``."""
        if len(ids) == 0:
            return
        vectors = _f32(vectors)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise CollectionError(f"vectors of shape {vectors.shape} do not fit a {self.dim}-d index")
        if not self.index.is_trained:
            self.train(vectors)
        self._in_memory()
        self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids``; returns how many were held. HNSW graphs cannot remove: the caller
        rebuilds them (see ``supports_remove``)."""
        if len(ids) == 0 or len(self) == 0:
            return 0
        if not self.supports_remove:
            raise CollectionError(f"a {self.index_type} index cannot remove vectors; rebuild it")
        self._in_memory()
        return int(self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def empty_like(self) -> VectorIndex:
        """An empty index of the same type, sharing this one's training (centroids, codebooks)."""
        if self.kind == "ivf":
            clone = faiss.clone_index(self.index)
            clone.reset()
            ivf = faiss.extract_index_ivf(clone)
            if not isinstance(ivf.invlists, faiss.ArrayInvertedLists):
                arrays = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
                ivf.replace_invlists(arrays, True)
                arrays.this.disown()
        else:
            clone = make_faiss_index(self.dim, self.index_type)
        return VectorIndex(self.dim, self.index_type, index=clone, params=self.params)

    def _in_memory(self) -> None:
        """Copy memory-mapped / on-disk inverted lists into RAM before the index is changed."""
        if self.kind != "ivf":
            if self.mmapped:  # a serialised round trip copies the mapped vectors into RAM
                self.index = faiss.deserialize_index(faiss.serialize_index(self.index))
                self.mmapped = False
            return
        ivf = faiss.extract_index_ivf(self.index)
        in_ram = (faiss.ArrayInvertedLists, faiss.BlockInvertedLists)  # fast-scan PQ: block lists
        if isinstance(faiss.downcast_InvertedLists(ivf.invlists), in_ram) and not self.mmapped:
            return
        arrays = faiss.ArrayInvertedLists(ivf.nlist, ivf.code_size)
        src = ivf.invlists
        for lst in range(ivf.nlist):
            size = src.list_size(lst)
            if size:
                ids_ptr, codes_ptr = src.get_ids(lst), src.get_codes(lst)
                arrays.add_entries(lst, size, ids_ptr, codes_ptr)
                src.release_ids(lst, ids_ptr)
                src.release_codes(lst, codes_ptr)
        ivf.replace_invlists(arrays, True)
        arrays.this.disown()
        self.mmapped = False

    def reconstruct(self, item_id: int) -> np.ndarray:
        return self.index.reconstruct(int(item_id))

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               params: SearchParams | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``(scores, ids)``, both ``(Q, k')`` with k' = min(k, len)
        (and <= the number of ``allowed`` ids); rows short of k' hits are padded with id -1.

        ``allowed`` (int64 ids) restricts the search to those ids. The filtered top-k is exact
        on exact indexes and for small allowed sets; on approximate indexes a larger set is
        searched with the knob widened until every row has k' hits (see :mod:`.filtered`).
        ``params`` overrides the stored search defaults (``nprobe``, ``ef_search``,
        ``rerank``) for this call.
        """
        queries = _f32(queries)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.shape[1] != self.dim:
            raise CollectionError(
                f"query vectors are {queries.shape[1]}-d but the index holds {self.dim}-d vectors "
                "(was the collection built with another encoder?)"
            )
        if allowed is not None:
            allowed = unique_ids(allowed)
        k = min(int(k), len(self) if allowed is None else min(len(self), len(allowed)))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        faiss.cvar.distance_compute_blas_threshold = _BLAS_THRESHOLD
        if len(queries) <= _NUMPY_MAX_QUERIES and self._flat_view() is not None:
            return self._search_numpy(queries, k, allowed)
        p = self.params.merged(params)
        if allowed is not None and self.kind != "flat":
            return search_filtered(self, queries, k, allowed, p)
        return self.search_ann(queries, k, p, None if allowed is None else id_selector(allowed))

    def search_ann(self, queries: np.ndarray, k: int, p: SearchParams,
                   sel: faiss.IDSelector | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One FAISS search of ``queries`` ``(Q, D)`` at settings ``p`` (restricted to ``sel``),
        PQ shortlists re-ranked with exact vectors: ``(scores, ids)``, ``(Q, k)``."""
        if self.kind == "flat" and self.uses_pq and self.exact_vectors is not None:
            from .exact_codes import search_codes_exact  # exact over float16 codes (SQfp16)

            with _single_thread_if(len(queries) <= _NUMPY_MAX_QUERIES):
                return search_codes_exact(self.index, queries, k, self.exact_vectors, sel=sel,
                                          depth=p.rerank or None)
        rerank = p.rerank if p.rerank is not None else (DEFAULT_PQ_RERANK if self.uses_pq else 0)
        fetch = k
        if rerank and self.exact_vectors is not None:
            fetch = min(k * rerank, len(self))
        fparams = search_parameters(self.index, p, sel, described=self._describe())
        with _single_thread_if(len(queries) <= _NUMPY_MAX_QUERIES):
            scores, ids = self.index.search(queries, fetch, params=fparams)
        if fetch > k:
            scores, ids = self._rerank(queries, scores, ids, k)
        return scores, ids

    def _rerank(self, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray, k: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """Re-score a shortlist with the exact vectors and keep the best ``k``."""
        out_s = np.full((len(queries), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(queries), k), -1, dtype=np.int64)
        for row in range(len(queries)):
            cand = ids[row][ids[row] >= 0]
            if len(cand) == 0:
                continue
            exact = self.exact_vectors(cand) @ queries[row]  # type: ignore[misc]
            order = np.argsort(-exact, kind="stable")[:k]
            out_s[row, : len(order)] = exact[order]
            out_i[row, : len(order)] = cand[order]
        return out_s, out_i

    def _flat_view(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Zero-copy views (vectors ``(n, d)``, ids ``(n,)``) of an exact inner-product index."""
        inner = getattr(self.index, "index", None)
        if inner is None or not hasattr(self.index, "id_map"):
            return None
        flat = faiss.downcast_index(inner)
        if not isinstance(flat, faiss.IndexFlat):
            return None
        n = len(self)
        xb = faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim)
        ids = faiss.rev_swig_ptr(self.index.id_map.data(), n)
        return xb, ids

    def _search_numpy(self, queries: np.ndarray, k: int, allowed: np.ndarray | None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Exact search for a few queries as one BLAS product + partial sort: on small CPUs this
        beats FAISS's flat scan for single queries (about 2x at 100k x 512, see benchmarks)."""
        xb, ids = self._flat_view()  # type: ignore[misc]
        scores = queries @ xb.T  # (Q, n)
        if allowed is not None:
            keep = np.isin(ids, allowed)
            scores = np.where(keep[None, :], scores, -np.inf)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part = np.take_along_axis(scores, top, 1)
        order = np.argsort(-part, axis=1, kind="stable")
        top = np.take_along_axis(top, order, 1)
        out_scores = np.take_along_axis(scores, top, 1).astype(np.float32)
        out_ids = np.asarray(ids)[top].astype(np.int64)
        out_ids[~np.isfinite(out_scores)] = -1
        return out_scores, out_ids

    # -- persistence ---------------------------------------------------------------------
    def on_disk_data(self) -> str | None:
        """File name of the on-disk inverted lists (``.ivfdata``) this index reads, if any."""
        if self.kind != "ivf":
            return None
        invlists = faiss.extract_index_ivf(self.index).invlists
        ondisk = faiss.downcast_InvertedLists(invlists)
        if isinstance(ondisk, faiss.OnDiskInvertedLists):
            return Path(ondisk.filename).name
        return None

    def save(self, folder: Path, relpath: str, *, fsync: bool = True) -> IndexFile:
        """Write atomically to ``folder/relpath``; returns the manifest record for the file.

        An index over on-disk inverted lists writes only its small header file; the ``.ivfdata``
        file beside it (written by the sharded builder) is recorded, not copied.
        """
        path = folder / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, fsync=fsync) as f:  # never through a planted link
            faiss.write_index(self.index, faiss.PyCallbackIOWriter(f.write))
        data = self.on_disk_data()
        data_rel = str(Path(relpath).parent / data) if data else None
        return IndexFile(path=relpath, bytes=path.stat().st_size, sha256=file_sha256(path),
                         count=len(self), data_path=data_rel,
                         data_bytes=(folder / data_rel).stat().st_size if data_rel else None)

    @classmethod
    def load(
        cls, folder: Path, record: IndexFile, dim: int, index_type: str, *, verify_hash: bool = False,
        mmap: bool = False, params: SearchParams | None = None,
    ) -> VectorIndex:
        """Read an index file after checking it against its manifest record.

        ``mmap=True`` maps the vectors / inverted lists from the file instead of reading them
        into RAM (read-only until changed), so an index larger than RAM can be served.

        Raises:
            CollectionError: naming the file, if it is missing, of the wrong size or hash, not a
                FAISS index, or of the wrong dimension or count.
        """
        path = folder / record.path
        if not path.is_file():
            raise CollectionError(f"index file missing: {path}")
        size = path.stat().st_size
        if size != record.bytes:
            raise CollectionError(f"index file {path} is {size} bytes, the manifest says {record.bytes}")
        with open(path, "rb") as f:
            header = f.read(4)
        if not _looks_like_faiss(header):
            raise CollectionError(f"index file {path} is not a FAISS index (header {header!r})")
        if record.data_path:
            data = folder / record.data_path
            if not data.is_file() or data.stat().st_size != record.data_bytes:
                raise CollectionError(
                    f"inverted-list file {data} of index {path} is missing or of the wrong size; "
                    f"rebuild the index with `crossmodal-rag reindex {folder}`"
                )
        if verify_hash and file_sha256(path) != record.sha256:
            raise CollectionError(f"index file {path} does not match the checksum in the manifest")
        base = faiss.IO_FLAG_ONDISK_SAME_DIR
        if mmap and not record.data_path:  # on-disk inverted lists are always mapped
            # inverted lists map with IO_FLAG_MMAP, flat codes with IO_FLAG_MMAP_IFC (not both)
            ivf_like = header.startswith(b"Iw") or header == b"IxPT"
            kinds = (faiss.IO_FLAG_MMAP, faiss.IO_FLAG_MMAP_IFC)
            attempts = [base | faiss.IO_FLAG_READ_ONLY | f for f in (kinds if ivf_like else kinds[::-1])]
        else:
            attempts = [base]
        for n, flags in enumerate(attempts):
            try:
                with silence_c_stdout():  # FAISS notes about on-disk lists
                    index = faiss.read_index(str(path), flags)
                break
            except RuntimeError as e:
                if n == len(attempts) - 1:
                    raise CollectionError(f"index file {path} is not a readable FAISS index: "
                                          f"{str(e).strip().splitlines()[-1]}") from e
        if index.d != dim or index.ntotal != record.count:
            raise CollectionError(
                f"index file {path} holds {index.ntotal} {index.d}-d vectors; the manifest says "
                f"{record.count} {dim}-d vectors"
            )
        out = cls(dim, index_type, index=index, params=params)
        out.mmapped = mmap
        return out
