from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from crossmodal_rag.errors import SourceError
from crossmodal_rag.ingestion.sources import ImageRecord, Problem, TextRecord, read_source
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


# -- hostile sources (issue 15) ----------------------------------------------------------------
def _child(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``code`` in a child with an address-space cap and a time limit (a hang or a read of
    /dev/zero fails the test, not the machine)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit, cwd=Path(__file__).resolve().parents[1])


def test_non_regular_manifests_and_caption_files_are_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.jsonl")
    os.mkfifo(tmp_path / "fifo.csv")
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    photos = tmp_path / "photos"
    _img(photos / "a.jpg")
    (photos / "a.txt").symlink_to("/dev/zero")  # a caption "file" that never ends
    _img(photos / "b.jpg")
    (photos / "b.txt").write_bytes(b"x" * (64 * 1024 * 1024 + 1))  # over the caption-file cap
    code = f"""
import json
from crossmodal_rag.errors import SourceError
from crossmodal_rag.ingestion.sources import Problem, read_source
out = {{}}
for name in ("fifo.jsonl", "fifo.csv", "zero.json"):
    try:
        list(read_source({str(tmp_path)!r} + "/" + name))
        out[name] = "read"
    except SourceError as e:
        out[name] = str(e)
out["photos"] = [[r.item, r.reason] if isinstance(r, Problem) else [r.path.name, list(r.captions)]
                 for r in read_source({str(photos)!r})]
print(json.dumps(out))
"""
    r = _child(code)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "named pipe" in out["fifo.jsonl"] and "named pipe" in out["fifo.csv"]
    assert "character device" in out["zero.json"]
    rows = {Path(a).name: b for a, b in out["photos"]}
    assert "character device" in rows["a.txt"] and rows["a.jpg"] == []  # the image is still indexed
    assert "exceeds the limit" in rows["b.txt"] and rows["b.jpg"] == []


def _bad_rows_manifest(root: Path) -> Path:
    for n, name in enumerate(("good1.jpg", "good2.jpg", "x.jpg")):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(jpeg_bytes(color=(40 * n, 200, 30)))  # distinct contents
    deep = '{"image": "x.jpg", "caption": "deep", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    lines = [
        json.dumps({"image": "good1.jpg", "caption": "a good caption"}),
        deep,                                                               # line 2
        json.dumps({"image": "x\u0000.jpg", "caption": "nul in the path"}),  # line 3
        '{"image": "x.jpg", "caption": "lone \\ud800 surrogate"}',          # line 4
        '{"image": "x.jpg", "caption": "ok", "license": "\\udfff"}',         # line 5
        '{"text": "a passage", "n": ' + "9" * 5000 + "}",                   # line 6: int too long
        json.dumps({"image": "good2.jpg", "caption": "another good caption"}),
        json.dumps({"text": "a good passage"}),
    ]
    manifest = root / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def test_bad_jsonl_rows_are_skipped_alone(tmp_path: Path) -> None:
    manifest = _bad_rows_manifest(tmp_path)
    records = list(read_source(manifest))
    reasons = {p.item.rsplit(":", 1)[1]: p.reason for p in records if isinstance(p, Problem)}
    assert set(reasons) == {"2", "3", "4", "5", "6"}, reasons
    assert "nested" in reasons["2"]
    assert "NUL" in reasons["3"]
    assert "surrogate" in reasons["4"] and "surrogate" in reasons["5"]
    assert "digits" in reasons["6"] or "invalid" in reasons["6"]
    good = {r.path.name: r.captions for r in records if isinstance(r, ImageRecord)}
    assert good == {"good1.jpg": ("a good caption",), "good2.jpg": ("another good caption",)}
    assert [r.text for r in records if isinstance(r, TextRecord)] == ["a good passage"]


def _coco_with_bad_ids(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(("1.jpg", "2.jpg", "3.jpg", "4.jpg")):
        (root / name).write_bytes(jpeg_bytes(color=(40 * n, 30, 200)))
    coco = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": [2], "file_name": "2.jpg"},
                       {"id": {"a": 1}, "file_name": "3.jpg"}, {"id": "four", "file_name": "4.jpg"},
                       {"id": 5, "file_name": "bad\ud800.jpg"}],
            "annotations": [{"image_id": 1, "caption": "one"}, {"image_id": [2], "caption": "two"},
                            {"image_id": "four", "caption": "four"}, {"image_id": 1, "caption": "bad \udfff"}]}
    path = root / "coco.json"
    path.write_text(json.dumps(coco), encoding="utf-8")  # ensure_ascii: surrogates as \\u escapes
    return path


def test_coco_entries_with_bad_ids_are_skipped_alone(tmp_path: Path) -> None:
    records = list(read_source(_coco_with_bad_ids(tmp_path)))
    good = {r.path.name: (r.captions, r.extra) for r in records if isinstance(r, ImageRecord)}
    assert good == {"1.jpg": (("one",), {"coco_id": 1}), "4.jpg": (("four",), {"coco_id": "four"})}
    reasons = {p.item.rsplit(":", 1)[1]: p.reason for p in records if isinstance(p, Problem)}
    assert "id" in reasons["images[1]"] and "list" in reasons["images[1]"]
    assert "id" in reasons["images[2]"]
    assert "surrogate" in reasons["images[4]"]
    assert "image_id" in reasons["annotations[1]"] and "surrogate" in reasons["annotations[3]"]


def test_ingest_goes_on_past_bad_rows(tmp_path: Path, tiny_oc_spec: str) -> None:
    """Each bad row is reported with its line and reason; the good rows are all committed."""
    from crossmodal_rag import Collection

    manifest = _bad_rows_manifest(tmp_path / "m")
    coco = _coco_with_bad_ids(tmp_path / "c")
    with Collection.create(tmp_path / "coll", tiny_oc_spec) as coll:
        report = coll.add(manifest)
        items = {Path(p.item).name for p in report.skipped}
        assert items == {f"m.jsonl:{n}" for n in (2, 3, 4, 5, 6)}, report.skipped
        assert (report.images_added, report.captions_added, report.passages_added) == (2, 2, 1)
        report = coll.add(coco)
        assert report.images_added == 2 and report.captions_added == 2
        assert {Path(p.item).name for p in report.skipped} == {
            "coco.json:images[1]", "coco.json:images[2]", "coco.json:images[4]",
            "coco.json:annotations[1]", "coco.json:annotations[3]"}
        texts = {h.text for h in coll.search("x", k=50, target="texts", mode="dense")}
        assert texts == {"a good caption", "another good caption", "a good passage", "one", "four"}
        assert coll.check().ok


def test_unknown_user_home_in_a_path_is_a_row_problem(tmp_path: Path) -> None:
    _img(tmp_path / "a.jpg")
    (tmp_path / "m.csv").write_text("image,caption\n~no_such_user_xyz/a.jpg,x\na.jpg,ok\n")
    records = list(read_source(tmp_path / "m.csv"))
    assert [r.captions for r in records if isinstance(r, ImageRecord)] == [("ok",)]
    [problem] = [r for r in records if isinstance(r, Problem)]
    assert problem.item.endswith("m.csv:2") and "unknown user" in problem.reason
