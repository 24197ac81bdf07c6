"""Filtered search equals brute force over the filtered subset; the grammar's errors name positions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal_rag import Collection, QueryError
from crossmodal_rag.filters import parse_where


@pytest.fixture(scope="module")
def varied(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str) -> Path:
    root = tmp_path_factory.mktemp("varied")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        w, h = int(rng.integers(20, 300)), int(rng.integers(20, 300))
        sub = root / "imgs" / ("2023" if i % 2 else "2024")
        sub.mkdir(parents=True, exist_ok=True)
        ext = ["jpg", "png", "webp"][i % 3]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(sub / f"p{i:02d}.{ext}")
        rows.append({"image": f"imgs/{sub.name}/p{i:02d}.{ext}", "caption": f"{['dog', 'cat', 'car', 'tree'][i % 4]} photo {i}",
                     "camera": ["nikon", "canon"][i % 2], "year": 2000 + i})
    (root / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    folder = root / "coll"
    with Collection.create(folder, tiny_oc_spec) as c:
        c.add(root / "m.jsonl")
    return folder


def _brute(coll: Collection, q: np.ndarray, index: str, keep, k: int) -> list[int]:
    ids = [i for i in coll.store.ids(index).tolist() if keep(coll.get(i)[0])]
    vecs = coll.store.vectors(ids, coll.manifest.dim)
    order = np.argsort(-(vecs @ q), kind="stable")[:k]
    return [ids[j] for j in order]


def _image_of(coll: Collection, item):
    return item if item.kind == "image" else coll.get(item.parent_id)[0]


@pytest.mark.parametrize(
    ("where", "keep"),
    [
        (["width>=150"], lambda it: it.width >= 150),
        (["type=png"], lambda it: it.format == "PNG"),
        (["type=jpg", "height<100"], lambda it: it.format == "JPEG" and it.height < 100),
        (["path=*/2023/*"], lambda it: "/2023/" in it.path),
        (["name=p1*.webp"], lambda it: Path(it.path).name.startswith("p1") and it.path.endswith(".webp")),
        (["caption~CAT"], lambda it: any("cat" in c for c in it.captions)),
        (["camera=canon"], lambda it: it.extra.get("camera") == "canon"),
        (["year>2030"], lambda it: it.extra.get("year", 0) > 2030),
        (["extra.year<=2005"], lambda it: it.extra.get("year", 9999) <= 2005),
        (["size>1KB"], lambda it: it.size_bytes > 1024),
        (["added>=2000-01-01"], lambda it: True),
        (["added<2000-01-01"], lambda it: False),
    ],
)
def test_filtered_image_search_is_exact(varied: Path, where: list[str], keep) -> None:
    with Collection.open(varied) as coll:
        q = coll.embed_query("a photo")
        hits = coll.search_vectors(q[None], k=7, where=where)[0]
        assert [h.id for h in hits] == _brute(coll, q, "image", keep, 7)


def test_filtered_text_search_refers_to_the_captioned_image(varied: Path) -> None:
    with Collection.open(varied) as coll:
        folder = str(varied.parent / "imgs" / "2024")
        q = coll.embed_query("a photo")
        hits = coll.search_vectors(q[None], k=5, target="texts", where=[f"folder={folder}", "caption~dog"])[0]
        keep = lambda it: _image_of(coll, it).path.startswith(folder) and "dog" in it.text  # noqa: E731
        assert [h.id for h in hits] == _brute(coll, q, "text", keep, 5)
        assert hits and all("dog" in h.text for h in hits)


@pytest.mark.parametrize(
    ("expr", "fragment", "pos"),
    [
        ("width", "expected an operator", 5),
        ("  height", "expected an operator", 8),
        ("=5", "expected a field name", 0),
        ("width>=", "missing value", 7),
        ("width>=wide", "expected a number", 7),
        ("size<3 parsecs", "units", 5),
        ("added>yesterday", "ISO date", 6),
        ("width~3", "not ~", 5),
        ("path<x", "= != or ~ only", 4),
        ("kind=dog", "image, caption or passage", 5),
    ],
)
def test_malformed_expressions_name_the_position(expr: str, fragment: str, pos: int) -> None:
    with pytest.raises(QueryError) as info:
        parse_where([expr])
    assert fragment in str(info.value) and f"position {pos}" in str(info.value)


def test_unknown_field_lists_the_known_ones(varied: Path) -> None:
    with Collection.open(varied) as coll, pytest.raises(QueryError) as info:
        coll.search("x", where=["widht>5"])
    assert "unknown field 'widht'" in str(info.value) and "camera" in str(info.value)
