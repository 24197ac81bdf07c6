"""OpenMP threads for FAISS calls: a handful of queries runs on one thread.

A single IVF/HNSW query or a small k-means gains nothing from a second OpenMP thread, and on a
busy 2-core machine waiting for one costs 10x (shared performance notes; ``benchmarks/``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import faiss

__all__ = ["NUMPY_MAX_QUERIES", "single_thread_if"]

#: Up to this many queries, exact search runs as a numpy product and FAISS on one thread.
NUMPY_MAX_QUERIES = 4

_lock = threading.Lock()


@contextlib.contextmanager
def single_thread_if(small: bool) -> Iterator[None]:
    """Run FAISS on one OpenMP thread inside (when ``small``), restoring the count after."""
    if not small:
        yield
        return
    with _lock:
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        with _lock:
            faiss.omp_set_num_threads(before)
