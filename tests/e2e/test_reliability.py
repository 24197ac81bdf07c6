"""Corrupt files give clear errors naming the file; readers see consistent snapshots while a
writer ingests; the web server keeps serving while a client dawdles."""

from __future__ import annotations

import json
import os
import re
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
from tests.servers import serve_cli


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
            want = [[h.id, h.path, round(h.score, 4)] for h in pristine.search("a cat", k=100, mode="dense")]
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
    pytest.importorskip("httpx")
    tmp_path = tmp_path_factory.mktemp("serve")
    coll = tmp_path / "coll"
    shutil.copytree(sample_collection, coll, ignore=shutil.ignore_patterns(".lock"))
    with serve_cli(coll, tmp_path, "--lazy-generator", "--max-upload-mb", "1") as base:
        yield base


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


# -- hostile collection files (issue 15, items 5, 6 and 10) ---------------------------------------
def _edit_manifest(folder: Path, change) -> None:
    path = folder / "manifest.json"
    data = json.loads(path.read_text())
    text = change(data)
    path.write_text(text if isinstance(text, str) else json.dumps(data))


def _edit_sql(folder: Path, script: str) -> None:
    import sqlite3

    conn = sqlite3.connect(folder / "metadata.sqlite")
    try:
        conn.executescript(script)
        conn.commit()
    finally:
        conn.close()


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


def _set_file(key, value):
    return lambda m: m["files"]["image"].__setitem__(key, value)


MANIFEST_DAMAGE = {
    "nested 100k deep": lambda m: '{"a":' * 100_000 + "1" + "}" * 100_000,
    "nested in tuning": _set("tuning", {"image": json.loads("[" * 40 + "1" + "]" * 40)}),
    "dim as a string": _set("dim", "32"),
    "negative dim": _set("dim", -3),
    "dim 10^12": _set("dim", 10**12),
    "dim true": _set("dim", True),
    "count as a string": _set("counts", {"images": "x"}),
    "generation as a string": _set("generation", "x"),
    "generation 1.5": _set("generation", 1.5),
    "files a list": _set("files", []),
    "index count negative": _set_file("count", -1),
    "index path absolute": _set_file("path", "/etc/passwd"),
    "index path escapes": _set_file("path", "../../../etc/passwd"),
    "index bytes 10^30": _set_file("bytes", 10**30),
    "sha256 not hex": _set_file("sha256", "zz"),
    "encoder with NUL": _set("encoder", "a\x00b"),
    "encoder lone surrogate": _set("encoder", "\ud800"),
    "encoder escape sequence": _set("encoder", "\x1b]0;owned\x07"),
    "tuning measured not a list": _set("tuning", {"image": {"param": "nprobe", "value": 1, "k": 10,
                                                           "target_recall": 0.9, "reached": True,
                                                           "queries": 5, "measured": 5}}),
    "search params negative": _set("search_params", {"image": {"nprobe": -1}}),
    "shard ids outside int64": lambda m: m["embeddings"]["image"][0].__setitem__("max_id", 2**70),
    "shard path escapes": lambda m: m["embeddings"]["image"][0].__setitem__("path", "../x.npy"),
    "NaN": lambda m: json.dumps(m).replace('"max_index_memory": null', '"max_index_memory": NaN'),
    "int of 5000 digits": lambda m: json.dumps(m).replace('"generation": ', '"generation": ' + "9" * 5000 + ", \"x\": "),
}


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    from crossmodal_rag.cli import main

    code = main(["-q", *args])
    return code, capsys.readouterr().err


