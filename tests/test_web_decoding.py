"""Uploads decoded safely (issue 25): the type sniffed from the first bytes before anything decodes
(415), decoding in a bounded pool of worker processes with a deadline (a slow decode gets a clear
error and never blocks searches), no decoder exception escaping as a 500, and no external program
(Ghostscript) ever started by an upload."""

from __future__ import annotations

import io
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from crossmodal_rag.web import WebSettings, create_app
from tests.hostile_uploads import (
    DOS_EPS,
    EPS,
    THIN_SIZES,
    fake_ghostscript,
    jpeg,
    path_with,
    scan_bomb,
)
from tests.servers import served_app

LOCAL = "http://127.0.0.1"
UPLOAD_ROUTES = ["/api/search/image", "/api/ask/image"]


def _image_bytes(fmt: str, size: tuple[int, int] = (24, 16), **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def coll_dir(tmp_path_factory: pytest.TempPathFactory, sample_collection: Path) -> Path:
    dest = tmp_path_factory.mktemp("decoding") / "coll"
    shutil.copytree(sample_collection, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def _settings(coll: Path, tmp: Path, **kw: object) -> WebSettings:
    base = {"collection": str(coll), "generator": str(tmp / "none"), "load_generator_at_startup": False,
            "thumbnail_dir": str(tmp / "th")}
    return WebSettings(**{**base, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(coll_dir: Path, tmp_path_factory: pytest.TempPathFactory, t5_dir: Path):
    settings = _settings(coll_dir, tmp_path_factory.mktemp("c"), generator=str(t5_dir), max_new_tokens=2)
    with TestClient(create_app(settings), base_url=LOCAL) as c:
        yield c


NOT_ALLOWED = {
    "eps.jpg": EPS,
    "dos-eps.jpg": DOS_EPS,
    "ps.png": b"%!PS-Adobe-3.0\n/Times-Roman findfont 12 scalefont setfont showpage\n",
    "doc.jpg": b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n",
    "pic.jpg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>',
    "truncated-ppm.jpg": b"P6\n2000 2000\n255\n" + b"\x00" * 1000,  # a PPM: Pillow reads it, the API does not
    "truncated-tga.png": _image_bytes("TGA", (600, 600))[:2000],
    "ico.png": _image_bytes("ICO", (32, 32)),
    "pcx.gif": _image_bytes("PCX"),
    "avif-brand.jpg": b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf" + b"\x00" * 64,
    "text.jpg": b"just some text, not an image at all\n" * 10,
    "two-bytes.jpg": b"\xff\xd8",
}


@pytest.mark.parametrize("route", UPLOAD_ROUTES)
@pytest.mark.parametrize("name", sorted(NOT_ALLOWED))
def test_uploads_of_other_formats_are_refused_before_decoding(client: TestClient, route: str, name: str) -> None:
    """415 from the first bytes, naming the allowed formats; the decoder pool never sees the file
    (a truncated PPM or TGA, which a decoder would try and fail on, gets 415, not 422)."""
    st = client.app.state.web
    before = st.decoder.stats.submitted
    r = client.post(route, files={"image": (name, NOT_ALLOWED[name], "image/jpeg")}, data={"question": "what?"})
    assert r.status_code == 415, (name, r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["code"] == "unsupported_type" and "JPEG" in err["message"] and "PNG" in err["message"], err
    assert st.decoder.stats.submitted == before  # refused before any decode


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_formats_still_search(client: TestClient, fmt: str) -> None:
    r = client.post("/api/search/image", files={"image": (f"a.{fmt.lower()}", _image_bytes(fmt), "image/x")},
                    data={"k": "2"})
    assert r.status_code == 200, (fmt, r.text[:300])


@pytest.mark.parametrize("route", UPLOAD_ROUTES)
@pytest.mark.parametrize("size", THIN_SIZES, ids=[f"{w}x{h}" for w, h in THIN_SIZES])
def test_thin_images_are_never_a_500(client: TestClient, route: str, size: tuple[int, int]) -> None:
    """3000x1, 1x5000 and 60000x2 JPEGs (a ZeroDivisionError in Pillow's draft once made these a
    500): a clean JSON 4xx, or an answer."""
    r = client.post(route, files={"image": ("thin.jpg", jpeg(size), "image/jpeg")}, data={"k": "2"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (size, r.status_code, r.text[:300])
    if r.status_code != 200:
        assert r.json()["error"]["message"], r.text
    assert client.get("/api/health").status_code == 200


def test_the_decode_worker_imports_no_web_framework_or_model() -> None:
    """The worker process imports the image decoder only: it starts in a fraction of a second,
    and a decoder bug cannot reach the server's state."""
    import subprocess

    code = ("import sys, crossmodal_rag.web.decode_worker; "
            "print(sorted(m for m in ('fastapi', 'starlette', 'torch', 'faiss') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


NAIVE = """
import io
from PIL import Image
from crossmodal_rag.ingestion.images import DecodedImage


def decode(data, name, *, max_pixels):
    img = Image.open(io.BytesIO(data))  # every format Pillow knows, as the old decoder did
    img.load()
    return DecodedImage(img.convert("RGB"), img.width, img.height, img.format)
"""


def test_the_decode_worker_has_no_eps_plugin_even_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: EPS bytes handed straight to the pool (past the upload's sniffing) are
    refused, and the worker process knows only the allowed formats: even a naive decoder run in
    it (``Image.open`` with every plugin, as the old code did) cannot reach the EPS plugin, so a
    fake ``gs`` first on PATH never runs."""
    import os

    import anyio

    from crossmodal_rag.web.decoding import DecodeFailed, DecodePool

    marker = fake_ghostscript(tmp_path / "bin")
    monkeypatch.setenv("PATH", path_with(tmp_path / "bin"))
    (tmp_path / "naive").mkdir()
    (tmp_path / "naive" / "naive_decode.py").write_text(NAIVE)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "naive"), str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    naive_argv = [sys.executable, "-m", "crossmodal_rag.web.decode_worker", "--decoder", "naive_decode:decode"]

    async def main() -> None:
        for pool in (DecodePool(workers=1, timeout_s=30), DecodePool(workers=1, timeout_s=30, argv=naive_argv, env=env)):
            try:
                for data in (EPS, DOS_EPS):
                    with pytest.raises(DecodeFailed) as e:
                        await pool.decode(data, "eps.jpg", max_pixels=10**6)
                    assert e.value.status in (415, 422) and e.value.code != "decode_failed", e.value
                img = (await pool.decode(jpeg((40, 30)), "ok.jpg", max_pixels=10**6)).image
                assert img.size == (40, 30) and img.mode == "RGB"
            finally:
                await pool.aclose()

    anyio.run(main)
    assert not marker.exists()


def _uploads_while_searching(base: str, uploads: list[tuple[str, bytes]]) -> tuple[list[float], list]:
    """Send ``uploads`` at once; while they run, five text searches one after another. Returns the
    searches' latencies and each upload's (status, JSON body, seconds)."""
    import httpx

    with httpx.Client(base_url=base, timeout=120) as c:  # warm: the encoder's first forward is slow
        assert c.get("/api/search", params={"q": "warm up"}).status_code == 200
    started = threading.Event()

    def upload(name: str, data: bytes) -> tuple[int, dict, float]:
        with httpx.Client(base_url=base, timeout=120) as c:
            started.set()
            t0 = time.perf_counter()
            r = c.post("/api/search/image", files={"image": (name, data, "image/jpeg")})
            return r.status_code, r.json(), time.perf_counter() - t0

    with ThreadPoolExecutor(len(uploads)) as pool:
        futures = [pool.submit(upload, name, data) for name, data in uploads]
        started.wait(10)
        time.sleep(0.3)  # the uploads are sent and decoding
        latencies = []
        with httpx.Client(base_url=base, timeout=120) as c:
            for i in range(5):
                t0 = time.perf_counter()
                assert c.get("/api/search", params={"q": f"a red flower {i}", "k": 3}).status_code == 200
                latencies.append(time.perf_counter() - t0)
        return latencies, [f.result() for f in futures]


def test_scan_bomb_uploads_never_block_searches(coll_dir: Path, tmp_path: Path) -> None:
    """Two uploads of a 584 KB progressive JPEG with 4,000 scans (~10 s each to decode on a 2020s
    core) on a server with two worker threads: the old server decoded them in the search threads,
    so searches waited ~10 s; now searches answer at once and each upload ends in a 4xx within
    the 1.5 s decode deadline (the scan budget refuses it before decoding, or the deadline ends it)."""
    bomb = scan_bomb(7000, 4000)
    settings = _settings(coll_dir, tmp_path, max_workers=2, max_upload_bytes=2_000_000, decode_timeout_s=1.5)
    with served_app(create_app(settings)) as (base, _st):
        latencies, results = _uploads_while_searching(base, [("bomb1.jpg", bomb), ("bomb2.jpg", bomb)])
    assert max(latencies) < 1.0, latencies
    for status, body, elapsed in results:
        assert 400 <= status < 500 and body["error"]["message"], (status, body)
        assert elapsed < 8, elapsed  # not the decode's own ~10 s (slack for a busy machine)


def test_a_decode_past_its_deadline_is_killed_with_a_clear_error(coll_dir: Path, tmp_path: Path) -> None:
    """A decode that takes 60 s (a decode function that sleeps, injected into the real worker
    process at the pool boundary) on a server with two worker threads: searches answer at once
    while two run, each upload gets 422 ``decode_timeout`` naming the 1.5 s limit, and the killed
    workers are replaced so the next upload decodes."""
    import httpx

    settings = _settings(coll_dir, tmp_path, max_workers=2, decode_timeout_s=1.5)
    with served_app(create_app(settings)) as (base, st):
        st.decoder = _sleepy_pool(tmp_path, 60, workers=2, timeout_s=1.5)  # no worker started yet
        slow = jpeg((40, 30))
        latencies, results = _uploads_while_searching(base, [("slow1.jpg", slow), ("slow2.jpg", slow)])
        assert max(latencies) < 1.0, latencies
        for status, body, elapsed in results:
            assert status == 422 and body["error"]["code"] == "decode_timeout", body
            assert "1.5 s" in body["error"]["message"], body
            assert 1.4 < elapsed < 8, elapsed
        assert st.decoder.stats.timeouts == 2 and st.decoder.stats.restarts == 2
        with httpx.Client(base_url=base, timeout=60) as c:
            r = c.post("/api/search/image", files={"image": ("fine.jpg", jpeg((40, 30)), "image/jpeg")})
            assert r.status_code == 200, r.text
        assert st.decoder.stats.started == 3


def test_a_client_that_goes_away_has_its_decode_stopped(coll_dir: Path, tmp_path: Path) -> None:
    """The issue's clients hung up 3 s after sending their upload: the decode is stopped (its worker
    killed) within a poll of the disconnect, not left to run to the deadline for nobody."""
    import socket

    settings = _settings(coll_dir, tmp_path)
    with served_app(create_app(settings)) as (base, st):
        st.decoder = _sleepy_pool(tmp_path, 60, workers=1, timeout_s=30)
        port = int(base.rsplit(":", 1)[1])
        data, boundary = jpeg((16, 16)), "b25"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="slow.jpg"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        head = (f"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
                f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head + body)
            deadline = time.time() + 10
            # the worker process started and the decode is under way (a request counts as running
            # from when it holds a slot; a hang-up before its worker exists has nothing to kill)
            while st.decoder.running == 0 or st.decoder.stats.started == 0:
                assert time.time() < deadline, "the decode did not start"
                time.sleep(0.05)
        t0 = time.perf_counter()  # hung up
        while st.decoder.running:
            assert time.perf_counter() - t0 < 5, "the decode went on after its client left"
            time.sleep(0.05)
        assert st.decoder.stats.restarts == 1 and st.decoder.stats.timeouts == 0  # killed, not timed out


def test_serve_decode_flags_are_bounded() -> None:
    from crossmodal_rag.cli import build_parser

    args = build_parser().parse_args(["serve", "-c", "x", "--decode-workers", "3", "--decode-timeout", "2.5",
                                      "--decode-memory-mb", "512"])
    assert (args.decode_workers, args.decode_timeout, args.decode_memory_mb) == (3, 2.5, 512)
    default = build_parser().parse_args(["serve", "-c", "x"])
    assert (default.decode_workers, default.decode_timeout, default.decode_memory_mb) == (2, 10.0, 1024)
    for flag, bad in [("--decode-workers", "0"), ("--decode-workers", "65"), ("--decode-timeout", "0"),
                      ("--decode-timeout", "nan"), ("--decode-timeout", "1e400"), ("--decode-memory-mb", "1"),
                      ("--decode-memory-mb", "x")]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "-c", "x", flag, bad])
    with pytest.raises(ValueError, match="decode_workers"):
        WebSettings(collection="x", decode_workers=0)


def test_a_page_of_cold_thumbnails_is_rendered_not_refused(coll_dir: Path, tmp_path: Path) -> None:
    """A results page asks for dozens of thumbnails at once: on a cold cache with one decode
    worker, all of them are rendered (they queue deeper than uploads), none gets 503."""
    import httpx

    from crossmodal_rag import Collection

    with Collection.open(coll_dir) as coll:
        ids = [int(i) for i in coll.store.ids("image")]
    settings = _settings(coll_dir, tmp_path, decode_workers=1, max_queued_decodes=2)
    urls = [f"/api/items/{i}/thumbnail?size={size}" for i in ids for size in (64, 128)]
    with served_app(create_app(settings)) as (base, st):
        def get(url: str) -> int:
            with httpx.Client(base_url=base, timeout=120) as c:
                return c.get(url).status_code

        with ThreadPoolExecutor(len(urls)) as pool:
            statuses = list(pool.map(get, urls))
        assert statuses == [200] * len(urls), statuses
        assert st.decoder.stats.decoded == len(urls) and st.decoder.stats.peak_running == 1


def test_the_pool_bounds_concurrency_and_queue(tmp_path: Path) -> None:
    """At most ``workers`` decodes run at once; more than ``max_queued`` waiting get 503 with
    Retry-After at once (a worker that sleeps is injected at the pool boundary)."""
    import anyio

    from crossmodal_rag.web.decoding import DecodeFailed

    async def main() -> None:
        pool = _sleepy_pool(tmp_path, 0.6, workers=2, timeout_s=5, max_queued=1)
        outcomes: list[object] = []

        async def one(i: int) -> None:
            try:
                outcomes.append(await pool.decode(jpeg((8, 8)), f"slow{i}.jpg", max_pixels=10**6))
            except DecodeFailed as e:
                outcomes.append(e)

        try:
            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(one, i)
                    await anyio.sleep(0.02)
            elapsed = time.perf_counter() - t0
        finally:
            await pool.aclose()
        busy = [o for o in outcomes if isinstance(o, DecodeFailed)]
        done = [o for o in outcomes if not isinstance(o, DecodeFailed)]
        assert len(done) == 3 and len(busy) == 2, outcomes  # 2 running + 1 queued; 2 refused
        assert all(b.status == 503 and b.code == "decoder_busy" and b.retry_after >= 1 for b in busy), busy
        assert pool.stats.peak_running == 2
        assert 1.1 < elapsed < 4, elapsed  # the queued one waited for a slot (two rounds of 0.6 s)

    anyio.run(main)


def test_worker_crashes_and_errors_are_4xx_and_the_worker_is_replaced(tmp_path: Path) -> None:
    """A worker that dies mid-decode, or answers garbage, gives a 422 naming the upload; the
    next decode gets a fresh worker."""
    import anyio

    from crossmodal_rag.web.decoding import DecodeFailed, DecodePool

    crasher = tmp_path / "crash_worker.py"
    crasher.write_text("import os, sys\nsys.stdout.buffer.write(b'R'); sys.stdout.flush()\n"
                       "sys.stdin.buffer.read(4)\nos._exit(3)\n")

    async def main() -> None:
        pool = DecodePool(workers=1, timeout_s=5, argv=[sys.executable, str(crasher)])
        try:
            for _ in range(2):
                with pytest.raises(DecodeFailed) as e:
                    await pool.decode(jpeg((8, 8)), "x.jpg", max_pixels=10**6)
                assert e.value.status == 422 and "x.jpg" in str(e.value), e.value
            assert pool.stats.restarts >= 2
        finally:
            await pool.aclose()

    anyio.run(main)


RAISING = """
def decode(data, name, *, max_pixels):
    if name.startswith("zero"):
        return 1 // 0
    raise RuntimeError("broken AVIF box\\nsecond line of a C library's message")
"""


def test_decoder_exceptions_become_reasons(tmp_path: Path) -> None:
    """Whatever a decoder raises inside the worker (ZeroDivisionError, RuntimeError, MemoryError
    past the memory budget) comes back as a one-line 4xx reason, never a traceback or a 500."""
    import os

    import anyio

    from crossmodal_rag.web.decoding import DecodeFailed, DecodePool

    (tmp_path / "raising").mkdir()
    (tmp_path / "raising" / "raising_decode.py").write_text(RAISING)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "raising"), str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "crossmodal_rag.web.decode_worker", "--decoder", "raising_decode:decode"]

    async def main() -> None:
        pool = DecodePool(workers=1, timeout_s=30, argv=argv, env=env)
        try:
            for name, expected in (("zero.jpg", "ZeroDivisionError"), ("x.jpg", "RuntimeError: broken AVIF box")):
                with pytest.raises(DecodeFailed) as e:
                    await pool.decode(jpeg((8, 8)), name, max_pixels=10**6)
                assert e.value.status == 422 and expected in e.value.reason and "\n" not in e.value.reason, e.value
            assert pool.stats.restarts == 0  # the worker answered; it was not lost
        finally:
            await pool.aclose()
        pool = DecodePool(workers=1, timeout_s=30, memory_mb=64)
        try:
            big = _image_bytes("PNG", (4000, 4000), compress_level=1)  # 48 MB of pixels, more while converting
            with pytest.raises(DecodeFailed) as e:
                await pool.decode(big, "big.png", max_pixels=10**8)
            assert e.value.status == 413 and "budget of 64 MB" in e.value.reason, e.value
            img = (await pool.decode(jpeg((40, 30)), "ok.jpg", max_pixels=10**6)).image
            assert img.size == (40, 30)
        finally:
            await pool.aclose()

    anyio.run(main)


SLEEPY = """
import time
from crossmodal_rag.ingestion.images import decode_image

DELAY = float(open(__file__ + ".delay").read())


def decode(data, name, *, max_pixels):
    if name.startswith("slow"):
        time.sleep(DELAY)
    return decode_image(data, name, max_pixels=max_pixels)
"""


def _sleepy_argv(folder: Path, delay: float) -> tuple[list[str], dict[str, str]]:
    """The real worker with a decode function that sleeps ``delay`` s first (injected by --decoder)."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sleepy_decode.py").write_text(SLEEPY)
    (folder / "sleepy_decode.py.delay").write_text(str(delay))
    path = os.pathsep.join([str(folder), str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
    return ([sys.executable, "-m", "crossmodal_rag.web.decode_worker", "--decoder", "sleepy_decode:decode"],
            {"PYTHONPATH": path})


def _sleepy_pool(folder: Path, delay: float, **kw: object):
    from crossmodal_rag.web.decoding import DecodePool

    argv, env = _sleepy_argv(folder / "sleepy", delay)
    return DecodePool(argv=argv, env=env, **kw)  # type: ignore[arg-type]
