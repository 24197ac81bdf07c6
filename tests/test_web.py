"""REST API tests against the real app with tiny models (FastAPI TestClient, no network)."""

from __future__ import annotations

import io
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from crossmodal_rag import Collection
from crossmodal_rag.testing import make_tiny_t5
from crossmodal_rag.web import WebSettings, create_app
from tests.badimages import png_declaring


@pytest.fixture(scope="module")
def web_collection(tmp_path_factory: pytest.TempPathFactory, sample_collection: Path) -> Path:
    dest = tmp_path_factory.mktemp("web") / "coll"
    shutil.copytree(sample_collection, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


@pytest.fixture(scope="module")
def client(web_collection: Path, tmp_path_factory: pytest.TempPathFactory):
    t5 = make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5")
    settings = WebSettings(collection=str(web_collection), generator=str(t5), max_upload_bytes=200_000,
                           max_image_pixels=4_000_000, max_query_chars=200, max_k=50, max_new_tokens=4,
                           thumbnail_dir=str(tmp_path_factory.mktemp("thumbs")))
    with TestClient(create_app(settings)) as c:
        for _ in range(100):
            if c.get("/api/health").json()["generator_status"] == "ready":
                break
            time.sleep(0.1)
        yield c


def _jpeg(path: Path) -> bytes:
    return path.read_bytes()


def test_health_stats_openapi(client: TestClient) -> None:
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["generator_status"] == "ready"
    s = client.get("/api/stats").json()
    assert s["counts"] == {"images": 15, "captions": 45, "passages": 0} and s["dim"] == 32
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/search/image", "/api/ask", "/api/ask/image", "/api/items/{item_id}",
            "/api/items/{item_id}/image", "/api/items/{item_id}/thumbnail", "/api/stats", "/api/health"} <= set(spec["paths"])
    page = client.get("/")
    assert page.status_code == 200 and "<form" in page.text
    assert "http" not in page.text.replace("http-equiv", "")  # nothing loaded from elsewhere
    assert client.get("/static/app.js").status_code == 200


def test_text_search_matches_the_library(client: TestClient, web_collection: Path) -> None:
    r = client.get("/api/search", params={"q": "a cup of coffee", "k": 5})
    assert r.status_code == 200
    data = r.json()
    with Collection.open(web_collection) as coll:
        expected = [h.id for h in coll.search("a cup of coffee", k=5)]
    assert [h["id"] for h in data["results"]] == expected
    first = data["results"][0]
    assert first["thumbnail_url"] == f"/api/items/{first['id']}/thumbnail"
    texts = client.get("/api/search", params={"q": "cat", "k": 3, "target": "texts"}).json()["results"]
    assert all(h["kind"] == "caption" and h["image_id"] == h["parent_id"] for h in texts)


def test_image_upload_search(client: TestClient, sample_dir: Path) -> None:
    r = client.post("/api/search/image", files={"image": ("cat.jpg", _jpeg(sample_dir / "cat.jpg"), "image/jpeg")},
                    data={"k": "3"})
    assert r.status_code == 200, r.text
    top = r.json()["results"][0]
    assert top["path"].endswith("cat.jpg") and top["score"] == pytest.approx(1.0, abs=1e-3)


def test_ask_text_and_image(client: TestClient, sample_dir: Path) -> None:
    r = client.post("/api/ask", json={"question": "what animal is this?", "k": 3, "mode": "rag-sequence"})
    assert r.status_code == 200, r.text
    a = r.json()
    assert len(a["sources"]) == 3 and sum(s["posterior"] for s in a["sources"]) == pytest.approx(1.0)
    assert all(s["thumbnail_url"] for s in a["sources"])  # caption sources point to their image
    r = client.post("/api/ask/image", files={"image": ("cat.jpg", _jpeg(sample_dir / "cat.jpg"), "image/jpeg")},
                    data={"question": "what is it?", "mode": "rag-token"})
    assert r.status_code == 200, r.text
    assert r.json()["question"] == "what is it?"


