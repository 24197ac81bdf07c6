"""``auto`` by measurement: the fastest index family that fits, chosen on the collection's vectors.

The data's way::

    live vectors -> held-out queries (tune set A, verify set B) + database sample (<= sample_max)
      -> each family of :data:`CANDIDATES` whose full-size index fits the memory budget:
         build on the sample -> tune on A to the mean recall (:func:`.tuning.tune_grid`)
         -> check on B (:func:`.tuning.verify_tuning`) -> p50 of single queries (one thread)
      -> p50 scaled to the full size (:func:`scale_p50`) -> the cheapest that reached the target

Queries are stored vectors left out of the measured index (and the other modality's vectors,
when given), so nothing a query is compared with contains the query itself: unlike
leave-one-out tuning on a built index, a setting measured here is one a fresh query meets.
A setting is accepted when its mean recall reaches the target on A *and* on B, two independent
estimates: B's is free of the selection bias of taking the first setting whose A-mean reached
it, so no confidence margin is added on top (a 95% lower bound on 300 queries asked for twice
the nprobe fresh queries needed on the 100k power-law mixture, benchmarks/RESULTS.md); the
sets' size keeps each estimate's standard error near 0.004.
Candidate builds run on one OpenMP thread, so the recall side (graphs, centroids, tuned
settings) is the same for the same seed; the choice itself depends on timings only between
candidates more than :data:`TIE` apart (the timing noise, not a trade of speed for memory: the
budget bounds memory), and among nearer ones exact search wins, then the fewest bytes. Everything measured is returned as an :class:`AutoChoice` (kept in the manifest's
``build`` section as ``auto``, shown by ``info --json`` and ``tune``).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from ..errors import CollectionError
from .ann import SearchParams, format_memory, training_rows
from .build import configure_graph, train_coarse_two_level
from .families import estimate_index_bytes, family_spec
from .threads import single_thread_if
from .tuning import TIMED_QUERIES, tune_grid, verify_tuning
from .vectors import VectorIndex

__all__ = [
    "CANDIDATES",
    "DEFAULT_MEMORY_SHARE",
    "MEASURE_MIN_VECTORS",
    "AutoChoice",
    "AutoSettings",
    "Candidate",
    "default_index_memory",
    "measure_choice",
    "pick",
    "scale_p50",
]

logger = logging.getLogger(__name__)

#: Families measured, cheapest first to break ties (exact ones first, see :func:`pick`).
CANDIDATES = ("flat", "exact_fp16", "hnsw", "ivf_hnsw_fp16", "ivf_hnsw_sq8", "ivf_flat", "ivf_hnsw_pqfs")
EXACT = ("flat", "exact_fp16")
#: Families measured only when no other approximate family fits the budget (fast-scan PQ: the
#: smallest codes, never the fastest at recall 0.95 in RESULTS.md, and the dearest to train).
COMPACT_ONLY = ("ivf_hnsw_pqfs",)
#: Below this many vectors ``auto`` searches exactly without measuring (a scan of 20k x 512
#: float32 is ~40 MB, ~2 ms; the measurement would cost more than it could save).
MEASURE_MIN_VECTORS = 20_000
#: The default memory budget of ``auto``: this share of the machine's physical memory.
DEFAULT_MEMORY_SHARE = 0.25
#: Candidates whose scaled p50 lies within this factor of the fastest count as tied: the spread
#: of interleaved median timings between repeated measurements, so a tie is a coin toss rather
#: than speed given up for bytes (1.10 took SQ8 over float16 codes that were 1.2x faster once
#: SQ8 needed its re-rank; RESULTS.md, issue 32).
TIE = 1.05


def default_index_memory() -> int:
    """:data:`DEFAULT_MEMORY_SHARE` of the machine's physical memory, in bytes (8 GiB if unknown)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 32 << 30
    return int(total * DEFAULT_MEMORY_SHARE)


