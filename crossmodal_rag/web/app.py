"""FastAPI app: a search page and a JSON REST API over one collection.

Safety: the server binds to 127.0.0.1 unless told otherwise; images are served only for item
ids in the collection (the path comes from the metadata, never from the request), and only while
the file is still the indexed one (size, and SHA-256 of the contents; see :mod:`.files`); request
bodies are size-limited as they arrive (:mod:`.limits`), an upload's type is checked from its
content, its declared pixel count is checked before decoding; every string field is bounded in
length and checked for NUL before any parser sees it, ids are bounded to SQLite's range
(:mod:`.inputs`); only the server's own host names are answered, and every response carries
``nosniff``, the page a Content Security Policy (:mod:`.guards`). Every error is JSON
``{"error": {"code", "message"}}`` with a matching HTTP status: bad input is 4xx, a bug a 500 that
keeps the connection. CPU-heavy work (query and ``where`` parsing, encoding, search, thumbnails,
generation) runs in worker threads, never on the event loop, a bounded number at a time, so
``/api/health`` answers while they run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..collection import Collection
from ..errors import CrossmodalError, ImageDecodeError, QueryError, WeightsUnavailableError
from ..generation import GenerationSettings, RagPipeline, RagSettings, load_generator
from ..images import decode_image
from ..search import Hit
from .files import FileChanged, IndexedFile, VerifiedFiles, read_checked, stream
from .guards import LOOPBACK_HOSTS, CatchAll, HostCheck, SecurityHeaders
from .inputs import (
    MAX_FILENAME_CHARS,
    MAX_ID,
    MAX_SCORE_CHARS,
    InputError,
    check_min_score,
    check_text,
    check_texts,
)
from .limits import BodyLimit
from .paths import PublicPaths
from .thumbnails import ThumbnailCache, content_key, default_cache_dir

__all__ = ["WebSettings", "create_app"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
_MEDIA = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
          "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff"}
T = TypeVar("T")


@dataclass(frozen=True)
class WebSettings:
    """Limits and models of a server."""

    collection: str  # collection folder
    generator: str | None = None  # generator spec (default google/flan-t5-base)
    model: str | None = None  # encoder spec (default: the collection's)
    max_upload_bytes: int = 10 * 1024 * 1024  # largest accepted upload
    max_image_pixels: int = 50_000_000  # largest declared width*height of an upload
    max_query_chars: int = 1000  # longest text query, question or plus/minus text
    max_where_chars: int = 500  # longest --where expression
    max_where_conditions: int = 16  # most where conditions in one request
    max_json_bytes: int = 256 * 1024  # largest request body that is not an upload (JSON)
    max_k: int = 100  # largest k
    max_new_tokens: int = 64  # longest generated answer
    thumbnail_size: int = 256  # default thumbnail side
    thumbnail_dir: str | None = None  # thumbnail cache folder (default under ~/.cache)
    load_generator_at_startup: bool = True  # else on the first ask
    mmap: bool = False  # memory-map the index files instead of reading them into RAM
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host header names answered ("*": any)
    max_workers: int = 0  # searches/renders run at once in worker threads (0: CPUs, at most 8)
    show_paths: bool = False  # absolute server paths in responses (else relative to the source root)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# -- response models ------------------------------------------------------------------------
class HitOut(BaseModel):
    rank: int
    score: float
    id: int
    kind: str
    path: str | None
    text: str | None
    captions: list[str]
    parent_id: int | None
    title: str | None
    image_id: int | None = Field(description="the item whose image shows this hit (itself or its image)")
    image_url: str | None
    thumbnail_url: str | None


class SearchOut(BaseModel):
    query: dict[str, Any]
    target: str
    k: int
    results: list[HitOut]
    seconds: float


class SourceOut(BaseModel):
    rank: int
    id: int
    kind: str
    path: str | None
    caption: str
    text: str
    score: float
    prior: float
    posterior: float
    logprob: float
    included: bool
    truncated: bool
    image_id: int | None
    thumbnail_url: str | None
    image_url: str | None


class AskIn(BaseModel):
    question: str = Field(min_length=1, description="the question (at most max_query_chars characters)")
    k: int = Field(5, ge=1, description="items retrieved")
    mode: Literal["concat", "rag-sequence", "rag-token"] = "concat"
    target: Literal["texts", "images", "all"] = "texts"
    where: list[str] = Field(default_factory=list, description="metadata filters on retrieval")
    min_score: str | float | None = Field(None, description="abstain below this score; 'auto' = calibrated")


class AskOut(BaseModel):
    answer: str
    question: str
    mode: str
    sources: list[SourceOut]
    prompts: list[str]
    timings: dict[str, float]
    generator: str
    encoder: str
    logprob: float | None
    logprob_of: str | None = None  # what logprob is (crossmodal_rag.generation.rag.LOGPROB_OF)
    abstained: bool = False
    min_score: float | None = None


class ItemOut(BaseModel):
    id: int
    kind: str
    path: str | None
    text: str | None
    captions: list[str]
    parent_id: int | None
    title: str | None
    width: int | None
    height: int | None
    format: str | None
    size_bytes: int | None
    added_at: float
    extra: dict[str, Any]
    image_url: str | None
    thumbnail_url: str | None


class StatsOut(BaseModel):
    collection: str
    encoder: str
    dim: int
    index_type: str
    counts: dict[str, int]
    generation: int
    updated_at: str


class HealthOut(BaseModel):
    status: str
    version: str
    encoder: str
    generator: str
    generator_status: str = Field(description="not-loaded | loading | ready | error: ...")


class ErrorOut(BaseModel):
    error: dict[str, str]


# -- state ----------------------------------------------------------------------------------
class _State:
    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self.collection = Collection.open(settings.collection, model=settings.model, mmap=settings.mmap)
        self.collection.encoder.load()
        self.paths = PublicPaths(self.collection, show_paths=settings.show_paths)
        self.generator = load_generator(settings.generator)
        self.generator_status = "not-loaded"
        self.gen_lock = threading.Lock()  # one generation at a time (also for callers outside the app)
        thumbs = Path(settings.thumbnail_dir) if settings.thumbnail_dir else default_cache_dir(
            self.collection.folder)
        self.thumbnails = ThumbnailCache(thumbs)
        self.files = VerifiedFiles()
        # worker threads: CPU-heavy request work waits here, on the event loop, not in a thread
        self.work = anyio.CapacityLimiter(settings.max_workers or max(1, min(8, os.cpu_count() or 1)))
        self.generation = anyio.CapacityLimiter(1)  # one generation at a time: it uses every core

    def load_generator(self) -> None:
        self.generator_status = "loading"
        try:
            self.generator.load()
            self.generator_status = "ready"
        except CrossmodalError as e:
            self.generator_status = f"error: {e}"
            logger.warning("generator unavailable: %s", e)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def create_app(settings: WebSettings) -> FastAPI:
    """Build the app; the collection opens and the encoder loads at start-up."""
    state: dict[str, _State] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        st = await run_in_threadpool(_State, settings)
        state["s"] = st
        if settings.load_generator_at_startup:
            threading.Thread(target=st.load_generator, name="load-generator", daemon=True).start()
        yield
        st.collection.close()

    app = FastAPI(title="crossmodal-rag", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,  # the hosted docs UIs load from a CDN
                  description="Cross-modal search and retrieval-augmented answers over one collection.")

    def S() -> _State:
        return state["s"]

    async def work(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn`` in a worker thread, at most ``max_workers`` at once (the rest wait on the loop)."""
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=S().work)

    _register_errors(app)
    # outermost first: headers on every answer, then the Host check, the body limit, and the
    # last-resort 500 right around the routes (Starlette's own would drop the connection)
    app.add_middleware(CatchAll)
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes + 64 * 1024,  # room for form headers
                       shown_limit=settings.max_upload_bytes, max_other_bytes=settings.max_json_bytes)
    app.add_middleware(HostCheck, allowed=settings.allowed_hosts)
    app.add_middleware(SecurityHeaders)

    # -- input checks (before any parser) -------------------------------------------------
    def check_query(text: str | None, what: str = "q") -> str | None:
        if text is None:
            return None
        check_text(text, what, settings.max_query_chars)
        if not text.strip():
            raise ApiError(422, "empty_query", f"empty {what}")
        return text

    def check_where(where: list[str]) -> list[str]:
        return check_texts(where, "where", settings.max_where_conditions, settings.max_where_chars)

    def check_k(k: int) -> int:
        if not 1 <= k <= settings.max_k:
            raise ApiError(422, "bad_k", f"k must be between 1 and {settings.max_k}, got {k}")
        return k

    async def read_upload(upload: UploadFile) -> Any:
        check_text(upload.filename or "upload", "image file name", MAX_FILENAME_CHARS)
        data = await upload.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ApiError(413, "too_large", f"upload exceeds the {settings.max_upload_bytes} byte limit")
        if not data:
            raise ApiError(422, "empty_upload", "the uploaded file is empty")
        try:
            decoded = await work(decode_image, data, upload.filename or "upload", max_pixels=settings.max_image_pixels)
        except ImageDecodeError as e:
            status = 413 if "exceeds the limit" in e.reason else 415 if "not a recognised" in e.reason else 422
            raise ApiError(status, "bad_image", f"uploaded image: {e.reason}") from e
        if decoded.format not in ALLOWED_FORMATS:
            raise ApiError(415, "unsupported_type",
                           f"uploaded image is {decoded.format}; allowed: {', '.join(sorted(ALLOWED_FORMATS))}")
        return decoded.image

    # -- results --------------------------------------------------------------------------
    def image_id_of(kind: str, item_id: int, parent_id: int | None) -> int | None:
        return item_id if kind == "image" else parent_id if kind == "caption" else None

    def urls(image_id: int | None) -> dict[str, str | None]:
        if image_id is None:
            return {"image_url": None, "thumbnail_url": None}
        return {"image_url": f"/api/items/{image_id}/image", "thumbnail_url": f"/api/items/{image_id}/thumbnail"}

    def hit_out(h: Hit) -> HitOut:
        iid = image_id_of(h.kind, h.id, h.parent_id)
        return HitOut(**{**h.to_dict(), "path": S().paths.path(h.path)}, image_id=iid, **urls(iid))

    def search_out(query: dict[str, Any], target: str, k: int, hits: list[Hit], t0: float) -> SearchOut:
        return SearchOut(query=query, target=target, k=k, results=[hit_out(h) for h in hits],
                         seconds=time.perf_counter() - t0)

    def run_ask(question: str | None, image: Any, k: int, mode: str, target: str,
                where: list[str] | None = None, min_score: str | float | None = None) -> AskOut:
        st = S()
        if st.generator_status.startswith("error"):
            raise ApiError(503, "generator_unavailable", st.generator_status[len("error: "):])
        pipe = RagPipeline(st.collection, st.generator,
                           RagSettings(k=k, mode=mode, target=target, where=tuple(where or ()),
                                       min_score=min_score),
                           GenerationSettings(max_new_tokens=settings.max_new_tokens))
        with st.gen_lock:
            try:
                if st.generator_status != "ready":
                    st.load_generator()
                    if st.generator_status != "ready":
                        raise ApiError(503, "generator_unavailable", st.generator_status[len("error: "):])
                answer = pipe.ask(question, image=image, k=k, mode=mode)
            except WeightsUnavailableError as e:
                raise ApiError(503, "generator_unavailable", str(e)) from e
        d = answer.to_dict()
        sources = []
        for s in d["sources"]:
            item = st.collection.get(s["id"])
            parent = item[0].parent_id if item else None
            iid = image_id_of(s["kind"], s["id"], parent)
            sources.append(SourceOut(**{**s, "path": st.paths.path(s["path"])}, image_id=iid, **urls(iid)))
        d["sources"] = sources
        d["generator"], d["encoder"] = st.paths.spec(d["generator"]), st.paths.spec(d["encoder"])
        return AskOut(**{k2: v for k2, v in d.items() if k2 in AskOut.model_fields})

    async def generate(*args: Any) -> AskOut:
        """``run_ask`` in a worker thread, one at a time (the others wait on the loop, not in threads)."""
        return await anyio.to_thread.run_sync(partial(run_ask, *args), limiter=S().generation)

    # -- API ------------------------------------------------------------------------------
    err = {422: {"model": ErrorOut}, 413: {"model": ErrorOut}, 415: {"model": ErrorOut}}
    max_q, max_where = settings.max_query_chars, settings.max_where_conditions

    @app.get("/api/health", response_model=HealthOut, tags=["meta"])
    async def health() -> HealthOut:  # on the loop: never waits for a worker thread
        st = S()
        return HealthOut(status="ok", version=__version__, encoder=st.paths.spec(st.collection.manifest.encoder),
                         generator=st.paths.spec(st.generator.spec), generator_status=st.generator_status)

    @app.get("/api/stats", response_model=StatsOut, tags=["meta"])
    def stats() -> StatsOut:
        c, paths = S().collection, S().paths
        m = c.manifest
        return StatsOut(collection=paths.folder(c.folder), encoder=paths.spec(m.encoder), dim=m.dim, index_type=m.index_type,
                        counts=c.counts(), generation=m.generation, updated_at=m.updated_at)

    @app.get("/api/search", response_model=SearchOut, responses=err, tags=["search"])
    async def search_text(
            q: str = Query(..., max_length=max_q,
                           description='text query; arithmetic allowed: "a cat" + "snow" - indoors, 2:cat'),
            k: int = Query(10, ge=1, le=settings.max_k), target: Literal["images", "texts", "all"] = Query("images"),
            where: list[str] = Query([], max_length=max_where,
                                     description="metadata filters, e.g. width>=1000 (repeatable, ANDed)"),
            min_score: str | None = Query(None, max_length=MAX_SCORE_CHARS,
                                          description="a number, or auto (calibrated)")) -> SearchOut:
        """Search by text."""
        t0 = time.perf_counter()
        check_query(q)
        check_where(where)
        check_min_score(min_score)
        hits = await work(S().collection.search, q, k=check_k(k), target=target, where=where, min_score=min_score)
        return search_out({"text": q, "where": where}, target, k, hits, t0)

    @app.post("/api/search/image", response_model=SearchOut, responses=err, tags=["search"])
    async def search_image(image: UploadFile = File(..., description="query image"),
                           k: int = Form(10, ge=1, le=settings.max_k),
                           target: Literal["images", "texts", "all"] = Form("images"),
                           plus: list[str] = Form([], description="texts added to the image query"),
                           minus: list[str] = Form([], description="texts subtracted from it"),
                           where: list[str] = Form([], description="metadata filters"),
                           min_score: str | None = Form(None, max_length=MAX_SCORE_CHARS)) -> SearchOut:
        """Search by an uploaded image (optionally plus/minus texts)."""
        t0 = time.perf_counter()
        check_k(k)
        for field, texts in (("plus", plus), ("minus", minus)):
            check_texts(texts, field, max_where, max_q)
            for t in texts:
                check_query(t, field)
        check_where(where)
        check_min_score(min_score)
        pil = await read_upload(image)
        hits = await work(S().collection.search, image=pil, k=k, target=target, where=where,
                          min_score=min_score, plus=plus, minus=minus)
        return search_out({"image": image.filename, "plus": plus, "minus": minus, "where": where},
                          target, k, hits, t0)

    @app.post("/api/ask", response_model=AskOut, responses={**err, 503: {"model": ErrorOut}}, tags=["ask"])
    async def ask(body: AskIn) -> AskOut:
        """Answer a question from the collection, with sources (JSON body)."""
        check_query(body.question, "question")
        check_where(body.where)
        check_min_score(body.min_score)
        return await generate(body.question, None, check_k(body.k), body.mode, body.target, body.where,
                              body.min_score)

    @app.post("/api/ask/image", response_model=AskOut, responses={**err, 503: {"model": ErrorOut}}, tags=["ask"])
    async def ask_image(image: UploadFile = File(..., description="image that drives retrieval"),
                        question: str | None = Form(None, max_length=max_q), k: int = Form(5, ge=1, le=settings.max_k),
                        mode: Literal["concat", "rag-sequence", "rag-token"] = Form("concat"),
                        target: Literal["texts", "images", "all"] = Form("texts"),
                        where: list[str] = Form([], description="metadata filters on retrieval"),
                        min_score: str | None = Form(None, max_length=MAX_SCORE_CHARS)) -> AskOut:
        """Answer with an uploaded image (and optionally a question)."""
        if question is not None and not question.strip():
            question = None
        check_query(question, "question")
        check_k(k)
        check_where(where)
        check_min_score(min_score)
        pil = await read_upload(image)
        return await generate(question, pil, k, mode, target, where, min_score)

    def _item(item_id: int):
        items = S().collection.get(item_id)
        if not items:
            raise ApiError(404, "not_found", f"no item {item_id} in the collection")
        return items[0]

    item_id_param = PathParam(ge=0, le=MAX_ID, description="an item id (0 to 2**63-1)")

    @app.get("/api/items/{item_id}", response_model=ItemOut, responses={404: {"model": ErrorOut}}, tags=["items"])
    def item(item_id: int = item_id_param) -> ItemOut:
        it = _item(item_id)
        d = {**it.to_dict(), "path": S().paths.path(it.path)}
        iid = image_id_of(it.kind, it.id, it.parent_id)
        return ItemOut(**{k: v for k, v in d.items() if k in ItemOut.model_fields}, **urls(iid))

    def _image_item(item_id: int) -> tuple[Any, IndexedFile]:
        it = _item(item_id)
        if it.kind != "image" or not it.path:
            raise ApiError(404, "not_found", f"item {item_id} is not an image")
        if not Path(it.path).is_file():
            raise ApiError(404, "gone", f"the file of item {item_id} is no longer on disk")
        # Paths are stored resolved; a symlink put there since indexing is not served (it could
        # point anywhere on the machine); the file itself is checked when it is opened.
        if os.path.realpath(it.path) != it.path:
            raise _changed(item_id, "the path now leads through a symlink")
        entry = S().collection.store.path_entry(it.path)
        size, mtime_ns = (entry[1], entry[2]) if entry else (it.size_bytes, None)
        return it, IndexedFile(it.path, size if size is not None else it.size_bytes, mtime_ns, it.sha256)

    def _changed(item_id: int, reason: str) -> ApiError:
        logger.warning("not serving the file of item %d: %s", item_id, reason)
        return ApiError(404, "gone", f"the file of item {item_id} changed since it was indexed ({reason}); "
                                     "re-index it")

    def _open_verified(item_id: int, rec: IndexedFile):
        try:
            return S().files.open(rec)
        except FileNotFoundError as e:
            raise ApiError(404, "gone", f"the file of item {item_id} is no longer on disk") from e
        except FileChanged as e:
            raise _changed(item_id, e.reason) from e

    def _open_image(item_id: int):
        it, rec = _image_item(item_id)
        return it, _open_verified(item_id, rec)  # the bytes sent come from the descriptor that was checked

    def _thumbnail(item_id: int, size: int) -> bytes:
        it, rec = _image_item(item_id)
        key = content_key(rec.sha256, rec.path, rec.size, rec.mtime_ns)
        with _open_verified(item_id, rec) as f:  # checked before any cached thumbnail is served
            try:
                return S().thumbnails.get(key, it.path, size or settings.thumbnail_size,
                                          settings.max_image_pixels * 10, lambda: read_checked(f, rec.path))
            except FileChanged as e:
                raise _changed(item_id, e.reason) from e
            except ImageDecodeError as e:
                raise ApiError(422, "bad_image", f"item {item_id}: {e.reason}") from e

    @app.get("/api/items/{item_id}/image", responses={404: {"model": ErrorOut}}, tags=["items"],
             response_class=StreamingResponse)
    async def item_image(item_id: int = item_id_param) -> StreamingResponse:
        it, f = await work(_open_image, item_id)
        return StreamingResponse(stream(f), media_type=_MEDIA.get(it.format or "", "application/octet-stream"),
                                 headers={"Content-Length": str(os.fstat(f.fileno()).st_size),
                                          "Cache-Control": "private, max-age=3600"})

    @app.get("/api/items/{item_id}/thumbnail", responses={404: {"model": ErrorOut}}, tags=["items"],
             response_class=Response)
    async def item_thumbnail(item_id: int = item_id_param, size: int = Query(0, ge=0, le=1024)) -> Response:
        data = await work(_thumbnail, item_id, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    # -- page -----------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _register_errors(app: FastAPI) -> None:
    """Every error is JSON ``{"error": {"code", "message"}}``; bad input 4xx, never 500."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(QueryError)
    async def _query_error(request: Request, exc: QueryError) -> JSONResponse:
        return _error(422, "bad_query", str(exc))

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return _error(422, "invalid_input", str(exc))

    async def _invalid_value(request: Request, exc: Exception) -> JSONResponse:
        # a value the checks above let through and a parser or SQLite refused (NUL, an int past
        # 2**63, digits past Python's int limit): the input's fault, so 4xx; logged to be closed
        logger.warning("unvalidated bad input on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return _error(422, "invalid_input", f"invalid input: {exc}")

    app.add_exception_handler(ValueError, _invalid_value)
    app.add_exception_handler(OverflowError, _invalid_value)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form"))
            parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))
