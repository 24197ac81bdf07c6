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
from tests.servers import serve_cli, serve_in_thread

LOCAL = "http://127.0.0.1"  # the default allowed hosts are the loopback names


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
    with TestClient(create_app(settings), base_url=LOCAL) as c:
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
    r = client.get("/api/search", params={"q": "a cup of coffee", "k": 5, "mode": "dense"})
    assert r.status_code == 200
    data = r.json()
    with Collection.open(web_collection) as coll:
        expected = [h.id for h in coll.search("a cup of coffee", k=5, mode="dense")]
        auto = coll.search("a cup of coffee", k=5)  # the default: auto, as the CLI's
    default = client.get("/api/search", params={"q": "a cup of coffee", "k": 5}).json()
    assert default["mode"] == auto.mode and [h["id"] for h in default["results"]] == [h.id for h in auto]
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


def test_items_images_and_thumbnails(client: TestClient, web_collection: Path, sample_dir: Path) -> None:
    with Collection.open(web_collection) as coll:
        image_id = int(coll.store.ids("image")[0])
        caption_id = int(coll.store.ids("text")[0])
        path = coll.get(image_id)[0].path
    item = client.get(f"/api/items/{image_id}").json()
    assert item["path"] == Path(path).relative_to(sample_dir).as_posix() and item["captions"] and item["width"] > 0
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
    with TestClient(create_app(settings), base_url=LOCAL) as c:
        for _ in range(100):
            if c.get("/api/health").json()["generator_status"].startswith("error"):
                break
            time.sleep(0.1)
        r = c.post("/api/ask", json={"question": "what is it?"})
        assert r.status_code == 503 and "--generator" in r.json()["error"]["message"]
        assert c.get("/api/search", params={"q": "cat"}).status_code == 200
    # leaving the block ran the shutdown (TestClient re-raises a failed one), which closed the collection
    assert [Path(f).resolve() for f in closed] == [web_collection.resolve()]


