"""Corrupt files give clear errors naming the file; readers see consistent snapshots while a
writer ingests; the web server keeps serving while a client dawdles."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal_rag import Collection


@pytest.mark.parametrize("victim", ["manifest", "metadata", "image-index", "text-index"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "zero", "delete"])
def test_corrupt_files(collection_copy: Path, sample_collection: Path, victim: str, damage: str) -> None:
    manifest = json.loads((collection_copy / "manifest.json").read_text())
    path = {"manifest": collection_copy / "manifest.json",
            "metadata": collection_copy / "metadata.sqlite",
            "image-index": collection_copy / manifest["files"]["image"]["path"],
            "text-index": collection_copy / manifest["files"]["text"]["path"]}[victim]
    size = path.stat().st_size
    rng = np.random.default_rng(0)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: size // 3])
    elif damage == "garbage":
        data = bytearray(path.read_bytes())
        for i in rng.integers(0, size, 64):
            data[int(i)] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
    elif damage == "zero":
        path.write_bytes(b"\x00" * size)
    else:
        path.unlink()
    code = (f"import json\nfrom crossmodal_rag import Collection\n"
            f"c = Collection.open({str(collection_copy)!r})\n"
            f"r = c.check()\nhits = [(h.id, h.path, round(h.score, 4)) for h in c.search('a cat', k=100)]\n"
            f"print(json.dumps({{'ok': r.ok, 'problems': r.problems, 'counts': c.counts(), 'hits': hits}}))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"})
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # never a segfault (-11) or abort
    if proc.returncode == 1:
        last = proc.stderr.strip().splitlines()[-1]
        assert "CollectionError" in last and (path.name in last or collection_copy.name in last), last
        return
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if victim.endswith("index"):
        # an index file is a cache: rebuilt from the metadata, and `check` says what was wrong
        assert not report["ok"] and any(path.name in p for p in report["problems"]), report
    elif report["ok"]:
        # SQLite may shrug off small damage in unused pages: then nothing may be missing either,
        # and the collection must search exactly like the undamaged one
        assert report["counts"] == {"images": 15, "captions": 45, "passages": 0}, report
        with Collection.open(sample_collection) as pristine:
            want = [[h.id, h.path, round(h.score, 4)] for h in pristine.search("a cat", k=100)]
        assert report["hits"] == want
    else:
        assert report["problems"], report  # not ok means a named problem


def test_readers_see_consistent_snapshots_during_ingest(tmp_path: Path, tiny_oc_spec: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    for i in range(150):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(src / f"i{i:03d}.png")
        (src / f"i{i:03d}.txt").write_text(f"image {i}\n")
    coll = tmp_path / "c"
    with Collection.create(coll, tiny_oc_spec):
        pass
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "crossmodal_rag", "-q", "index", str(src), "-c", str(coll),
                             "--batch-size", "2", "--workers", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        while proc.poll() is None:
            with Collection.open(coll) as reader:
                report = reader.check(verify_hash=False)
                assert report.ok, report.problems
                counts = reader.counts()
                assert counts["captions"] == counts["images"]  # an image and its caption commit together
                seen.append(counts["images"])
            time.sleep(0.05)
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert seen == sorted(seen) and len(set(seen)) > 1  # readers saw the ingest progress, in order
    with Collection.open(coll) as final:
        assert final.counts()["images"] == 150


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, sample_collection: Path):
    """``crossmodal-rag serve`` in a subprocess (uploads limited to 1 MB); yields its base URL."""
    pytest.importorskip("uvicorn")
    import httpx

    tmp_path = tmp_path_factory.mktemp("serve")
    coll = tmp_path / "coll"
    shutil.copytree(sample_collection, coll, ignore=shutil.ignore_patterns(".lock"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.Popen([sys.executable, "-m", "crossmodal_rag", "serve", "-c", str(coll), "--port", str(port),
                             "--lazy-generator", "--thumbnail-dir", str(tmp_path / "t"), "--max-upload-mb", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_slow_client_does_not_block_others(server: str) -> None:
    import httpx

    port = int(server.rsplit(":", 1)[1])
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    for s in slow:  # headers trickle in and never finish
        s.sendall(b"GET /api/search?q=cat HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    t0 = time.perf_counter()
    for _ in range(5):
        r = httpx.get(server + "/api/search", params={"q": "a cat", "k": 3}, timeout=10)
        assert r.status_code == 200
    assert time.perf_counter() - t0 < 10
    with socket.create_connection(("127.0.0.1", port), timeout=10) as big:  # declares 1 GB, sends 100 B
        big.sendall(b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                    b"boundary=z\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 100)
        assert big.recv(100).startswith(b"HTTP/1.1 413")
    for s in slow:
        s.close()
    assert httpx.get(server + "/api/health", timeout=10).status_code == 200


def test_chunked_upload_is_refused_while_it_arrives(server: str) -> None:
    """No Content-Length: the server counts bytes as they arrive and answers 413 at the 1 MB limit,
    long before the client has sent its 30 MB."""
    import httpx

    port = int(server.rsplit(":", 1)[1])
    total, chunk = 30 * 1024 * 1024, 64 * 1024
    sent = 0
    answered = threading.Event()
    sent_when_answered: list[int] = []

    def upload(sock: socket.socket) -> None:
        nonlocal sent
        head = (b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: multipart/form-data; boundary=zz\r\n\r\n")
        part = (b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
                b"Content-Type: image/jpeg\r\n\r\n")
        try:
            sock.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
            while sent < total and not answered.is_set():
                sock.sendall(b"%x\r\n%s\r\n" % (chunk, b"x" * chunk))
                sent += chunk
            sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server closed the connection after its answer

    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sender = threading.Thread(target=upload, args=(sock,), daemon=True)
        sender.start()
        reply = sock.recv(4096)
        sent_when_answered.append(sent)
        while b'"}}' not in reply and (more := sock.recv(4096)):  # the rest of the JSON answer
            reply += more
        answered.set()
        sender.join(timeout=60)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b'"too_large"' in reply
    assert sent_when_answered[0] < total // 2, sent_when_answered  # answered mid-upload
    assert httpx.get(server + "/api/health", timeout=10).status_code == 200
