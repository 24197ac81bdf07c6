"""The real ``crossmodal-rag serve`` (a subprocess) against issue 25's hostile requests: a
cross-origin form upload, EPS and PostScript disguised as JPEG with a fake Ghostscript first on
PATH, thin images. One server for the module (starting one takes seconds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from tests.hostile_uploads import DOS_EPS, EPS, THIN_SIZES, fake_ghostscript, jpeg, path_with
from tests.servers import serve_cli

EVIL = "https://evil.example"
APP = "https://app.example"
UPLOAD_ROUTES = ["/api/search/image", "/api/ask/image"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, sample_collection: Path):
    """(base URL, the fake gs's marker path) of ``serve --allow-origin https://app.example``."""
    work = tmp_path_factory.mktemp("serve-guards")
    coll = work / "coll"
    shutil.copytree(sample_collection, coll, ignore=shutil.ignore_patterns(".lock"))
    marker = fake_ghostscript(work / "bin")
    with serve_cli(coll, work, "--lazy-generator", "--allow-origin", APP, env={"PATH": path_with(work / "bin")}) as base:
        yield base, marker


def test_cross_origin_uploads_are_refused_unless_allowed(served: tuple[str, Path]) -> None:
    base, _ = served
    files = {"image": ("cat.jpg", jpeg((64, 48)), "image/jpeg")}
    evil = httpx.post(base + "/api/search/image", files=files, headers={"origin": EVIL}, timeout=60)
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "cross_origin"
    assert f"--allow-origin {EVIL}" in evil.json()["error"]["message"]
    cross = httpx.post(base + "/api/ask", json={"question": "hi"}, headers={"sec-fetch-site": "cross-site"}, timeout=60)
    assert cross.status_code == 403
    app = httpx.post(base + "/api/search/image", files=files, headers={"origin": APP}, timeout=60)
    assert app.status_code == 200 and app.headers["access-control-allow-origin"] == APP
    assert httpx.post(base + "/api/search/image", files=files, timeout=60).status_code == 200  # curl
    port = base.rsplit(":", 1)[1]
    same = httpx.post(base + "/api/search/image", files=files, headers={"origin": f"http://127.0.0.1:{port}"},
                      timeout=60)
    assert same.status_code == 200


def test_eps_disguised_as_jpeg_never_starts_ghostscript(served: tuple[str, Path]) -> None:
    """EPS and PostScript uploads named ``.jpg`` get 415 and the fake ``gs`` never runs (Pillow's
    EPS plugin would run it on load; the old server answered 500 after running it)."""
    base, marker = served
    for route in UPLOAD_ROUTES:
        for name, data in (("eps.jpg", EPS), ("dos.jpg", DOS_EPS), ("x.eps", EPS)):
            r = httpx.post(base + route, files={"image": (name, data, "image/jpeg")}, timeout=60)
            assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_type", (route, name, r.text)
    ok = httpx.post(base + "/api/search/image", files={"image": ("a.jpg", jpeg((32, 32)), "image/jpeg")}, timeout=60)
    assert ok.status_code == 200, ok.text  # the decode workers decode what is allowed
    assert not marker.exists(), marker.read_text()


@pytest.mark.parametrize("size", THIN_SIZES, ids=[f"{w}x{h}" for w, h in THIN_SIZES])
def test_thin_images_are_not_a_500(served: tuple[str, Path], size: tuple[int, int]) -> None:
    base, _ = served
    r = httpx.post(base + "/api/search/image", files={"image": ("thin.jpg", jpeg(size), "image/jpeg")}, timeout=60)
    assert r.status_code == 200 or (400 <= r.status_code < 500 and r.json()["error"]["message"]), r.text
