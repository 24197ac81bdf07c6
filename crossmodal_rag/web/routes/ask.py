"""``/api/ask`` (a JSON question) and ``/api/ask/image`` (an upload, optionally a question): a
retrieval-augmented answer with its sources, generated one at a time in a worker thread behind a
bounded queue (:mod:`..generation`); with ``stream=true`` the answer comes as server-sent events."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import StreamingResponse

from ...errors import WeightsUnavailableError
from ...generation import GenerationSettings, RagPipeline, RagSettings
from ...generation.stream import Final, Sources, Token
from ...search.request import DEFAULT_MODE
from ..checks import Checks
from ..errors import ApiError
from ..generation import Ticket, stream_events, watch_disconnect
from ..inputs import MAX_SCORE_CHARS, check_min_score
from ..models import AskIn, AskOut, ErrorOut, SourceOut
from ..results import image_id_of, urls
from ..settings import WebSettings
from ..state import AppState, get_state
from .search import ERRORS

__all__ = ["produce", "router", "run_ask"]

Mode = Literal["concat", "rag-sequence", "rag-token"]


def _pipeline(st: AppState, k: int, mode: str, target: str, where: list[str] | None,
              min_score: str | float | None, search_mode: str = DEFAULT_MODE,
              generation: GenerationSettings | None = None) -> RagPipeline:
    return RagPipeline(st.collection, st.generator,
                       RagSettings(k=k, mode=mode, target=target, where=tuple(where or ()), min_score=min_score,
                                   search_mode=search_mode),
                       generation or GenerationSettings(max_new_tokens=st.settings.max_new_tokens),
                       knowledge=st.backend.knowledge)  # several shards: retrieval merges them


def _check_generator(st: AppState) -> None:
    """503 at once when the generator failed to load (before a place in the queue is taken)."""
    if st.generator_status.startswith("error"):
        raise ApiError(503, "generator_unavailable", st.generator_status[len("error: "):])


def _ensure_loaded(st: AppState) -> None:
    """Load the generator if it is not yet (call holding ``st.gen_lock``)."""
    _check_generator(st)
    if st.generator_status != "ready":
        st.load_generator()
        if st.generator_status != "ready":
            raise ApiError(503, "generator_unavailable", st.generator_status[len("error: "):])


def _public_source(st: AppState, s: dict[str, Any]) -> dict[str, Any]:
    """A source as the API shows it: the public path, and its image's id and URLs (of its shard)."""
    shard = s.get("shard")
    item = st.backend.item(s["id"], shard)
    parent = item.parent_id if item else None
    iid = image_id_of(s["kind"], s["id"], parent)
    return {**s, "path": st.paths.path(s["path"]), "image": st.paths.path(s.get("image")), "image_id": iid,
            **urls(iid, shard)}


def answer_out(st: AppState, answer: Any) -> AskOut:
    d = answer.to_dict()
    d["sources"] = [SourceOut(**_public_source(st, s)) for s in d["sources"]]
    d["generator"], d["encoder"] = st.paths.spec(d["generator"]), st.paths.spec(d["encoder"])
    d["prompt_images"] = [[st.paths.path(p) or "" for p in ps] for ps in d.get("prompt_images", [])]  # VLM
    return AskOut(**{k2: v for k2, v in d.items() if k2 in AskOut.model_fields})


def run_ask(st: AppState, question: str | None, image: Any, k: int, mode: str, target: str,
            where: list[str] | None = None, min_score: str | float | None = None,
            ticket: Ticket | None = None, search_mode: str = DEFAULT_MODE,
            generation: GenerationSettings | None = None) -> AskOut:
    """One answer (blocking; runs in a worker thread), loading the generator first if needed;
    the ``ticket``'s ``cancel`` stops it at the next token. ``search_mode``: how a question
    retrieves (RagSettings.search_mode); ``generation``: decoding settings (default: greedy,
    the server's ``max_new_tokens``)."""
    _check_generator(st)
    pipe = _pipeline(st, k, mode, target, where, min_score, search_mode, generation)

    def count(event: Any) -> None:
        if ticket is not None and isinstance(event, Token):
            ticket.tokens += 1

    with st.gen_lock:
        try:
            _ensure_loaded(st)
            answer = pipe.ask(question, image=image, k=k, mode=mode, on_event=count,
                              cancel=ticket.cancel if ticket is not None else None)
        except WeightsUnavailableError as e:
            raise ApiError(503, "generator_unavailable", str(e)) from e
    return answer_out(st, answer)


