"""OpenAI-compatible endpoints: ``/v1/models``, ``/v1/embeddings``, ``/v1/chat/completions``, so
the ``openai`` client, LangChain, LlamaIndex and RAG front ends can use a collection by
``base_url`` alone.

* ``/v1/embeddings``: the model is the collection's encoder; text inputs, and images as
  ``data:image/...;base64,`` URLs (sniffed and decoded as uploads are); vectors equal the
  encoder's (``Collection.encoder.encode_texts`` / ``encode_images``); ``encoding_format``
  ``float`` or ``base64`` (little-endian float32, what the ``openai`` client asks for).
* ``/v1/chat/completions``: the last user message is the question (an ``image_url`` data URL in
  it drives retrieval as ``/api/ask/image``'s upload does); the answer is the assistant message;
  ``sources`` (priors, posteriors) and ``rag`` ride in extra fields; ``stream: true`` sends
  ``chat.completion.chunk`` events and ends with ``data: [DONE]``. ``n`` other than 1, ``stop``,
  ``tools`` and ``logprobs`` are refused by name; ``temperature``/``top_p``/``seed`` sample
  (0 or absent: greedy); ``max_tokens`` up to the server's ``max_new_tokens``. The RAG knobs of
  ``/api/ask`` (``k``, ``mode``, ``target``, ``where``, ``min_score``, ``search_mode``) are
  accepted as extra body fields.

They are ordinary routes of the app, so the Host allow-list, the Origin check, the body limits
(JSON bodies: ``max_json_bytes``), the worker limits and the bounded answer queue apply as for
``/api/*``; errors are the app's JSON errors (``error.message`` is what the ``openai`` client shows).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from functools import partial
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ...generation import GenerationSettings
from ...search.request import DEFAULT_MODE, Mode
from ..checks import Checks
from ..errors import ApiError
from ..generation import stream_events, watch_disconnect
from ..inputs import check_min_score
from ..settings import WebSettings
from ..state import AppState, get_state
from .ask import produce, run_ask

__all__ = ["MAX_EMBEDDING_INPUTS", "BytesUpload", "ChatIn", "EmbeddingsIn", "router"]

MAX_EMBEDDING_INPUTS = 256  # inputs one /v1/embeddings request may carry
MAX_MESSAGES = 64  # messages one chat request may carry
OWNER = "crossmodal-rag"


class BytesUpload:
    """Bytes already in memory, read by :meth:`Checks.upload` as it reads a browser's upload."""

    def __init__(self, filename: str, data: bytes) -> None:
        self.filename, self.data = filename, data

    async def read(self, size: int = -1) -> bytes:
        return self.data if size < 0 else self.data[:size]


class EmbeddingsIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=1000, description="the collection's encoder (GET /v1/models)")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a text, a list of texts, or images as data:image/...;base64, URLs")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="only the encoder's own dimension")
    user: str | None = Field(None, max_length=1000)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(max_length=1000, description="the collection's name (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    n: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    logprobs: bool | None = None
    # the RAG knobs of /api/ask, as extra body fields
    k: int = Field(5, ge=1)
    mode: Literal["concat", "rag-sequence", "rag-token"] = "concat"
    target: Literal["texts", "images", "all"] = "texts"
    where: list[str] = Field(default_factory=list)
    min_score: str | float | None = None
    search_mode: Mode = DEFAULT_MODE


def _model_ids(st: AppState) -> tuple[str, str]:
    """(the embeddings model: the encoder, the chat model: the collection's name; several shards:
    their names joined by '+')."""
    return st.paths.spec(st.collection.manifest.encoder), st.backend.name


def _check_model(given: str, wanted: str, what: str) -> None:
    if given != wanted:
        raise ApiError(404, "model_not_found", f"{what} model {given[:200]!r} is not served here; use {wanted!r} "
                                               f"(GET /v1/models lists the models)")


async def _data_url_image(st: AppState, check: Checks, url: str, field: str) -> Any:
    """The decoded image of a ``data:image/...;base64,`` URL (as an upload is checked)."""
    head, sep, payload = url.partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64") and sep):
        raise ApiError(400, "unsupported_image", f"{field}: images are accepted as data:image/...;base64, URLs only "
                                                 "(no remote URLs)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad_image", f"{field}: the data URL's base64 is invalid ({e})") from e
    return await check.upload(st, BytesUpload(field, data))  # type: ignore[arg-type]


def _vectors_out(vectors: np.ndarray, fmt: str) -> list[Any]:
    if fmt == "base64":
        return [base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode() for v in vectors]
    return [v.astype(np.float32).tolist() for v in vectors]


def _question(body: ChatIn) -> tuple[str | None, str | None]:
    """(the last user message's text, its image data URL or None)."""
    last = body.messages[-1]
    if last.role != "user":
        raise ApiError(400, "bad_messages", f"the last message must be the user's question, not {last.role!r}")
    if isinstance(last.content, str) or last.content is None:
        return last.content, None
    texts, images = [], []
    for part in last.content:
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif part.get("type") == "image_url" and isinstance(part.get("image_url"), dict):
            images.append(str(part["image_url"].get("url", "")))
        else:
            raise ApiError(400, "bad_messages", f"message part of type {str(part.get('type'))[:40]!r} is not "
                                                "supported; send text and image_url parts")
    if len(images) > 1:
        raise ApiError(400, "bad_messages", "at most one image per question")
    return " ".join(texts) or None, images[0] if images else None


def _generation(st: AppState, body: ChatIn) -> GenerationSettings:
    for name, bad in (("n", body.n not in (None, 1)), ("stop", bool(body.stop)), ("tools", bool(body.tools)),
                      ("logprobs", bool(body.logprobs))):
        if bad:
            raise ApiError(400, "unsupported_parameter", f"{name} is not supported here (one answer per request, "
                                                         "ended by the model; leave it out)")
    limit = st.settings.max_new_tokens
    wanted = body.max_completion_tokens or body.max_tokens or limit
    if wanted > limit:
        raise ApiError(400, "max_tokens_too_large", f"max_tokens {wanted} exceeds this server's limit of {limit} "
                                                    "(serve --max-new-tokens)")
    sample = bool(body.temperature)
    return GenerationSettings(max_new_tokens=wanted, do_sample=sample, temperature=body.temperature or 1.0,
                              top_p=body.top_p or 1.0, seed=body.seed)


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None = None,
           **extra: Any) -> bytes:
    data = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _chunk_writer(cid: str, created: int, model: str) -> Any:
    """``encode(event, data)`` for :func:`stream_events`: the answer's events as OpenAI chunks."""
    streamed = {"tokens": 0}

    def encode(event: str, data: Any) -> bytes:
        if event == "sources":
            return _chunk(cid, created, model, {"role": "assistant", "content": ""}, sources=data["sources"])
        if event == "token":
            streamed["tokens"] += 1
            return _chunk(cid, created, model, {"content": data["text"]})
        if event == "final":
            rest = b"" if streamed["tokens"] else _chunk(cid, created, model, {"content": data["answer"]})
            return rest + _chunk(cid, created, model, {}, "stop", sources=data["sources"], rag=_rag(data))
        message = data if isinstance(data, dict) else {"code": "internal_error", "message": str(data)}
        return f"data: {json.dumps({'error': {**message, 'type': message.get('code')}})}\n\n".encode()

    return encode


def _rag(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d.get(k) for k in ("mode", "abstained", "min_score", "logprob", "logprob_of", "timings")}


