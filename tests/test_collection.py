from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection, EncoderMismatchError, IngestSettings, QueryError
from crossmodal_rag.errors import CollectionError, CollectionLockedError
from crossmodal_rag.search import TargetEmptyError
from crossmodal_rag.testing import make_tiny_open_clip
from tests.badimages import jpeg_bytes, write_bad_images, write_odd_images


def _brute_force(coll: Collection, query: np.ndarray, index: str, k: int) -> list[tuple[int, float]]:
    ids = coll.store.ids(index)
    vecs = coll.store.vectors(ids.tolist(), coll.manifest.dim)
    scores = vecs @ query
    order = np.argsort(-scores, kind="stable")[:k]
    return [(int(ids[j]), float(scores[j])) for j in order]


def test_text_and_image_search_match_brute_force(sample_collection: Path) -> None:
    with Collection.open(sample_collection) as coll:
        q = coll.embed_query("a cat looking at the camera")
        hits = coll.search("a cat looking at the camera", k=5, mode="dense")
        assert [h.rank for h in hits] == [1, 2, 3, 4, 5]
        expected = _brute_force(coll, q, "image", 5)
        assert [h.id for h in hits] == [i for i, _ in expected]
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], atol=1e-5)
        assert all(h.kind == "image" and h.path and h.captions for h in hits)

        cat = str(Path(hits[0].path))
        same = coll.search(image=cat, k=3, mode="dense")
        assert same[0].path == cat and same[0].score == pytest.approx(1.0, abs=1e-4)

        texts = coll.search(image=cat, k=4, target="texts", mode="dense")
        qi = coll.embed_query(image=cat)
        assert [h.id for h in texts] == [i for i, _ in _brute_force(coll, qi, "text", 4)]
        assert all(h.kind == "caption" and h.text and h.parent_id for h in texts)
        assert texts[0].path == coll.get(texts[0].parent_id)[0].path

        mixed = coll.search("a cup of coffee", k=8, target="all", mode="dense")
        assert {h.kind for h in mixed} <= {"image", "caption"}
        assert [h.score for h in mixed] == sorted((h.score for h in mixed), reverse=True)
        everything = coll.search("x", k=1000, target="all", mode="dense")
        assert len(everything) == sum(coll.counts().values())


def test_bad_queries_are_query_errors(sample_collection: Path, tmp_path: Path) -> None:
    with Collection.open(sample_collection) as coll:
        for bad in ("", "   \n\t"):
            with pytest.raises(QueryError, match="empty query"):
                coll.search(bad, mode="dense")
        with pytest.raises(QueryError, match="empty query"):
            coll.search(None, mode="dense")
        with pytest.raises(QueryError, match="no such file"):
            coll.search(image=tmp_path / "missing.jpg", mode="dense")
        (tmp_path / "junk.jpg").write_text("junk")
        with pytest.raises(QueryError, match="junk.jpg"):
            coll.search(image=tmp_path / "junk.jpg", mode="dense")
        with pytest.raises(QueryError, match="positive integer"):
            coll.search("cat", k=0, mode="dense")
        with pytest.raises(QueryError, match="target"):
            coll.search("cat", target="videos", mode="dense")


def test_reindexing_is_incremental_and_idempotent(photos: Path, tmp_path: Path, tiny_oc_spec: str) -> None:
    folder = tmp_path / "c"
    with Collection.create(folder, tiny_oc_spec) as coll:
        first = coll.add(photos)
        assert (first.images_added, first.captions_added) == (5, 15)
        again = coll.add(photos)
        assert (again.images_added, again.captions_added, again.unchanged) == (0, 0, 5)

        # a byte-identical copy is stored once, under both paths
        shutil.copy(photos / "cat.jpg", photos / "cat-copy.jpg")
        dup = coll.add(photos)
        assert (dup.images_added, dup.duplicates) == (0, 1)
        assert coll.counts()["images"] == 5

        # an edited caption file: new captions added, dropped ones removed
        (photos / "coffee.txt").write_text("a mug of black coffee\n")
        edited = coll.add(photos)
        assert (edited.captions_added, edited.captions_removed) == (1, 3)
        coffee = next(h for h in coll.search("coffee", k=5, mode="dense") if h.path.endswith("coffee.jpg"))
        assert coffee.captions == ("a mug of black coffee",)

        # a changed image at the same path replaces the old item
        old_ids = {h.path: h.id for h in coll.search("x", k=10, mode="dense")}
        (photos / "dahlia.jpg").write_bytes(jpeg_bytes((80, 60), (10, 200, 10)))
        changed = coll.add(photos)
        assert (changed.images_added, changed.replaced) == (1, 1)
        new_ids = {h.path: h.id for h in coll.search("x", k=10, mode="dense")}
        assert new_ids[str(photos / "dahlia.jpg")] != old_ids[str(photos / "dahlia.jpg")]
        assert coll.get(old_ids[str(photos / "dahlia.jpg")]) == []
        assert coll.check().ok