def produce(st: AppState, question: str | None, image: Any, k: int, mode: str, target: str,
            where: list[str] | None, min_score: str | float | None, ticket: Ticket, emit: Any,
            search_mode: str = DEFAULT_MODE, generation: GenerationSettings | None = None) -> None:
    """The events of one streamed answer (blocking; runs in a worker thread): ``emit`` gets
    ``("sources", ...)``, ``("token", {"text"})`` and ``("final", AskOut as JSON)``."""
    pipe = _pipeline(st, k, mode, target, where, min_score, search_mode, generation)
    with st.gen_lock:
        try:
            _ensure_loaded(st)
            for event in pipe.stream(question, image=image, k=k, mode=mode, cancel=ticket.cancel):
                if isinstance(event, Sources):
                    d = event.to_dict()
                    shards = [{"shard": s.shard} if s.shard is not None else {} for s in event.sources]
                    emit("sources", {**{k2: v for k2, v in d.items() if k2 != "event"},
                                     "sources": [_public_source(st, {**s, **of})
                                                 for s, of in zip(d["sources"], shards, strict=True)]})
                elif isinstance(event, Token):
                    ticket.tokens += 1
                    emit("token", {"text": event.text})
                elif isinstance(event, Final):
                    emit("final", answer_out(st, event.answer).model_dump(mode="json"))
        except WeightsUnavailableError as e:
            raise ApiError(503, "generator_unavailable", str(e)) from e


async def _answer(st: AppState, request: Request, stream: bool, question: str | None, image: Any, k: int,
                  mode: str, target: str, where: list[str], min_score: str | float | None,
                  search_mode: str = DEFAULT_MODE) -> Any:
    """Queue the answer (503 when the queue is full); stream it, or wait for it while watching
    the connection."""
    _check_generator(st)
    ticket = st.queue.admit()
    if stream:
        events = partial(produce, st, question, image, k, mode, target, where, min_score, ticket,
                          search_mode=search_mode)
        return StreamingResponse(stream_events(st.queue, ticket, request, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.get_running_loop().create_task(watch_disconnect(request, ticket.cancel))
    try:
        return await st.queue.run(ticket, partial(run_ask, st, question, image, k, mode, target, where,
                                                  min_score, ticket, search_mode))
    finally:
        watcher.cancel()
        ticket.release()


def router(settings: WebSettings) -> APIRouter:
    r = APIRouter(tags=["ask"])
    check = Checks(settings)
    errors = {**ERRORS, 503: {"model": ErrorOut}}
    sse = {"text/event-stream": {"description": "with stream=true: events sources, token*, final (or error)"}}
    ok = {200: {"content": sse}}

    @r.post("/api/ask", response_model=AskOut, responses={**ok, **errors})
    async def ask(body: AskIn, request: Request, st: AppState = Depends(get_state)) -> Any:
        """Answer a question from the collection, with sources (JSON body; ``stream``: as events)."""
        check.query(body.question, "question")
        check.where(body.where)
        check_min_score(body.min_score)
        return await _answer(st, request, body.stream, body.question, None, check.k(body.k), body.mode,
                             body.target, body.where, body.min_score, body.search_mode)

    @r.post("/api/ask/image", response_model=AskOut, responses={**ok, **errors})
    async def ask_image(request: Request, image: UploadFile = File(..., description="image that drives retrieval"),
                        question: str | None = Form(None, max_length=settings.max_query_chars),
                        k: int = Form(5, ge=1, le=settings.max_k), mode: Mode = Form("concat"),
                        target: Literal["texts", "images", "all"] = Form("texts"),
                        where: list[str] = Form([], description="metadata filters on retrieval"),
                        min_score: str | None = Form(None, max_length=MAX_SCORE_CHARS),
                        stream: bool = Form(False, description="answer as server-sent events"),
                        st: AppState = Depends(get_state)) -> Any:
        """Answer with an uploaded image (and optionally a question)."""
        if question is not None and not question.strip():
            question = None
        check.query(question, "question")
        check.k(k)
        check.where(where)
        check_min_score(min_score)
        pil = await check.upload(st, image, request)
        return await _answer(st, request, stream, question, pil, k, mode, target, where, min_score)

    return r
