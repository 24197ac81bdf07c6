"""Score calibration follows the vectors: every path that changes them leaves a current
calibration, and a stale one is never used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossmodal_rag import Collection
from crossmodal_rag.calibration import calibrate, load_calibration
from crossmodal_rag.errors import QueryError
from tests.test_cli import run

DIRECTIONS = ((False, "images", "text-image"), (False, "texts", "text-text"))


def _thresholds(c: Collection) -> dict[str, float | None]:
    """The threshold ``--min-score auto`` uses per direction (None: it refuses, uncalibrated)."""
    out: dict[str, float | None] = {}
    for query_is_image, target, key in DIRECTIONS:
        try:
            out[key] = c.resolve_min_score("auto", query_is_image=query_is_image, target=target)
        except QueryError:
            out[key] = None
    return out


def _of(calibration: dict) -> dict[str, float | None]:
    return {key: calibration[key]["threshold"] if key in calibration else None for _, _, key in DIRECTIONS}


def test_reembed_recalibrates_with_the_new_encoder(photos: Path, tmp_path: Path, tiny_oc_spec: str,
                                                   tiny_hf_dir: Path) -> None:
    from crossmodal_rag.training.clip import reembed_collection

    new_model = f"hf:{tiny_hf_dir}"
    with Collection.create(tmp_path / "c", tiny_oc_spec) as c:
        c.add(photos)
        old = _thresholds(c)
    # the oracle: the same photos indexed from scratch with the new encoder
    with Collection.create(tmp_path / "fresh", new_model) as fresh:
        fresh.add(photos)
        expected = _thresholds(fresh)
    assert expected != pytest.approx(old, abs=1e-4)  # the encoders disagree, so the test can fail
    reembed_collection(tmp_path / "c", new_model, progress=False)
    with Collection.open(tmp_path / "c") as c:
        assert _thresholds(c) == pytest.approx(expected, abs=1e-5)
        assert load_calibration(c.store) == calibrate(c.store, c.manifest.dim)  # stored by reembed, current


def test_remove_leaves_a_current_calibration(photos: Path, tmp_path: Path, tiny_oc_spec: str) -> None:
    folder = tmp_path / "c"
    with Collection.create(folder, tiny_oc_spec) as c:
        c.add(photos)
        before = load_calibration(c.store)
        paths = [str(p) for p in sorted(photos.glob("*.jpg"))[:2]]
    r = run("remove", "-c", str(folder), "--path", paths[0], "--path", paths[1], "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["removed"]) == 8  # two photos and their six captions
    with Collection.open(folder) as c:
        fresh = calibrate(c.store, c.manifest.dim)
        assert fresh["text-image"]["positives"] == 9  # 3 photos left with 3 captions each
        assert fresh != before
        assert load_calibration(c.store) == fresh  # stored by remove, not the pre-removal one
        assert _thresholds(c) == _of(fresh)


def test_a_stale_calibration_is_never_used(photos: Path, tmp_path: Path, tiny_oc_spec: str) -> None:
    """Vectors committed without a calibration refresh (as a kill between the two leaves them):
    a read-only search computes the threshold from the vectors as they are, and writes nothing."""
    folder = tmp_path / "c"
    with Collection.create(folder, tiny_oc_spec) as c:
        c.add(photos)
        stored = load_calibration(c.store)
        images = c.store.ids("image")
        with c.store.transaction():
            c.store.delete_items([int(images[0])])
    with Collection.open(folder) as c:
        fresh = calibrate(c.store, c.manifest.dim)
        assert _of(fresh) != _of(stored)
        assert _thresholds(c) == _of(fresh)
        assert load_calibration(c.store) == stored  # a search does not write
        hits = c.search("a cat", k=10, min_score="auto")
        assert all(h.score >= fresh["text-image"]["threshold"] for h in hits)
