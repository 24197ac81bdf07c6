"""REST API tests against the real app with tiny models (FastAPI TestClient, no network)."""

from __future__ import annotations

import io
import json
import os
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
    for hosted_ui in ("/docs", "/redoc"):  # they would load scripts from a CDN
        assert client.get(hosted_ui).status_code == 404


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
    assert a["logprob_of"] == "log sum_z P(z|x) P(answer+eos | x,z)"  # the JSON says what logprob is
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
    closed: list[Path] = []
    real_close = Collection.close

    def spy_close(self: Collection) -> None:
        closed.append(self.folder)
        real_close(self)

    monkeypatch.setattr(Collection, "close", spy_close)
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
    # leaving the block ran the shutdown (TestClient re-raises a failed one), which closed the collection
    assert [Path(f).resolve() for f in closed] == [web_collection.resolve()]


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


def _png_of_size(color: tuple[int, int, int], size: int) -> bytes:
    """A valid PNG of another picture, padded after its end chunk to exactly ``size`` bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, "PNG")
    data = buf.getvalue()
    assert len(data) < size
    return data + b"\x00" * (size - len(data))  # decoders stop at IEND


def test_same_size_swapped_files_are_not_served(tmp_path: Path, tiny_oc_spec: str) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for name in ("careful", "plain", "kept", "touched"):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(photos / f"{name}.png")
    with Collection.create(tmp_path / "c", tiny_oc_spec) as coll:
        coll.add(photos)
        ids = {Path(it.path).stem: it.id for it in coll.get(coll.store.ids("image").tolist())}
    originals = {name: (photos / f"{name}.png").read_bytes() for name in ids}
    settings = WebSettings(collection=str(tmp_path / "c"), generator=str(tmp_path / "none"),
                           thumbnail_dir=str(tmp_path / "t"), load_generator_at_startup=False)
    with TestClient(create_app(settings)) as c:
        for name in ids:  # served (and thumbnails cached) before the swap
            for suffix in ("image", "thumbnail"):
                assert c.get(f"/api/items/{ids[name]}/{suffix}").status_code == 200, (name, suffix)
        # a careful attacker: another valid picture of the same byte size, mtime put back to the ns
        careful = photos / "careful.png"
        st = careful.stat()
        careful.write_bytes(_png_of_size((255, 0, 0), st.st_size))
        os.utime(careful, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert careful.stat().st_size == st.st_size and careful.stat().st_mtime_ns == st.st_mtime_ns
        # the plain case: same size, new mtime
        plain = photos / "plain.png"
        swapped = _png_of_size((0, 0, 255), plain.stat().st_size)
        plain.write_bytes(swapped)
        # same contents, new mtime: still the indexed file
        touched = photos / "touched.png"
        os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
        for name in ("careful", "plain"):
            for suffix in ("image", "thumbnail"):
                r = c.get(f"/api/items/{ids[name]}/{suffix}")
                assert r.status_code == 404, (name, suffix, r.status_code)
                assert "changed since it was indexed" in r.json()["error"]["message"]
        for name in ("kept", "touched"):
            r = c.get(f"/api/items/{ids[name]}/image")
            assert r.status_code == 200 and r.content == originals[name], name
            thumb = c.get(f"/api/items/{ids[name]}/thumbnail")
            assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        # put the careful file's original bytes back: it is the indexed file again
        careful.write_bytes(originals["careful"])
        r = c.get(f"/api/items/{ids['careful']}/image")
        assert r.status_code == 200 and r.content == originals["careful"]


def _send_chunked(client: TestClient, path: str, content_type: str, first: bytes,
                  total: int, chunk: int = 64 * 1024) -> tuple[int, dict, int]:
    """Call the app as a server would for a body without Content-Length (chunked), fed one chunk
    per ``receive``; returns (status, JSON body, bytes the app consumed)."""
    consumed = 0
    sent: list[dict] = []

    def chunks():
        yield first
        for _ in range((total - len(first)) // chunk):
            yield b"x" * chunk

    body = chunks()
    done = False

    async def receive() -> dict:
        nonlocal consumed, done
        if done:
            return {"type": "http.disconnect"}
        part = next(body, None)
        if part is None:
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        consumed += len(part)
        return {"type": "http.request", "body": part, "more_body": True}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [(b"host", b"test"), (b"content-type", content_type.encode()),
                                          (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {}}
    client.portal.call(client.app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(payload), consumed


@pytest.mark.parametrize("route", ["/api/search/image", "/api/ask"])
def test_chunked_bodies_stop_at_the_limit(client: TestClient, route: str) -> None:
    chunk = 64 * 1024
    if route == "/api/ask":
        ctype, first = "application/json", b'{"question": "'
    else:
        ctype = "multipart/form-data; boundary=zz"
        first = b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n' \
                b"Content-Type: image/jpeg\r\n\r\n"
    status, body, consumed = _send_chunked(client, route, ctype, first, 30 * 1024 * 1024, chunk)
    assert status == 413 and body["error"]["code"] == "too_large", body
    limit = 200_000 + 64 * 1024  # the fixture's upload limit plus room for the form's headers
    assert consumed <= limit + chunk, consumed  # stopped reading at the limit, not after 30 MB
    assert client.get("/api/health").status_code == 200  # and the server keeps serving


def test_thumbnails_are_rendered_once_then_served_from_the_cache(web_collection: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import crossmodal_rag.web.thumbnails as thumbnails

    rendered: list[int] = []
    real_render = thumbnails.render_thumbnail

    def counting_render(data: bytes, name: str, size: int, max_pixels: int) -> bytes:
        rendered.append(size)
        return real_render(data, name, size, max_pixels)

    monkeypatch.setattr(thumbnails, "render_thumbnail", counting_render)
    with Collection.open(web_collection) as coll:
        item = coll.get(int(coll.store.ids("image")[0]))[0]
    cache = tmp_path / "thumbs"
    settings = WebSettings(collection=str(web_collection), generator=str(tmp_path / "none"),
                           thumbnail_dir=str(cache), load_generator_at_startup=False)
    url = f"/api/items/{item.id}/thumbnail"
    with TestClient(create_app(settings)) as c:
        first = c.get(url)
        assert first.status_code == 200 and rendered == [256]
        assert [f.name for f in cache.iterdir()] == [f"{item.sha256}-256.jpg"]
        assert (cache / f"{item.sha256}-256.jpg").read_bytes() == first.content
        assert c.get(url).content == first.content and rendered == [256]  # from memory
    # a new server (empty memory cache) serves the file in the cache folder without rendering:
    # replace its contents with another picture and that picture comes back
    other = io.BytesIO()
    Image.new("RGB", (9, 9), (0, 255, 0)).save(other, "JPEG")
    (cache / f"{item.sha256}-256.jpg").write_bytes(other.getvalue())
    with TestClient(create_app(settings)) as c:
        assert c.get(url).content == other.getvalue() and rendered == [256]
        small = c.get(url, params={"size": 64})
        assert small.status_code == 200 and rendered == [256, 64]
        assert max(Image.open(io.BytesIO(small.content)).size) <= 64


def test_verified_files_hash_each_version_once(tmp_path: Path) -> None:
    import hashlib

    from crossmodal_rag.web.files import FileChanged, IndexedFile, VerifiedFiles

    path = tmp_path / "a.bin"
    path.write_bytes(b"indexed contents")
    st = path.stat()
    rec = IndexedFile(str(path), st.st_size, st.st_mtime_ns, hashlib.sha256(b"indexed contents").hexdigest())
    files = VerifiedFiles()
    for _ in range(3):
        with files.open(rec) as f:
            assert f.read() == b"indexed contents"
    assert files.hashed == 1  # one version, hashed once
    path.write_bytes(b"swapped contents")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    with pytest.raises(FileChanged, match="SHA-256"):
        files.open(rec)
    assert files.hashed == 2
    # imported items have no hash: size and mtime_ns must both match
    no_hash = IndexedFile(str(path), st.st_size, st.st_mtime_ns, None)
    with files.open(no_hash) as f:
        assert f.read() == b"swapped contents"  # what size + mtime cannot tell apart (SECURITY.md)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    with pytest.raises(FileChanged, match="mtime"):
        files.open(no_hash)
    with pytest.raises(FileChanged, match="no size"):
        files.open(IndexedFile(str(path), None, None, None))
    link = tmp_path / "link.bin"
    link.symlink_to(path)
    with pytest.raises(FileChanged, match="plain file"):
        files.open(IndexedFile(str(link), None, None, rec.sha256))