def test_remove_by_id_and_by_path(photos: Path, tmp_path: Path, tiny_oc_spec: str) -> None:
    shutil.copy(photos / "cat.jpg", photos / "cat-copy.jpg")
    with Collection.create(tmp_path / "c", tiny_oc_spec) as coll:
        coll.add(photos)
        cat_id = coll.store.path_entry(str(photos / "cat.jpg"))[0]
        # removing one of two copies only forgets that path
        result = coll.remove(paths=[str(photos / "cat-copy.jpg")])
        assert result == {"removed": [], "unknown": [], "forgotten": [
            {"path": str(photos / "cat-copy.jpg"), "item": cat_id, "kept_by": [str(photos / "cat.jpg")]}]}
        assert coll.get(cat_id)[0].path == str(photos / "cat.jpg")
        n_caps = len(coll.get(cat_id)[0].captions)
        result = coll.remove(ids=[cat_id, 99999])
        assert len(result["removed"]) == 1 + n_caps and result["unknown"] == [99999]
        assert cat_id not in {h.id for h in coll.search("x", k=100, target="all", mode="dense")}
        assert all(h.parent_id != cat_id for h in coll.search("x", k=100, target="texts", mode="dense"))
        assert coll.check().ok
    with Collection.open(tmp_path / "c") as coll:
        assert coll.counts()["images"] == 4 and coll.check().ok


def test_bad_items_are_skipped_and_the_rest_indexed(tmp_path: Path, tiny_oc_spec: str) -> None:
    src = tmp_path / "src"
    expected = write_bad_images(src)
    write_odd_images(src)
    with Collection.create(tmp_path / "c", tiny_oc_spec) as coll:
        report = coll.add(src, max_image_pixels=10_000_000)
        reasons = {Path(p.item).name: p.reason for p in report.skipped}
        assert set(reasons) == set(expected) - {"folder.jpg"}  # a folder named x.jpg is not a file
        for name, fragment in expected.items():
            if name in reasons:
                assert fragment in reasons[name], (name, reasons[name])
        assert report.images_added == 10  # the 10 odd-but-valid images
        assert coll.check().ok


def test_passage_corpus_is_searchable_text(tmp_path: Path, tiny_oc_spec: str) -> None:
    corpus = tmp_path / "passages.jsonl"
    rows = [{"id": f"p{i}", "title": f"T{i}", "text": f"passage number {i} about topic {i % 3}"} for i in range(20)]
    corpus.write_text("\n".join(json.dumps(r) for r in rows + rows[:3]) + "\n")
    with Collection.create(tmp_path / "c", tiny_oc_spec) as coll:
        report = coll.add(corpus)
        assert (report.passages_added, report.duplicates) == (20, 3)
        q = coll.encoder.encode_texts(["T5. passage number 5 about topic 2"])[0]
        hits = coll.search_vectors(q[None], k=3, target="texts")[0]
        assert hits[0].kind == "passage" and hits[0].text == rows[5]["text"] and hits[0].score == pytest.approx(1, abs=1e-4)
        assert coll.get(hits[0].id)[0].ext_id == "p5"
        with pytest.raises(TargetEmptyError, match="holds no images to search, only texts"):
            coll.search("topic", k=5, mode="dense")  # no images in this collection: said, not an empty list


