"""Generation in the server: one answer at a time, a bounded queue in front, cancellation when the
client goes away, and answers streamed as server-sent events.

* **Queue.** A generation uses every core, so answers are generated one at a time; at most
  ``max_queued_generations`` more wait (on the event loop, not in threads). Beyond that a request
  is answered at once with ``503 {"error": {"code": "busy"}}`` and a ``Retry-After`` header: the
  expected wait, from the mean duration of recent generations times the answers ahead.
* **Cancellation.** While a request waits or is answered, its connection is watched; a client
  that disconnects is dropped from the queue, or its decoding stops at the next token
  (:meth:`RagPipeline.stream <crossmodal_rag.generation.rag.RagPipeline.stream>`'s ``cancel``).
* **Streaming** (``stream=true``): ``text/event-stream`` with the events ``sources`` (the retrieved
  items with their priors, before any generation; ``streaming: false`` when the answer comes
  whole, as rag-sequence's does once every candidate is scored), ``token`` (text deltas), and
  ``final`` (the whole answer, the same JSON as the non-streamed response, with posteriors); an
  error after the stream began is an ``error`` event ``{"code", "message"}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
from fastapi import Request

from ..errors import CrossmodalError, QueryError, WeightsUnavailableError
from .errors import ApiError

__all__ = ["GenerationQueue", "Ticket", "sse", "watch_disconnect"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
DISCONNECT_POLL_S = 0.1  # how often a waiting or generating request checks its connection
_running: set[asyncio.Task] = set()  # streamed answers still finishing (a reference keeps each alive)


class Ticket:
    """A place in the generation queue; ``release()`` (idempotent) gives it back."""

    def __init__(self, queue: GenerationQueue) -> None:
        self.queue, self.released = queue, False
        self.cancel = threading.Event()  # set: the client went away, stop generating
        self.started = False  # its generation began (it was not dropped while waiting)
        self.tokens = 0  # answer text pieces generated

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.queue.admitted -= 1
            self.queue.finished.append(self)


class GenerationQueue:
    """Answers one at a time; at most ``max_waiting`` more admitted; 503 + Retry-After beyond."""

    def __init__(self, max_waiting: int, limiter: anyio.CapacityLimiter) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.max_waiting, self.limiter = max_waiting, limiter
        self.admitted = 0  # generating + waiting
        self.cancelled = 0  # generations stopped or dropped because the client went away
        self.durations: deque[float] = deque(maxlen=20)
        self.finished: deque[Ticket] = deque(maxlen=50)  # the latest tickets given back

    def retry_after(self) -> int:
        """Seconds until a place is likely free: mean recent generation time x answers ahead."""
        mean = sum(self.durations) / len(self.durations) if self.durations else 10.0
        return max(1, min(600, math.ceil(mean * max(1, self.admitted - self.max_waiting))))

    def admit(self) -> Ticket:
        """A ticket, or ``ApiError(503, "busy")`` with ``Retry-After`` when the queue is full."""
        if self.admitted >= self.max_waiting + 1:
            wait = self.retry_after()
            raise ApiError(503, "busy", f"the server is answering {self.admitted} question(s) already "
                                        f"(at most {self.max_waiting} wait); try again in {wait} s",
                           headers={"Retry-After": str(wait)})
        self.admitted += 1
        return Ticket(self)

    async def run(self, ticket: Ticket, fn: Callable[[], T]) -> T:
        """``fn()`` in a worker thread once it is this ticket's turn (raises QueryError when the
        client went away before that)."""
        async with self.limiter:
            if ticket.cancel.is_set():
                self.cancelled += 1
                raise QueryError("the client went away before its answer started")
            t0 = time.perf_counter()
            ticket.started = True
            try:
                return await anyio.to_thread.run_sync(fn)
            finally:
                if ticket.cancel.is_set():
                    self.cancelled += 1
                else:
                    self.durations.append(time.perf_counter() - t0)


async def watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client disconnects (checked every :data:`DISCONNECT_POLL_S`)."""
    while not cancel.is_set():
        if await request.is_disconnected():
            logger.info("client of %s went away: cancelling its answer", request.url.path)
            cancel.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def _finite(value: Any) -> Any:
    """Non-finite floats (a -inf log-probability) as None, so the data is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def sse(event: str, data: Any) -> bytes:
    """One server-sent event (``data`` as one line of strict JSON)."""
    return f"event: {event}\ndata: {json.dumps(_finite(data), ensure_ascii=False, allow_nan=False)}\n\n".encode()


def error_payload(exc: BaseException) -> dict[str, str]:
    """What an ``error`` event says about ``exc`` (the codes of the JSON errors)."""
    if isinstance(exc, ApiError):
        return {"code": exc.code, "message": exc.message}
    if isinstance(exc, WeightsUnavailableError):
        return {"code": "generator_unavailable", "message": str(exc)}
    if isinstance(exc, QueryError):
        return {"code": "bad_query", "message": str(exc)}
    if isinstance(exc, CrossmodalError | ValueError):
        return {"code": "invalid_input", "message": str(exc)}
    logger.exception("error while streaming an answer", exc_info=exc)
    return {"code": "internal_error", "message": "internal error while answering"}


async def stream_events(queue: GenerationQueue, ticket: Ticket, request: Request,
                        produce: Callable[[Callable[[str, Any], None]], None],
                        encode: Callable[[str, Any], bytes] = sse) -> AsyncIterator[bytes]:
    """The SSE body of one streamed answer. ``produce(emit)`` runs in a worker thread when it is
    this ticket's turn and calls ``emit(event, data)`` for each event; the ticket is released
    when it returns, and its ``cancel`` is set if the client goes away first. ``encode`` writes
    each event (default :func:`sse`; the OpenAI-compatible stream writes its own chunks)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()

    def emit(event: str, data: Any) -> None:
        loop.call_soon_threadsafe(events.put_nowait, (event, data))

    async def runner() -> None:
        try:
            await queue.run(ticket, lambda: produce(emit))
        except BaseException as e:
            if not ticket.cancel.is_set():
                events.put_nowait(("error", error_payload(e)))
            if not isinstance(e, Exception):
                raise
        finally:
            ticket.release()
            events.put_nowait(None)

    task = loop.create_task(runner())
    watcher = loop.create_task(watch_disconnect(request, ticket.cancel))
    try:
        yield b": queued\n\n"  # a comment: the response starts at once, before the model runs
        while (item := await events.get()) is not None:
            yield encode(*item)
    finally:
        # the stream ended or the client went away: decoding stops at the next token, and the
        # runner gives the ticket back once the worker thread has returned
        ticket.cancel.set()
        watcher.cancel()
        _running.add(task)
        task.add_done_callback(_running.discard)
