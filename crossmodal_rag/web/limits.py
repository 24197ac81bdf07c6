"""Request body limit, counted on the bytes as they arrive (pure ASGI middleware).

A declared ``Content-Length`` over the limit is refused before anything is read. A body without
one (``Transfer-Encoding: chunked``) is counted message by message as the app reads it; the read
that crosses the limit fails, the app stops, and the client gets 413 (JSON error) with
``Connection: close``, so the server stops reading the socket too. Every route that takes a body
(uploads and JSON) goes through it.
"""

from __future__ import annotations

import json
import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit", "BodyTooLarge"]

logger = logging.getLogger(__name__)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when the body read so far exceeds the limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds the {limit} byte upload limit")


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (declared or received) with 413.

    ``shown_limit`` is the limit named in the message (the upload limit a user set; ``max_bytes``
    adds room for a form's own headers).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, shown_limit: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.shown_limit = shown_limit if shown_limit is not None else max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(send, 400, "bad_request", "invalid Content-Length header")
                return
            if int(declared) > self.max_bytes:
                await _send_error(send, 413, "too_large", self._message(int(declared)), close=True)
                return
        received = 0
        over = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise BodyTooLarge(self.shown_limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:  # whatever the app answers to the failed read, the client gets the 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await self._refuse(scope, send, received)
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(scope, send, received)

    def _message(self, size: int | None = None) -> str:
        what = f"request body of {size} bytes" if size is not None else "request body"
        return f"{what} exceeds the {self.shown_limit} byte upload limit"

    async def _refuse(self, scope: Scope, send: Send, received: int) -> None:
        logger.info("refused %s %s: body passed the %d byte limit after %d bytes received",
                    scope.get("method"), scope.get("path"), self.max_bytes, received)
        await _send_error(send, 413, "too_large", self._message(), close=True)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


async def _send_error(send: Send, status: int, code: str, message: str, *, close: bool = False) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
