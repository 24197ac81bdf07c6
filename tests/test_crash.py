"""Kill ingest with SIGKILL at random moments; the collection must open, pass its check and
resume to exactly the expected items."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from crossmodal_rag import Collection

TRIALS = int(os.environ.get("CROSSMODAL_RAG_CRASH_TRIALS", "5"))


def _make_source(folder: Path, n: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"picture number {i}\nrandom noise {i}\n")
    # a byte-identical duplicate and a bad file
    (folder / "dup.png").write_bytes((folder / "img000.png").read_bytes())
    (folder / "bad.png").write_bytes(b"not an image")


def _ingest_cmd(src: Path, coll: Path, spec: str) -> list[str]:
    return [sys.executable, "-m", "crossmodal_rag", "-q", "index", str(src), "--collection", str(coll),
            "--model", spec, "--batch-size", "2", "--workers", "0"]


def _assert_complete(coll: Path, n: int) -> None:
    with Collection.open(coll) as c:
        report = c.check()
        assert report.ok, report.problems
        assert c.counts() == {"images": n, "captions": 2 * n, "passages": 0}
        rows = c.store.conn.execute("SELECT COUNT(*), COUNT(DISTINCT sha256) FROM items WHERE kind='image'").fetchone()
        assert rows[0] == rows[1] == n
        assert c.store.conn.execute("SELECT COUNT(*) FROM paths").fetchone()[0] == n + 1


def test_sigkill_during_ingest_never_loses_or_duplicates(tmp_path: Path, tiny_oc_spec: str) -> None:
    n = 120
    src = tmp_path / "src"
    _make_source(src, n)
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}

    t0 = time.perf_counter()
    subprocess.run(_ingest_cmd(src, tmp_path / "calib", tiny_oc_spec), env=env, check=False, timeout=300,
                   capture_output=True)
    duration = time.perf_counter() - t0
    _assert_complete(tmp_path / "calib", n)

    rng = random.Random(1234)
    landed = attempts = 0
    while landed < TRIALS:
        attempts += 1
        assert attempts <= 4 * TRIALS, f"only {landed} of {attempts} runs were killed mid-ingest"
        coll = tmp_path / f"c{attempts}"
        kills = 0
        for _ in range(2):  # up to two kills per trial, at different points
            proc = subprocess.Popen(_ingest_cmd(src, coll, tiny_oc_spec), env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.2, duration))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=60)
            if (coll / "manifest.json").exists():
                with Collection.open(coll) as c:  # opens, and is consistent after every kill
                    report = c.check()
                    assert report.ok, (attempts, report.problems)
        r = subprocess.run(_ingest_cmd(src, coll, tiny_oc_spec), env=env, timeout=300, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        _assert_complete(coll, n)
        if kills:
            landed += 1
        else:  # the machine ran faster than calibrated: aim earlier
            duration *= 0.7


def test_sigkill_during_reindex_keeps_a_working_collection(tmp_path: Path, tiny_oc_spec: str) -> None:
    """A reindex killed at any moment leaves the previous index in service (or the new one,
    complete): the collection opens, passes its check, and holds the same items."""
    import json

    from crossmodal_rag.importer import import_embeddings

    with Collection.create(tmp_path / "probe", tiny_oc_spec) as c:
        dim = c.manifest.dim
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(20, dim))
    x = centres[rng.integers(0, 20, 4000)] + 0.5 * rng.normal(size=(4000, dim))
    src = tmp_path / "emb"
    src.mkdir()
    np.save(src / "part.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    (src / "part.jsonl").write_text("".join(json.dumps({"image_path": f"{i}.jpg"}) + "\n" for i in range(4000)))
    coll = tmp_path / "coll"
    import_embeddings(src, coll, tiny_oc_spec, progress=False)
    with Collection.open(coll) as c:
        ids = c.store.ids("image")
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
    specs = ["IVF32,Flat", "HNSW16", "IVF16,PQ8np", "Flat"]

    def cmd(spec: str) -> list[str]:
        return [sys.executable, "-m", "crossmodal_rag", "-q", "reindex", str(coll), "--index", spec,
                "--sharded" if spec.startswith("IVF") else "--no-sharded"]

    t0 = time.perf_counter()
    subprocess.run(cmd("IVF32,Flat"), env=env, check=True, timeout=300, capture_output=True)
    duration = time.perf_counter() - t0
    prng = random.Random(99)
    for trial in range(max(TRIALS, 4)):
        proc = subprocess.Popen(cmd(specs[trial % len(specs)]), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(prng.uniform(0.5, duration))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        with Collection.open(coll) as c:
            report = c.check()
            assert report.ok, (trial, report.problems)
            assert np.array_equal(c.indexes["image"].ids(), ids)
            assert len(c.search_vectors(x[:1].astype(np.float32), k=5)[0]) == 5
    r = subprocess.run(cmd("IVF32,Flat"), env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with Collection.open(coll) as c:
        assert c.check().ok and c.manifest.index_types["image"] == "IVF32,Flat"
        leftovers = [p.name for p in (coll / "index").iterdir()]
        assert not [n for n in leftovers if n.startswith(".build") or n.endswith(".tmp")], leftovers