def test_a_generator_spec_that_cannot_be_used_still_serves_search(web_collection: Path, tmp_path: Path) -> None:
    """load_generator refuses a missing folder up front (issue 28); the server still starts, searches,
    and answers /api/ask with 503 naming the folder."""
    missing = tmp_path / "no-such-generator"
    settings = WebSettings(collection=str(web_collection), generator=str(missing), load_generator_at_startup=False,
                           thumbnail_dir=str(tmp_path / "thumbs"))
    with TestClient(create_app(settings), base_url=LOCAL) as c:
        assert c.get("/api/health").json()["generator_status"].startswith("error")
        r = c.post("/api/ask", json={"question": "what is it?"})
        assert r.status_code == 503 and str(missing) in r.json()["error"]["message"], r.text
        assert c.get("/api/search", params={"q": "cat"}).status_code == 200


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
                                           thumbnail_dir=str(tmp_path / "t"), load_generator_at_startup=False)),
                    base_url=LOCAL) as c:
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
    with TestClient(create_app(settings), base_url=LOCAL) as c:
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
             "root_path": "", "headers": [(b"host", b"127.0.0.1"), (b"content-type", content_type.encode()),
                                          (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("test", 80), "state": {}}
    client.portal.call(client.app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(payload), consumed


@pytest.mark.parametrize("route", ["/api/search/image", "/api/ask", "/api/ask/image"])
def test_chunked_bodies_stop_at_the_limit(client: TestClient, route: str) -> None:
    chunk = 64 * 1024
    if route == "/api/ask":
        ctype, first = "application/json", b'{"question": "'
    else:
        ctype = "multipart/form-data; boundary=zz"
        first = b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n' \
                b"Content-Type: image/jpeg\r\n\r\n"
    status, body, consumed = _send_chunked(client, route, ctype, first, 400 * 1024 * 1024, chunk)  # 400 MB
    assert status == 413 and body["error"]["code"] == "too_large", body
    # uploads: the fixture's upload limit plus room for the form's headers; JSON: its own 256 KiB
    limit = 256 * 1024 if route == "/api/ask" else 200_000 + 64 * 1024
    assert consumed <= limit + chunk, consumed  # stopped reading at the limit, not after 400 MB
    assert client.get("/api/health").status_code == 200  # and the server keeps serving


def test_thumbnails_are_rendered_once_then_served_from_the_cache(web_collection: Path, tmp_path: Path) -> None:
    with Collection.open(web_collection) as coll:
        item = coll.get(int(coll.store.ids("image")[0]))[0]
    cache = tmp_path / "thumbs"
    settings = WebSettings(collection=str(web_collection), generator=str(tmp_path / "none"),
                           thumbnail_dir=str(cache), load_generator_at_startup=False)
    url = f"/api/items/{item.id}/thumbnail"
    with TestClient(create_app(settings), base_url=LOCAL) as c:
        rendered = c.app.state.web.decoder.stats  # thumbnails render in the decode pool
        first = c.get(url)
        assert first.status_code == 200 and rendered.decoded == 1
        assert [f.name for f in cache.iterdir()] == [f"{item.sha256}-256.jpg"]
        assert (cache / f"{item.sha256}-256.jpg").read_bytes() == first.content
        assert c.get(url).content == first.content and rendered.decoded == 1  # from memory
    # a new server (empty memory cache) serves the file in the cache folder without rendering:
    # replace its contents with another picture and that picture comes back
    other = io.BytesIO()
    Image.new("RGB", (9, 9), (0, 255, 0)).save(other, "JPEG")
    (cache / f"{item.sha256}-256.jpg").write_bytes(other.getvalue())
    with TestClient(create_app(settings), base_url=LOCAL) as c:
        rendered = c.app.state.web.decoder.stats
        assert c.get(url).content == other.getvalue() and rendered.submitted == 0
        small = c.get(url, params={"size": 64})
        assert small.status_code == 200 and rendered.decoded == 1
        assert max(Image.open(io.BytesIO(small.content)).size) <= 64


def test_thumbnail_sizes_snap_to_a_few_buckets(web_collection: Path, tmp_path: Path) -> None:
    """Every size from 1 to 1024 asked for (issue 25: each once left its own file, 1,024 in all):
    at most one file per bucket on disk, each answer no larger than its bucket and at least as
    large as asked (up to the image's own size)."""
    from crossmodal_rag.web.thumbnails import THUMBNAIL_SIZES, snap_size

    assert [snap_size(s) for s in (1, 64, 65, 128, 200, 256, 257, 512, 513, 1024)] == \
        [64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024]
    with Collection.open(web_collection) as coll:
        item = coll.get(int(coll.store.ids("image")[0]))[0]
    cache = tmp_path / "thumbs"
    settings = WebSettings(collection=str(web_collection), generator=str(tmp_path / "none"),
                           thumbnail_dir=str(cache), load_generator_at_startup=False)
    seen: dict[int, tuple[int, int]] = {}
    with TestClient(create_app(settings), base_url=LOCAL) as c:
        for size in range(1, 1025):
            r = c.get(f"/api/items/{item.id}/thumbnail", params={"size": size})
            assert r.status_code == 200, (size, r.text)
            if snap_size(size) not in seen:
                seen[snap_size(size)] = Image.open(io.BytesIO(r.content)).size
        assert c.app.state.web.decoder.stats.decoded == len(THUMBNAIL_SIZES)
    files = sorted(f.name for f in cache.iterdir())
    assert len(files) <= len(THUMBNAIL_SIZES), files
    assert files == sorted(f"{item.sha256}-{b}.jpg" for b in THUMBNAIL_SIZES)
    for bucket, dims in seen.items():
        assert max(dims) <= bucket and max(dims) >= min(bucket, max(item.width, item.height)) - 1, (bucket, dims)


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


# -- hostile input (issue 15) ----------------------------------------------------------------
HOSTILE_GETS = [
    ("/api/items/9223372036854775808", {}),  # past SQLite's INTEGER: OverflowError in the driver
    ("/api/items/99999999999999999999999999/image", {}),
    ("/api/items/9223372036854775808/thumbnail", {}),
    ("/api/items/-9223372036854775809", {}),
    ("/api/search", {"q": "cat", "where": "folder=/tmp/a\x00b"}),  # NUL: ValueError in the path code
    ("/api/search", {"q": "c\x00at"}),
    ("/api/search", {"q": "cat", "where": "path=*\x00*"}),
    ("/api/search", {"q": "cat", "min_score": "nan"}),
    ("/api/search", {"q": "cat", "min_score": "-inf"}),
    ("/api/search", {"q": "cat", "k": "99999999999999999999999"}),
]


@pytest.mark.parametrize(("url", "params"), HOSTILE_GETS)
def test_junk_ids_nul_and_bad_numbers_are_4xx(client: TestClient, url: str, params: dict) -> None:
    r = client.get(url, params=params)
    assert 400 <= r.status_code < 500, (url, params, r.status_code, r.text)
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("body", [
    {"question": "what?", "min_score": float("nan")},
    {"question": "what?", "where": ["folder=/a\x00b"]},
    {"question": "wh\x00at?"},
    {"question": "what?", "k": 10**30},
])
def test_junk_ask_bodies_are_4xx(client: TestClient, body: dict) -> None:
    r = client.post("/api/ask", content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, (body, r.status_code, r.text)


def test_lone_surrogate_in_a_json_question_is_4xx(client: TestClient) -> None:
    r = client.post("/api/ask", content=b'{"question": "a \\ud800 b"}', headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text


LONG = 100_000


@pytest.mark.parametrize(("method", "url", "kwargs", "field"), [
    ("get", "/api/search", {"params": {"q": "x" * 20_000}}, "q"),  # a client's URL limit is 64 KB
    ("get", "/api/search", {"params": {"q": "cat", "where": "size>" + "1" * 5000 + "x"}}, "where"),
    ("get", "/api/search", {"params": {"q": "cat", "where": ["kind=image"] * 500}}, "where"),
    ("get", "/api/search", {"params": {"q": "cat", "min_score": "1" * 5000}}, "min_score"),
    ("post", "/api/ask", {"json": {"question": "x" * LONG}}, "question"),
    ("post", "/api/ask", {"json": {"question": "a", "where": ["size>" + "1" * 5000]}}, "where"),
    ("post", "/api/ask", {"json": {"question": "a", "min_score": "9" * 5000}}, "min_score"),
    ("post", "/api/search/image", {"data": {"plus": "x" * 5000}}, "plus"),
    ("post", "/api/search/image", {"data": {"minus": "x" * 5000}}, "minus"),
    ("post", "/api/search/image", {"data": {"where": "size>" + "1" * 5000}}, "where"),
    ("post", "/api/ask/image", {"data": {"question": "x" * 5000}}, "question"),
    ("post", "/api/ask/image", {"data": {"where": "size>" + "1" * 5000}}, "where"),
])
def test_string_fields_are_length_limited_before_parsing(client: TestClient, sample_dir: Path, method: str,
                                                         url: str, kwargs: dict, field: str) -> None:
    """The answer names the field and its limit (a parse error would name a position instead)."""
    if url.endswith("/image"):
        jpg = next(sample_dir.rglob("*.jpg"))
        kwargs = {**kwargs, "files": {"image": ("a.jpg", jpg.read_bytes(), "image/jpeg")}}
    r = getattr(client, method)(url, **kwargs)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert field in message and "at most" in message, message


def _raw_get(sock, path: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """One request on an open keep-alive socket; (status, body) read by Content-Length."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        more = sock.recv(65536)
        assert more, f"connection closed before the answer to {path}"
        buf += more
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        more = sock.recv(65536)
        assert more, f"connection closed mid-answer to {path}"
        body += more
    return int(head.split(b" ", 2)[1]), body


@pytest.fixture(scope="module")
def live_server(web_collection: Path, tmp_path_factory: pytest.TempPathFactory):
    """The app under a real uvicorn in a thread, with one extra route that fails unexpectedly."""
    pytest.importorskip("uvicorn")

    settings = WebSettings(collection=str(web_collection), generator=str(tmp_path_factory.mktemp("none")),
                           load_generator_at_startup=False, thumbnail_dir=str(tmp_path_factory.mktemp("th")))
    app = create_app(settings)

    @app.get("/test-boom", include_in_schema=False)
    def boom() -> dict:
        raise RuntimeError("a bug, not bad input")

    with serve_in_thread(app) as port:
        yield port


def test_errors_keep_the_keep_alive_connection(live_server: int) -> None:
    """A 500 from a bug and a 4xx from junk both leave the connection usable for the next request."""
    import socket

    with socket.create_connection(("127.0.0.1", live_server), timeout=10) as sock:
        status, body = _raw_get(sock, "/test-boom")
        assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
        status, body = _raw_get(sock, "/api/health")  # the same connection
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, _ = _raw_get(sock, "/api/items/9223372036854775808")
        assert 400 <= status < 500
        status, _ = _raw_get(sock, "/api/search?q=cat&where=folder%3D%2Fa%00b")
        assert 400 <= status < 500
        assert _raw_get(sock, "/api/health")[0] == 200


def test_host_header_must_name_this_server(client: TestClient) -> None:
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends Host: evil.example."""
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhostx"):
        r = client.get("/api/health", headers={"host": host})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_host", host
        assert client.get("/", headers={"host": host}).status_code == 400
    for host in ("127.0.0.1", "127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000"):
        assert client.get("/api/health", headers={"host": host}).status_code == 200, host


def test_allowed_hosts_setting(web_collection: Path, tmp_path: Path) -> None:
    base = {"collection": str(web_collection), "generator": str(tmp_path / "none"),
            "load_generator_at_startup": False, "thumbnail_dir": str(tmp_path / "t")}
    with TestClient(create_app(WebSettings(**base, allowed_hosts=("photos.lan",))),
                    base_url="http://photos.lan:8000") as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/health", headers={"host": "127.0.0.1"}).status_code == 400
    with TestClient(create_app(WebSettings(**base, allowed_hosts=("*",))), base_url="http://any.thing") as c:
        assert c.get("/api/health").status_code == 200


def test_serve_allowed_host_defaults() -> None:
    from crossmodal_rag.web.guards import allowed_hosts_for

    loopback = {"127.0.0.1", "localhost", "::1"}
    assert set(allowed_hosts_for("127.0.0.1", [])) == loopback
    assert set(allowed_hosts_for("localhost", [])) == loopback
    assert set(allowed_hosts_for("::1", [])) == loopback
    assert set(allowed_hosts_for("192.168.1.5", [])) == {"192.168.1.5"}
    assert set(allowed_hosts_for("127.0.0.1", ["photos.lan"])) == loopback | {"photos.lan"}
    assert allowed_hosts_for("0.0.0.0", ["*"]) == ("*",)
    assert loopback <= set(allowed_hosts_for("0.0.0.0", []))


def test_security_headers(client: TestClient) -> None:
    for url in ("/", "/api/health", "/api/search?q=cat&k=1", "/api/items/999999", "/static/app.js",
                "/static/style.css", "/openapi.json", "/nope"):
        r = client.get(url)
        assert r.headers.get("x-content-type-options") == "nosniff", url
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    assert "script-src 'self'" in csp and "object-src 'none'" in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert "<script>" not in page.text  # no inline script (the CSP would block it)


def test_thumbnail_memory_cache_is_bounded_in_bytes(tmp_path: Path) -> None:
    from crossmodal_rag.web.thumbnails import ThumbnailCache

    cache = ThumbnailCache(tmp_path / "t", max_memory_items=1000, max_memory_bytes=100_000)
    rng = np.random.default_rng(0)
    sizes = []
    for i in range(200):
        blob = rng.bytes(int(rng.integers(1, 30_000)))
        sizes.append(len(blob))
        assert cache.get(f"k{i}", "x", 64, 10**6, lambda blob=blob: blob, render=lambda d, *a: d) == blob
        assert cache.memory_bytes <= 100_000 and cache.memory_bytes == sum(len(v) for v in cache._memory.values())
    assert len(cache._memory) >= 3  # recent ones kept
    small = ThumbnailCache(tmp_path / "u", max_memory_items=5, max_memory_bytes=10**9)
    for i in range(20):
        small.get(f"k{i}", "x", 64, 10**6, lambda: b"abc", render=lambda d, *a: d)
        assert len(small._memory) <= 5


def test_verified_files_verdicts_are_bounded(tmp_path: Path) -> None:
    import hashlib

    from crossmodal_rag.web.files import IndexedFile, VerifiedFiles

    files = VerifiedFiles(max_entries=4)
    for i in range(10):
        p = tmp_path / f"{i}.bin"
        p.write_bytes(b"%d" % i)
        with files.open(IndexedFile(str(p), p.stat().st_size, None, hashlib.sha256(b"%d" % i).hexdigest())):
            pass
        assert len(files._verdicts) <= 4
    assert files.hashed == 10


def test_health_answers_while_slow_requests_run(tmp_path: Path, sample_collection: Path, t5_dir: Path) -> None:
    """A real server (subprocess) under more slow requests than it has worker threads: 12 questions
    (generation runs one at a time), 16 searches with a hostile ``where`` within
    the length limit, and 8 requests with the ReDoS ``where`` of issue 15 (digits past the limit,
    which once held the interpreter for tens of seconds). ``/api/health`` still answers within
    100 ms: it never waits for a worker thread, and over-long fields are refused before parsing."""
    from concurrent.futures import ThreadPoolExecutor

    httpx = pytest.importorskip("httpx")
    coll = tmp_path / "coll"
    shutil.copytree(sample_collection, coll, ignore=shutil.ignore_patterns(".lock"))
    with serve_cli(coll, tmp_path, "--generator", str(t5_dir), "--max-new-tokens", "16",
                   "--max-queued-answers", "16",  # all 14 questions wait their turn (the default 8 would 503)
                   ready=lambda health: health["generator_status"] == "ready") as base:
        slow_where = "size>" + "1" * 400 + "x"  # within the length limit; the parser rejects it
        with httpx.Client(base_url=base, timeout=300) as warm:  # first generation loads lazily-built parts
            assert warm.post("/api/ask", json={"question": "warm up", "k": 2}).status_code == 200
        started = threading.Event()

        def ask(i: int) -> int:
            with httpx.Client(base_url=base, timeout=300) as c:
                started.set()
                return c.post("/api/ask", json={"question": f"what is in picture {i}?", "k": 3}).status_code

        def search(i: int) -> int:
            with httpx.Client(base_url=base, timeout=300) as c:
                return c.get("/api/search", params={"q": f"a cat {i}", "k": 50, "where": slow_where}).status_code

        def redos(i: int) -> int:  # quadratic in the old where pattern: ~0.2 s at 6k spaces, ~6 s at 30k
            with httpx.Client(base_url=base, timeout=300) as c:
                if i % 4:
                    return c.get("/api/search", params={"q": "cat", "where": "size>1" + " " * 10_000 + "x"}).status_code
                return c.post("/api/ask", json={"question": "cat?", "where": ["size>1" + " " * 40_000 + "x"]}).status_code

        with ThreadPoolExecutor(36) as pool:
            futures = ([pool.submit(ask, i) for i in range(12)] + [pool.submit(search, i) for i in range(16)]
                       + [pool.submit(redos, i) for i in range(8)])
            started.wait(30)
            latencies = []  # health, every 50 ms for as long as the slow requests run
            with httpx.Client(base_url=base, timeout=60) as c:
                while not all(f.done() for f in futures) or len(latencies) < 20:
                    t0 = time.perf_counter()
                    assert c.get("/api/health").status_code == 200
                    latencies.append(time.perf_counter() - t0)
                    time.sleep(0.05)
            statuses = [f.result() for f in futures]
        assert sorted(set(statuses)) == [200, 422] and statuses.count(422) == 24, statuses
        shown = [round(x, 3) for x in sorted(latencies)]
        assert np.median(latencies) < 0.1 and np.percentile(latencies, 90) < 0.1, shown
        assert max(latencies) < 0.5, shown  # no stall (one slow sample on a busy test machine is noise)


# -- no absolute server paths unless asked (issue 17) ------------------------------------------------
def _strings(value: object) -> list[str]:
    """Every string (keys too) in a JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _every_response(c: TestClient, web_collection: Path, sample_dir: Path) -> list[object]:
    with Collection.open(web_collection) as coll:
        ids = [int(coll.store.ids("image")[0]), int(coll.store.ids("text")[0])]
    cat = {"image": ("cat.jpg", _jpeg(sample_dir / "cat.jpg"), "image/jpeg")}
    out = [c.get("/api/health").json(), c.get("/api/stats").json()]
    out += [c.get("/api/search", params={"q": "a cat", "k": 20, "target": t}).json() for t in ("images", "texts", "all")]
    out.append(c.post("/api/search/image", files=cat, data={"k": "20", "target": "all"}).json())
    out.append(c.post("/api/ask", json={"question": "what is it?", "k": 3, "target": "all"}).json())
    out.append(c.post("/api/ask/image", files=cat, data={"question": "what?", "k": "3", "target": "images"}).json())
    out += [c.get(f"/api/items/{i}").json() for i in ids]
    out.append(c.get("/api/items/999999").json())
    return out


def test_responses_hold_no_absolute_server_paths(client: TestClient, web_collection: Path, sample_dir: Path) -> None:
    responses = _every_response(client, web_collection, sample_dir)
    server = [str(sample_dir), str(web_collection), str(web_collection.parent.parent), os.path.expanduser("~")]
    leaks = [s for s in _strings(responses)
             if (os.path.isabs(s) and not s.startswith("/api/")) or any(root in s for root in server)]
    assert not leaks, leaks
    # paths are relative to the collection's source root: the sample folder (space/ under it)
    with Collection.open(web_collection) as coll:
        files = {Path(it.path).relative_to(sample_dir).as_posix() for it in coll.get(coll.store.ids("image").tolist())}
    hits = responses[4]["results"] + responses[5]["results"]
    assert {h["path"] for h in hits} <= files and "space/astronaut.jpg" in files
    assert responses[1]["collection"] == web_collection.name


def test_show_paths_gives_absolute_paths(web_collection: Path, tmp_path: Path, tiny_oc_spec: str) -> None:
    settings = WebSettings(collection=str(web_collection), generator=str(tmp_path / "none"), show_paths=True,
                           load_generator_at_startup=False, thumbnail_dir=str(tmp_path / "t"))
    with TestClient(create_app(settings), base_url=LOCAL) as c, Collection.open(web_collection) as coll:
        hits = c.get("/api/search", params={"q": "a cat", "k": 5}).json()["results"]
        assert [h["path"] for h in hits] == [it.path for it in coll.get([h["id"] for h in hits])]
        assert all(os.path.isabs(h["path"]) for h in hits)
        assert c.get("/api/health").json()["encoder"] == tiny_oc_spec
        assert c.get("/api/stats").json()["collection"] == str(coll.folder)
    from crossmodal_rag.cli import build_parser

    assert build_parser().parse_args(["serve", "-c", "x", "--show-paths"]).show_paths is True
    assert build_parser().parse_args(["serve", "-c", "x"]).show_paths is False
