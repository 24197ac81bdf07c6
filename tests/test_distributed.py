"""Embedding on Ray (``index --ray``): the oracle is a single-process ingest of the same source,
which a Ray run must reproduce (same ids, kinds, paths, captions, metadata and skipped items;
vectors within float tolerance)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.ingestion.distributed import (
    STAGING_DIR,
    DistributedError,
    RaySettings,
    ingest_ray,
    require_ray,
)
from crossmodal_rag.ingestion.runner import IngestSettings, ingest
from tests.badimages import write_bad_images

REPO = Path(__file__).resolve().parents[1]
LONG = " ".join(f"word{i}" for i in range(300))  # several windows of the tiny model's context


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the in-process tests (ingest_ray uses a running session)."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """The sample photos and captions, a byte-identical copy, bad files, and a manifest of the
    same photos with other captions plus text passages (one long, one repeated)."""
    src = tmp_path_factory.mktemp("ray-src") / "src"
    shutil.copytree(sample_dir, src, ignore=shutil.ignore_patterns("*.md"))
    shutil.copy(src / "cat.jpg", src / "cat-copy.jpg")
    write_bad_images(src / "bad")
    rows: list[dict[str, object]] = [
        {"image": str(p.relative_to(src)), "caption": f"photo number {i}"}
        for i, p in enumerate(sorted(src.rglob("*.jpg")) + sorted(src.rglob("*.png")))
    ]
    rows += [{"image": "missing.jpg", "caption": "gone"},
             {"id": "p1", "title": "Dahlias", "text": "dahlias bloom from midsummer to the first frost"},
             {"id": "p2", "text": LONG},
             {"id": "p3", "text": "dahlias bloom from midsummer to the first frost", "title": "Dahlias"}]
    (src / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return src


def _snapshot(folder: Path) -> tuple[list[tuple], list[tuple], np.ndarray]:
    """(item rows without timestamps and vectors, path rows, vectors in id order) from SQLite."""
    conn = sqlite3.connect(f"file:{folder / 'metadata.sqlite'}?mode=ro", uri=True)
    try:
        items = conn.execute("SELECT id, kind, parent_id, sha256, text, title, ext_id, origin, width, height, "
                             "format, size_bytes, extra FROM items ORDER BY id").fetchall()
        paths = conn.execute("SELECT path, item_id, size_bytes, mtime_ns FROM paths ORDER BY path").fetchall()
        blobs = conn.execute("SELECT vector FROM items ORDER BY id").fetchall()
    finally:
        conn.close()
    return items, paths, np.stack([np.frombuffer(b, "<f4") for (b,) in blobs])


def _assert_same_collection(a: Path, b: Path) -> None:
    items_a, paths_a, vecs_a = _snapshot(a)
    items_b, paths_b, vecs_b = _snapshot(b)
    assert items_a == items_b  # ids, kinds, parents, hashes, texts, captions' origins, sizes
    assert paths_a == paths_b
    np.testing.assert_allclose(vecs_a, vecs_b, atol=1e-5)
    # the indexes agree too: the same hits, in the same order, for a text and an image query
    with Collection.open(a) as ca, Collection.open(b) as cb:
        assert ca.counts() == cb.counts()
        n = sum(ca.counts().values())
        for query in ({"text": "a cat"}, {"image": sorted(paths_a)[0][0]}):
            hits_a = ca.search(**query, k=n, target="all")
            hits_b = cb.search(**query, k=n, target="all")
            assert [h.id for h in hits_a] == [h.id for h in hits_b]
            np.testing.assert_allclose([h.score for h in hits_a], [h.score for h in hits_b], atol=1e-5)


def test_ray_ingest_matches_single_process(ray_session, source: Path, tmp_path: Path, tiny_oc_spec: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="crossmodal_rag.ingestion.distributed")
    manifest = source / "manifest.jsonl"
    settings = IngestSettings(batch_size=4)
    with Collection.create(tmp_path / "single", tiny_oc_spec) as coll:
        single = ingest(coll, manifest, settings)
    assert single.images_added >= 15 and single.duplicates == 2 and single.passages_added == 2
    assert len(single.skipped) == 7  # six bad files and a missing one
    with Collection.open(tmp_path / "single") as coll:
        assert coll.counts().get("windows")  # the long passage's extra windows

    folder = tmp_path / "ray"
    with Collection.create(folder, tiny_oc_spec) as coll:
        stale = folder / STAGING_DIR / "ray-crashed-run"  # what a killed run leaves behind
        stale.mkdir(parents=True)
        (stale / "images-000000.npy").write_bytes(b"partial")
        # other Ray batches than the commit batches: the commit must not depend on them
        report = ingest_ray(coll, manifest, settings, RaySettings(actors=2, batch_size=3))
    assert not (folder / STAGING_DIR).exists()  # the crashed run's and this run's shards are gone
    for field in ("images_added", "captions_added", "passages_added", "duplicates", "unchanged"):
        assert getattr(report, field) == getattr(single, field), field
    assert report.skipped == single.skipped  # same items, same reasons, same order
    assert report.timings["ray"] > 0
    # every caption, passage and window came from the actors (none embedded on the driver)
    assert not [r for r in caplog.records if "did not see" in r.getMessage()]
    _assert_same_collection(tmp_path / "single", folder)

    # Files already indexed are not read again, and when nothing needs vectors Ray is not used.
    with Collection.open(folder, writable=True) as coll:
        again = ingest_ray(coll, source / "cat.jpg", settings, RaySettings(actors=2))
    assert (again.images_added, again.unchanged, again.timings["ray"]) == (0, 1, 0)
    _assert_same_collection(tmp_path / "single", folder)


def test_ray_workers_apply_the_byte_limit_and_decode_budgets(ray_session, tmp_path: Path, tiny_oc_spec: str) -> None:
    """`index --ray --max-image-mb` and the decode budgets hold on the Ray decode tasks as in a
    single-process run (the byte limit was not passed to the workers): a file over the limit, a
    PostScript file named .jpg and a scan bomb are skipped with the same reasons, a thin JPEG
    is indexed by both."""
    from tests.badimages import EPS, jpeg_bytes, scan_bomb_jpeg, thin_jpeg

    src = tmp_path / "src"
    src.mkdir()
    import io

    from PIL import Image

    buf = io.BytesIO()  # noise: larger than the scan bomb below
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buf, "JPEG")
    big = buf.getvalue()
    (src / "big.jpg").write_bytes(big)
    (src / "small.jpg").write_bytes(jpeg_bytes((40, 30)))
    (src / "thin.jpg").write_bytes(thin_jpeg(3000, 1))
    (src / "drawing.jpg").write_bytes(EPS)
    (src / "bomb.jpg").write_bytes(scan_bomb_jpeg(500, (64, 64)))
    settings = IngestSettings(batch_size=4, max_image_bytes=len(big) - 1)
    with Collection.create(tmp_path / "single", tiny_oc_spec) as coll:
        single = ingest(coll, src, settings)
    with Collection.create(tmp_path / "ray", tiny_oc_spec) as coll:
        report = ingest_ray(coll, src, settings, RaySettings(actors=1))
    reasons = {Path(p.item).name: p.reason for p in single.skipped}
    assert set(reasons) == {"big.jpg", "drawing.jpg", "bomb.jpg"}, reasons
    assert f"exceeds the limit of {len(big) - 1} bytes" in reasons["big.jpg"]
    assert reasons["drawing.jpg"].startswith("PostScript/EPS is not an allowed image format")
    assert "scan budget" in reasons["bomb.jpg"]
    assert report.skipped == single.skipped and report.images_added == single.images_added == 2
    _assert_same_collection(tmp_path / "single", tmp_path / "ray")


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "crossmodal_rag", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO)


def test_cli_index_with_ray_matches_single_process(source: Path, tmp_path: Path, tiny_oc_spec: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray.data")
    from crossmodal_rag.cli import main

    # The folder source: same-stem .txt captions, a copy, bad files (the manifest is not an image).
    common = ("index", str(source), "--model", tiny_oc_spec, "--batch-size", "4")
    assert main(["-q", *common, "--collection", str(tmp_path / "single"), "--workers", "0"]) == 0
    single = capsys.readouterr()
    # a fresh process, which starts (and stops) its own local Ray instance
    distributed = _cli("-q", *common, "--collection", str(tmp_path / "ray"), "--ray", "--ray-actors", "1")
    assert distributed.returncode == 0, distributed.stderr
    assert "Traceback" not in distributed.stderr
    def counts(out: str) -> list[str]:  # the summary and counts, without the time and folder
        return [re.sub(r" in [\d.]+s$| /\S+:", "", line) for line in out.splitlines()]

    def skipped(err: str) -> list[str]:
        return [line for line in err.splitlines() if line.startswith("  ")]

    assert counts(distributed.stdout) == counts(single.out)
    assert "15 images" in single.out and "1 duplicates" in single.out
    assert skipped(distributed.stderr) == skipped(single.err) and len(skipped(single.err)) >= 4
    _assert_same_collection(tmp_path / "single", tmp_path / "ray")


def test_unreachable_cluster_is_a_one_line_error(source: Path, tmp_path: Path, tiny_oc_spec: str) -> None:
    pytest.importorskip("ray.data")
    t = time.perf_counter()
    out = _cli("index", str(source / "cat.jpg"), "--collection", str(tmp_path / "c"), "--model", tiny_oc_spec,
               "--ray", "127.0.0.1:1", timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("error: cannot reach a Ray cluster at 127.0.0.1:1")
    assert "Traceback" not in out.stderr and "ray start --head" in out.stderr
    assert time.perf_counter() - t < 100
    assert not (tmp_path / "c").exists()  # refused before a collection was created


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never says a word (a Ray address that does not
    answer: the TCP probe passes, so only Ray's own connection attempt can find out)."""
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # Ray connects to this node's IP, not to 127.0.0.1
        s.listen(16)
        yield s.getsockname()[1]


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _index_existing(folder: Path, source: Path, spec: str) -> None:
    with Collection.create(folder, spec) as coll:
        ingest(coll, source / "cat.jpg", IngestSettings(progress=False))


