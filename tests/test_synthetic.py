"""The synthetic shapes generator: deterministic, captions true to the pictures, readable by the ingest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal_rag.ingestion.sources import ImageRecord, read_source
from crossmodal_rag.synthetic import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapeAttrs,
    all_attribute_combinations,
    caption_of,
    make_shapes,
    render_shape_example,
    sample_attrs,
)

REPO = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_shapes(tmp_path / "a", 12, seed=3)
    b = make_shapes(tmp_path / "b", 12, seed=3)
    c = make_shapes(tmp_path / "c", 12, seed=4)
    assert [cap for _, cap in a] == [cap for _, cap in b] != [cap for _, cap in c]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert _files(tmp_path / "a") != _files(tmp_path / "c")
    assert len(_files(tmp_path / "a")) == 2 * 12 + 1  # png + txt each, and the manifest


def test_script_writes_the_same_as_the_library(tmp_path: Path) -> None:
    make_shapes(tmp_path / "lib", 6, seed=9, distinct=True)
    r = subprocess.run([sys.executable, str(REPO / "data" / "make_shapes.py"), str(tmp_path / "cli"),
                        "--n", "6", "--seed", "9", "--distinct"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert _files(tmp_path / "lib") == _files(tmp_path / "cli")


def test_captions_describe_the_pictures(tmp_path: Path) -> None:
    written = make_shapes(tmp_path, 40, seed=1)
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    for (png, caption), row in zip(written, rows, strict=True):
        assert row["image"] == png.name and row["caption"] == caption
        assert (png.with_suffix(".txt")).read_text().strip() == caption
        attrs = ShapeAttrs(row["shape"], row["colour"], row["size"], row["position"], row["background"])
        assert caption == caption_of(attrs)
        # Every attribute is named in the caption.
        for word in (row["shape"], row["colour"], row["size"], row["background"] + " background"):
            assert word in caption
        # And visible in the picture: the shape's colour at its grid cell's centre, the
        # background's colour in the farthest corner.
        pixels = np.asarray(Image.open(png).convert("RGB"))
        col, rowi = POSITIONS[row["position"]]
        cy, cx = int((0.23, 0.5, 0.77)[rowi] * 64), int((0.23, 0.5, 0.77)[col] * 64)
        assert tuple(pixels[cy, cx]) == COLOURS[row["colour"]], (png, caption)
        corner = (63 if rowi == 0 else 0, 63 if col == 0 else 0)
        assert tuple(pixels[corner]) == BACKGROUNDS[row["background"]]


def test_large_shapes_cover_more_pixels() -> None:
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        counts = {}
        for size in SIZES:
            img = render_shape_example(sample_attrs(rng, (shape, "red", size, "centre", "white")))
            counts[size] = int((np.asarray(img) == COLOURS["red"]).all(-1).sum())
        assert counts["large"] > 1.5 * counts["small"] > 0, shape  # radius 0.19 vs 0.12, +-10% jitter


def test_distinct_captions_and_bad_attributes(tmp_path: Path) -> None:
    assert len(set(all_attribute_combinations())) == 1620
    written = make_shapes(tmp_path, 300, seed=0, distinct=True)
    assert len({cap for _, cap in written}) == 300
    with pytest.raises(ValueError, match="<= 1620"):
        make_shapes(tmp_path / "x", 1621, distinct=True)
    with pytest.raises(ValueError, match="unknown colour"):
        ShapeAttrs("circle", "mauve", "small", "top", "white")


def test_ingest_reads_folder_and_manifest(tmp_path: Path) -> None:
    written = make_shapes(tmp_path, 8, seed=2)
    expected = {png.resolve(): (cap,) for png, cap in written}
    for source in (tmp_path, tmp_path / "manifest.jsonl"):
        recs = list(read_source(source))
        assert all(isinstance(r, ImageRecord) for r in recs)
        assert {r.path: r.captions for r in recs} == expected
    manifest_recs = list(read_source(tmp_path / "manifest.jsonl"))
    assert {r.extra["shape"] for r in manifest_recs} <= set(SHAPES)


def test_cli_indexes_the_manifest(tmp_path: Path, tiny_oc_spec: str) -> None:
    make_shapes(tmp_path / "shapes", 6, seed=5)
    r = subprocess.run([sys.executable, "-m", "crossmodal_rag", "index", str(tmp_path / "shapes" / "manifest.jsonl"),
                        "--collection", str(tmp_path / "coll"), "--model", tiny_oc_spec],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "6 images, 6 captions" in r.stdout
