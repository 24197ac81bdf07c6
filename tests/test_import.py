"""Importing precomputed embeddings through the real CLI: verification wherever the import may
read, no empty collection left behind, image sizes on imported items, a calibrated threshold."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal_rag import Collection
from crossmodal_rag.errors import EncoderMismatchError
from crossmodal_rag.ingestion.importer import import_embeddings
from tests.e2e.test_cli import run

N_IMAGES = 24


def _picture(k: int) -> Image.Image:
    """A distinct little picture: its own size, colour and stripes."""
    rng = np.random.default_rng(k)
    w, h = 24 + 6 * k, 80 - 2 * k
    base = rng.integers(0, 256, size=3)
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = base
    arr[:: 2 + k % 5] = 255 - base
    return Image.fromarray(arr)


def _write_source(folder: Path, vectors: np.ndarray, rows: list[dict]) -> Path:
    """clip-retrieval's layout: img_emb/img_emb_0.npy + metadata/metadata_0.jsonl."""
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    np.save(folder / "img_emb" / "img_emb_0.npy", vectors.astype(np.float16))
    with open(folder / "metadata" / "metadata_0.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str) -> tuple[Path, np.ndarray]:
    """N_IMAGES small PNGs and their embeddings by the tiny encoder (the model of the import)."""
    from crossmodal_rag.encoders import load_encoder
    from crossmodal_rag.ingestion.images import load_image

    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for k in range(N_IMAGES):
        paths.append(folder / f"p{k:02d}.png")
        _picture(k).save(paths[-1])
    vectors = load_encoder(tiny_oc_spec).encode_images([load_image(p).image for p in paths])
    return folder, vectors


@pytest.fixture
def captioned(tmp_path: Path, pictures: tuple[Path, np.ndarray]) -> Path:
    """An embedding folder whose images lie under it, each with a caption (embedded on import)."""
    src = tmp_path / "emb"
    shutil.copytree(pictures[0], src / "images")
    rows = [{"image_path": f"images/p{k:02d}.png", "caption": f"striped picture number {k}"}
            for k in range(N_IMAGES)]
    return _write_source(src, pictures[1], rows)


def test_import_calibrates_and_min_score_auto_works(captioned: Path, tmp_path: Path,
                                                   tiny_oc_spec: str) -> None:
    from crossmodal_rag.search.calibration import calibrate, load_calibration

    folder = tmp_path / "coll"
    r = run("import", str(captioned), "-c", str(folder), "--model", tiny_oc_spec)
    assert r.returncode == 0, r.stderr
    with Collection.open(folder) as c:
        fresh = calibrate(c.store, c.manifest.dim)  # what a calibration of the collection as it stands computes
        assert "text-image" in fresh
        assert load_calibration(c.store) == fresh  # stored by the import, and current
        t = fresh["text-image"]["threshold"]
        assert c.resolve_min_score("auto", query_is_image=False, target="images") == t
        unthresholded = c.search("striped picture number 3", k=N_IMAGES, mode="dense")
    r = run("search", "striped picture number 3", "-c", str(folder), "--min-score", "auto",
            "--top-k", str(N_IMAGES), "--mode", "dense", "--json")  # the calibrated dense ranking
    assert r.returncode == 0, r.stderr
    got = [h["id"] for h in json.loads(r.stdout)["results"]]
    assert got == [h.id for h in unthresholded if h.score >= t]  # the threshold, applied as computed


def test_allow_outside_root_still_verifies(tmp_path: Path, pictures: tuple[Path, np.ndarray],
                                           tiny_oc_spec: str) -> None:
    images, vectors = pictures
    rows = [{"image_path": str(images / f"p{k:02d}.png")} for k in range(N_IMAGES)]  # absolute paths
    other = np.random.default_rng(3).normal(size=vectors.shape).astype(np.float32)  # "another model"
    bad = _write_source(tmp_path / "bad", other, rows)
    r = run("import", str(bad), "-c", str(tmp_path / "c1"), "--model", tiny_oc_spec, "--allow-outside-root")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "another model" in r.stderr and "could be read" not in r.stderr
    assert not (tmp_path / "c1").exists()  # the refused import left no collection behind
    good = _write_source(tmp_path / "good", vectors, rows)
    r = run("import", str(good), "-c", str(tmp_path / "c2"), "--model", tiny_oc_spec, "--allow-outside-root")
    assert r.returncode == 0, r.stderr
    assert "could be read" not in r.stderr  # the images were read and the embeddings agreed
    with Collection.open(tmp_path / "c2") as c:
        assert c.counts()["images"] == N_IMAGES


def test_refused_or_empty_import_leaves_no_folder(tmp_path: Path, captioned: Path, tiny_oc_spec: str) -> None:
    wrong_dim = tmp_path / "wrong"
    wrong_dim.mkdir()
    np.save(wrong_dim / "p.npy", np.ones((2, 7), np.float32))
    (wrong_dim / "p.jsonl").write_text("".join(json.dumps({"image_path": f"{i}.jpg"}) + "\n" for i in range(2)))
    r = run("import", str(wrong_dim), "-c", str(tmp_path / "c1"), "--model", tiny_oc_spec)
    assert r.returncode != 0 and "Traceback" not in r.stderr and "7-d" in r.stderr
    assert not (tmp_path / "c1").exists()
    empty = tmp_path / "empty"  # a folder that was there, empty, stays so
    empty.mkdir()
    with pytest.raises(EncoderMismatchError, match="7-d"):
        import_embeddings(wrong_dim, empty, tiny_oc_spec, progress=False)
    assert empty.is_dir() and not any(empty.iterdir())
    # every row skipped: nothing imported, no folder
    outside = tmp_path / "outside"
    outside.mkdir()
    dim = np.load(captioned / "img_emb" / "img_emb_0.npy").shape[1]
    np.save(outside / "p.npy", np.eye(2, dim, dtype=np.float32))
    (outside / "p.jsonl").write_text("".join(json.dumps({"image_path": p}) + "\n"
                                             for p in ("/etc/passwd", "../../elsewhere.jpg")))
    r = run("import", str(outside), "-c", str(tmp_path / "c2"), "--model", tiny_oc_spec)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "2 skipped" in r.stdout
    assert "nothing could be imported" in r.stderr
    assert not (tmp_path / "c2").exists()
    # an existing collection is kept as it was, whatever the import does
    existing = tmp_path / "c3"
    assert run("import", str(captioned), "-c", str(existing), "--model", tiny_oc_spec).returncode == 0
    manifest = (existing / "manifest.json").read_text()
    for source in (wrong_dim, outside):
        r = run("import", str(source), "-c", str(existing), "--model", tiny_oc_spec)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert (existing / "manifest.json").read_text() == manifest
    with Collection.open(existing) as c:
        assert c.counts()["images"] == N_IMAGES and c.check().ok


def test_imported_items_have_sizes_and_where_width_works(tmp_path: Path, pictures: tuple[Path, np.ndarray],
                                                         tiny_oc_spec: str) -> None:
    images, vectors = pictures
    src = tmp_path / "emb"
    shutil.copytree(images, src / "images")
    half = N_IMAGES // 2
    rows = [{"image_path": f"images/p{k:02d}.png"} for k in range(half)]
    # the second half: files that are not there, but the manifest says how big they are
    rows += [{"image_path": f"gone/p{k:02d}.png", "width": 24 + 6 * k, "height": 80 - 2 * k}
             for k in range(half, N_IMAGES)]
    _write_source(src, vectors, rows)
    folder = tmp_path / "coll"
    r = run("import", str(src), "-c", str(folder), "--model", tiny_oc_spec, "--verify", "0")
    assert r.returncode == 0, r.stderr
    with Collection.open(folder) as c:
        by_path = {Path(p).name: c.get(i)[0] for p, i in c.store.conn.execute(
            "SELECT path, item_id FROM paths")}
    for k in range(half):  # read from the files' headers
        item = by_path[f"p{k:02d}.png"]
        with Image.open(images / f"p{k:02d}.png") as im:
            assert (item.width, item.height) == im.size
    sizes = {k: _picture(k).size for k in range(N_IMAGES)}
    for n in (60, 100):
        want = sorted(f"p{k:02d}.png" for k, (w, _) in sizes.items() if w >= n)
        r = run("search", "a picture", "-c", str(folder), "--where", f"width>={n}", "--top-k", "100", "--json")
        assert r.returncode == 0, r.stderr
        got = sorted(Path(h["path"]).name for h in json.loads(r.stdout)["results"])
        assert got == want and any(int(g[1:3]) >= half for g in got)
    want = sorted(f"p{k:02d}.png" for k, (_, h) in sizes.items() if h < 50)
    r = run("search", "a picture", "-c", str(folder), "--where", "height<50", "--top-k", "100", "--json")
    assert r.returncode == 0, r.stderr
    got = sorted(Path(h["path"]).name for h in json.loads(r.stdout)["results"])
    assert got == want and want


def test_where_width_falls_back_to_the_manifest_column(tmp_path: Path, tiny_oc_spec: str) -> None:
    """Items without a measured size (imported before sizes were read, or with only one of the
    columns) are filtered on the manifest's own width/height columns."""
    from crossmodal_rag.search.filters import allowed_ids, parse_where

    with Collection.create(tmp_path / "c", tiny_oc_spec) as c:
        vec = np.eye(1, c.manifest.dim, dtype=np.float32)[0]
        with c.store.transaction():
            ids = {w: c.store.insert_item("image", vec, sha256=f"s{w}", extra={"width": w, "group": "a"})
                   for w in (50, 100, 150)}
            measured = c.store.insert_item("image", vec, sha256="m", width=300, height=10, extra={"width": 5})
            unknown = c.store.insert_item("image", vec, sha256="u", extra={"width": "wide"})
        allowed = allowed_ids(c.store, parse_where("width>=100"))["image"].tolist()
        assert allowed == sorted([ids[100], ids[150], measured])  # the measured size wins over the column
        assert unknown not in allowed_ids(c.store, parse_where("width<1000"))["image"].tolist()
        assert allowed_ids(c.store, parse_where("height<20"))["image"].tolist() == [measured]
