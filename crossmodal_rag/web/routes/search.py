"""``/api/search`` (text, with query arithmetic) and ``/api/search/image`` (an upload, plus/minus texts).

A collection with a text space (``index --text-model``) answers text queries for ``texts`` and
``all`` as the CLI does (:func:`crossmodal_rag.routing.search`); those run in a worker thread,
one by one, not through the batcher (it embeds with CLIP only)."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile

from ... import hybrid, routing
from ..batching import SearchRequest
from ..checks import Checks
from ..inputs import MAX_SCORE_CHARS, check_min_score
from ..models import ErrorOut, SearchOut
from ..results import search_out
from ..settings import WebSettings
from ..state import AppState, get_state

__all__ = ["ERRORS", "router"]

ERRORS = {422: {"model": ErrorOut}, 413: {"model": ErrorOut}, 415: {"model": ErrorOut}}


def router(settings: WebSettings) -> APIRouter:
    r = APIRouter(tags=["search"])
    check = Checks(settings)
    max_q, max_where = settings.max_query_chars, settings.max_where_conditions

    @r.get("/api/search", response_model=SearchOut, responses=ERRORS)
    async def search_text(
            q: str = Query(..., max_length=max_q,
                           description='text query; arithmetic allowed: "a cat" + "snow" - indoors, 2:cat'),
            k: int = Query(10, ge=1, le=settings.max_k), target: Literal["images", "texts", "all"] = Query("images"),
            where: list[str] = Query([], max_length=max_where,
                                     description="metadata filters, e.g. width>=1000 (repeatable, ANDed)"),
            min_score: str | None = Query(None, max_length=MAX_SCORE_CHARS,
                                          description="a number, or auto (calibrated); the dense (cosine) "
                                                      "score in every mode"),
            mode: Literal["auto", "dense", "keyword", "hybrid"] = Query(
                "dense", description="dense (embeddings; batched with concurrent searches), keyword (BM25 "
                                     "over captions, passages, OCR text), hybrid (both, reciprocal rank "
                                     "fusion), auto (hybrid when the collection has texts, else dense)"),
            st: AppState = Depends(get_state)) -> SearchOut:
        """Search by text."""
        t0 = time.perf_counter()
        check.query(q)
        check.where(where)
        check_min_score(min_score)
        check.k(k)
        chosen = hybrid.choose_mode(mode, st.collection.store, has_text=True)
        if target != "images":  # a text space (index --text-model) answers, outside the batcher
            routed = await st.work(routing.search, st.collection, q, k=k, target=target, where=where,
                                   min_score=min_score, mode=chosen)
            if routed is not None:
                return search_out({"text": q, "where": where}, target, k, routed[1], t0, st.paths, routed[0])
        if chosen != "dense":
            _, hits = await st.work(hybrid.search, st.collection, q, k=k, target=target, where=where,
                                    min_score=min_score, mode=chosen)
            return search_out({"text": q, "where": where}, target, k, hits, t0, st.paths, chosen)
        if st.batcher is not None:
            hits = await st.batcher.search(SearchRequest(text=q, k=k, target=target, where=tuple(where),
                                                         min_score=min_score))
        else:
            hits = await st.work(st.collection.search, q, k=k, target=target, where=where, min_score=min_score)
        return search_out({"text": q, "where": where}, target, k, hits, t0, st.paths)

    @r.post("/api/search/image", response_model=SearchOut, responses=ERRORS)
    async def search_image(request: Request, image: UploadFile = File(..., description="query image"),
                           k: int = Form(10, ge=1, le=settings.max_k),
                           target: Literal["images", "texts", "all"] = Form("images"),
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
        if st.batcher is not None:
            hits = await st.batcher.search(SearchRequest(image=pil, k=k, target=target, where=tuple(where),
                                                         min_score=min_score, plus=tuple(plus), minus=tuple(minus)))
        else:
            hits = await st.work(st.collection.search, image=pil, k=k, target=target, where=where,
                                 min_score=min_score, plus=plus, minus=minus)
        return search_out({"image": image.filename, "plus": plus, "minus": minus, "where": where},
                          target, k, hits, t0, st.paths)

    return r