def router(settings: WebSettings) -> APIRouter:
    r = APIRouter(tags=["openai"])
    check = Checks(settings)

    @r.get("/v1/models")
    async def models(st: AppState = Depends(get_state)) -> dict[str, Any]:
        """The models: the collection's encoder (embeddings) and the collection (chat)."""
        created = int(st.collection.folder.stat().st_mtime)
        return {"object": "list", "data": [{"id": mid, "object": "model", "created": created, "owned_by": OWNER}
                                           for mid in _model_ids(st)]}

    @r.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsIn, st: AppState = Depends(get_state)) -> dict[str, Any]:
        """Embeddings by the collection's encoder (texts, or images as data URLs)."""
        _check_model(body.model, _model_ids(st)[0], "embeddings")
        items = [body.input] if isinstance(body.input, str) else list(body.input)
        if not items or not all(isinstance(x, str) for x in items):
            raise ApiError(400, "bad_input", "input must be a text or a non-empty list of texts (token ids are not "
                                             "accepted: this encoder has its own tokenizer)")
        if len(items) > MAX_EMBEDDING_INPUTS:
            raise ApiError(400, "too_many_inputs", f"{len(items)} inputs; at most {MAX_EMBEDDING_INPUTS} per request")
        dim = st.collection.manifest.dim
        if body.dimensions not in (None, dim):
            raise ApiError(400, "bad_dimensions", f"this encoder's embeddings have {dim} dimensions, not "
                                                  f"{body.dimensions}; leave dimensions out")
        images: dict[int, Any] = {}
        for i, x in enumerate(items):
            if x.startswith("data:"):
                images[i] = await _data_url_image(st, check, x, f"input[{i}]")
            else:
                check.query(x, f"input[{i}]")  # bounded, NUL-free, valid Unicode, not blank
        texts = [(i, x) for i, x in enumerate(items) if i not in images]
        enc = st.collection.encoder
        out = np.zeros((len(items), dim), dtype=np.float32)
        if texts:
            out[[i for i, _ in texts]] = await st.work(enc.encode_texts, [x for _, x in texts])
        if images:
            out[list(images)] = await st.work(enc.encode_images, list(images.values()))
        tokens = sum(len(x.split()) for _, x in texts)  # words: an estimate, the encoder counts its own
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": v}
                         for i, v in enumerate(_vectors_out(out, body.encoding_format))],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @r.post("/v1/chat/completions")
    async def chat(body: ChatIn, request: Request, st: AppState = Depends(get_state)) -> Any:
        """A retrieval-augmented answer to the last user message, as a chat completion."""
        _check_model(body.model, _model_ids(st)[1], "chat")
        question, image_url = _question(body)
        check.query(question, "question")
        check.k(body.k)
        check.where(body.where)
        check_min_score(body.min_score)
        generation = _generation(st, body)
        image = await _data_url_image(st, check, image_url, "image_url") if image_url else None
        if question is None and image is None:
            raise ApiError(400, "empty_query", "the last user message holds no text and no image")
        if st.generator_status.startswith("error"):
            raise ApiError(503, "generator_unavailable", st.generator_status[len("error: "):])
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        args = (st, question, image, body.k, body.mode, body.target, body.where, body.min_score)
        ticket = st.queue.admit()
        if body.stream:
            events = partial(produce, *args, ticket, search_mode=body.search_mode, generation=generation)

            async def chunks() -> Any:
                async for piece in stream_events(st.queue, ticket, request, events,
                                                 _chunk_writer(cid, created, body.model)):
                    yield piece
                yield b"data: [DONE]\n\n"

            return StreamingResponse(chunks(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        watcher = asyncio.get_running_loop().create_task(watch_disconnect(request, ticket.cancel))
        try:
            out = await st.queue.run(ticket, partial(run_ask, *args, ticket, body.search_mode, generation))
        finally:
            watcher.cancel()
            ticket.release()
        d = json.loads(out.model_dump_json())  # strict JSON: a -inf log-probability as null
        prompt_words = sum(len(p.split()) for p in d["prompts"])  # an estimate, as for embeddings
        return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": d["answer"]},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": prompt_words, "completion_tokens": ticket.tokens,
                          "total_tokens": prompt_words + ticket.tokens},
                "sources": d["sources"], "rag": _rag(d)}

    return r