def test_other_encoder_is_refused(collection_copy: Path, tiny_hf_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(EncoderMismatchError, match="was built with"):
        Collection.open(collection_copy, model=f"hf:{tiny_hf_dir}")
    other = make_tiny_open_clip(tmp_path / "other", seed=1)  # same shape, other weights
    with pytest.raises(EncoderMismatchError, match="different embeddings"):
        Collection.open(collection_copy, model=f"open_clip:local-dir:{other}")
    # Weights replaced in place under the same spec are caught on first use.
    with Collection.open(collection_copy) as coll:
        spec_dir = Path(coll.manifest.encoder.split("local-dir:", 1)[1])
    backup = tmp_path / "backup"
    shutil.copytree(spec_dir, backup)
    try:
        shutil.copy(other / "open_clip_model.safetensors", spec_dir / "open_clip_model.safetensors")
        from crossmodal_rag.encoders import _CACHE

        _CACHE.clear()
        with Collection.open(collection_copy) as coll, pytest.raises(EncoderMismatchError):
            coll.search("a cat", mode="dense")
    finally:
        shutil.copy(backup / "open_clip_model.safetensors", spec_dir / "open_clip_model.safetensors")
        _CACHE.clear()


def test_one_writer_at_a_time(collection_copy: Path) -> None:
    writer = Collection.open(collection_copy, writable=True)
    try:
        with pytest.raises(CollectionLockedError, match="another process"):
            Collection.open(collection_copy, writable=True)
        with Collection.open(collection_copy) as reader:  # readers are never blocked
            assert reader.counts()["images"] == 15
    finally:
        writer.close()
    Collection.open(collection_copy, writable=True).close()


def test_commits_newer_than_the_index_are_replayed(collection_copy: Path) -> None:
    with Collection.open(collection_copy, writable=True) as coll:
        image_ids = coll.store.ids("image")
        vec = coll.store.vectors([int(image_ids[0])], coll.manifest.dim)[0]
        # commit metadata changes without writing the index (as a kill would leave it)
        with coll.store.transaction():
            new_id = coll.store.insert_item("passage", vec, text="late passage", sha256="x")
            coll.store.delete_items([int(image_ids[1])])
    with Collection.open(collection_copy) as reader:
        report = reader.check()
        assert report.ok and report.notes  # consistent after replay, with a note that it replayed
        assert new_id in reader.indexes["text"].ids()
        assert int(image_ids[1]) not in reader.indexes["image"].ids()
        assert reader.info()["pending_generations"] == 1
    with Collection.open(collection_copy, writable=True) as writer:
        assert writer.info()["pending_generations"] == 0  # a writer persists the replay


def test_corrupt_index_file_is_rebuilt_from_metadata(collection_copy: Path) -> None:
    manifest = json.loads((collection_copy / "manifest.json").read_text())
    (collection_copy / manifest["files"]["image"]["path"]).write_bytes(b"garbage")
    with Collection.open(collection_copy) as coll:
        report = coll.check()
        assert not report.ok and any("image" in p and "bytes" in p for p in report.problems)
        assert len(coll.indexes["image"]) == 15  # rebuilt in memory, searches still work
    with Collection.open(collection_copy, writable=True) as coll:
        coll.persist()
        assert coll.check().ok


def test_manifest_is_validated(collection_copy: Path, tmp_path: Path) -> None:
    path = collection_copy / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(CollectionError, match="newer"):
        Collection.open(collection_copy)
    path.write_text(json.dumps({**data, "surprise": 1}))
    with pytest.raises(CollectionError, match="unknown keys"):
        Collection.open(collection_copy)
    path.write_text("{ not json")
    with pytest.raises(CollectionError, match="manifest.json"):
        Collection.open(collection_copy)
    with pytest.raises(CollectionError, match="not a crossmodal-rag collection"):
        Collection.open(tmp_path)
    with pytest.raises(CollectionError, match="does not exist"):
        Collection.open(tmp_path / "nope")


def test_create_refuses_non_empty_folders(tmp_path: Path, tiny_oc_spec: str) -> None:
    (tmp_path / "stuff.txt").write_text("x")
    with pytest.raises(CollectionError, match="not an empty folder"):
        Collection.create(tmp_path, tiny_oc_spec)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        IngestSettings(batch_size=0)
    with pytest.raises(TypeError):
        IngestSettings(bogus=1)  # type: ignore[call-arg]


def test_near_duplicates_match_pairwise_brute_force(tmp_path: Path, tiny_oc_spec: str) -> None:
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(4)]
    for i, arr in enumerate(base):
        Image.fromarray(arr).save(src / f"b{i}.png")
        Image.fromarray(arr).resize((41, 40)).save(src / f"b{i}-resized.png")  # near, not byte-identical
    with Collection.create(tmp_path / "c", tiny_oc_spec) as coll:
        coll.add(src)
        ids = coll.store.ids("image")
        vecs = coll.store.vectors(ids.tolist(), coll.manifest.dim)
        for threshold in (0.999, 0.99, 0.9):
            sims = vecs @ vecs.T
            parent = list(range(len(ids)))

            def find(x: int, parent: list[int] = parent) -> int:
                while parent[x] != x:
                    x = parent[x]
                return x

            for a in range(len(ids)):
                for b in range(a + 1, len(ids)):
                    if sims[a, b] >= threshold:
                        parent[find(b)] = find(a)
            groups: dict[int, list[int]] = {}
            for a in range(len(ids)):
                groups.setdefault(find(a), []).append(int(ids[a]))
            expected = sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
            assert coll.near_duplicates(threshold) == expected
        with pytest.raises(QueryError):
            coll.near_duplicates(1.5)


