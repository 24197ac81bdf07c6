"""The collection manifest (crossmodal_rag/store/manifest.py): a versioned JSON file that
round-trips, is replaced atomically, and is read as hostile input (newer formats, unknown or
mistyped fields, paths leaving the collection, deep nesting and oversized files refused with one
CollectionError naming the file and the field)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from crossmodal_rag.errors import CollectionError
from crossmodal_rag.safe_io import atomic_write_bytes
from crossmodal_rag.store.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    MAX_MANIFEST_DEPTH,
    IndexFile,
    Manifest,
    ShardFile,
    json_depth,
)


def _full() -> Manifest:
    return Manifest(
        encoder="open_clip:ViT-B-32/openai", dim=512, index_type="auto", library_version="0.9",
        created_at="2026-12-01T00:00:00Z", updated_at="2026-12-01T00:00:01Z", generation=7,
        counts={"images": 3, "captions": 2, "passages": 1},
        files={"image": IndexFile(path="index/image-7.faiss", bytes=1234, sha256="a" * 64, count=3)},
        max_index_memory=1 << 30, index_types={"image": "Flat", "text": "HNSW32"},
        search_params={"text": {"ef_search": 64}},
        embeddings={"image": [ShardFile(path="embeddings/image-0.npy", ids_path="embeddings/image-0.ids.npy",
                                        count=3, min_id=1, max_id=3)]},
        collection_id="0123456789abcdef0123456789abcdef",
    )


def _write(folder: Path, data: dict[str, Any]) -> None:
    (folder / MANIFEST_NAME).write_text(json.dumps(data))


def test_a_manifest_round_trips_through_its_file(tmp_path: Path) -> None:
    manifest = _full()
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["format_version"] == FORMAT_VERSION
    assert manifest.index_type_of("text") == "HNSW32"
    assert Manifest(encoder="x", dim=4, index_type="auto").index_type_of("text") == "Flat"  # format 1


def test_a_newer_format_is_refused_with_the_fix(tmp_path: Path) -> None:
    data = _full().to_dict() | {"format_version": FORMAT_VERSION + 1}
    _write(tmp_path, data)
    with pytest.raises(CollectionError, match=rf"format version {FORMAT_VERSION + 1}, newer .*upgrade crossmodal-rag"):
        Manifest.read(tmp_path)


@pytest.mark.parametrize(("change", "names"), [
    ({"surprise": 1}, "surprise"),  # unknown key
    ({"dim": "512"}, "dim"),  # mistyped
    ({"dim": 0}, "dim"),  # out of bounds
    ({"metric": "l2"}, "metric"),
    ({"collection_id": "XYZ"}, "collection_id"),
    ({"files": {"image": {"path": "../../etc/passwd", "bytes": 1, "sha256": "a" * 64, "count": 1}}},
     "path"),  # leaves the collection's index folder
    ({"encoder": "bad\x00name"}, "encoder"),  # a control character
])
def test_each_bad_field_is_one_error_naming_the_file_and_field(tmp_path: Path, change: dict[str, Any],
                                                               names: str) -> None:
    _write(tmp_path, _full().to_dict() | change)
    with pytest.raises(CollectionError) as info:
        Manifest.read(tmp_path)
    assert str(tmp_path / MANIFEST_NAME) in str(info.value) and names in str(info.value)


def _depth(value: Any) -> int:
    """Nesting of parsed JSON (the oracle for the linear scan)."""
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


@pytest.mark.parametrize("text", ['{"a": [1, {"b": [[]]}]}', '[]', '"[[[{"', '{"k": "]]]}}}", "l": [[[1]]]}',
                                  '{"a": "\\"[[["}', "[" * 5 + "]" * 5])
def test_json_depth_agrees_with_the_parsed_nesting(text: str) -> None:
    assert json_depth(text) == _depth(json.loads(text))


def test_deep_nesting_and_oversized_files_are_refused_before_parsing(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_NAME).write_text("[" * (MAX_MANIFEST_DEPTH + 1) + "]" * (MAX_MANIFEST_DEPTH + 1))
    with pytest.raises(CollectionError, match="nests"):
        Manifest.read(tmp_path)
    with open(tmp_path / MANIFEST_NAME, "wb") as f:
        f.truncate(MAX_MANIFEST_BYTES + 1)
    with pytest.raises(CollectionError, match="unreadable"):
        Manifest.read(tmp_path)


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / MANIFEST_NAME
    atomic_write_bytes(target, b"old")

    def dies(*_: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", dies)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST_NAME]
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"


def test_a_folder_without_a_manifest_names_the_command_that_makes_one(tmp_path: Path) -> None:
    with pytest.raises(CollectionError, match="is not a crossmodal-rag collection .*crossmodal-rag index"):
        Manifest.read(tmp_path)
    with pytest.raises(CollectionError, match="does not exist"):
        Manifest.read(tmp_path / "nope")
