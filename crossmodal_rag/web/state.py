"""What a running server holds: the open collection (or shards as one: :mod:`.backend`), the
generator, caches and the worker limits.

CPU-heavy request work runs in worker threads, a bounded number at a time (the rest wait on the
event loop, not in threads), so ``/api/health`` answers while they run; searches are batched
(:mod:`.batching`); generation runs one at a time behind a bounded queue (:mod:`.generation`),
since it uses every core; images decode in a pool of worker processes (:mod:`.decoding`)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import Request

from ..errors import CrossmodalError
from ..generation import load_generator
from .backend import Backend, open_backend
from .batching import SearchBatcher
from .decoding import DecodePool
from .files import VerifiedFiles
from .generation import GenerationQueue
from .paths import PublicPaths
from .settings import WebSettings
from .thumbnails import ThumbnailCache, default_cache_dir

__all__ = ["AppState", "get_state"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class AppState:
    """The collection (opened, encoder loaded), the generator and the limits of one server."""

    def __init__(self, settings: WebSettings, backend: Backend | None = None) -> None:
        self.settings = settings
        # what the routes search and read (one collection, or shards as one); main embeds queries
        self.backend = backend or open_backend(settings.collection, settings.shards, model=settings.model,
                                               mmap=settings.mmap)
        self.collection = self.backend.main
        self.collection.encoder.load()
        self.paths = PublicPaths(self.collection, show_paths=settings.show_paths)
        self.generator_status = "not-loaded"
        try:
            self.generator: Any = load_generator(settings.generator)
        except CrossmodalError as e:  # a spec that cannot be used: the server still searches (asks get 503)
            self.generator = _Unusable(settings.generator or "", e)
            self.generator_status = f"error: {e}"
            logger.warning("generator unavailable: %s", e)
        self.gen_lock = threading.Lock()  # one generation at a time (also for callers outside the app)
        thumbs = Path(settings.thumbnail_dir) if settings.thumbnail_dir else default_cache_dir(
            self.collection.folder)
        self.thumbnails = ThumbnailCache(thumbs)
        self.files = VerifiedFiles()
        # worker threads: CPU-heavy request work waits here, on the event loop, not in a thread
        self.work_limit = anyio.CapacityLimiter(settings.max_workers or max(1, min(8, os.cpu_count() or 1)))
        self.generation_limit = anyio.CapacityLimiter(1)  # one generation at a time: it uses every core
        self.queue = GenerationQueue(settings.max_queued_generations, self.generation_limit)
        # uploads and thumbnails decode in worker processes of their own, never in the threads above
        self.decoder = DecodePool(workers=settings.decode_workers, timeout_s=settings.decode_timeout_s,
                                  memory_mb=settings.decode_memory_mb, max_queued=settings.max_queued_decodes)
        # concurrent searches share encoder forwards (max_batch 1: each search on its own)
        self.batcher = SearchBatcher(self.collection, self.work_limit, max_batch=settings.max_batch,
                                     batch_ms=settings.batch_ms) if settings.max_batch > 1 and not self.backend.shards \
            else None

    def load_generator(self) -> None:
        self.generator_status = "loading"
        try:
            self.generator.load()
            self.generator_status = "ready"
        except CrossmodalError as e:
            self.generator_status = f"error: {e}"
            logger.warning("generator unavailable: %s", e)

    async def work(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` in a worker thread, at most ``max_workers`` at once (the rest wait on the loop)."""
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=self.work_limit)

    def close(self) -> None:
        self.backend.close()


class _Unusable:
    """Stands for a generator whose spec was refused: it has a spec to show and cannot load."""

    def __init__(self, spec: str, error: CrossmodalError) -> None:
        self.spec, self.error = spec, error

    def load(self) -> None:
        raise self.error


async def get_state(request: Request) -> AppState:
    """The running server's state (a dependency; async, so it never waits for a worker thread)."""
    return request.app.state.web
