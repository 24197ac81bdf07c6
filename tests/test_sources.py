from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossmodal_rag.errors import SourceError
from crossmodal_rag.sources import ImageRecord, Problem, TextRecord, read_source
from tests.badimages import jpeg_bytes


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes())
    return path


def test_folder_is_recursive_with_same_stem_captions(tmp_path: Path) -> None:
    _img(tmp_path / "a.jpg")
    (tmp_path / "a.txt").write_text("first caption\n\n  second   caption \nfirst caption\n")
    _img(tmp_path / "sub" / "deeper" / "b.PNG")
    _img(tmp_path / ".hidden" / "c.jpg")
    (tmp_path / "notes.txt").write_text("not a caption of anything")
    (tmp_path / "data.csv").write_text("x\n")
    records = list(read_source(tmp_path))
    assert all(isinstance(r, ImageRecord) for r in records)
    by_name = {r.path.name: r for r in records}
    assert set(by_name) == {"a.jpg", "b.PNG"}
    assert by_name["a.jpg"].captions == ("first caption", "second caption")
    assert by_name["a.jpg"].origin == str(tmp_path / "a.txt")
    assert by_name["b.PNG"].captions == ()


def test_jsonl_manifest_groups_rows_and_reports_bad_lines(tmp_path: Path) -> None:
    _img(tmp_path / "imgs" / "x.jpg")
    _img(tmp_path / "imgs" / "y.jpg")
    lines = [
        {"image": "imgs/x.jpg", "caption": "a red square", "license": "CC0"},
        {"image": "imgs/x.jpg", "captions": ["a square", "a red square"]},
        {"image": "imgs/y.jpg"},
        {"text": "A passage about squares.", "id": 7, "title": "Squares"},
        {"image": "../outside.jpg", "caption": "escapes"},
        {"image": "/etc/passwd"},
        {"caption": "no image, no text"},
    ]
    body = "\n".join(json.dumps(x) for x in lines) + "\n{not json\n[1, 2]\n"
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(body)
    records = list(read_source(manifest))
    images = {r.path.name: r for r in records if isinstance(r, ImageRecord)}
    texts = [r for r in records if isinstance(r, TextRecord)]
    problems = [r for r in records if isinstance(r, Problem)]
    assert images["x.jpg"].captions == ("a red square", "a square")
    assert images["x.jpg"].extra == {"license": "CC0"}
    assert images["y.jpg"].captions == ()
    assert texts == [TextRecord("A passage about squares.", "Squares", "7", str(manifest.resolve()), {})]
    reasons = {p.item.rsplit(":", 1)[1]: p.reason for p in problems}
    assert "outside" in reasons["5"] and "outside" in reasons["6"]
    assert "neither" in reasons["7"]
    assert "invalid JSON" in reasons["8"]
    assert "not a JSON object" in reasons["9"]
    allowed = [r for r in read_source(manifest, allow_outside_root=True) if isinstance(r, ImageRecord)]
    assert {r.path.name for r in allowed} == {"x.jpg", "y.jpg", "outside.jpg", "passwd"}


def test_csv_manifest_and_missing_columns(tmp_path: Path) -> None:
    _img(tmp_path / "x.jpg")
    (tmp_path / "m.csv").write_text('image,caption,source\nx.jpg,"a caption, with comma",cam1\nx.jpg,another,cam1\n')
    [rec] = list(read_source(tmp_path / "m.csv"))
    assert rec.captions == ("a caption, with comma", "another")
    assert rec.extra == {"source": "cam1"}
    (tmp_path / "bad.csv").write_text("file,desc\nx.jpg,hello\n")
    with pytest.raises(SourceError, match="'image' column"):
        list(read_source(tmp_path / "bad.csv"))


def test_coco_captions_json(tmp_path: Path) -> None:
    _img(tmp_path / "images" / "001.jpg")
    _img(tmp_path / "images" / "002.jpg")
    coco = {
        "images": [{"id": 1, "file_name": "images/001.jpg"}, {"id": 2, "file_name": "images/002.jpg"},
                   {"id": 3}],
        "annotations": [{"image_id": 1, "id": 10, "caption": "A dog."},
                        {"image_id": 1, "id": 11, "caption": "A brown dog"},
                        {"image_id": 2, "id": 12, "caption": "A boat"}],
    }
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    records = list(read_source(tmp_path / "captions.json"))
    images = {r.path.name: r for r in records if isinstance(r, ImageRecord)}
    assert images["001.jpg"].captions == ("A dog.", "A brown dog")
    assert images["001.jpg"].extra == {"coco_id": 1}
    assert images["002.jpg"].captions == ("A boat",)
    assert [p.reason for p in records if isinstance(p, Problem)] == ["image entry has no 'file_name'"]


def test_unreadable_sources_raise(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        list(read_source(tmp_path / "nope"))
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    with pytest.raises(SourceError, match="cannot tell"):
        list(read_source(tmp_path / "x.parquet"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SourceError, match="JSON"):
        list(read_source(tmp_path / "bad.json"))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(SourceError, match="COCO"):
        list(read_source(tmp_path / "list.json"))