@dataclass(frozen=True)
class AutoSettings:
    """How ``auto`` measures (all fields round-trip through the manifest's ``auto`` record)."""

    target_recall: float = 0.95  # recall@k each candidate is tuned to, on held-out queries
    k: int = 10
    seed: int = 0  # draws the queries, the sample and every training set
    max_memory: int | None = None  # bytes for the full-size index; None: default_index_memory()
    sample_max: int = 200_000  # the largest database sample a candidate is built on
    tune_queries: int = 1000  # set A: tunes each candidate's knobs (mean recall: std error ~0.004)
    verify_queries: int = 1000  # set B: checks the tuned setting before it is accepted
    max_build_seconds: float = 3600.0  # families whose full build would take longer are left out
    families: tuple[str, ...] = CANDIDATES

    def __post_init__(self) -> None:
        unknown = sorted(set(self.families) - set(CANDIDATES))
        if unknown:
            raise ValueError(f"unknown index families {unknown} (valid: {', '.join(CANDIDATES)})")
        if not 0.0 < self.target_recall <= 1.0:
            raise CollectionError(f"target recall must be in (0, 1], got {self.target_recall}")


@dataclass
class Candidate:
    """One family as measured: ``status`` is ``measured``, ``over budget``, ``too slow to
    build`` or ``missed target``; times are single queries on one thread."""

    family: str
    spec: str  # factory string at the full size
    sample_spec: str  # factory string built on the sample
    est_bytes: int  # estimated full-size index bytes (families.estimate_index_bytes)
    status: str = "measured"
    sample_bytes: int = 0  # serialised bytes of the sample index
    scaled_bytes: int = 0  # sample_bytes scaled to the full size
    build_s: float = 0.0  # sample build seconds
    est_build_s: float = 0.0  # full build seconds by the same cost model as the p50
    param: str = ""  # tuned knob ("" for exact search)
    value: int | None = None
    rerank: int | None = None
    recall: float = 1.0  # recall@k on set B at the accepted setting
    p50_ms: float = 0.0  # on the sample
    est_p50_ms: float = 0.0  # scaled to the full size
    curve: list[dict[str, Any]] = field(default_factory=list)  # tuning rows (A), then B's

    def row(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "curve"}


@dataclass
class AutoChoice:
    """What ``auto`` measured and chose for ``n`` ``dim``-d vectors."""

    index_type: str
    n: int
    dim: int
    sample: int  # database vectors each candidate was built on
    budget: int  # bytes
    target_recall: float
    seed: int
    reason: str
    seconds: float = 0.0
    held: int = 0  # stored vectors held out as queries (sets A + B); sample + held = n: all of it
    candidates: list[Candidate] = field(default_factory=list)

    def chosen(self) -> Candidate | None:
        return next((c for c in self.candidates if c.spec == self.index_type), None)

    def to_dict(self) -> dict[str, Any]:
        """A manifest record: flat values, ``candidates`` (one row each) and ``curves``."""
        head = {k: v for k, v in self.__dict__.items() if k != "candidates"}
        return {**head, "candidates": [c.row() for c in self.candidates],
                "curves": [{"family": c.family, **r} for c in self.candidates for r in c.curve]}


def scale_p50(family: str, p50_ms: float, sample: int, n: int) -> float:
    """A p50 measured on ``sample`` vectors scaled to ``n`` by each family's cost model: exact
    scans grow with n, an HNSW walk with log n, an IVF probe with sqrt(n) (lists grow as
    sqrt(n), so a probe of the same share of them scans sqrt(n) times more vectors)."""
    if n <= sample:
        return p50_ms
    if family in EXACT:
        return p50_ms * n / sample
    if family == "hnsw":
        return p50_ms * math.log(n) / math.log(max(sample, 2))
    return p50_ms * math.sqrt(n / sample)


def _exact_top_k(base: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), 256):
        scores = queries[s:s + 256] @ base.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
        out[s:s + 256] = ids[np.take_along_axis(top, order, 1)]
    return out


def _build(spec: str, ids: np.ndarray, base: np.ndarray, seed: int) -> VectorIndex:
    index = VectorIndex(base.shape[1], spec)
    configure_graph(index.index)
    rows = training_rows(len(base), index.index, seed)
    if len(rows):
        train_coarse_two_level(index.index, base[rows], seed)
        index.train(base[rows])
    for s in range(0, len(base), 50_000):
        index.add(ids[s:s + 50_000], base[s:s + 50_000])
    index.exact_vectors = lambda got: base[np.searchsorted(ids, got)]
    return index


def _p50(index: VectorIndex, queries: np.ndarray, k: int, params: SearchParams) -> float:
    times = []
    for q in queries[:TIMED_QUERIES]:
        t0 = time.perf_counter()
        index.search(q[None, :], k, params=params)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times))