def test_calibration_threshold_by_hand() -> None:
    from crossmodal_rag.search.calibration import _threshold

    pos = np.array([0.30, 0.32, 0.35, 0.28])
    neg = np.array([0.10, 0.12, 0.29, 0.05])
    t = _threshold(pos, neg)
    # at 0.30: TPR 3/4, FPR 0 -> J 0.75; at 0.28: TPR 1, FPR 1/4 -> J 0.75 (first maximum wins)
    assert t["threshold"] == pytest.approx(0.28) and t["tpr"] == 1.0 and t["fpr"] == 0.25


def test_calibration_is_stored_and_refreshed(photos: Path, tmp_path: Path, tiny_oc_spec: str) -> None:
    from crossmodal_rag.search.calibration import load_calibration

    with Collection.create(tmp_path / "c", tiny_oc_spec) as coll:
        coll.add(photos)
        first = load_calibration(coll.store)
        assert {"text-image", "text-text"} <= set(first)
        t = coll.resolve_min_score("auto", query_is_image=False, target="images")
        assert t == first["text-image"]["threshold"]
        assert all(h.score >= t for h in coll.search("a cat", k=5, min_score="auto", mode="dense"))
        (photos / "extra.txt").write_text("x")
        shutil.copy(photos / "cat.jpg", photos / "extra.jpg")
        (photos / "extra.txt").write_text("another caption\nand one more\n")
        coll.add(photos)
        assert load_calibration(coll.store)["generation"] > first["generation"]
        with pytest.raises(QueryError, match="no calibration"):
            coll.search(image=photos / "cat.jpg", min_score="auto", mode="dense")


def test_ask_abstains_below_the_threshold_and_knowledge_collection(sample_collection: Path, tmp_path: Path,
                                                                  tiny_oc_spec: str, tiny_hf_dir: Path) -> None:
    from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings
    from crossmodal_rag.testing import make_tiny_t5

    t5 = str(make_tiny_t5(tmp_path / "t5"))
    corpus = tmp_path / "kb.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": f"fact number {i}"}) for i in range(6)))
    with Collection.create(tmp_path / "kb", tiny_oc_spec) as kb:
        kb.add(corpus)
    with Collection.open(sample_collection) as coll, Collection.open(tmp_path / "kb") as kb:
        gs = GenerationSettings(max_new_tokens=3)
        ans = RagPipeline(coll, t5, RagSettings(k=3, min_score=1.01), gs).ask("what is it?")
        assert ans.abstained and ans.answer == "not found in the collection" and ans.prompts == []
        assert len(ans.sources) == 3 and ans.min_score == 1.01
        ok = RagPipeline(coll, t5, RagSettings(k=3, min_score=-1.0), gs).ask("what is it?")
        assert not ok.abstained and ok.prompts
        kb_ans = RagPipeline(coll, t5, RagSettings(k=2), gs, knowledge=kb).ask("which fact?")
        assert {s.kind for s in kb_ans.sources} == {"passage"}
        assert all(s.text.startswith("fact number") for s in kb_ans.sources)
    with Collection.create(tmp_path / "hfkb", f"hf:{tiny_hf_dir}") as other, \
            Collection.open(sample_collection) as coll, pytest.raises(EncoderMismatchError):
        RagPipeline(coll, t5, knowledge=other)