def _assert_kept(folder: Path) -> None:
    with Collection.open(folder) as coll:
        assert coll.counts()["images"] == 1 and coll.check().ok


def _cli_env(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "crossmodal_rag", *args], capture_output=True, text=True,
                          env=full, timeout=timeout, cwd=REPO)


def test_ray_auto_with_a_dead_ray_address_fails_fast(source: Path, tmp_path: Path, tiny_oc_spec: str) -> None:
    """``--ray auto`` connects where ``RAY_ADDRESS`` points: a closed port there is the same
    one-line error as ``--ray HOST:PORT`` (Ray itself retries it for minutes), before any
    collection is created; an existing collection is kept as it was."""
    pytest.importorskip("ray.data")
    address = f"127.0.0.1:{_closed_port()}"
    new, kept = tmp_path / "new", tmp_path / "kept"
    _index_existing(kept, source, tiny_oc_spec)
    for folder in (new, kept):
        t = time.perf_counter()
        out = _cli_env("index", str(source / "coffee.jpg"), "--collection", str(folder), "--model", tiny_oc_spec,
                       "--ray", "auto", env={"RAY_ADDRESS": address}, timeout=120)
        assert time.perf_counter() - t < 60, "a closed port must not be retried for minutes"
        assert out.returncode == 1, out.stderr[-2000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("error: cannot reach a Ray cluster at auto") and address in last, last
        assert "ray start --head" in last and "Traceback" not in out.stderr
    assert not new.exists()
    _assert_kept(kept)


@pytest.mark.parametrize("how", ["auto", "address"])
def test_ray_address_that_does_not_answer(source: Path, tmp_path: Path, tiny_oc_spec: str, silent_port: int,
                                          how: str) -> None:
    """An address that accepts the connection and then says nothing passes the TCP probe, so the
    collection is opened before Ray finds out: Ray's connection attempt is bounded (not its
    default ~14 minutes of retries), the error names the address and the fix, a collection the
    command created (still empty) is removed again and an existing one is kept as it was. The
    real Ray connection code runs (no fake)."""
    pytest.importorskip("ray.data")
    address = f"127.0.0.1:{silent_port}"
    flag, env = (("auto", {"RAY_ADDRESS": address}) if how == "auto" else (address, {}))
    # the user's own Ray settings win over ours; these keep the test short
    env.update(RAY_py_gcs_connect_timeout_s="3", RAY_gcs_rpc_server_connect_timeout_s="1")
    new, kept, empty = tmp_path / "new", tmp_path / "kept", tmp_path / "empty"
    _index_existing(kept, source, tiny_oc_spec)
    empty.mkdir()  # the user's own empty folder: left empty again, not holding an empty collection
    folders = (new, kept) if how == "auto" else (new, empty)
    for folder in folders:
        t = time.perf_counter()
        out = _cli_env("index", str(source / "coffee.jpg"), "--collection", str(folder), "--model", tiny_oc_spec,
                       "--ray", flag, env=env, timeout=150)
        assert time.perf_counter() - t < 90
        assert out.returncode == 1, out.stderr[-2000:]
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot start or reach the Ray cluster at {flag}"), last
        assert str(silent_port) in last and "ray start --head" in last, last
        assert "Traceback" not in out.stderr
    assert not new.exists()
    if how == "auto":
        _assert_kept(kept)
    else:
        assert empty.is_dir() and not any(empty.iterdir())


def test_usage_errors(tmp_path: Path) -> None:
    from crossmodal_rag.cli import main

    assert main(["index", str(tmp_path), "-c", str(tmp_path / "c"), "--ray-actors", "2"]) == 2
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="actors"):
        RaySettings(actors=0)
    with pytest.raises(ValueError, match="unknown Ray settings"):
        RaySettings.from_dict({"actor": 2})
    assert RaySettings.from_dict(RaySettings(address="auto", actors=2).to_dict()) == RaySettings(address="auto", actors=2)


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_oc_spec: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(DistributedError, match=r'pip install "crossmodal-rag\[distributed\]"'):
        require_ray()
    code = main(["index", str(tmp_path), "-c", str(tmp_path / "c"), "--model", tiny_oc_spec, "--ray"])
    assert code == 1 and 'pip install "crossmodal-rag[distributed]"' in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before a collection was created