def _measure(cand: Candidate, ids: np.ndarray, base: np.ndarray, sets: tuple[np.ndarray, ...],
             n: int, s: AutoSettings) -> VectorIndex | None:
    qa, ta, qb, tb = sets
    t0 = time.perf_counter()
    with single_thread_if(True):  # one thread: the same graph and centroids for the same seed
        index = _build(cand.sample_spec, ids, base, s.seed)
    cand.build_s = round(time.perf_counter() - t0, 3)
    cand.est_build_s = round(cand.build_s * max(n / len(base), 1.0), 1)
    cand.sample_bytes = int(faiss.serialize_index(index.index).nbytes)
    cand.scaled_bytes = int(cand.sample_bytes * max(n / len(base), 1.0))
    if cand.est_build_s > s.max_build_seconds:
        cand.status = "too slow to build"
        return None

    def search(q: np.ndarray, kk: int, p: SearchParams) -> tuple[np.ndarray, np.ndarray]:
        return index.search(q, kk, params=p)

    with single_thread_if(True):
        # the mean on A, then the mean on B (independent of the choice) before acceptance
        tuning = tune_grid(search, index.index, qa, ta, k=s.k, target_recall=s.target_recall,
                           criterion="mean")
        if tuning.param:
            verify_tuning(search, index.index, tuning, qb, tb, target_recall=s.target_recall)
            cand.param, cand.value, cand.rerank = tuning.param, tuning.value, tuning.rerank
            cand.curve = [dict(r) for r in tuning.measured]
        params = SearchParams(**({tuning.param: tuning.value} if tuning.param else {}),
                              rerank=tuning.rerank)
        _, found = index.search(qb, s.k, params=params)
        cand.recall = round(float(np.mean([len(np.intersect1d(f, t)) / s.k for f, t in zip(found, tb, strict=True)])), 4)
    if cand.recall < s.target_recall:
        cand.status = "missed target"
    return index


#: Rounds of interleaved timing of the candidates that reached the target (median of rounds).
TIMING_ROUNDS = 3


def _retime(built: list[tuple[Candidate, VectorIndex]], queries: np.ndarray, k: int, n: int,
            sample: int) -> None:
    """Time every candidate again, round by round in turn (load drifting over the minutes of
    the measurement falls on all of them alike); ``p50_ms`` = the median of the rounds."""
    rounds: dict[int, list[float]] = {id(c): [] for c, _ in built}
    with single_thread_if(True):
        for _ in range(TIMING_ROUNDS):
            for cand, index in built:
                params = SearchParams(**({cand.param: cand.value} if cand.param else {}), rerank=cand.rerank)
                rounds[id(cand)].append(_p50(index, queries, k, params))
    for cand, _ in built:
        cand.p50_ms = round(float(np.median(rounds[id(cand)])), 4)
        cand.est_p50_ms = round(scale_p50(cand.family, cand.p50_ms, sample, n), 4)


def pick(candidates: list[Candidate]) -> tuple[Candidate | None, str]:
    """The winner among measured candidates and why: the lowest scaled p50 that reached the
    target; candidates within :data:`TIE` of it count as tied, and among them exact search
    wins, then the fewest bytes. None if no candidate reached the target."""
    ok = [c for c in candidates if c.status == "measured"]
    if not ok:
        return None, "no family that fits reached the target recall"
    fastest = min(ok, key=lambda c: c.est_p50_ms)
    tied = [c for c in ok if c.est_p50_ms <= fastest.est_p50_ms * TIE]
    best = min(tied, key=lambda c: (c.family not in EXACT, c.scaled_bytes, CANDIDATES.index(c.family)))
    others = sorted((c for c in ok if c is not best), key=lambda c: c.est_p50_ms)
    setting = f"{best.param}={best.value}, " if best.param else ""
    why = (f"{best.spec}: p50 {best.est_p50_ms:.3f} ms ({setting}recall@10 {best.recall:.3f} on "
           "held-out queries)")
    if best is not fastest:
        why += f"; within {TIE:.2f}x of the fastest ({fastest.spec}, {fastest.est_p50_ms:.3f} ms) and "
        why += "exact" if best.family in EXACT else f"smaller ({format_memory(best.scaled_bytes)})"
    elif others:
        why += f"; next {others[0].spec} at {others[0].est_p50_ms:.3f} ms"
    return best, why