# -- encoder identity: both towers --------------------------------------------------------
def _with_other_image_tower(src: Path, dst: Path, seed: int = 7) -> Path:
    """A copy of the local-dir model in ``src`` whose text tower is bit-identical and whose
    image tower (every ``visual.*`` weight) is perturbed, saved in the same layout."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(src / "open_clip_model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for key, value in state.items():
        if key.startswith("visual.") and value.is_floating_point():
            state[key] = value + torch.randn(value.shape, generator=gen) * (value.std() + 0.02)
    save_file(state, str(dst / "open_clip_model.safetensors"))
    return dst


@pytest.fixture
def swapped_image_tower(tiny_oc_dir: Path, tmp_path: Path, sample_dir: Path) -> str:
    from crossmodal_rag.encoders import load_encoder

    other = _with_other_image_tower(tiny_oc_dir, tmp_path / "other-image-tower")
    a, b = load_encoder(f"open_clip:local-dir:{tiny_oc_dir}"), load_encoder(f"open_clip:local-dir:{other}")
    texts = ["a cat", "a cup of coffee on a table"]
    assert np.allclose(a.encode_texts(texts), b.encode_texts(texts), atol=1e-6)  # same text tower
    photo = [sample_dir / "cat.jpg"]
    assert float(a.encode_images(photo)[0] @ b.encode_images(photo)[0]) < 0.95  # another image tower
    return f"open_clip:local-dir:{other}"


def test_other_image_tower_is_refused(collection_copy: Path, swapped_image_tower: str) -> None:
    with pytest.raises(EncoderMismatchError) as err:
        Collection.open(collection_copy, model=swapped_image_tower)
    msg = str(err.value)
    assert "image" in msg and str(collection_copy.resolve()) in msg and swapped_image_tower in msg
    assert "leave out --model" in msg  # the fix


def test_other_image_tower_is_refused_by_the_cli(collection_copy: Path, swapped_image_tower: str,
                                                 sample_dir: Path) -> None:
    from tests.e2e.test_cli import run

    r = run("search", "--image", str(sample_dir / "cat.jpg"), "--collection", str(collection_copy),
            "--model", swapped_image_tower)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "image" in r.stderr and "different embeddings" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_same_weights_under_another_name_open(collection_copy: Path, tiny_oc_dir: Path, tmp_path: Path,
                                              sample_dir: Path) -> None:
    moved = shutil.copytree(tiny_oc_dir, tmp_path / "moved")
    with Collection.open(collection_copy) as own:
        expect = [h.id for h in own.search(image=sample_dir / "cat.jpg", k=3, mode="dense")]
    with Collection.open(collection_copy, model=f"open_clip:local-dir:{moved}") as coll:
        assert [h.id for h in coll.search(image=sample_dir / "cat.jpg", k=3, mode="dense")] == expect


def test_collection_without_image_fingerprint_opens_and_is_backfilled(
        collection_copy: Path, tiny_oc_dir: Path, swapped_image_tower: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import sqlite3

    from crossmodal_rag.encoders import load_encoder
    from crossmodal_rag.maintenance import fingerprint

    with sqlite3.connect(collection_copy / "metadata.sqlite") as db:  # as made before image probes
        db.execute("DELETE FROM meta WHERE key = ?", (fingerprint.IMAGE_KEY,))
    moved = f"open_clip:local-dir:{shutil.copytree(tiny_oc_dir, tmp_path / 'moved')}"
    with caplog.at_level(logging.WARNING, logger="crossmodal_rag"), \
            Collection.open(collection_copy, model=moved) as coll:  # the text probe still checks
        assert coll.search("a cat", k=1, mode="dense")
        assert coll.store.get_meta(fingerprint.IMAGE_KEY) is None  # read-only: nothing written
    assert "image tower" in caplog.text and "cannot be verified" in caplog.text
    with Collection.open(collection_copy, writable=True) as coll:
        coll.search("a cat", k=1, mode="dense")  # first use of the collection's own encoder back-fills the probe
    with Collection.open(collection_copy) as coll:
        stored = fingerprint.read(coll.store)
        fresh = fingerprint.compute(load_encoder(coll.manifest.encoder))
    assert stored is not None and stored.image is not None
    assert np.allclose(stored.image, fresh.image, atol=1e-5)
    with pytest.raises(EncoderMismatchError, match="image"):
        Collection.open(collection_copy, model=swapped_image_tower)