def test_decode_tasks_preprocess_like_the_encoder(tiny_oc_spec: str, tiny_hf_dir: Path, sample_dir: Path) -> None:
    """What the decode tasks get (the transform without the weights) gives the pixels the
    single-process workers make, for both backends, and is small to ship."""
    import pickle

    from crossmodal_rag.encoders import load_encoder
    from crossmodal_rag.ingestion.distributed import _decode_batch, _preprocessor
    from crossmodal_rag.ingestion.images import load_image

    photo = sample_dir / "cat.jpg"
    for spec in (tiny_oc_spec, f"hf:{tiny_hf_dir}"):
        encoder = load_encoder(spec, "cpu").load()
        shipped = pickle.loads(pickle.dumps(_preprocessor(encoder)))
        assert len(pickle.dumps(_preprocessor(encoder))) < 100_000  # no model weights inside
        expected = encoder.preprocess(load_image(photo).image).numpy()
        paths = ["", str(photo), str(sample_dir / "nope.jpg")]  # a text row, an image, a missing file
        batch = {"position": np.arange(3), "path": np.array(paths, object),
                 "text": np.array(["a caption", "", ""], object)}
        out = _decode_batch(batch, shipped, 10**9)
        np.testing.assert_array_equal(np.frombuffer(out["pixels"][1], np.float32).reshape(expected.shape), expected)
        assert list(out["error"]) == ["", "", "no such file"]  # the text row passes through
        assert out["pixels"][0] == b"" and out["pixels"][2] == b"" and out["text"][0] == "a caption"
        assert out["sha256"][1] == hashlib.sha256(photo.read_bytes()).hexdigest()


def test_worker_failures_become_one_line() -> None:
    """Ray hands a worker's failure over wrapped, traceback inside; the user gets its last line."""
    from crossmodal_rag.ingestion.distributed import _root_message

    class SystemException(Exception):  # Ray Data's outer wrapper has no message
        pass

    worker_trace = ("The actor died because of an error raised in its creation task\nTraceback (most recent "
                    "call last):\n  File \"x.py\", line 1, in load\ncrossmodal_rag.errors.ModelSpecError: "
                    "open_clip local-dir folder does not exist: /models/m")
    try:
        try:
            raise SystemException()
        except SystemException as inner:
            raise RuntimeError(worker_trace) from inner
    except RuntimeError as e:
        assert _root_message(e) == "ModelSpecError: open_clip local-dir folder does not exist: /models/m"
    assert _root_message(ConnectionError("no cluster")) == "ConnectionError: no cluster"
