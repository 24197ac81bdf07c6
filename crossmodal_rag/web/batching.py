"""Batched search serving: concurrent search requests share one encoder forward and one index
search.

A request waits on the event loop (never in a thread) until a worker is free and, while other
batches are being searched, at most ``batch_ms`` milliseconds after the first request of its
batch arrived, or until ``max_batch`` requests are waiting (an idle server takes a request at
once); then one worker thread embeds every text of the batch in one forward (and
every query image in one), builds each request's query vector with the library's own query
arithmetic, and searches each group of requests with the same ``k``, target, filter, threshold
and params in one dense search. A request that is not a plain dense search in CLIP's space
(keyword, hybrid or auto resolved to them, or routed to a text space:
:func:`crossmodal_rag.search.engine.dense_only`) runs on its own in the same worker, as
:meth:`Collection.search <crossmodal_rag.collection.Collection.search>` runs it. Each request gets
its own :class:`~crossmodal_rag.search.SearchResult`, or its own error.

Under load batches form by themselves: while the workers are busy, arriving requests queue, and
the next free worker takes them all. A lone request on an idle server does not wait at all.
The results equal those of :meth:`Collection.search <crossmodal_rag.collection.Collection.search>`
for each request alone (``tests/test_web_batching.py`` compares them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np

from ..errors import QueryError
from ..search import SearchRequest, SearchResult, engine
from ..search.query import embed_query

if TYPE_CHECKING:
    from ..collection import Collection
    from ..encoders import ClipEncoder

__all__ = ["BatchStats", "SearchBatcher", "SearchRequest", "run_batch"]

logger = logging.getLogger(__name__)


@dataclass
class BatchStats:
    """What the batcher did: batches run, requests served, text/image encoder forwards."""

    batches: int = 0
    requests: int = 0
    text_forwards: int = 0
    image_forwards: int = 0
    sizes: list[int] = field(default_factory=list)  # the last 1000 batch sizes


class _Recorder:
    """Phase one: what the query code would encode, recorded (answers zeros)."""

    def __init__(self, encoder: ClipEncoder) -> None:
        self.encoder, self.texts, self.images = encoder, [], []

    @property
    def max_text_tokens(self) -> int:
        return self.encoder.max_text_tokens

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self.texts.extend(texts)
        return np.zeros((len(texts), self.encoder.dim), dtype=np.float32)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        self.images.extend(images)
        return np.zeros((len(images), self.encoder.dim), dtype=np.float32)


class _Encoded:
    """Phase two: the batch's embeddings handed back to the query code (texts by their string,
    the request's images in the order it asked for them)."""

    def __init__(self, encoder: ClipEncoder, texts: dict[str, np.ndarray], images: np.ndarray) -> None:
        self.encoder, self.texts, self.images = encoder, texts, images

    @property
    def max_text_tokens(self) -> int:
        return self.encoder.max_text_tokens

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.texts[t] for t in texts])

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        rows, self.images = self.images[:len(images)], self.images[len(images):]
        return rows


def _record(encoder: ClipEncoder, req: SearchRequest) -> _Recorder:
    """The texts and images ``req`` needs embedded; a bad query raises here, before any forward."""
    rec = _Recorder(encoder)
    try:
        embed_query(lambda: rec, req.text, req.image, plus=list(req.plus), minus=list(req.minus))
    except QueryError:
        if not rec.texts and not rec.images:
            raise  # refused while it was read: the request's own error
        # otherwise the zeros cancelled in the weighted sum; phase two sees the real vectors
    return rec