def test_items_images_and_thumbnails(client: TestClient, web_collection: Path) -> None:
    with Collection.open(web_collection) as coll:
        image_id = int(coll.store.ids("image")[0])
        caption_id = int(coll.store.ids("text")[0])
        path = coll.get(image_id)[0].path
    item = client.get(f"/api/items/{image_id}").json()
    assert item["path"] == path and item["captions"] and item["width"] > 0
    img = client.get(f"/api/items/{image_id}/image")
    assert img.status_code == 200 and img.content == Path(path).read_bytes()
    thumb = client.get(f"/api/items/{image_id}/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    assert client.get(f"/api/items/{image_id}/thumbnail").content == thumb.content  # cached
    small = Image.open(io.BytesIO(client.get(f"/api/items/{image_id}/thumbnail", params={"size": 64}).content))
    assert max(small.size) <= 64
    assert client.get(f"/api/items/{caption_id}/image").status_code == 404


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status"),
    [
        ("get", "/api/search", {"params": {"q": "   "}}, 422),
        ("get", "/api/search", {"params": {"q": "x" * 201}}, 422),
        ("get", "/api/search", {"params": {"q": "cat", "k": 0}}, 422),
        ("get", "/api/search", {"params": {"q": "cat", "k": 51}}, 422),
        ("get", "/api/search", {"params": {"q": "cat", "k": "many"}}, 422),
        ("get", "/api/search", {"params": {"q": "cat", "target": "videos"}}, 422),
        ("get", "/api/search", {}, 422),
        ("get", "/api/items/999999", {}, 404),
        ("get", "/api/items/abc", {}, 422),
        ("get", "/api/items/1/thumbnail", {"params": {"size": 99999}}, 422),
        ("get", "/api/items/..%2F..%2Fetc%2Fpasswd/image", {}, 404),
        ("get", "/static/..%2F..%2F..%2Fetc%2Fpasswd", {}, 404),
        ("get", "/nope", {}, 404),
        ("post", "/api/ask", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
        ("post", "/api/ask", {"content": b"question=hi", "headers": {"content-type": "text/plain"}}, 422),
        ("post", "/api/ask", {"json": {"question": ""}}, 422),
        ("post", "/api/ask", {"json": {"question": "hi", "mode": "magic"}}, 422),
        ("post", "/api/search/image", {"files": {"image": ("x.jpg", b"not an image", "image/jpeg")}}, 415),
        ("post", "/api/search/image", {"files": {"image": ("x.jpg", b"", "image/jpeg")}}, 422),
        ("post", "/api/search/image", {"files": {"image": ("b.png", png_declaring(60000, 60000), "image/png")}}, 413),
        ("post", "/api/search/image", {"files": {"image": ("big.bin", b"\xff" * 300_000, "image/jpeg")}}, 413),
        ("post", "/api/search/image", {"data": {"k": "3"}}, 422),
        ("delete", "/api/search", {}, 405),
    ],
)
def test_bad_requests_get_json_errors(client: TestClient, method: str, url: str, kwargs: dict, status: int) -> None:
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["code"]
    assert client.get("/api/health").status_code == 200  # and the server keeps serving


def test_pdf_and_svg_uploads_are_refused_by_content(client: TestClient) -> None:
    svg = b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="10" height="10"/></svg>'
    r = client.post("/api/search/image", files={"image": ("a.png", svg, "image/png")})
    assert r.status_code == 415
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PDF")
    r = client.post("/api/search/image", files={"image": ("a.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 415


def test_concurrent_requests_agree_with_sequential(client: TestClient) -> None:
    queries = [f"query number {i}" for i in range(12)]
    sequential = {q: [h["id"] for h in client.get("/api/search", params={"q": q, "k": 5}).json()["results"]] for q in queries}
    results: dict[str, list[int]] = {}
    errors: list[str] = []

    def worker(q: str) -> None:
        r = client.get("/api/search", params={"q": q, "k": 5})
        if r.status_code != 200:
            errors.append(r.text)
        else:
            results[q] = [h["id"] for h in r.json()["results"]]

    threads = [threading.Thread(target=worker, args=(q,)) for q in queries * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == sequential


def test_generator_unavailable_is_503_and_search_still_works(web_collection: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    settings = WebSettings(collection=str(web_collection), generator="google/flan-t5-base",
                           thumbnail_dir=str(tmp_path / "thumbs"))
    with TestClient(create_app(settings)) as c:
        for _ in range(100):
            if c.get("/api/health").json()["generator_status"].startswith("error"):
                break
            time.sleep(0.1)
        r = c.post("/api/ask", json={"question": "what is it?"})
        assert r.status_code == 503 and "--generator" in r.json()["error"]["message"]
        assert c.get("/api/search", params={"q": "cat"}).status_code == 200
    assert np.isfinite(0)  # the app shut down cleanly


def test_swapped_files_and_symlinks_are_not_served(tmp_path: Path, sample_collection: Path, tiny_oc_spec: str) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (20, 20), (10, 20, 30) if name == "a" else (200, 0, 0)).save(photos / f"{name}.png")
    secret = tmp_path / "secret.txt"
    secret.write_text("do not serve me")
    with Collection.create(tmp_path / "c", tiny_oc_spec) as coll:
        coll.add(photos)
        ids = {Path(it.path).name: it.id for it in coll.get(coll.store.ids("image").tolist())}
    (photos / "a.png").unlink()
    (photos / "a.png").symlink_to(secret)  # an indexed image replaced by a link to elsewhere
    (photos / "b.png").write_bytes(b"different contents of another size")
    with TestClient(create_app(WebSettings(collection=str(tmp_path / "c"), generator=str(tmp_path / "none"),
                                           thumbnail_dir=str(tmp_path / "t"), load_generator_at_startup=False))) as c:
        for name in ("a.png", "b.png"):
            for suffix in ("image", "thumbnail"):
                r = c.get(f"/api/items/{ids[name]}/{suffix}")
                assert r.status_code == 404 and b"do not serve me" not in r.content, (name, suffix)
                assert "changed since it was indexed" in r.json()["error"]["message"]
