"""Errors of the REST API: every one is JSON ``{"error": {"code", "message"}}`` with a matching
HTTP status; bad input is 4xx, never 500."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import CollectionError, QueryError
from ..search.shards import ShardsUnavailableError
from .inputs import InputError

__all__ = ["ApiError", "error_response", "register_errors"]

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """An answer other than 200: ``status``, a short machine ``code`` and a message for people;
    ``headers`` go with it (e.g. ``Retry-After`` on a 503)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def register_errors(app: FastAPI) -> None:
    """Every error is JSON ``{"error": {"code", "message"}}``; bad input 4xx, never 500."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(QueryError)
    async def _query_error(request: Request, exc: QueryError) -> JSONResponse:
        return error_response(422, "bad_query", str(exc))

    @app.exception_handler(CollectionError)
    async def _collection_error(request: Request, exc: CollectionError) -> JSONResponse:
        # the collection's own state (a damaged or refused index, text space or file), not the
        # request's: 503, with the library's message, which names the fix (reindex, ...)
        logger.error("collection problem on %s: %s", request.url.path, exc)
        message = str(exc)
        web = getattr(request.app.state, "web", None)
        if web is not None and not web.settings.show_paths:  # no absolute server path leaves it
            folder = str(web.collection.folder)
            message = message.replace(folder, web.collection.folder.name)
        return error_response(503, "collection_damaged", message)

    @app.exception_handler(ShardsUnavailableError)
    async def _shards_down(request: Request, exc: ShardsUnavailableError) -> JSONResponse:
        # no shard answered (a shard that did not is named in the partial answer of the others)
        logger.error("no shard answered on %s: %s", request.url.path, exc)
        return error_response(503, "shards_unavailable", str(exc), {"Retry-After": "5"})

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return error_response(422, "invalid_input", str(exc))

    async def _invalid_value(request: Request, exc: Exception) -> JSONResponse:
        # a value the checks let through and a parser or SQLite refused (NUL, an int past
        # 2**63, digits past Python's int limit): the input's fault, so 4xx; logged to be closed
        logger.warning("unvalidated bad input on %s: %s: %s", request.url.path, type(exc).__name__, exc)
        return error_response(422, "invalid_input", f"invalid input: {exc}")

    app.add_exception_handler(ValueError, _invalid_value)
    app.add_exception_handler(OverflowError, _invalid_value)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "form"))
            parts.append(f"{where or 'request'}: {err.get('msg', 'invalid')}")
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))
