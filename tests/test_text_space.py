"""A collection's text space (sentence-encoder index of its text items): built, searched against
brute force, kept in sync with adds and removes, swapped, refused when the model changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sentence_models import make_tiny_sentence_model

from crossmodal_rag import Collection
from crossmodal_rag.encoders import sentence
from crossmodal_rag.encoders.sentence import SentenceEncoder
from crossmodal_rag.errors import CollectionError, EncoderMismatchError
from crossmodal_rag.text_space import open_text_space, sync_text_space

PASSAGES = ["the red bridge crosses the river", "a cargo ship carried salt", "the festival is held in may",
            "comet seen every ten years", "the library holds many books"]


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sentence_model(tmp_path_factory.mktemp("st") / "m", seed=3)


@pytest.fixture
def coll_dir(tmp_path: Path, tiny_oc_spec: str, photos: Path) -> Path:
    corpus = tmp_path / "passages.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES))
    with Collection.create(tmp_path / "coll", tiny_oc_spec) as coll:
        coll.add(photos)
        coll.add(corpus)
    return tmp_path / "coll"


def test_build_search_matches_brute_force(coll_dir: Path, tiny_st: Path) -> None:
    with Collection.open(coll_dir, writable=True) as coll:
        report = sync_text_space(coll, str(tiny_st))
        want = coll.store.ids("text")
        assert report.rebuilt and report.added == len(want) and report.removed == 0
        space = open_text_space(coll)
        assert space is not None and np.array_equal(space.ids, want)
        # oracle: the model on the stored texts, cosine, best first
        enc = SentenceEncoder(str(tiny_st), device="cpu")
        items = coll.store.get_items(want.tolist())
        texts = [items[i].text for i in want.tolist()]
        truth = enc.encode_texts(texts) @ enc.encode_texts("a ship with salt")[0]
        hits = space.search(coll, "a ship with salt", k=4)
        assert [h.id for h in hits] == [int(want[j]) for j in np.argsort(-truth)[:4]]
        np.testing.assert_allclose([h.score for h in hits], np.sort(truth)[::-1][:4], atol=1e-5)


def test_sync_adds_and_drops_rows_and_keeps_the_rest(coll_dir: Path, tiny_st: Path, tmp_path: Path) -> None:
    with Collection.open(coll_dir, writable=True) as coll:
        sync_text_space(coll, str(tiny_st))
        before = open_text_space(coll)
        assert sync_text_space(coll).added == 0  # up to date: nothing to do
        extra = tmp_path / "more.jsonl"
        extra.write_text(json.dumps({"text": "a brand new passage about owls"}) + "\n")
        coll.add(extra)
        gone = int(before.ids[0])
        coll.remove(ids=[gone])
        report = sync_text_space(coll)
        assert (report.added, report.removed, report.rebuilt) == (1, 1, False)
        after = open_text_space(coll)
        assert np.array_equal(after.ids, coll.store.ids("text"))
        kept = np.isin(before.ids, after.ids)
        np.testing.assert_array_equal(after.vectors[np.isin(after.ids, before.ids)], before.vectors[kept])


def test_none_removes_and_a_new_spec_rebuilds(coll_dir: Path, tiny_st: Path, tmp_path: Path) -> None:
    other = make_tiny_sentence_model(tmp_path / "other", seed=9, hidden=16)
    with Collection.open(coll_dir, writable=True) as coll:
        sync_text_space(coll, str(tiny_st))
        report = sync_text_space(coll, str(other))
        assert report.rebuilt and open_text_space(coll).dim == 16
        assert sync_text_space(coll, "none").spec is None
        assert open_text_space(coll) is None and not (coll_dir / "text_space").exists()


def test_changed_model_is_refused(coll_dir: Path, tiny_st: Path, tmp_path: Path) -> None:
    moved = tmp_path / "model"
    shutil.copytree(tiny_st, moved)
    with Collection.open(coll_dir, writable=True) as coll:
        sync_text_space(coll, str(moved))
    shutil.rmtree(moved)
    make_tiny_sentence_model(moved, seed=4)  # same path, other weights
    sentence._CACHE.clear()  # as a new process would: load what the folder holds now
    with Collection.open(coll_dir) as coll:
        space = open_text_space(coll)
        with pytest.raises(EncoderMismatchError, match="reembed"):
            space.search(coll, "ship", k=2)


def test_damaged_files_are_collection_errors(coll_dir: Path, tiny_st: Path) -> None:
    with Collection.open(coll_dir, writable=True) as coll:
        sync_text_space(coll, str(tiny_st))
    np.save(coll_dir / "text_space" / "ids.npy", np.arange(3, dtype=np.int64))
    with Collection.open(coll_dir) as coll, pytest.raises(CollectionError, match="text space is damaged"):
        open_text_space(coll)
