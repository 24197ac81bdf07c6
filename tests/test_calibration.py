"""Score calibration follows the vectors: every path that changes them leaves a current
calibration, and a stale one is never used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.errors import QueryError
from crossmodal_rag.search.calibration import (
    auto_threshold,
    calibrate,
    current_calibration,
    load_calibration,
    write_calibration,
)
from crossmodal_rag.store.metadata import MetadataStore
from tests.e2e.test_cli import run

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
        hits = c.search("a cat", k=10, min_score="auto", mode="dense")
        assert all(h.score >= fresh["text-image"]["threshold"] for h in hits)


# -- on a metadata store with hand-made vectors ------------------------------------------------
DIM = 32


def _unit(axis: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[axis] = 1.0
    return v


def _captioned_store(folder: Path, angles: list[list[float]]) -> MetadataStore:
    """Image i is axis i; its caption j is cos(a) * (axis i) + sin(a) * (an axis of its own), so
    a caption scores cos(a) with its image, cos(a) cos(b) with a sibling, 0 with anything else."""
    folder.mkdir()
    store = MetadataStore(folder)
    free = len(angles)
    with store.transaction():
        for i, caption_angles in enumerate(angles):
            image = store.insert_item("image", _unit(i), sha256=f"{i:064x}")
            for a in caption_angles:
                vec = np.cos(a) * _unit(i) + np.sin(a) * _unit(free)
                free += 1
                store.insert_item("caption", vec.astype(np.float32), parent_id=image, text=f"caption {free}")
    return store


def test_thresholds_by_hand_on_orthogonal_vectors(tmp_path: Path) -> None:
    """Matching pairs score cos(angle); every random pair scores 0. So the best threshold is the
    weakest matching score (TPR 1, FPR 0), and the means are those of the two sets."""
    rng = np.random.default_rng(3)
    angles = [list(rng.uniform(0.2, 1.2, 3)) for _ in range(6)]  # 6 images, 3 captions each
    store = _captioned_store(tmp_path / "s", angles)
    try:
        calib = calibrate(store, DIM)
        pos = [np.cos(a) for caps in angles for a in caps]
        ti = calib["text-image"]
        assert ti["positives"] == 18 and ti["negatives"] == 18
        assert ti["threshold"] == pytest.approx(min(pos), abs=1e-6)
        assert (ti["tpr"], ti["fpr"]) == (1.0, 0.0)
        assert ti["positive_mean"] == pytest.approx(np.mean(pos), abs=1e-6)
        assert ti["negative_mean"] == pytest.approx(0.0, abs=1e-6)
        # siblings: consecutive captions of one image, cos(a) cos(b)
        sib = [np.cos(caps[j]) * np.cos(caps[j + 1]) for caps in angles for j in range(2)]
        tt = calib["text-text"]
        assert tt["positives"] == 12
        assert tt["threshold"] == pytest.approx(min(sib), abs=1e-6)
        assert tt["positive_mean"] == pytest.approx(np.mean(sib), abs=1e-6)
        assert tt["negative_mean"] == pytest.approx(0.0, abs=1e-6)
        assert calib["generation"] == store.generation
    finally:
        store.close()


def test_too_few_pairs_give_no_direction(tmp_path: Path) -> None:
    """Under 5 matching pairs a direction is left out, and ``auto`` names what is missing."""
    store = _captioned_store(tmp_path / "s", [[0.3, 0.5], [0.4, 0.6]])  # 4 captions, 2 sibling pairs
    try:
        assert set(calibrate(store, DIM)) == {"generation"}
        with pytest.raises(QueryError, match=r"no calibration for text -> images"):
            auto_threshold(store, DIM, query_is_image=False, target="images")
    finally:
        store.close()
    store = _captioned_store(tmp_path / "t", [[0.3, 0.5, 0.7], [0.4, 0.6]])  # 5 captions, 3 pairs
    try:
        assert set(calibrate(store, DIM)) == {"generation", "text-image"}
    finally:
        store.close()


def test_stored_calibration_is_current_until_the_next_commit(tmp_path: Path) -> None:
    """``write_calibration`` stores the generation of its own commit; any later commit makes it
    stale, and ``current_calibration`` then computes one from the vectors as they are."""
    angles = [[0.3, 0.5, 0.7], [0.4, 0.6, 0.8]]
    store = _captioned_store(tmp_path / "s", angles)
    try:
        stored = write_calibration(store, DIM)
        assert stored["generation"] == store.generation
        assert current_calibration(store, DIM) == stored == load_calibration(store)
        weakest = store.ids("text")[int(np.argmax([a for caps in angles for a in caps]))]
        with store.transaction():
            store.delete_items([int(weakest)])  # the caption with the largest angle (lowest score)
        fresh = current_calibration(store, DIM)
        assert fresh["generation"] == store.generation != stored["generation"]
        remaining = sorted(np.cos(a) for caps in angles for a in caps)[1:]
        assert fresh["text-image"]["threshold"] == pytest.approx(remaining[0], abs=1e-6)
        assert load_calibration(store) == stored  # computed on use, never written
    finally:
        store.close()