def _assert_one_line_error(code: int, err: str, *names: str) -> None:
    """Exit code 1 (README: a damaged collection) and one `error:` line naming the file."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (code, err[-2000:])
    assert any(n in lines[0] for n in names), lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_tampered_manifest_is_one_collection_error(collection_copy: Path, damage: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag.errors import CollectionError

    _edit_manifest(collection_copy, MANIFEST_DAMAGE[damage])
    for command in ("info", "check"):
        code, err = _cli([command, str(collection_copy)], capsys)
        _assert_one_line_error(code, err, "manifest.json")
    code, err = _cli(["search", "a cat", "-c", str(collection_copy)], capsys)
    _assert_one_line_error(code, err, "manifest.json")
    with pytest.raises(CollectionError, match="manifest.json"):
        Collection.open(collection_copy)


METADATA_DAMAGE = {
    "garbage encoder probe": ("UPDATE meta SET value = 'garbage' WHERE key = 'encoder_probe'", "encoder_probe"),
    "ragged encoder probe": ("UPDATE meta SET value = '[[1, 2], [3]]' WHERE key = 'encoder_probe'", "encoder_probe"),
    "deep image probe": ("UPDATE meta SET value = '" + "[" * 50_000 + "]" * 50_000
                         + "' WHERE key = 'encoder_image_probe.v1'", "encoder_image_probe"),
    "2-byte vector blob": ("UPDATE items SET vector = x'0102' WHERE id = 3", "item 3"),
    "vector as text": ("UPDATE items SET vector = 'abcd' WHERE id = 3", "item 3"),
    "vector of NaN": ("UPDATE items SET vector = (SELECT vector FROM items WHERE id = 3) WHERE id = 3; "
                      "UPDATE items SET vector = x'" + "0000c07f" * 32 + "' WHERE id = 3", "item 3"),
    "generation not a number": ("UPDATE meta SET value = 'abc' WHERE key = 'generation'", "generation"),
    "schema version not a number": ("UPDATE meta SET value = 'abc' WHERE key = 'schema_version'", "schema version"),
    "items a view": ("ALTER TABLE items RENAME TO items_old; CREATE VIEW items AS SELECT * FROM items_old",
                     "view"),
    "a trigger": ("CREATE TRIGGER t AFTER INSERT ON paths BEGIN DELETE FROM items; END", "trigger"),
    "items without the vector column": ("ALTER TABLE items DROP COLUMN vector", "vector"),
}


@pytest.mark.parametrize("damage", sorted(METADATA_DAMAGE))
def test_tampered_metadata_is_one_collection_error(collection_copy: Path, damage: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Every read of a tampered metadata file ends in one error line naming what is wrong, never
    a traceback (item 5); the searches that meet the damaged row say which item it is."""
    script, named = METADATA_DAMAGE[damage]
    _edit_sql(collection_copy, script)
    outcomes = []
    for args in (["info", str(collection_copy)], ["check", str(collection_copy)],
                 ["search", "a cat", "-c", str(collection_copy), "-k", "100"]):
        from crossmodal_rag.cli import main

        code = main(["-q", *args])
        out, err = capsys.readouterr()
        assert "Traceback" not in err and code in (0, 1), (args, code, err[-2000:])
        if code == 1 and args[0] == "check" and not err.strip():  # a report: the bad vector named
            assert "FAILED" in out and re.search(rf"\b{named.split()[-1]} \(", out), out[-2000:]
        elif code == 1:
            _assert_one_line_error(code, err, named)
        outcomes.append(code)
    assert 1 in outcomes, f"{damage}: no command noticed the damage"


