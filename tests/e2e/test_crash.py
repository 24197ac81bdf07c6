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
import pytest
from PIL import Image

from crossmodal_rag import Collection
from crossmodal_rag.errors import CollectionError

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

    from crossmodal_rag.ingestion.importer import import_embeddings

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


# -- kills during creation ------------------------------------------------------------------
# The child runs the real CLI with one library function replaced by a SIGKILL of itself, so the
# kill lands at an exact point of `Collection.create` (no timing involved).
_KILL_CHILD = """
import os, signal, sys
from crossmodal_rag.store import manifest, metadata
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
if sys.argv[1] == "after-sqlite":  # the metadata file exists, nothing else is written yet
    init = metadata.MetadataStore.__init__
    def init_then_die(self, *args, **kwargs):
        init(self, *args, **kwargs)
        die()
    metadata.MetadataStore.__init__ = init_then_die
else:  # "before-manifest": lock, SQLite and index files exist, the manifest is next
    manifest.Manifest.write = die
from crossmodal_rag.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("point", ["after-sqlite", "before-manifest"])
def test_sigkill_during_creation_then_index_succeeds(tmp_path: Path, tiny_oc_spec: str, point: str) -> None:
    n = 6
    src = tmp_path / "src"
    _make_source(src, n)
    coll = tmp_path / "coll"
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", _KILL_CHILD, point, *_ingest_cmd(src, coll, tiny_oc_spec)[3:]],
                            env=env, timeout=300, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # creation is atomic: the folder appears complete or not at all
    assert not coll.exists(), sorted(p.name for p in coll.iterdir())
    r = subprocess.run(_ingest_cmd(src, coll, tiny_oc_spec), env=env, timeout=300, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_complete(coll, n)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coll", "src"]  # the killed staging folder is gone


def _interrupted_in_place_creation(folder: Path, *, items: int = 0) -> None:
    """What a kill just before the manifest left behind when collections were created in place
    (older versions; and a folder that is a mount point still is): lock, SQLite, index files."""
    from crossmodal_rag.lock import WriteLock
    from crossmodal_rag.store.metadata import MetadataStore
    from crossmodal_rag.store.vectors import VectorIndex

    folder.mkdir()
    lock = WriteLock(folder)
    lock.acquire()
    store = MetadataStore(folder)
    with store.transaction():
        store.set_meta("encoder_probe", "[[0.0]]")
        for i in range(items):
            store.insert_item("image", np.full(8, i, np.float32), sha256=f"{i:064x}")
    store.close()
    VectorIndex(8, "Flat").save(folder, "index/image.1.faiss")
    (folder / "embeddings" / "image").mkdir(parents=True)
    lock.release()


def test_create_resumes_an_interrupted_in_place_creation(tmp_path: Path, tiny_oc_spec: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "coll"
    _interrupted_in_place_creation(folder)
    with Collection.open_or_create(folder, tiny_oc_spec) as c:
        assert c.check().ok and c.counts() == {"images": 0, "captions": 0, "passages": 0}
    assert "interrupted creation" in caplog.text
    # an empty folder the user made is still a fine place for a new collection
    (tmp_path / "empty").mkdir()
    with Collection.create(tmp_path / "empty", tiny_oc_spec) as c:
        assert c.check().ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coll", "empty"]


def test_create_never_deletes_what_is_not_an_interrupted_creation(tmp_path: Path, tiny_oc_spec: str) -> None:
    # a user's file beside the leftovers
    mixed = tmp_path / "mixed"
    _interrupted_in_place_creation(mixed)
    (mixed / "notes.txt").write_text("mine")
    # a real collection whose manifest was deleted: the SQLite file holds committed items
    damaged = tmp_path / "damaged"
    _interrupted_in_place_creation(damaged, items=3)
    before = {f: sorted(p.relative_to(f) for p in f.rglob("*")) for f in (mixed, damaged)}
    for folder, says in ((mixed, "not an empty folder"), (damaged, "items but no manifest.json")):
        with pytest.raises(CollectionError, match=says):
            Collection.open_or_create(folder, tiny_oc_spec)
        assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before[folder]
    assert (mixed / "notes.txt").read_text() == "mine"


def test_stale_staging_folders_are_removed_but_not_live_or_foreign_ones(tmp_path: Path, tiny_oc_spec: str) -> None:
    from crossmodal_rag.lock import WriteLock
    from crossmodal_rag.store.metadata import MetadataStore

    def staging(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        MetadataStore(folder).close()
        (folder / ".lock").write_text("1")
        return folder

    stale = staging(".coll.creating-0123456789abcdef")
    live = staging(".coll.creating-fedcba9876543210")
    other = staging(".other.creating-0123456789abcdef")
    foreign = tmp_path / ".coll.creating-00000000000000aa"
    foreign.mkdir()
    (foreign / "photo.jpg").write_bytes(b"mine")
    held = WriteLock(live)
    held.acquire()  # a creation running in another process
    try:
        with Collection.create(tmp_path / "coll", tiny_oc_spec) as c:
            assert c.check().ok
    finally:
        held.release()
    assert not stale.exists()
    assert live.exists() and other.exists() and (foreign / "photo.jpg").read_bytes() == b"mine"


def test_a_folder_that_cannot_be_renamed_over_is_built_in_place(tmp_path: Path, tiny_oc_spec: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount point cannot be replaced by a rename: the collection is built in it, manifest
    last (a kill there leaves what test_create_resumes_an_interrupted_in_place_creation clears)."""
    from crossmodal_rag.store import creation

    folder = tmp_path / "mnt"
    folder.mkdir()
    inode = folder.stat().st_ino
    monkeypatch.setattr(creation.os.path, "ismount", lambda p: Path(p) == folder)
    with Collection.create(folder, tiny_oc_spec) as c:
        assert c.check().ok
    assert folder.stat().st_ino == inode and sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]