def run_batch(collection: Collection, requests: Sequence[SearchRequest], stats: BatchStats | None = None
              ) -> list[SearchResult | BaseException]:
    """Each request's result (or its error): the dense CLIP searches with one text forward, one
    image forward and one dense search per group of requests that share ``k``, target, filter,
    threshold and params; every other request searched on its own."""
    out: list[SearchResult | BaseException | None] = [None] * len(requests)
    recorded: dict[int, tuple[_Recorder, float | None]] = {}
    for i, req in enumerate(requests):
        try:
            if req.vector is not None or not engine.dense_only(collection, req):
                out[i] = collection.search(req)
                continue
            threshold = collection.resolve_min_score(req.min_score, query_is_image=req.image is not None,
                                                     target=req.target)
            recorded[i] = (_record(collection.encoder, req), threshold)
        except Exception as e:  # the request's own error, answered to it alone
            out[i] = e
    if not recorded:
        return out  # type: ignore[return-value]
    encoder = collection.encoder
    texts = list(dict.fromkeys(t for rec, _ in recorded.values() for t in rec.texts))
    images = [im for rec, _ in recorded.values() for im in rec.images]
    try:
        text_vecs = encoder.encode_texts(texts) if texts else np.zeros((0, encoder.dim), np.float32)
        image_vecs = encoder.encode_images(images) if images else np.zeros((0, encoder.dim), np.float32)
    except Exception as e:  # the encoder failed: every request of the batch gets the error
        return [o if o is not None else e for o in out]
    if stats is not None:
        stats.text_forwards += bool(texts)
        stats.image_forwards += bool(images)
    text_rows = dict(zip(texts, text_vecs, strict=True))
    image_start = 0
    groups: dict[tuple, list[tuple[int, np.ndarray, float | None]]] = {}
    for i, (_, threshold) in recorded.items():
        req, n_images = requests[i], len(recorded[i][0].images)
        encoded = _Encoded(encoder, text_rows, image_vecs[image_start:image_start + n_images])
        image_start += n_images
        try:
            vector = embed_query(lambda e=encoded: e, req.text, req.image, plus=list(req.plus),
                                 minus=list(req.minus))
        except Exception as e:
            out[i] = e
            continue
        key = (req.k, req.target, req.where, threshold, req.params, req.cut)
        groups.setdefault(key, []).append((i, vector, threshold))
    for (_, _, _, threshold, _, cut), members in groups.items():
        first = requests[members[0][0]]
        try:
            hits: list[Any] = engine.run_vectors(collection, np.stack([v for _, v, _ in members]), first,
                                                 threshold if cut else None)
        except Exception as e:
            hits = [e] * len(members)
        for (i, vector, _), h in zip(members, hits, strict=True):
            out[i] = h if isinstance(h, BaseException) else SearchResult(tuple(h), "dense", threshold, vector)
    return out  # type: ignore[return-value]


class SearchBatcher:
    """Collects concurrent :class:`SearchRequest` s on the event loop and runs them in batches
    in worker threads (at most ``limiter``'s capacity at once)."""

    def __init__(self, collection: Collection, limiter: anyio.CapacityLimiter, *, max_batch: int = 32,
                 batch_ms: float = 2.0, run: Callable[..., list] = run_batch) -> None:
        if max_batch < 1 or batch_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and batch_ms >= 0, got {max_batch} and {batch_ms}")
        self.collection, self.limiter, self.run = collection, limiter, run
        self.max_batch, self.wait_s = max_batch, batch_ms / 1000.0
        self.stats = BatchStats()
        self._pending: list[tuple[SearchRequest, asyncio.Future]] = []
        self._full: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()  # drainers running (a reference keeps each alive)
        self._running = 0  # batches being searched now

    async def search(self, request: SearchRequest) -> SearchResult:
        """The result of ``request`` (its own error is raised here)."""
        loop = asyncio.get_running_loop()
        if self._full is None:
            self._full = asyncio.Event()
        fut: asyncio.Future = loop.create_future()
        self._pending.append((request, fut))
        if len(self._pending) == 1:
            self._full.clear()
            self._spawn()
        if len(self._pending) >= self.max_batch:
            self._full.set()
        return await fut

    def _spawn(self) -> None:
        task = asyncio.get_running_loop().create_task(self._drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        """Wait for the batch window (or a full batch), then for a worker; take what is waiting."""
        assert self._full is not None
        # an idle server answers at once; while batches run, wait a moment for company
        if self.wait_s > 0 and self._running and len(self._pending) < self.max_batch:
            with anyio.move_on_after(self.wait_s):
                await self._full.wait()
        async with self.limiter:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            if len(self._pending) < self.max_batch:
                self._full.clear()
            if self._pending:  # more than one batch waiting: the rest get a drainer of their own
                self._spawn()
            batch = [(r, f) for r, f in batch if not f.done()]  # a client that went away
            if not batch:
                return
            t0 = time.perf_counter()
            self._running += 1
            try:
                results = await anyio.to_thread.run_sync(self.run, self.collection, [r for r, _ in batch],
                                                         self.stats)
            except BaseException as e:  # a bug: every request of the batch gets it
                results = [e] * len(batch)
                if not isinstance(e, Exception):
                    raise
            finally:
                self._running -= 1
        self.stats.batches += 1
        self.stats.requests += len(batch)
        self.stats.sizes = [*self.stats.sizes[-999:], len(batch)]
        logger.debug("search batch of %d in %.1f ms", len(batch), 1000 * (time.perf_counter() - t0))
        for (_, fut), res in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(res, BaseException):
                fut.set_exception(res)
            else:
                fut.set_result(res)