def test_recursive_view_cannot_hang_info(collection_copy: Path) -> None:
    """An ``items`` table replaced by an endless recursive view is refused at once (item 5)."""
    cols = ("x AS id, 'image' AS kind, NULL AS parent_id, NULL AS sha256, NULL AS text, NULL AS title, "
            "NULL AS ext_id, NULL AS origin, NULL AS width, NULL AS height, NULL AS format, "
            "NULL AS size_bytes, NULL AS extra, 0.0 AS added_at, x'00' AS vector")
    _edit_sql(collection_copy, "ALTER TABLE items RENAME TO items_old; CREATE VIEW items AS WITH RECURSIVE "
                               f"r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT {cols} FROM r")
    for command in ("info", "check"):
        start = time.monotonic()
        try:
            proc = subprocess.run([sys.executable, "-m", "crossmodal_rag", command, str(collection_copy)],
                                  capture_output=True, text=True, timeout=60,
                                  env={**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"})
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{command}` still ran after 60 s on a recursive view")
        assert proc.returncode == 1 and "view" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert time.monotonic() - start < 60


def test_lock_file_symlink_is_not_followed(collection_copy: Path, tmp_path: Path) -> None:
    """``ln -s ~/victim C/.lock``: the next writer refuses, and the victim is not touched (item 6)."""
    from crossmodal_rag.errors import CollectionError

    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (collection_copy / ".lock").symlink_to(victim)
    with pytest.raises(CollectionError, match=r"\.lock.*(link|regular)"):
        Collection.open(collection_copy, writable=True)
    assert victim.read_text() == "precious\n"
    (collection_copy / ".lock").unlink()
    os.mkfifo(collection_copy / ".lock")  # a FIFO neither blocks nor is written
    with pytest.raises(CollectionError, match=r"\.lock.*regular"):
        Collection.open(collection_copy, writable=True)


def test_planted_temp_file_links_are_not_followed(collection_copy: Path, tmp_path: Path,
                                                  sample_dir: Path) -> None:
    """Links planted at the names of the index and shard temp files a writer will use: the
    writer writes its own files, the link targets stay as they were (item 6)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pid = os.getpid()
    planted = []
    for gen in range(1, 12):
        for name in ("image", "text"):
            planted.append(collection_copy / "index" / f".{name}.{gen}.faiss.{pid}.tmp")
    for name in ("image", "text"):
        for n in range(4):
            for ext in ("f16", "ids"):
                planted.append(collection_copy / "embeddings" / name / f".{n:06d}.{ext}.npy.{pid}.tmp")
    for link in planted:
        link.symlink_to(victim)
    extra = tmp_path / "more"
    extra.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(extra / "red.png")
    with Collection.open(collection_copy, writable=True) as coll:
        coll.add(extra)
        coll.remove(ids=[1])
        assert len(coll.indexes["image"]) == 15
    assert victim.read_text() == "precious\n"
    with Collection.open(collection_copy) as coll:
        assert coll.check().ok


def test_linked_subfolder_is_refused(collection_copy: Path, tmp_path: Path) -> None:
    """``index`` replaced by a link to a user's folder: a writer would write there and delete
    what the manifest does not list. Refused on a writable open (item 6)."""
    from crossmodal_rag.errors import CollectionError

    elsewhere = tmp_path / "elsewhere"
    shutil.move(collection_copy / "index", elsewhere)
    (elsewhere / "notes.txt").write_text("mine\n")
    (collection_copy / "index").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(CollectionError, match="index.*link"), \
            Collection.open(collection_copy, writable=True) as coll:
        coll.remove(ids=[1])
    assert (elsewhere / "notes.txt").read_text() == "mine\n"


def _foreign_index(folder: Path, name: str, ids: np.ndarray, dim: int) -> dict:
    """A valid FAISS file of another collection (same ids and size, other vectors), written
    into ``folder/index`` with the manifest record that would describe it."""
    import hashlib

    import faiss

    rng = np.random.default_rng(7)
    vecs = rng.standard_normal((len(ids), dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(vecs, ids.astype(np.int64))
    rel = f"index/{name}.99.faiss"
    faiss.write_index(index, str(folder / rel))
    data = (folder / rel).read_bytes()
    return {"path": rel, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "count": len(ids), "data_path": None, "data_bytes": None}


def test_foreign_index_file_is_not_loaded(collection_copy: Path, sample_collection: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    """A manifest entry and file swapped in from another collection (a valid FAISS file with the
    same ids and size): refused on open, rebuilt from the metadata, and `check` names it (item 10)."""
    with Collection.open(sample_collection) as pristine:
        want = [(h.id, round(h.score, 4)) for h in pristine.search("a cat", k=100, mode="dense")]
        ids, dim = pristine.store.ids("image"), pristine.manifest.dim
    record = _foreign_index(collection_copy, "image", ids, dim)
    _edit_manifest(collection_copy, lambda m: m["files"].__setitem__("image", record))
    with caplog.at_level("WARNING", logger="crossmodal_rag"), Collection.open(collection_copy) as coll:
        got = [(h.id, round(h.score, 4)) for h in coll.search("a cat", k=100, mode="dense")]
        report = coll.check()
    assert got == want
    assert any("image.99.faiss" in r.getMessage() for r in caplog.records), caplog.text
    assert not report.ok and any("image.99.faiss" in p for p in report.problems), report.problems


def test_manifest_of_another_collection_is_refused(collection_copy: Path, tmp_path: Path) -> None:
    """The collection id binds the manifest to the metadata: another collection's manifest is
    refused by name; a collection made before ids gets one on its next writable open."""
    from crossmodal_rag.errors import CollectionError

    m = json.loads((collection_copy / "manifest.json").read_text())
    assert len(m["collection_id"]) == 32
    other = dict(m, collection_id="0" * 32)
    (collection_copy / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(CollectionError, match="another collection"):
        Collection.open(collection_copy)
    # an older collection: no id on either side
    del m["collection_id"]
    m["format_version"] = 2
    (collection_copy / "manifest.json").write_text(json.dumps(m))
    _edit_sql(collection_copy, "DELETE FROM meta WHERE key IN ('collection_id', 'index_files')")
    with Collection.open(collection_copy) as coll:
        assert coll.search("a cat", k=3, mode="dense")
    with Collection.open(collection_copy, writable=True) as coll:
        cid = coll.store.get_meta("collection_id")
    assert cid and json.loads((collection_copy / "manifest.json").read_text())["collection_id"] == cid


def test_metadata_queries_have_a_step_budget(collection_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No query on a metadata file runs unbounded: an endless one (here a recursive CTE, as a
    hostile schema could hide one) is stopped after its budget of SQLite steps, ordinary ones
    fit, and each call of the store starts with a fresh budget (item 5)."""
    import sqlite3

    from crossmodal_rag.errors import CollectionError
    from crossmodal_rag.store import guard, metadata

    monkeypatch.setattr(guard, "_BASE_STEPS", 5_000_000)
    monkeypatch.setattr(guard, "_STEPS_PER_BYTE", 0)
    endless = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r"
    store = metadata.MetadataStore(collection_copy, readonly=True)
    watchdog = threading.Timer(30, store.conn.interrupt)  # without a budget: stopped here, and failed
    watchdog.start()
    try:
        assert store.counts()["images"] == 15
        start = time.monotonic()
        with pytest.raises(sqlite3.OperationalError, match="interrupt"):
            store.conn.execute(endless).fetchone()
        with pytest.raises(CollectionError, match="budget"), store.snapshot() as conn:
            conn.execute(endless).fetchone()
        assert time.monotonic() - start < 20
        assert store.counts()["images"] == 15 and len(store.ids("text")) == 45
    finally:
        watchdog.cancel()
        store.close()


def test_damaged_rows_and_calibration_in_filters(collection_copy: Path, sample_collection: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Found by tests/test_fuzz_collection.py: a filtered search over a row whose extra fields
    are not JSON, or whose width is a blob, is a CollectionError naming the item; a damaged
    stored calibration is computed again from the vectors (item 5)."""
    from crossmodal_rag.errors import CollectionError

    with Collection.open(sample_collection) as pristine:
        want = pristine.resolve_min_score("auto", query_is_image=False, target="images")
    _edit_sql(collection_copy, "UPDATE meta SET value = '{\"generation\": [' WHERE key = 'calibration'")
    query = np.ones((1, 32), np.float32) / np.sqrt(32)
    with caplog.at_level("WARNING", logger="crossmodal_rag"), Collection.open(collection_copy) as coll:
        assert coll.resolve_min_score("auto", query_is_image=False, target="images") == pytest.approx(want)
        assert any("calibration" in r.getMessage() for r in caplog.records)
        assert coll.search_vectors(query, k=3, where="width>=1")[0]
    for damage in ("UPDATE items SET extra = '{bad' WHERE id = 3",
                   "UPDATE items SET width = x'00' WHERE id = 3",
                   "UPDATE paths SET path = x'ff' WHERE item_id = 3"):
        _edit_sql(collection_copy, damage)
        with Collection.open(collection_copy) as coll, pytest.raises(CollectionError, match="item 3"):
            coll.search_vectors(query, k=3, where="width>=1")
        _edit_sql(collection_copy, "UPDATE items SET extra = NULL, width = 1 WHERE id = 3; "
                                   "UPDATE paths SET path = 'p3' WHERE item_id = 3")


def test_nan_in_the_shards_is_found_refused_and_repaired_through_the_cli(tmp_path: Path, photos: Path,
                                                                          tiny_oc_spec: str) -> None:
    """The hostile tester's case, driven through the documented CLI: NaN written into the float16
    shards. `check` said ok and `reindex` built from them (searches then found nothing); now
    `check` names the items, `reindex` refuses, `reindex --repair` re-embeds them from their
    files, and the collection passes `check` and answers searches again."""
    from tests.e2e.test_cli import run
    from tests.test_check import poison_shard

    coll = tmp_path / "coll"
    r = run("index", str(photos), "--collection", str(coll), "--model", tiny_oc_spec)
    assert r.returncode == 0, r.stderr
    with Collection.open(coll) as c:
        victims = [int(i) for i in c.store.ids("image")[:2]]
        paths = [c.get(v)[0].path for v in victims]
    poison_shard(coll, "image", {v: np.nan for v in victims})

    r = run("check", str(coll))
    assert r.returncode == 1 and "FAILED" in r.stdout
    assert all(f"{v} ({p})" in r.stdout for v, p in zip(victims, paths, strict=True)), r.stdout
    r = run("reindex", str(coll))
    assert r.returncode == 1 and "reindex --repair" in r.stderr and paths[0] in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = run("reindex", str(coll), "--repair", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["repair"]["reembedded"] == victims
    r = run("check", str(coll))
    assert r.returncode == 0 and r.stdout.rstrip().splitlines()[-1].startswith("ok:"), r.stdout
    r = run("search", "a cat", "--collection", str(coll), "--top-k", "5", "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["results"]) == 5, r.stdout