def measure_choice(ids: np.ndarray, vectors: np.ndarray, n: int, settings: AutoSettings | None = None,
                   *, extra_queries: np.ndarray | None = None) -> AutoChoice:
    """Measure every candidate family on the ``vectors`` ``(N, D)`` (float32, unit norm) stored
    under the sorted ``ids`` ``(N,)`` of a collection of ``n`` vectors (N <= n: a uniform sample
    where reading all is too dear) and choose. ``extra_queries`` ``(Q, D)``: more queries of the
    collection's query model (the other modality's vectors), split between sets A and B.

    Raises:
        CollectionError: too few vectors to hold out queries and still measure.
    """
    s = settings or AutoSettings()
    t0 = time.perf_counter()
    budget = s.max_memory or default_index_memory()
    dim = vectors.shape[1]
    rng = np.random.default_rng(s.seed)
    held = s.tune_queries + s.verify_queries
    if len(ids) < max(4 * held, 2 * s.k):
        raise CollectionError(f"auto needs at least {4 * held:,} vectors to measure, got {len(ids):,}")
    order = rng.permutation(len(ids))
    q_rows = order[:held]
    base_rows = np.sort(order[held:held + s.sample_max])
    base_ids, base = ids[base_rows], np.ascontiguousarray(vectors[base_rows], dtype=np.float32)
    queries = vectors[q_rows]
    if extra_queries is not None and len(extra_queries):
        extra = extra_queries[rng.permutation(len(extra_queries))[: held // 2]]
        queries = np.concatenate([queries[: held - len(extra)], extra])[rng.permutation(held)]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    qa, qb = queries[: s.tune_queries], queries[s.tune_queries:]
    sets = (qa, _exact_top_k(base, base_ids, qa, s.k), qb, _exact_top_k(base, base_ids, qb, s.k))
    choice = AutoChoice(index_type="", n=int(n), dim=int(dim), sample=len(base), budget=int(budget),
                        target_recall=s.target_recall, seed=s.seed, reason="", held=held)
    built: list[tuple[Candidate, VectorIndex]] = []
    for family in s.families:
        sample_spec = family_spec(family, len(base), dim)
        # a sample of (nearly) everything: the full index is built as the one measured
        spec = sample_spec if len(base) + held >= n else family_spec(family, n, dim)
        if spec is None or sample_spec is None:
            continue
        cand = Candidate(family, spec, sample_spec, estimate_index_bytes(spec, n, dim))
        choice.candidates.append(cand)
        if cand.est_bytes > budget:
            cand.status = "over budget"
            continue
        if family in COMPACT_ONLY and any(c.status == "measured" and c.family not in EXACT
                                          for c in choice.candidates):
            cand.status = "not needed"  # the memory fallback: a faster family fits
            continue
        logger.info("auto: measuring %s (%s) on %d of %d vectors", family, sample_spec, len(base), n)
        index = _measure(cand, base_ids, base, sets, n, s)
        if cand.scaled_bytes > budget and cand.status == "measured":
            cand.status = "over budget"
        if index is not None and cand.status == "measured":
            built.append((cand, index))
    _retime(built, qa, s.k, n, len(base))
    for cand in choice.candidates:
        logger.info("auto: %s %s recall %.3f p50 %.3f ms (scaled %.3f ms), %s", cand.family, cand.status,
                    cand.recall, cand.p50_ms, cand.est_p50_ms, format_memory(cand.scaled_bytes))
    best, why = pick(choice.candidates)
    if best is None:
        fitting = [c for c in choice.candidates if c.status == "missed target"]
        if not fitting:
            raise CollectionError(
                f"no index family fits a {format_memory(budget)} budget for {n:,} vectors of {dim} "
                "dimensions; raise --max-index-memory or shard the collection")
        best = max(fitting, key=lambda c: (c.recall, -c.est_p50_ms))
        why = f"{why}; the highest recall: {best.spec} ({best.recall:.3f})"
    choice.index_type, choice.reason = best.spec, why
    choice.seconds = round(time.perf_counter() - t0, 1)
    logger.info("auto chose %s in %.0f s: %s", best.spec, choice.seconds, why)
    return choice

