"""FastAPI app: a search page and a JSON REST API over one collection, or over several index shards
searched as one (the routes call a backend, :mod:`.backend`).

Safety: the server binds to 127.0.0.1 unless told otherwise; images are served only for item
ids in the collection (the path comes from the metadata, never from the request), and only while
the file is still the indexed one (size, and SHA-256 of the contents; see :mod:`.files`); request
bodies are size-limited as they arrive (:mod:`.limits`), an upload's type is checked from its
content, its declared pixel count is checked before decoding; every string field is bounded in
length and checked for NUL before any parser sees it, ids are bounded to SQLite's range
(:mod:`.inputs`); only the server's own host names are answered, and every response carries
``nosniff``, the page a Content Security Policy (:mod:`.guards`); requests made by another site's
pages are refused before their body is read, unless ``--allow-origin`` names the site
(:mod:`.origins`). Uploads and thumbnails are decoded in a bounded pool of worker processes,
each decode under a deadline, apart from the search threads (:mod:`.decoding`). Every error is JSON
``{"error": {"code", "message"}}`` with a matching HTTP status: bad input is 4xx, a bug a 500 that
keeps the connection (:mod:`.errors`). CPU-heavy work (query and ``where`` parsing, encoding,
search, thumbnails, generation) runs in worker threads, never on the event loop, a bounded number
at a time, so ``/api/health`` answers while they run (:mod:`.state`).

This module assembles the app: state opened in the lifespan, middleware, error handlers and one
router per family of routes (:mod:`.routes`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from .._version import __version__
from .backend import Backend
from .errors import register_errors
from .guards import CatchAll, HostCheck, SecurityHeaders
from .limits import BodyLimit
from .origins import OriginCheck
from .routes import ask, items, meta, openai, page, search
from .settings import WebSettings
from .state import AppState

__all__ = ["WebSettings", "create_app"]


def create_app(settings: WebSettings, backend: Callable[[], Backend] | None = None) -> FastAPI:
    """Build the app; the collection opens (``settings.shards``: the shards, as one) and the
    encoder loads at start-up. ``backend``: what the routes search instead, made at start-up
    (the Ray Serve router's remote shards, :mod:`crossmodal_rag.serving.ray_serve`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = await run_in_threadpool(lambda: AppState(settings, backend() if backend is not None else None))
        app.state.web = st
        if settings.load_generator_at_startup:
            threading.Thread(target=st.load_generator, name="load-generator", daemon=True).start()
        yield
        await st.decoder.aclose()
        st.close()

    app = FastAPI(title="crossmodal-rag", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # the hosted docs UIs load from a CDN
                  description="Cross-modal search and retrieval-augmented answers over one collection.")
    register_errors(app)
    # outermost first: headers on every answer, then the Host check, the Origin check, the body
    # limit, and the last-resort 500 right around the routes (Starlette's own would drop the connection)
    app.add_middleware(CatchAll)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes + 64 * 1024,  # room for form headers
                       shown_limit=settings.max_upload_bytes, max_other_bytes=settings.max_json_bytes)
    app.add_middleware(OriginCheck, allowed=settings.allowed_origins)
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts)
    app.add_middleware(SecurityHeaders)
    for family in (meta, search, ask, items, openai, page):
        app.include_router(family.router(settings))
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    return app
