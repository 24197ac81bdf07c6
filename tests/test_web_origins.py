"""Cross-origin requests (issue 25): a page on another site cannot make the server decode, search or
answer. Requests from a foreign ``Origin`` (or, without one, from a browser context that says
``Sec-Fetch-Site: cross-site``/``same-site``) are refused with 403 before their body is read, unless
``serve --allow-origin`` names the origin; same-origin pages and plain clients (curl) keep working."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from crossmodal_rag.web import WebSettings, create_app
from tests.hostile_uploads import jpeg

LOCAL = "http://127.0.0.1"
EVIL = "https://evil.example"
FOREIGN = [EVIL, "http://evil.example", "null", "http://127.0.0.1.evil.example", "http://127.0.0.1:9999",
           "http://localhost", "https://127.0.0.1", "file://", "chrome-extension://abcdef", "http://[::1]",
           "http://127.0.0.1:80@evil.example", "not an origin"]
CAT = jpeg((64, 48))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, sample_collection: Path):
    coll = tmp_path_factory.mktemp("origins") / "coll"
    shutil.copytree(sample_collection, coll, ignore=shutil.ignore_patterns(".lock"))
    settings = WebSettings(collection=str(coll), generator=str(tmp_path_factory.mktemp("none")),
                           load_generator_at_startup=False, thumbnail_dir=str(tmp_path_factory.mktemp("th")),
                           allowed_hosts=("127.0.0.1", "localhost", "::1", "photos.lan"),
                           allowed_origins=("https://app.example", "http://photos.lan:8080"))
    with TestClient(create_app(settings), base_url=LOCAL) as c:
        yield c


def _requests() -> list[tuple[str, str, dict]]:
    """Every state-changing or costly request, in the shapes a web page can send without CORS
    preflight (multipart and url-encoded forms, text/plain) and with it (JSON)."""
    upload = {"files": {"image": ("cat.jpg", CAT, "image/jpeg")}, "data": {"k": "3"}}
    return [
        ("post", "/api/search/image", upload),
        ("post", "/api/ask/image", {**upload, "data": {"question": "what?"}}),
        ("post", "/api/ask", {"json": {"question": "what is it?", "k": 2}}),
        ("post", "/api/ask", {"content": b'{"question": "hi"}', "headers": {"content-type": "text/plain"}}),
        ("post", "/api/ask", {"content": b"question=hi", "headers": {"content-type": "application/x-www-form-urlencoded"}}),
        ("post", "/api/search/image", {"content": b"image=x", "headers": {"content-type": "application/x-www-form-urlencoded"}}),
        ("put", "/api/ask", {"json": {"question": "hi"}}),
        ("delete", "/api/items/1", {}),
        ("get", "/api/search", {"params": {"q": "a cat", "k": 3}}),  # costly, though a GET
    ]


def _send(c: TestClient, method: str, url: str, kwargs: dict, headers: dict[str, str]):
    kwargs = dict(kwargs)
    kwargs["headers"] = {**kwargs.get("headers", {}), **headers}
    return c.request(method.upper(), url, **kwargs)


@pytest.mark.parametrize("origin", FOREIGN)
def test_requests_from_a_foreign_origin_are_refused(client: TestClient, origin: str) -> None:
    for method, url, kwargs in _requests():
        r = _send(client, method, url, kwargs, {"origin": origin})
        assert r.status_code == 403, (origin, method, url, r.status_code, r.text[:200])
        err = r.json()["error"]
        assert err["code"] == "cross_origin"
        assert repr(origin) in err["message"] and "--allow-origin" in err["message"], err
        assert r.headers["x-content-type-options"] == "nosniff"
        assert "access-control-allow-origin" not in r.headers
    assert client.get("/api/health").status_code == 200  # and the server keeps serving


@pytest.mark.parametrize("site", ["cross-site", "same-site", "CROSS-SITE"])
def test_browser_requests_without_origin_from_another_site_are_refused(client: TestClient, site: str) -> None:
    for method, url, kwargs in _requests():
        r = _send(client, method, url, kwargs, {"sec-fetch-site": site, "sec-fetch-mode": "no-cors"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin", (site, method, url, r.text)
        assert "Sec-Fetch-Site" in r.json()["error"]["message"]


def test_same_origin_pages_and_plain_clients_keep_working(client: TestClient) -> None:
    cases = [
        {},  # curl, scripts: no Origin, no Sec-Fetch-Site
        {"origin": LOCAL},  # the page itself (Host: 127.0.0.1)
        {"origin": "http://127.0.0.1:8000", "host": "127.0.0.1:8000"},
        {"origin": "http://localhost:8000", "host": "localhost:8000", "sec-fetch-site": "same-origin"},
        {"origin": "http://LOCALHOST:8000", "host": "localhost:8000"},
        {"origin": "http://[::1]:8000", "host": "[::1]:8000"},
        {"sec-fetch-site": "same-origin"},
        {"sec-fetch-site": "none"},  # typed into the address bar
        {"origin": "https://app.example"},  # named by --allow-origin
        {"origin": "http://photos.lan:8080", "host": "photos.lan"},
    ]
    for headers in cases:
        r = _send(client, "post", "/api/search/image", _requests()[0][2], headers)
        assert r.status_code == 200, (headers, r.text[:200])
        r = client.get("/api/search", params={"q": "a cat", "k": 2}, headers=headers)
        assert r.status_code == 200, (headers, r.text[:200])


def test_cross_site_navigations_and_the_page_are_not_refused(client: TestClient) -> None:
    """A link on another site to the page (or to an API URL) is a navigation, not a request the
    other site can read or repeat: it is answered."""
    nav = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}
    assert client.get("/", headers=nav).status_code == 200
    assert client.get("/api/health", headers=nav).status_code == 200
    assert client.get("/static/app.js", headers={"sec-fetch-site": "same-origin"}).status_code == 200


def test_allowed_origins_get_cors_headers_and_a_preflight_answer(client: TestClient) -> None:
    ok = client.post("/api/ask", json={"question": "hi"}, headers={"origin": "https://app.example"})
    assert ok.status_code != 403  # 503: no generator here; the origin was let through
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "origin" in ok.headers["vary"].lower()
    pre = client.options("/api/ask", headers={"origin": "https://app.example", "access-control-request-method": "POST",
                                              "access-control-request-headers": "content-type"})
    assert pre.status_code == 204, pre.text
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "content-type" in pre.headers["access-control-allow-headers"].lower()
    bad = client.options("/api/ask", headers={"origin": EVIL, "access-control-request-method": "POST"})
    assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers
    same = client.get("/api/health", headers={"origin": LOCAL})
    assert "access-control-allow-origin" not in same.headers  # same-origin needs no CORS


def test_allow_origin_flag_is_checked_and_normalised() -> None:
    from crossmodal_rag.cli import build_parser

    args = build_parser().parse_args(["serve", "-c", "x", "--allow-origin", "https://App.Example:443",
                                      "--allow-origin", "http://photos.lan:8080/"])
    assert args.allow_origin == ["https://app.example", "http://photos.lan:8080"]
    assert build_parser().parse_args(["serve", "-c", "x"]).allow_origin == []
    for bad in ("evil.example", "https://evil.example/path", "ftp://evil.example", "https://", "*",
                "https://a.example?x=1", "https://user@a.example", "null", "https://a b.example", "http://a.example:99999"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "-c", "x", "--allow-origin", bad])
