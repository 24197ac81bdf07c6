"""Ingest (crossmodal_rag/ingestion/runner.py) with an embedder whose vectors are a known function of the
content: every stored vector is the one its content calls for, and a re-run reads and embeds
exactly the files that changed (docs/collections.md, "Incremental and idempotent")."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.ingestion.runner import DecodeDataset, IngestSettings, ingest
from crossmodal_rag.ingestion.sources import ImageRecord, read_source
from tests.badimages import jpeg_bytes


def _vector(key: str, dim: int) -> np.ndarray:
    """A unit vector drawn from ``key`` (the oracle: same key, same vector)."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class KeyedEmbedder:
    """An :class:`crossmodal_rag.ingestion.runner.Embedder`: an image's vector is drawn from its SHA-256,
    a text's from the text. Records which files it was asked to read and to embed."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.read: list[str] = []
        self.embedded: list[str] = []

    def prepare(self, texts: list[str], images: list[Any], settings: IngestSettings) -> None:
        pass

    def image_batches(self, images: list[Any], settings: IngestSettings):
        self.read.extend(str(r.path) for r in images)
        dataset = DecodeDataset([r.path for r in images], lambda image: None, settings.max_image_pixels)
        batch = []
        for i in range(len(dataset)):
            out = dataset[i]
            if out["error"] is None:
                out["pixels"] = out["sha256"]  # what image_vectors needs
            batch.append(out)
            if len(batch) == settings.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def image_vectors(self, decoded: list[dict[str, Any]]) -> np.ndarray:
        self.embedded.extend(o["sha256"] for o in decoded)
        return np.stack([_vector(o["sha256"], self.dim) for o in decoded])

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        return np.stack([_vector(t, self.dim) for t in texts])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def coll(tmp_path: Path, tiny_oc_spec: str):
    with Collection.create(tmp_path / "c", tiny_oc_spec) as c:
        yield c


def test_stored_vectors_are_the_embedders(coll: Collection, photos: Path) -> None:
    dim = coll.manifest.dim
    embedder = KeyedEmbedder(dim)
    report = ingest(coll, photos, IngestSettings(batch_size=2), embedder=embedder)
    assert (report.images_added, report.captions_added) == (5, 15)
    records = [r for r in read_source(photos) if isinstance(r, ImageRecord)]
    assert len(records) == 5
    for rec in records:
        item_id, _, _ = coll.store.path_entry(str(rec.path))
        np.testing.assert_allclose(coll.store.vectors([item_id], dim)[0], _vector(_sha(rec.path), dim),
                                   atol=1e-6)
        captions = coll.store.captions_of(item_id)
        assert set(captions) == set(rec.captions)
        for text, (cid, _) in captions.items():
            np.testing.assert_allclose(coll.store.vectors([cid], dim)[0], _vector(text, dim), atol=1e-6)
    # the indexes hold what the metadata holds: a search finds each image's own vector first
    for jpg in photos.glob("*.jpg"):
        item_id = coll.store.path_entry(str(jpg))[0]
        hits = coll.search_vectors(_vector(_sha(jpg), dim)[None], k=1)[0]
        assert hits[0].id == item_id and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert coll.check().ok


def test_a_rerun_reads_only_changed_files_and_embeds_only_new_contents(coll: Collection, photos: Path) -> None:
    dim = coll.manifest.dim
    ingest(coll, photos, embedder=KeyedEmbedder(dim))
    ids = {p.name: coll.store.path_entry(str(p))[0] for p in photos.glob("*.jpg")}

    touched = photos / "cat.jpg"  # same bytes, new modification time
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    changed = photos / "dahlia.jpg"  # new bytes at the same path
    changed.write_bytes(jpeg_bytes((64, 48), (200, 30, 30)))
    deleted = photos / "pagoda.jpg"  # gone from disk
    deleted.unlink()
    added = photos / "new.jpg"
    added.write_bytes(jpeg_bytes((50, 40), (20, 20, 220)))
    copy = photos / "coffee-copy.jpg"  # byte-identical to a stored image
    shutil.copy(photos / "coffee.jpg", copy)

    embedder = KeyedEmbedder(dim)
    report = ingest(coll, photos, embedder=embedder)
    assert sorted(embedder.read) == sorted(str(p) for p in (touched, changed, added, copy))
    assert sorted(embedder.embedded) == sorted([_sha(changed), _sha(added)])
    assert (report.images_added, report.replaced, report.duplicates, report.unchanged) == (2, 1, 1, 2)

    assert coll.store.path_entry(str(touched))[0] == ids["cat.jpg"]  # the same item, new mtime
    assert coll.store.path_entry(str(touched))[2] == touched.stat().st_mtime_ns
    assert coll.get(ids["dahlia.jpg"]) == []  # replaced: the old contents' item is gone
    new_dahlia = coll.store.path_entry(str(changed))[0]
    np.testing.assert_allclose(coll.store.vectors([new_dahlia], dim)[0], _vector(_sha(changed), dim), atol=1e-6)
    assert coll.store.path_entry(str(copy))[0] == ids["coffee.jpg"]  # stored once, two paths
    assert coll.get(ids["pagoda.jpg"]) == [] and report.pruned == 1  # gone from disk: pruned (issue 30)
    assert coll.counts()["images"] == 5  # 5 - dahlia's old + dahlia's new + new.jpg - pagoda
    assert coll.check().ok


def test_passages_are_stored_once(coll: Collection, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"title": "A", "text": "alpha"}\n{"title": "B", "text": "beta"}\n'
                      '{"title": "A", "text": "alpha"}\n')
    dim = coll.manifest.dim
    first = ingest(coll, corpus, embedder=KeyedEmbedder(dim))
    assert (first.passages_added, first.duplicates) == (2, 1)
    again = ingest(coll, corpus, embedder=KeyedEmbedder(dim))
    assert (again.passages_added, again.duplicates) == (0, 3)
    ids = coll.store.ids("text")
    got = {it.text: coll.store.vectors([it.id], dim)[0] for it in coll.get(ids.tolist())}
    np.testing.assert_allclose(got["alpha"], _vector("A. alpha", dim), atol=1e-6)  # title. text
    np.testing.assert_allclose(got["beta"], _vector("B. beta", dim), atol=1e-6)


def test_a_read_only_collection_is_refused(coll: Collection, photos: Path) -> None:
    folder = coll.folder
    coll.close()
    with Collection.open(folder) as ro, pytest.raises(Exception, match="read-only"):
        ingest(ro, photos, embedder=KeyedEmbedder(ro.manifest.dim))
