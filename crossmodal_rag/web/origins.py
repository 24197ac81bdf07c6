"""Cross-origin requests: only the server's own pages, the sites ``serve --allow-origin`` names,
and plain clients may make it work.

A browser lets any page send a form or a "simple" request (``multipart/form-data``,
``application/x-www-form-urlencoded`` or ``text/plain`` body, no CORS preflight) to any address,
127.0.0.1 included; it only hides the answer. So a page on another site could make this server
decode uploads, search and generate. :class:`OriginCheck` decides before a byte of the body is read:

* ``Origin`` present: let through when it is the request's own origin (the scheme it came in on
  and its ``Host``, which :class:`.guards.HostCheck` has already checked) or one of the allowed
  origins; any other (``null``, another port, another scheme) gets 403;
* no ``Origin``, but ``Sec-Fetch-Site: cross-site`` or ``same-site`` (a browser request made by
  another site's page, e.g. ``<img src>``): 403;
* neither (curl, scripts): let through; no browser made the request.

Checked: every method but GET and HEAD, on every path; GET and HEAD under ``/api/`` too (a
search or a thumbnail costs work), except top-level navigations (``Sec-Fetch-Mode: navigate``: a
link from elsewhere, which the other site cannot read or repeat unseen). An allowed origin's
answers carry ``Access-Control-Allow-Origin`` and its preflight (``OPTIONS``) is answered 204.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .guards import send_json_error

__all__ = ["OriginCheck", "normalize_origin"]

logger = logging.getLogger(__name__)

_DEFAULT_PORT = {"http": "80", "https": "443"}
# scheme://host[:port]: a DNS name or IPv4 address, or an IPv6 address in brackets; nothing else
_ORIGIN = re.compile(r"(https?)://(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?)(?::([0-9]{1,5}))?",
                     re.IGNORECASE)
_SAFE = frozenset({"GET", "HEAD"})
_PREFLIGHT_HEADERS = [(b"access-control-allow-methods", b"GET, POST"),
                      (b"access-control-allow-headers", b"Content-Type"), (b"access-control-max-age", b"600")]


def _canonical(scheme: str, host: str, port: str | None) -> str | None:
    scheme, host = scheme.lower(), host.lower()
    if port is not None and not 0 < int(port) <= 65535:
        return None
    port = None if port is None or str(int(port)) == _DEFAULT_PORT[scheme] else str(int(port))
    return f"{scheme}://{host}" + (f":{port}" if port else "")


def _parse(origin: str) -> str | None:
    """``scheme://host[:port]`` lower-cased, default port dropped; None when not such an origin."""
    text = origin.strip()
    m = _ORIGIN.fullmatch(text[:-1] if text.endswith("/") else text)  # one trailing slash, as users type it
    return _canonical(m.group(1), m.group(2), m.group(4)) if m else None


def normalize_origin(origin: str) -> str:
    """An ``--allow-origin`` value as the browser sends it (``https://app.example``).

    Raises:
        ValueError: not ``http(s)://host[:port]`` (no path, query, user or wildcard).
    """
    canonical = _parse(origin)
    if canonical is None:
        raise ValueError(f"{origin!r} is not an origin; expected scheme://host[:port] with scheme http or https "
                         "and nothing after the host or port, e.g. https://photos.example:8443")
    return canonical


def _own_origin(scope: Scope) -> str | None:
    """The origin a page of this server has, from the scheme and ``Host`` of the request."""
    host = _header(scope, b"host")
    scheme = scope.get("scheme", "http")
    if host is None or scheme not in _DEFAULT_PORT:
        return None
    m = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::([0-9]{1,5}))?", host.strip())
    return _canonical(scheme, m.group(1).rstrip("."), m.group(2)) if m else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class OriginCheck:
    """Refuse requests made by another site's pages (403 JSON) unless their origin is allowed."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = frozenset(normalize_origin(o) for o in allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET").upper()
        origin = _header(scope, b"origin")
        if method in _SAFE and (not scope.get("path", "").startswith("/api/")
                                or (_header(scope, b"sec-fetch-mode") or "").lower() == "navigate"):
            await self.app(scope, receive, send)
            return
        if origin is None:
            site = (_header(scope, b"sec-fetch-site") or "").strip().lower()
            if site in ("cross-site", "same-site"):
                await self._refuse(scope, send, f"a {site} request (Sec-Fetch-Site: {site}, no Origin) is refused: "
                                                "this server answers its own pages and plain clients only; a page "
                                                "of another site needs --allow-origin ORIGIN")
                return
            await self.app(scope, receive, send)
            return
        canonical = _parse(origin)
        if canonical is not None and (canonical == _own_origin(scope) or canonical in self.allowed):
            if canonical in self.allowed and canonical != _own_origin(scope):
                await self._with_cors(scope, receive, send, canonical, method)
                return
            await self.app(scope, receive, send)
            return
        fix = (f"start the server with --allow-origin {canonical} to allow that site's pages" if canonical
               else "an opaque or malformed origin cannot be allowed (--allow-origin takes scheme://host[:port])")
        own = _own_origin(scope) or "this server's own"
        await self._refuse(scope, send, f"cross-origin request from Origin {origin!r} is refused: this server "
                                        f"answers pages of {own} only; {fix}")

    async def _with_cors(self, scope: Scope, receive: Receive, send: Send, origin: str, method: str) -> None:
        cors = [(b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin")]
        if method == "OPTIONS" and _header(scope, b"access-control-request-method") is not None:
            await send({"type": "http.response.start", "status": 204, "headers": cors + _PREFLIGHT_HEADERS})
            await send({"type": "http.response.body", "body": b""})
            return

        async def with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *cors]}
            await send(message)

        await self.app(scope, receive, with_cors)

    async def _refuse(self, scope: Scope, send: Send, message: str) -> None:
        logger.info("refused %s %s: %s", scope.get("method"), scope.get("path"), message)
        body_follows = _header(scope, b"transfer-encoding") is not None or (_header(scope, b"content-length") or "0") != "0"
        await send_json_error(send, 403, "cross_origin", message, close=body_follows)
