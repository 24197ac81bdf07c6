"""Checks of a request's fields against the server's limits, before any parser sees them, and the
upload reader: size, then the type sniffed from the first bytes (415 before anything decodes),
then decoding in the server's decode pool (declared pixel count and scan budgets, a deadline;
see :mod:`.decoding`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request, UploadFile

from ..ingestion.image_sniff import ImageFormatError, sniff_image_format
from .decoding import DecodeFailed
from .errors import ApiError
from .generation import DISCONNECT_POLL_S
from .inputs import MAX_FILENAME_CHARS, check_text, check_texts
from .settings import WebSettings
from .state import AppState

__all__ = ["ALLOWED_FORMATS", "Checks"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: Upload formats (sniffed; MPO is a camera's JPEG). HEIF and AVIF are indexed from disk, not
#: taken from the network: their decoders are large and seldom exercised.
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
_SHOWN = ", ".join(sorted(ALLOWED_FORMATS - {"MPO"}))


class Checks:
    """The field checks of one server's limits."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings

    def query(self, text: str | None, what: str = "q") -> str | None:
        if text is None:
            return None
        check_text(text, what, self.settings.max_query_chars)
        if not text.strip():
            raise ApiError(422, "empty_query", f"empty {what}")
        return text

    def where(self, where: list[str]) -> list[str]:
        s = self.settings
        return check_texts(where, "where", s.max_where_conditions, s.max_where_chars)

    def plus_minus(self, field: str, texts: list[str]) -> None:
        check_texts(texts, field, self.settings.max_where_conditions, self.settings.max_query_chars)
        for t in texts:
            self.query(t, field)

    def k(self, k: int) -> int:
        if not 1 <= k <= self.settings.max_k:
            raise ApiError(422, "bad_k", f"k must be between 1 and {self.settings.max_k}, got {k}")
        return k

    async def upload(self, st: AppState, upload: UploadFile, request: Request | None = None) -> Any:
        """The decoded PIL image of ``upload``, or a 413/415/422 (503 when the decoders are busy)
        naming what is wrong. While it decodes, ``request``'s connection is watched: a client
        that goes away has its decode stopped (the worker killed), not finished for nobody."""
        limit = self.settings.max_upload_bytes
        name = check_text(upload.filename or "upload", "image file name", MAX_FILENAME_CHARS)
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise ApiError(413, "too_large", f"upload exceeds the {limit} byte limit")
        if not data:
            raise ApiError(422, "empty_upload", "the uploaded file is empty")
        try:
            fmt = sniff_image_format(data, name)
        except ImageFormatError as e:
            what = e.reason.split(" (allowed")[0]
            raise ApiError(415, "unsupported_type", f"uploaded file: {what}; accepted upload formats: {_SHOWN}") from e
        if fmt not in ALLOWED_FORMATS:
            raise ApiError(415, "unsupported_type", f"uploaded image is {fmt}; accepted upload formats: {_SHOWN}")
        try:
            decoded = await _unless_gone(st.decoder.decode(data, name, max_pixels=self.settings.max_image_pixels),
                                         request)
        except DecodeFailed as e:
            retry = {"Retry-After": str(e.retry_after)} if e.retry_after else None
            raise ApiError(e.status, e.code, f"uploaded image: {e.reason}", headers=retry) from e
        if decoded.format not in ALLOWED_FORMATS:
            raise ApiError(415, "unsupported_type", f"uploaded image is {decoded.format}; accepted upload formats: "
                                                    f"{_SHOWN}")
        return decoded.image


async def _unless_gone(work: Awaitable[T], request: Request | None) -> T:
    """``work``'s result; cancelled (and a 400 raised) if ``request``'s client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while request is not None:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                break
            if await request.is_disconnected():
                logger.info("client of %s went away: stopping its decode", request.url.path)
                task.cancel()
                raise ApiError(400, "client_gone", "the client went away while its upload was decoded")
        return await task
    finally:
        if not task.done():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
