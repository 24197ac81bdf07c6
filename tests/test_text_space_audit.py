"""``info`` and ``check`` report a collection's text space: its spec/dim/count and whether it is
in step with the metadata; damage written by hand (a removed row, a NaN, a non-unit row, a
changed probe, a model that does not load) is reported by ``check`` with exit code 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sentence_models import make_tiny_sentence_model

from crossmodal_rag import Collection
from crossmodal_rag.cli import main
from crossmodal_rag.search.text_space import array_files, open_text_space, sync_text_space

PASSAGES = ["the red bridge crosses the river", "a cargo ship carried salt", "the festival is held in may",
            "comet seen every ten years"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str, sample_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("audit")
    photos = root / "photos"
    photos.mkdir()
    for name in ("cat", "coffee", "pagoda"):
        (photos / f"{name}.jpg").write_bytes((sample_dir / f"{name}.jpg").read_bytes())
        (photos / f"{name}.txt").write_text((sample_dir / f"{name}.txt").read_text())
    corpus = root / "p.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES))
    st = make_tiny_sentence_model(root / "st", seed=4)
    with Collection.create(root / "coll", tiny_oc_spec) as coll:
        coll.add(photos)
        coll.add(corpus)
        sync_text_space(coll, str(st))
    return root / "coll", st


@pytest.fixture
def coll_dir(built: tuple[Path, Path], tmp_path: Path) -> Path:
    shutil.copytree(built[0], tmp_path / "coll")
    return tmp_path / "coll"


def _check(folder: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main(["check", str(folder), "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_info_shows_the_text_space(coll_dir: Path, built: tuple[Path, Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    with Collection.open(coll_dir) as coll:
        live = coll.store.ids("text")
        space = open_text_space(coll)
        info = coll.info()["text_space"]
    assert info == {"spec": space.spec, "dim": space.vectors.shape[1], "count": len(live), "in_step": True,
                    "missing": 0, "extra": 0}
    assert main(["info", str(coll_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text_space"] == info
    assert main(["info", str(coll_dir)]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("text space:")]
    assert line == [f"text space:     {space.spec} ({info['dim']}-d, {len(live)} vectors, in step with the metadata)"]
    # out of step: drop one row by hand (ids and vectors stay consistent with the manifest)
    _rewrite(coll_dir, keep=slice(1, None))
    assert main(["info", str(coll_dir), "--json"]) == 0
    ts = json.loads(capsys.readouterr().out)["text_space"]
    assert (ts["in_step"], ts["missing"], ts["extra"], ts["count"]) == (False, 1, 0, len(live) - 1)


def _rewrite(folder: Path, keep: slice = slice(None), vectors: np.ndarray | None = None) -> None:
    space = folder / "text_space"
    manifest = json.loads((space / "manifest.json").read_text())
    ids_file, vectors_file = array_files(space, manifest)
    ids = np.load(ids_file)[keep]
    vecs = np.load(vectors_file)[keep] if vectors is None else vectors
    np.save(ids_file, ids)
    np.save(vectors_file, vecs.astype(np.float32))
    manifest["count"] = len(ids)
    (space / "manifest.json").write_text(json.dumps(manifest))


def _files(folder: Path) -> tuple[Path, Path]:
    space = folder / "text_space"
    return array_files(space, json.loads((space / "manifest.json").read_text()))


def test_check_passes_a_good_text_space(coll_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = _check(coll_dir, capsys)
    assert code == 0 and report["ok"], report["problems"]
    assert any("reproduces the stored probe" in n for n in report["notes"])


def test_check_reports_an_out_of_step_space(coll_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with Collection.open(coll_dir) as coll:
        first = int(coll.store.ids("text")[0])
    _rewrite(coll_dir, keep=slice(1, None))
    code, report = _check(coll_dir, capsys)
    assert code == 1 and not report["ok"]
    assert [p for p in report["problems"] if "out of step" in p and f"e.g. {first}" in p], report["problems"]


def test_check_reports_bad_vectors(coll_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids_file, vectors_file = _files(coll_dir)
    vecs = np.load(vectors_file).copy()
    ids = np.load(ids_file)
    vecs[0, 0] = np.nan
    vecs[1] *= 1.5
    _rewrite(coll_dir, vectors=vecs)
    code, report = _check(coll_dir, capsys)
    assert code == 1
    assert any("NaN" in p and f"e.g. {ids[0]}" in p for p in report["problems"]), report["problems"]
    assert any("unit norm" in p and f"e.g. {ids[1]}" in p for p in report["problems"]), report["problems"]


def test_check_reports_a_changed_probe_and_an_unloadable_model(coll_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = coll_dir / "text_space" / "manifest.json"
    manifest = json.loads(path.read_text())
    good = dict(manifest)
    manifest["probe"] = (-np.asarray(manifest["probe"])).tolist()
    path.write_text(json.dumps(manifest))
    code, report = _check(coll_dir, capsys)
    assert code == 1 and any("does not reproduce the stored probe" in p for p in report["problems"])
    # a model folder that is gone: not verified, said so, not a failure by itself
    gone = make_tiny_sentence_model(tmp_path / "gone", seed=4)
    path.write_text(json.dumps({**good, "spec": str(gone)}))
    shutil.rmtree(gone)
    code, report = _check(coll_dir, capsys)
    assert any("probe was not verified" in n for n in report["notes"]), report
    assert (code, report["problems"]) == (0, [])


def test_check_reports_damaged_files(coll_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _files(coll_dir)[0].write_bytes(b"not numpy")
    code, report = _check(coll_dir, capsys)
    assert code == 1 and any("text space: damaged" in p for p in report["problems"])


def test_info_and_check_read_the_text_space_in_their_metadata_snapshot(coll_dir: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer commits (here: a caption deleted through another connection) just as the text
    space is read: `info` and `check` still describe one generation of the metadata, so the text
    space is in step with the counts they print, not with a commit they did not count."""
    import sqlite3

    from crossmodal_rag.search import text_space_audit

    real = text_space_audit._read
    with Collection.open(coll_dir) as coll:
        victims = [int(i) for i in coll.store.ids("text")[:2]]
        first, texts = victims[0], len(coll.store.ids("text"))
        captions = coll.counts()["captions"]

    def commit_meanwhile(folder: Path) -> object:
        if victims:
            with sqlite3.connect(coll_dir / "metadata.sqlite") as db:
                db.execute("DELETE FROM items WHERE id = ?", (victims.pop(0),))
        return real(folder)

    monkeypatch.setattr(text_space_audit, "_read", commit_meanwhile)
    with Collection.open(coll_dir) as coll:
        info = coll.info()
        assert info["counts"]["captions"] == captions
        assert info["text_space"]["in_step"], info["text_space"]
        report = coll.check()  # sees the first commit (made before it began), not the second
        assert report.counts["captions"] == captions - 1
        steps = [p for p in report.problems if "out of step" in p]
        assert len(steps) == 1 and f"({texts - 1} text items)" in steps[0], report.problems
        assert f"1 row(s) of items no longer there (e.g. {first})" in steps[0]
    assert not victims  # both commits happened while the text space was being read
