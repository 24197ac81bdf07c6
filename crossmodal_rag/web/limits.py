"""Request body limit, counted on the bytes as they arrive (pure ASGI middleware).

A declared ``Content-Length`` over the limit is refused before anything is read. A body without
one (``Transfer-Encoding: chunked``) is counted message by message as the app reads it; the read
that crosses the limit fails, the app stops, and the client gets 413 (JSON error) with
``Connection: close``, so the server stops reading the socket too. Every route that takes a body
(uploads and JSON) goes through it. Uploads (``multipart/form-data``) get the upload limit; any
other body (JSON) the smaller ``max_other_bytes``, since no JSON route needs more than a few KB.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .guards import send_json_error as _send_error

__all__ = ["BodyLimit", "BodyTooLarge"]

logger = logging.getLogger(__name__)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when the body read so far exceeds the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, _message(limit))


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (declared or received) with 413.

    ``shown_limit`` is the limit named in the message (the upload limit a user set; ``max_bytes``
    adds room for a form's own headers). Bodies that are not ``multipart/form-data`` are limited
    to ``max_other_bytes`` (default: ``max_bytes``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, shown_limit: int | None = None,
                 max_other_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.shown_limit = shown_limit if shown_limit is not None else max_bytes
        self.max_other_bytes = max_other_bytes if max_other_bytes is not None else max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        form = (_header(scope, b"content-type") or "").lower().startswith("multipart/form-data")
        limit, shown = (self.max_bytes, self.shown_limit) if form else (self.max_other_bytes, self.max_other_bytes)
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(send, 400, "bad_request", "invalid Content-Length header")
                return
            if int(declared) > limit:
                await _send_error(send, 413, "too_large", _message(shown, int(declared)), close=True)
                return
        received = 0
        over = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge(shown)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:  # whatever the app answers to the failed read, the client gets the 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _refuse(scope, send, received, shown)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                await _refuse(scope, send, received, shown)


def _message(limit: int, size: int | None = None) -> str:
    what = f"request body of {size} bytes" if size is not None else "request body"
    return f"{what} exceeds the {limit} byte limit"


async def _refuse(scope: Scope, send: Send, received: int, limit: int) -> None:
    logger.info("refused %s %s: body passed the %d byte limit after %d bytes received",
                scope.get("method"), scope.get("path"), limit, received)
    await _send_error(send, 413, "too_large", _message(limit), close=True)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None
