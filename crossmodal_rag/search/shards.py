"""One query over several index shards (collections with one encoder): fan out, merge, answer.

request --plan once (auto: document frequencies summed over the shards)--> embed once (CLIP) -->
        fan out to every shard (threads or remote replicas; deadline; one retry) -->
        merge: dense by cosine | keyword by BM25 | fused: the merged lists fused as one collection
        fuses them --> hits naming their shard, the result marked partial when a shard is missing

The merge rules, and how they compare with one collection holding the union of the shards:

* **dense**: each shard's top ``k`` (its ``where`` filter and ``min_score`` cut applied), merged
  by cosine: exactly the union's top ``k`` when each shard's index is exact.
* **keyword**: BM25 with **global statistics**. Each shard reports, for the query's phrases,
  its row count, its token total and the rows holding each phrase; the router sums them, and
  every shard scores its matching texts with the sums (:mod:`crossmodal_rag.store.bm25`), so a
  text's score is the one the union gives it and the lists merge by score: the union's keyword
  ranking (tests/test_shards.py: same texts, scores within 1e-6). One more round trip per
  keyword query (the statistics), and each shard reads every row holding a phrase.
* **auto**: whether keyword evidence counts, and which words, is decided once from the
  **global** document frequencies (each shard's, summed), so every shard ranks for the same
  keyword query and the decision is the union's.
* **hybrid / auto fused**: the merged dense list and the merged keyword list, each
  :data:`~crossmodal_rag.search.hybrid.FUSED_DEPTH` deep, fused by the one-collection rule
  (reciprocal rank fusion, or auto's min-max evidence fusion): both lists are the union's, so
  the fusion is too (up to the order of equal scores).

A shard that fails (after one retry) or answers after the deadline is left out: the result is a
:class:`ShardedResult` with ``partial`` true and ``missing`` naming the shard and why. A query
error (a bad ``where``) is the caller's and is raised as it is. Shards are reached through the
small :class:`Shard` interface: an open collection in this process
(:class:`crossmodal_rag.serving.local.LocalShard`) or a Ray Serve deployment
(:mod:`crossmodal_rag.serving.ray_serve`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np

from ..errors import CrossmodalError, QueryError
from . import evidence, hybrid, routing
from .dense import TargetEmptyError
from .fusion import RRF_K, reciprocal_rank_fusion
from .hits import Hit
from .request import SearchRequest, SearchResult
from .shard_merge import dense_scored, first_threshold, fuse_merged, merge_by

if TYPE_CHECKING:
    from ..store.bm25 import Bm25Stats
    from ..store.items import Item
    from .text_space import TextSpaceOwner

__all__ = ["Shard", "ShardSet", "ShardSettings", "ShardedResult", "ShardsUnavailableError"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class ShardsUnavailableError(CrossmodalError):
    """No shard answered a query (each one's reason is in the message)."""


class Shard(Protocol):
    """One index shard as the fan-out reads it."""

    name: str  # the shard's name in hits and in ``missing`` (its folder's name)
    has_text_space: bool  # the shard holds a text space (index --text-model)

    def search(self, request: SearchRequest) -> SearchResult:
        """The shard's own search (the router sends dense requests, with the vector when CLIP's)."""
        ...

    def keyword_stats(self, query: str, arithmetic: bool) -> Bm25Stats:
        """The shard's BM25 statistics of the keyword query ``query`` (:mod:`crossmodal_rag.store.bm25`)."""
        ...

    def keyword(self, request: SearchRequest, query: str, arithmetic: bool, routed: bool,
                stats: Bm25Stats | None = None) -> SearchResult:
        """The shard's keyword ranking of ``query``, ``request.k`` deep, with dense scores; BM25
        scored with ``stats`` (every shard's summed) when given."""
        ...

    def doc_freqs(self, words: Sequence[str]) -> tuple[dict[str, int], int]:
        """(word -> number of texts holding it, number of texts) in the shard's word index."""
        ...

    # what the web app reads of one shard's items (an item is named by its shard and id)
    def get(self, ids: list[int]) -> list[Item]:
        """The shard's items by id, in the order asked (missing ids left out)."""
        ...

    def path_entry(self, path: str) -> tuple[int, int | None, int | None] | None:
        """(item id, size, mtime_ns) of an indexed file of the shard, or None."""
        ...

    def counts(self) -> dict[str, int]:
        """The shard's items by kind."""
        ...


@dataclass(frozen=True)
class ShardSettings:
    """How the fan-out waits and retries."""

    deadline_s: float = 30.0  # a shard that has not answered by then is left out (partial result)
    retries: int = 1  # a shard that fails is asked again this many times before it is left out
    workers: int = 16  # threads that call the shards (one query uses one per shard)
    parallel: bool = True  # False: call the shards one after another in the caller's thread (no
    # hand-off to a thread: cheaper for small in-process shards; a late answer is kept, not cut)

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0, got {self.deadline_s!r}")
        if self.retries < 0 or self.workers < 1:
            raise ValueError(f"retries must be >= 0 and workers >= 1, got {self.retries!r}, {self.workers!r}")


@dataclass(frozen=True, eq=False)
class ShardedResult(SearchResult):
    """A :class:`SearchResult` over several shards: which answered, which are missing and why."""

    shards: tuple[str, ...] = ()  # the shards whose hits are merged here
    missing: tuple[tuple[str, str], ...] = field(default=())  # (shard, why) left out

    @property
    def partial(self) -> bool:
        """Some shard did not answer: the hits are the best of the others."""
        return bool(self.missing)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "partial": self.partial, "shards": list(self.shards),
                "missing_shards": [{"shard": s, "reason": why} for s, why in self.missing]}


