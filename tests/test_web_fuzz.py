"""The REST API fuzzed from its own OpenAPI schema (schemathesis strategies, run by hypothesis):
no generated request, valid or not (wrong types, out-of-range numbers, NUL and other odd
characters, missing fields), gets a 5xx; every error is JSON; every answer carries ``nosniff``.
Issue 25's hostile inputs too: every operation from foreign and generated ``Origin`` headers and
``Sec-Fetch-Site`` values (403 where it costs work, never a 5xx), and hostile uploads (EPS and
PostScript named .jpg, thin JPEGs, a scan bomb, other formats) on both upload routes.

The app runs under a real uvicorn on loopback and one keep-alive session sends every request of an
operation, so a request that makes the server drop its connection fails the test too. Bounded:
``derandomize=True`` and a fixed number of examples per operation and mode (~1 min in all).
(schemathesis' own pytest plugin is not used: its lazy fixtures do not run on pytest 9.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (in the dev extra)")
uvicorn = pytest.importorskip("uvicorn")
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from crossmodal_rag.testing import make_tiny_t5
from crossmodal_rag.web import WebSettings, create_app
from tests.hostile_uploads import DOS_EPS, EPS, THIN_SIZES, jpeg, scan_bomb
from tests.servers import serve_in_thread

EXAMPLES = 50  # per operation and generation mode
LIMITS = {"max_new_tokens": 2, "max_upload_bytes": 200_000, "max_k": 20}


def _settings(collection: str = "unused", **kw: object) -> WebSettings:
    return WebSettings(collection=collection, **LIMITS, **kw)  # type: ignore[arg-type]


# The schema of an app with the served app's limits; building it opens no collection.
SCHEMA = schemathesis.openapi.from_dict(create_app(_settings()).openapi())
SCHEMA.config.generation.update(deterministic=True, allow_x00=True)
OPERATIONS = {op.label: op for op in (r.ok() for r in SCHEMA.get_all_operations())}
CASES = [(label, mode) for label, op in sorted(OPERATIONS.items())
         for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if mode is GenerationMode.POSITIVE or len(op.path_parameters) + len(op.query) + len(op.body) > 0]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory, sample_collection: Path):
    coll = tmp_path_factory.mktemp("fuzz") / "coll"
    shutil.copytree(sample_collection, coll, ignore=shutil.ignore_patterns(".lock"))
    t5 = make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5")
    app = create_app(_settings(str(coll), generator=str(t5), thumbnail_dir=str(tmp_path_factory.mktemp("th"))))
    with serve_in_thread(app) as port:
        yield f"http://127.0.0.1:{port}"


def test_the_schema_lists_every_route() -> None:
    assert {"GET /api/search", "POST /api/search/image", "POST /api/ask", "POST /api/ask/image",
            "GET /api/items/{item_id}", "GET /api/items/{item_id}/image", "GET /api/items/{item_id}/thumbnail",
            "GET /api/stats", "GET /api/health"} <= set(OPERATIONS)


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_no_generated_request_gets_a_5xx(base_url: str, label: str, mode: GenerationMode) -> None:
    operation = OPERATIONS[label]
    seen: list[int] = []
    with requests.Session() as session:  # keep-alive: a dropped connection shows as an error

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            response = case.call(base_url=base_url, session=session, timeout=60)
            seen.append(response.status_code)
            where = (case.method, case.formatted_path, case.query, str(case.body)[:200])
            assert response.status_code < 500, (*where, response.text[:300])
            headers = {k.lower(): v[0] for k, v in response.headers.items()}
            if response.status_code >= 400:
                assert headers["content-type"].startswith("application/json"), (*where, headers)
                assert response.json()["error"]["message"], where
            assert headers.get("x-content-type-options") == "nosniff", where

        check()
    assert seen  # requests were sent


# -- issue 25: other sites' requests and hostile uploads ------------------------------------------
FOREIGN_ORIGINS = ["https://evil.example", "null", "http://127.0.0.1:1", "http://localhost", "https://127.0.0.1",
                   "http://127.0.0.1.evil.example", "file://", "http://[::1]:80", "http://x@127.0.0.1", "http://127.0.0.1:80:80", "evil", ""]


def _example_request(label: str) -> tuple[str, str, dict]:
    """(method, URL path, requests kwargs) of a plausible request for an operation."""
    method, path = label.split(" ", 1)
    path = path.replace("{item_id}", "1")
    kwargs: dict = {}
    if path == "/api/search":
        kwargs["params"] = {"q": "a cat"}
    elif path == "/api/ask":
        kwargs["json"] = {"question": "hi"}
    elif method == "POST":
        kwargs["files"] = {"image": ("a.jpg", jpeg((16, 16)), "image/jpeg")}
    return method, path, kwargs


def _is_checked(method: str, path: str) -> bool:
    """Requests the Origin check covers: every method but GET/HEAD, and every request under /api/."""
    return method not in ("GET", "HEAD") or path.startswith("/api/")


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_every_operation_refuses_foreign_origins(base_url: str, label: str) -> None:
    method, path, kwargs = _example_request(label)
    with requests.Session() as session:
        for origin in FOREIGN_ORIGINS:
            r = session.request(method, base_url + path, headers={"Origin": origin}, timeout=60, **kwargs)
            assert r.status_code < 500 and r.headers["content-type"].startswith("application/json"), (origin, r.text)
            if _is_checked(method, path):
                assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin", (label, origin, r.text)
        for site in ("cross-site", "same-site"):
            r = session.request(method, base_url + path, headers={"Sec-Fetch-Site": site}, timeout=60, **kwargs)
            assert r.status_code == 403 if _is_checked(method, path) else r.status_code < 500, (label, site)


_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)


@given(origin=st.one_of(_HEADER_TEXT, st.builds(lambda s, h, p: f"{s}://{h}{p}",
                                                st.sampled_from(["http", "https", "HTTP", "ws", "file"]),
                                                st.sampled_from(["127.0.0.1", "localhost", "[::1]", "evil.example",
                                                                 "127.0.0.1.evil.example", "0x7f.1"]),
                                                st.sampled_from(["", ":80", ":8000", ":0", ":99999", "/", "/x"]))),
       site=st.sampled_from([None, "cross-site", "same-site", "same-origin", "none", "CROSS-SITE", "junk"]))
@settings(max_examples=150, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_generated_origins_never_reach_the_upload_route(base_url: str, origin: str, site: str | None) -> None:
    """Whatever the Origin (or Sec-Fetch-Site) is, a POST from it is refused with a JSON 403
    unless it is the server's own origin; no 5xx."""
    port = base_url.rsplit(":", 1)[1]
    own = {f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/"}
    headers = {"Origin": origin, **({"Sec-Fetch-Site": site} if site else {})}
    r = requests.post(base_url + "/api/ask", json={"question": "hi"}, headers=headers, timeout=60)
    assert r.status_code < 500, (origin, r.text)
    if origin.strip().lower() not in own:
        assert r.status_code == 403 and r.json()["error"]["code"] == "cross_origin", (origin, r.status_code, r.text)


HOSTILE_UPLOADS = {
    "eps.jpg": (EPS, {415}),
    "dos-eps.jpg": (DOS_EPS, {415}),
    "ps.jpg": (b"%!PS-Adobe-3.0\nshowpage\n", {415}),
    "pdf.jpg": (b"%PDF-1.4\n%%EOF\n", {415}),
    "svg.png": (b"<svg xmlns='http://www.w3.org/2000/svg'/>", {415}),
    "scan-bomb.jpg": (scan_bomb(1024, 400), {413, 422}),  # ~40 KB, 400 scans: over the scan budget
    **{f"thin-{w}x{h}.jpg": (jpeg((w, h)), {200, 413, 422}) for w, h in THIN_SIZES},
    "truncated.jpg": (jpeg((64, 64))[:300], {422}),
}


@pytest.mark.parametrize("route", ["/api/search/image", "/api/ask/image"])
@pytest.mark.parametrize("name", sorted(HOSTILE_UPLOADS))
def test_hostile_uploads_get_clean_answers(base_url: str, route: str, name: str) -> None:
    data, expected = HOSTILE_UPLOADS[name]
    r = requests.post(base_url + route, files={"image": (name, data, "image/jpeg")}, data={"k": "2"}, timeout=60)
    assert r.status_code in expected, (name, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert r.headers["content-type"].startswith("application/json") and r.json()["error"]["message"]
