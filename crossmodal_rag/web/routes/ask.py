"""``/api/ask`` (a JSON question) and ``/api/ask/image`` (an upload, optionally a question): a
retrieval-augmented answer with its sources, generated one at a time in a worker thread."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, UploadFile

from ...errors import WeightsUnavailableError
from ...generation import GenerationSettings, RagPipeline, RagSettings
from ..checks import Checks
from ..errors import ApiError
from ..inputs import MAX_SCORE_CHARS, check_min_score
from ..models import AskIn, AskOut, ErrorOut, SourceOut
from ..results import image_id_of, urls
from ..settings import WebSettings
from ..state import AppState, get_state
from .search import ERRORS

__all__ = ["router", "run_ask"]


def run_ask(st: AppState, question: str | None, image: Any, k: int, mode: str, target: str,
            where: list[str] | None = None, min_score: str | float | None = None) -> AskOut:
    """One answer (blocking; runs in a worker thread), loading the generator first if needed."""
    if st.generator_status.startswith("error"):
        raise ApiError(503, "generator_unavailable", st.generator_status[len("error: "):])
    pipe = RagPipeline(st.collection, st.generator,
                       RagSettings(k=k, mode=mode, target=target, where=tuple(where or ()), min_score=min_score),
                       GenerationSettings(max_new_tokens=st.settings.max_new_tokens))
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


def router(settings: WebSettings) -> APIRouter:
    r = APIRouter(tags=["ask"])
    check = Checks(settings)
    errors = {**ERRORS, 503: {"model": ErrorOut}}

    @r.post("/api/ask", response_model=AskOut, responses=errors)
    async def ask(body: AskIn, st: AppState = Depends(get_state)) -> AskOut:
        """Answer a question from the collection, with sources (JSON body)."""
        check.query(body.question, "question")
        check.where(body.where)
        check_min_score(body.min_score)
        return await st.generate(run_ask, st, body.question, None, check.k(body.k), body.mode, body.target,
                                 body.where, body.min_score)

    @r.post("/api/ask/image", response_model=AskOut, responses=errors)
    async def ask_image(image: UploadFile = File(..., description="image that drives retrieval"),
                        question: str | None = Form(None, max_length=settings.max_query_chars),
                        k: int = Form(5, ge=1, le=settings.max_k),
                        mode: Literal["concat", "rag-sequence", "rag-token"] = Form("concat"),
                        target: Literal["texts", "images", "all"] = Form("texts"),
                        where: list[str] = Form([], description="metadata filters on retrieval"),
                        min_score: str | None = Form(None, max_length=MAX_SCORE_CHARS),
                        st: AppState = Depends(get_state)) -> AskOut:
        """Answer with an uploaded image (and optionally a question)."""
        if question is not None and not question.strip():
            question = None
        check.query(question, "question")
        check.k(k)
        check.where(where)
        check_min_score(min_score)
        pil = await check.upload(st, image)
        return await st.generate(run_ask, st, question, pil, k, mode, target, where, min_score)

    return r
