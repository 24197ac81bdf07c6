"""``/api/search`` (text, with query arithmetic) and ``/api/search/image`` (an upload, plus/minus texts).

Each route makes one :class:`~crossmodal_rag.search.SearchRequest` and hands it to the batcher
(which batches the dense CLIP searches and runs every other request as
:meth:`Collection.search <crossmodal_rag.collection.Collection.search>` does), or to the
server's backend in a worker thread (:mod:`..backend`: one collection, or several shards merged,
the answer then marked ``partial`` with ``missing_shards`` when a shard did not answer): the
answers are the CLI's, mode and routing included (``mode`` defaults to
:data:`~crossmodal_rag.search.DEFAULT_MODE`, as the CLI's)."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile

from ...search import DEFAULT_MODE, Mode, SearchRequest, SearchResult, Target
from ...search.moments import moments_in, sort_hits
from ..checks import Checks
from ..inputs import MAX_SCORE_CHARS, check_min_score
from ..models import ErrorOut, SearchOut
from ..results import search_out, sharded
from ..settings import WebSettings
from ..state import AppState, get_state

__all__ = ["ERRORS", "router"]

ERRORS = {422: {"model": ErrorOut}, 413: {"model": ErrorOut}, 415: {"model": ErrorOut}}


def router(settings: WebSettings) -> APIRouter:
    r = APIRouter(tags=["search"])
    check = Checks(settings)
    max_q, max_where = settings.max_query_chars, settings.max_where_conditions

    async def run(st: AppState, request: SearchRequest) -> SearchResult:
        if st.batcher is not None:  # concurrent dense searches share one forward and one FAISS call
            return await st.batcher.search(request)
        return await st.work(st.backend.search, request)  # one collection, or the shards merged

    @r.get("/api/search", response_model=SearchOut, responses=ERRORS)
    async def search_text(
            q: str = Query(..., max_length=max_q,
                           description='text query; arithmetic allowed: "a cat" + "snow" - indoors, 2:cat'),
            k: int = Query(10, ge=1, le=settings.max_k), target: Target = Query("images"),
            where: list[str] = Query([], max_length=max_where,
                                     description="metadata filters, e.g. width>=1000 (repeatable, ANDed)"),
            min_score: str | None = Query(None, max_length=MAX_SCORE_CHARS,
                                          description="a number, or auto (calibrated); the dense (cosine) "
                                                      "score in every mode"),
            mode: Mode = Query(
                DEFAULT_MODE, description="auto (the default, as the CLI's: keyword evidence joins the dense "
                                          "ranking only when the query's words are informative, see "
                                          "mode_reason), dense (embeddings; batched with "
                                          "concurrent searches), keyword (BM25 over captions, passages, OCR "
                                          "text), hybrid (both, reciprocal rank fusion)"),
            parse: bool = Query(True, description="read dates and places in q as capture filters ('beach in "
                                                  "July 2023' -> beach, taken:2023-07) when photos are dated; "
                                                  "query.parsed shows what was read"),
            sort: Literal["relevance", "taken", "-taken"] = Query(
                "relevance", description="order of the results: relevance, taken (oldest first), -taken"),
            st: AppState = Depends(get_state)) -> SearchOut:
        """Search by text."""
        t0 = time.perf_counter()
        check.query(q)
        check.where(where)
        check_min_score(min_score)
        check.k(k)
        found = await st.work(moments_in, st.collection, q) if parse else None  # issue 30
        text, extra = (found.text, found.where) if found else (q, ())
        result = await run(st, SearchRequest(text=text, k=k, target=target, where=(*where, *extra),
                                              min_score=min_score, mode=mode))
        query: dict[str, Any] = {"text": q, "where": where}
        if found is not None and found.where:
            query["parsed"] = found.to_dict()
        return search_out(query, target, k, sort_hits(list(result.hits), sort), t0, st.paths, result.mode,
                          result.reason, sharded(result))

    @r.post("/api/search/image", response_model=SearchOut, responses=ERRORS)
    async def search_image(request: Request, image: UploadFile = File(..., description="query image"),
                           k: int = Form(10, ge=1, le=settings.max_k),
                           target: Target = Form("images"),
                           plus: list[str] = Form([], description="texts added to the image query"),
                           minus: list[str] = Form([], description="texts subtracted from it"),
                           where: list[str] = Form([], description="metadata filters"),
                           min_score: str | None = Form(None, max_length=MAX_SCORE_CHARS),
                           st: AppState = Depends(get_state)) -> SearchOut:
        """Search by an uploaded image (optionally plus/minus texts)."""
        t0 = time.perf_counter()
        check.k(k)
        check.plus_minus("plus", plus)
        check.plus_minus("minus", minus)
        check.where(where)
        check_min_score(min_score)
        pil = await check.upload(st, image, request)
        result = await run(st, SearchRequest(image=pil, k=k, target=target, where=tuple(where),
                                             min_score=min_score, plus=tuple(plus), minus=tuple(minus)))
        return search_out({"image": image.filename, "plus": plus, "minus": minus, "where": where},
                          target, k, result.hits, t0, st.paths, result.mode, shards=sharded(result))

    return r
