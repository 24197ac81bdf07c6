"""ASGI guards around the app: the Host check, security headers, and a last-resort error answer.

- :class:`HostCheck` answers 400 (JSON) to a request whose ``Host`` is not one of the server's
  names, so a DNS-rebinding page (``evil.example`` resolved to 127.0.0.1) cannot read the API.
- :class:`SecurityHeaders` adds ``X-Content-Type-Options: nosniff``, ``Referrer-Policy`` and
  ``Cross-Origin-Resource-Policy: same-origin`` to every response, and a Content Security Policy
  and ``X-Frame-Options: DENY`` to HTML.
- :class:`CatchAll` turns an unexpected exception into a JSON 500 and *returns*, so the server
  keeps the keep-alive connection (Starlette's own handler re-raises, and uvicorn then drops it).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import socket
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ANY_HOST", "CSP", "LOOPBACK_HOSTS", "CatchAll", "HostCheck", "SecurityHeaders", "allowed_hosts_for",
           "host_name"]

logger = logging.getLogger(__name__)

ANY_HOST = "*"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_ALWAYS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
           (b"cross-origin-resource-policy", b"same-origin")]
_HTML = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY")]


def host_name(host: str) -> str:
    """The name in a ``Host`` header or an ``--allowed-host``: no port, no IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def allowed_hosts_for(bind_host: str, extra: Iterable[str] = ()) -> tuple[str, ...]:
    """The Host names a server bound to ``bind_host`` answers by default, plus ``extra``.

    Bound to a loopback address or name: the loopback names. Bound to one address or name: that.
    Bound to every interface (``0.0.0.0``, ``::``): the loopback names and this machine's host
    name; clients that use another name or an IP address need ``--allowed-host``. ``*`` in
    ``extra`` allows any Host (no DNS-rebinding protection).
    """
    extra = [host_name(h) if h != ANY_HOST else h for h in extra]
    if ANY_HOST in extra:
        return (ANY_HOST,)
    name = host_name(bind_host)
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        address = None
    if name == "localhost" or (address is not None and address.is_loopback):
        names = [*LOOPBACK_HOSTS]
    elif address is not None and address.is_unspecified:
        names = [*LOOPBACK_HOSTS, socket.gethostname().lower()]
    else:
        names = [name]
    return tuple(dict.fromkeys([*names, *extra]))


class HostCheck:
    """Refuse requests whose ``Host`` header is not an allowed name (``*`` allows any)."""

    def __init__(self, app: ASGIApp, allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = {host_name(h) for h in allowed}
        self.any = ANY_HOST in self.allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.any:
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope.get("headers", ()) if k == b"host"), None)
        name = host_name(raw.decode("latin-1")) if raw is not None else ""
        if name in self.allowed:
            await self.app(scope, receive, send)
            return
        logger.info("refused a request for Host %r (allowed: %s)", name, ", ".join(sorted(self.allowed)))
        await send_json_error(send, 400, "bad_host",
                              f"this server does not answer for host {name!r}; start it with "
                              f"--allowed-host {name or 'NAME'} to allow it")


class SecurityHeaders:
    """Add the security headers to every response (CSP and frame denial on HTML)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ())
                           if k.lower() not in {name for name, _ in _ALWAYS}]
                headers += _ALWAYS
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                if ctype.startswith(b"text/html"):
                    headers += _HTML
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class CatchAll:
    """An exception nobody handled becomes a JSON 500; the connection stays open for the next request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            logger.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if started:  # half an answer sent: only closing the connection can end it
                raise
            await send_json_error(send, 500, "internal_error", "internal error; see the server log")


async def send_json_error(send: Send, status: int, code: str, message: str, *, close: bool = False) -> None:
    """Send ``{"error": {"code", "message"}}`` with ``status`` (``close``: ask to end the connection)."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