@dataclass(frozen=True)
class _Plan:
    mode: str  # dense | keyword | hybrid
    reason: str
    evidence: evidence.Evidence | None = None


class ShardSet:
    """Several shards searched as one collection (see the module docstring).

    ``embed`` makes the CLIP query vector ``(D,)`` of a request (once per query, here);
    ``encoder`` and ``dim`` name the shards' common encoder (RAG checks a collection against them).
    """

    def __init__(self, shards: Sequence[Shard], embed: Callable[[SearchRequest], np.ndarray], *,
                 encoder: str = "", dim: int = 0, settings: ShardSettings | None = None) -> None:
        if not shards:
            raise ValueError("a shard set needs at least one shard")
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            raise ValueError(f"shard names must differ, got {names}")
        self.shards = list(shards)
        self.embed = embed
        self.encoder, self.dim = encoder, dim
        self.settings = settings or ShardSettings()
        self._pool = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="shard")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check_compatible(self, collection: TextSpaceOwner) -> None:
        """``collection`` embeds queries as the shards do (same encoder and dimension)."""
        if (collection.manifest.encoder, collection.manifest.dim) != (self.encoder, self.dim):
            raise CrossmodalError(f"{collection.folder} uses {collection.manifest.encoder}; the shards use "
                                  f"{self.encoder}: give collections of one encoder")

    def each(self, call: Callable[[Shard], T]) -> tuple[list[tuple[str, T]], dict[str, str]]:
        """``call`` on every shard as a search calls them (deadline, one retry): the answers
        ``[(shard, answer), ...]`` and the shards missing, with why. Raises
        :class:`ShardsUnavailableError` when none answers."""
        missing: dict[str, str] = {}
        return self._fan(call, missing), missing

    # -- the fan-out ---------------------------------------------------------------------------
    def _call(self, shard: Shard, call: Callable[[Shard], T]) -> T:
        for attempt in range(self.settings.retries + 1):
            try:
                return call(shard)
            except (QueryError, TargetEmptyError):
                raise
            except Exception as e:
                if attempt == self.settings.retries:
                    raise
                logger.warning("shard %s failed (%s); asking again", shard.name, e)
        raise AssertionError("unreachable")

    def _fan(self, call: Callable[[Shard], T], missing: dict[str, str]) -> list[tuple[str, T]]:
        """``call`` on every shard not yet missing, in parallel; failures and late answers go to
        ``missing``. Raises :class:`ShardsUnavailableError` when no shard answers."""
        active = [s for s in self.shards if s.name not in missing]
        if not self.settings.parallel:
            return self._serial(active, call, missing)
        futures = [(s, self._pool.submit(self._call, s, call)) for s in active]
        end = time.monotonic() + self.settings.deadline_s
        out: list[tuple[str, T]] = []
        empty: TargetEmptyError | None = None
        for shard, fut in futures:
            try:
                out.append((shard.name, fut.result(timeout=max(0.0, end - time.monotonic()))))
            except FutureTimeout:
                missing[shard.name] = f"no answer within {self.settings.deadline_s:g} s"
            except QueryError:
                raise
            except TargetEmptyError as e:  # holds none of the target: nothing to merge from it
                empty = e
            except Exception as e:
                missing[shard.name] = f"{type(e).__name__}: {e}"
                logger.warning("shard %s left out: %s", shard.name, missing[shard.name])
        if not out:
            if empty is not None and not missing:
                raise empty
            why = "; ".join(f"{n}: {r}" for n, r in missing.items())
            raise ShardsUnavailableError(f"no shard answered ({why}); check that the shards are up "
                                         "(serve --ray: the deployments' status) and search again")
        return out

    def _serial(self, active: list[Shard], call: Callable[[Shard], T], missing: dict[str, str]) -> list[tuple[str, T]]:
        out: list[tuple[str, T]] = []
        empty: TargetEmptyError | None = None
        for shard in active:
            try:
                out.append((shard.name, self._call(shard, call)))
            except TargetEmptyError as e:
                empty = e
            except QueryError:
                raise
            except Exception as e:
                missing[shard.name] = f"{type(e).__name__}: {e}"
                logger.warning("shard %s left out: %s", shard.name, missing[shard.name])
        if not out:
            if empty is not None and not missing:
                raise empty
            raise ShardsUnavailableError(f"no shard answered ({'; '.join(f'{n}: {r}' for n, r in missing.items())})")
        return out

    # -- one search ----------------------------------------------------------------------------
    def search(self, request: SearchRequest | str | None = None, /, **options: Any) -> ShardedResult:
        """Search every shard as one collection: the arguments of
        :meth:`Collection.search <crossmodal_rag.collection.Collection.search>`."""
        r = SearchRequest.of(request, **options)
        missing: dict[str, str] = {}
        keyword_only = r.mode == "keyword" and (r.min_score in (None, "") or not r.cut) and not r.dense_scores
        routed = routing.routes(r) and not keyword_only and any(s.has_text_space for s in self.shards)
        plan = self._plan(r, missing)
        vector = None
        if not keyword_only and not routed:
            vector = np.asarray(r.vector if r.vector is not None else self.embed(r), np.float32).reshape(-1)
            r = SearchRequest.of(r, vector=vector)
        if routed and r.target == "all":
            hits, threshold = self._routed_all(r, plan, missing)
        else:
            found, threshold = self._ranked(r, plan, routed, missing)
            hits = found[:r.k]
        answered = tuple(s.name for s in self.shards if s.name not in missing)
        return ShardedResult(tuple(h.ranked(i) for i, h in enumerate(hits, start=1)), plan.mode, threshold,
                             vector, reason=plan.reason, shards=answered, missing=tuple(missing.items()))

    def _plan(self, r: SearchRequest, missing: dict[str, str]) -> _Plan:
        if r.mode != "auto":
            if r.mode != "dense" and not r.has_text:
                raise QueryError(f"{r.mode} search needs a text query (an image alone searches in dense mode)")
            how = {"dense": "embeddings only", "keyword": "BM25 only",
                   "hybrid": f"reciprocal rank fusion of the dense and keyword rankings, each "
                             f"{hybrid.fused_depth(r.k)} deep"}[r.mode]
            return _Plan(r.mode, f"{r.mode}: asked for ({how})")
        if not r.has_text:
            return _Plan("dense", "auto: dense: an image or vector query")
        if hybrid.keyword_note(r.text):
            return _Plan("dense", "auto: dense: no words or numbers to match (symbols or emoji only)")
        words = hybrid.keyword_text(r.text or "")
        lookup = evidence.lookup_words(words)
        df: dict[str, int] = {}
        n = 0
        for _, (freqs, count) in self._fan(lambda s: s.doc_freqs(lookup), missing):
            n += count
            for word, d in freqs.items():
                df[word] = df.get(word, 0) + d
        if n == 0:
            return _Plan("dense", "auto: dense: the collection has no texts in its keyword index")
        ev = evidence.weigh_evidence(words, df, n, hybrid.EVIDENCE)
        return _Plan(ev.mode, f"auto: {ev.reason}", ev if ev.mode == "hybrid" else None)

    def _ranked(self, r: SearchRequest, plan: _Plan, routed: bool,
                missing: dict[str, str]) -> tuple[list[Hit], float | None]:
        """The merged hits of ``plan`` (not yet cut to ``k``) and the threshold."""
        if plan.mode == "dense":
            dense = self._fan(lambda s: s.search(SearchRequest.of(r, mode="dense", dense_scores=False)), missing)
            return merge_by([(n, res.hits) for n, res in dense], lambda h: h.score, r.k), first_threshold(dense)
        depth = hybrid.fused_depth(r.k)
        cut_asked = r.cut and r.min_score not in (None, "")
        kw_depth = r.k if plan.mode == "keyword" and not cut_asked else depth
        query, arithmetic = ((plan.evidence.keyword_query or "", False) if plan.evidence is not None
                             else (r.text or "", True))
        kw_request = SearchRequest.of(r, k=kw_depth, target="texts" if routed else r.target)
        stats = self._global_stats(query, arithmetic, missing)
        found = self._fan(lambda s: s.keyword(kw_request, query, arithmetic, routed and s.has_text_space, stats),
                          missing)
        threshold = first_threshold(found)
        keyword = merge_by([(n, res.hits) for n, res in found], lambda h: h.keyword_score, kw_depth)
        cut = threshold if r.cut else None
        if plan.mode == "keyword":
            hits = [h for h in keyword if cut is None or (h.dense_score is not None and h.dense_score >= cut)]
            return dense_scored(hits, r.dense_scores), threshold
        sub = SearchRequest.of(r, mode="dense", k=depth, dense_scores=False,
                               target="texts" if routed else r.target)
        dense_found = [(n, res) for n, res in self._fan(lambda s: s.search(sub), missing)
                       if n not in missing]
        dense = merge_by([(n, res.hits) for n, res in dense_found], lambda h: h.score, depth)
        keyword = [h for h in keyword if h.shard not in missing]
        hits = fuse_merged(dense, keyword, plan.evidence, depth, "text" if routed else "clip", limit_all=not routed)
        if cut is not None and not routed:
            hits = [h for h in hits if h.dense_score is not None and h.dense_score >= cut]
        return dense_scored(hits, r.dense_scores), threshold

    def _global_stats(self, query: str, arithmetic: bool, missing: dict[str, str]) -> Bm25Stats:
        """The BM25 statistics of ``query`` over every shard that answers (summed)."""
        reports = self._fan(lambda s: s.keyword_stats(query, arithmetic), missing)
        total = reports[0][1]
        for _, stats in reports[1:]:
            total = total + stats
        return total

    def _routed_all(self, r: SearchRequest, plan: _Plan, missing: dict[str, str]) -> tuple[list[Hit], float | None]:
        """A routed text query for ``all``: the text space's list and CLIP's image list, fused by
        rank (as one collection does, :mod:`crossmodal_rag.search.routing`)."""
        depth = r.k if plan.mode == "dense" else hybrid.fused_depth(r.k)
        texts, threshold = self._ranked(SearchRequest.of(r, target="texts", k=depth), plan, True, missing)
        vector = self.embed(r)
        images_req = SearchRequest.of(r, target="images", mode="dense", k=depth, vector=vector)
        try:
            images, _ = self._ranked(images_req, _Plan("dense", plan.reason), False, missing)
        except TargetEmptyError:
            images = []
        key: dict[tuple[str, str | None, int], Hit] = {("image", h.shard, h.id): h for h in images}
        key |= {("text", h.shard, h.id): h for h in texts}
        fused = reciprocal_rank_fusion([[("image", h.shard, h.id) for h in images],
                                        [("text", h.shard, h.id) for h in texts]], RRF_K, limit=r.k)
        return [key[k] for k, _ in fused], threshold
