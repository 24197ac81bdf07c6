"""train clip: contrastive fine-tuning on the synthetic shapes (tiny random models), the saved
encoder reloading through its model spec, and re-embedding a collection with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.encoders import ClipEncoder
from crossmodal_rag.errors import EncoderMismatchError
from crossmodal_rag.synthetic import make_shapes
from crossmodal_rag.training import TrainSettings, train
from crossmodal_rag.training.clip import ClipTask, ClipTaskSettings, artifact_spec
from crossmodal_rag.training.pairs import read_captioned_images


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    make_shapes(folder, 48, seed=0, size=32)
    return folder


def _train_losses(metrics: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, metrics.read_text().splitlines()) if r["split"] == "train"]


def _check_reload(task: ClipTask, best: Path) -> None:
    """The saved folder, loaded through its spec, embeds exactly like the trained model."""
    indices = list(range(task.num_examples()))
    img, txt = task.embed(indices)
    enc = ClipEncoder(artifact_spec(best), device="cpu")
    np.testing.assert_allclose(enc.encode_images(task.paths), img, atol=1e-5)
    np.testing.assert_allclose(enc.encode_texts([c[0] for c in task.captions]), txt, atol=1e-5)


def test_open_clip_loss_falls_and_encoder_reloads(tmp_path: Path, shapes: Path, tiny_oc_spec: str) -> None:
    task = ClipTask(tiny_oc_spec, read_captioned_images(shapes))
    before = task.state_dict()["visual.conv1.weight"]
    settings = TrainSettings(max_steps=30, batch_size=16, lr=1e-3, val_fraction=0.0, checkpoint_every=30,
                             device="cpu")
    result = train(task, settings, tmp_path / "run", progress=False)
    losses = _train_losses(result.metrics_path)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert not np.allclose(task.state_dict()["visual.conv1.weight"], before)
    # Without a validation set, best/ is the final model; it is an open_clip local-dir folder.
    assert artifact_spec(result.best_dir).startswith("open_clip:local-dir:")
    assert json.loads((result.best_dir / "train_info.json").read_text())["base_model"] == tiny_oc_spec
    _check_reload(task, result.best_dir)


def test_frozen_tower_does_not_change(shapes: Path, tiny_oc_spec: str, tmp_path: Path) -> None:
    task = ClipTask(tiny_oc_spec, read_captioned_images(shapes), ClipTaskSettings(train_text=False))
    text_before = task.state_dict()["token_embedding.weight"]
    image_before = task.state_dict()["visual.conv1.weight"]
    train(task, TrainSettings(max_steps=3, batch_size=8, lr=1e-3, device="cpu"), tmp_path / "r", progress=False)
    assert np.array_equal(task.state_dict()["token_embedding.weight"], text_before)
    assert not np.array_equal(task.state_dict()["visual.conv1.weight"], image_before)
    with pytest.raises(ValueError, match="nothing to train"):
        ClipTaskSettings(train_image=False, train_text=False, train_logit_scale=False)


def test_hf_clip_trains_and_reloads(tmp_path: Path, shapes: Path, tiny_hf_dir: Path) -> None:
    task = ClipTask(f"hf:{tiny_hf_dir}", read_captioned_images(shapes))
    settings = TrainSettings(max_steps=12, batch_size=16, lr=1e-3, val_fraction=0.0, device="cpu")
    result = train(task, settings, tmp_path / "hf", progress=False)
    losses = _train_losses(result.metrics_path)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert artifact_spec(result.best_dir).startswith("hf:")
    _check_reload(task, result.best_dir)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "crossmodal_rag", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_train_clip_reembeds_the_collection(tmp_path: Path, shapes: Path, tiny_oc_spec: str) -> None:
    coll_dir = tmp_path / "coll"
    with Collection.create(coll_dir, tiny_oc_spec) as coll:
        coll.add(shapes)
    r = _cli("train", "clip", str(shapes / "manifest.jsonl"), "--out", str(tmp_path / "out"),
             "--collection", str(coll_dir), "--steps", "6", "--batch-size", "16", "--lr", "1e-3",
             "--eval-every", "3", "--val-fraction", "0.25", "--seed", "1", "--hard-negatives", "0.5")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out" / "best" / "train_info.json").read_text())["settings"]["hard_negatives"] == 0.5
    summary = json.loads(r.stdout)
    assert summary["steps"] == 6 and summary["examples"] == 48 and summary["base_model"] == tiny_oc_spec
    new_spec = summary["model"]
    assert new_spec == f"open_clip:local-dir:{tmp_path / 'out' / 'best'}"
    assert summary["reembedded"]["images"] == 48 and summary["reembedded"]["texts"] == 48

    with Collection.open(coll_dir) as coll:
        assert coll.manifest.encoder == new_spec  # the collection names its new encoder
        assert coll.check().ok
        enc = ClipEncoder(new_spec, device="cpu")
        items = coll.get(coll.store.ids("image").tolist())
        stored = coll.store.vectors([it.id for it in items], coll.manifest.dim)
        np.testing.assert_allclose(stored, enc.encode_images([it.path for it in items]), atol=1e-5)
        caption_ids = coll.store.ids("text").tolist()
        captions = coll.get(caption_ids)
        np.testing.assert_allclose(coll.store.vectors(caption_ids, coll.manifest.dim),
                                   enc.encode_texts([c.text for c in captions]), atol=1e-5)
        # Searching uses the new encoder: scores are new-text . new-image products.
        query = items[0].captions[0]
        hits = coll.search(query, k=3, mode="dense")
        q = enc.encode_texts(query)[0]
        by_id = dict(zip([it.id for it in items], stored, strict=True))
        assert [h.score for h in hits] == pytest.approx([float(q @ by_id[h.id]) for h in hits], abs=1e-5)
        assert hits[0].score == pytest.approx(float((stored @ q).max()), abs=1e-5)
    with pytest.raises(EncoderMismatchError):  # the old encoder no longer fits
        Collection.open(coll_dir, model=tiny_oc_spec).close()


def test_caption_neighbours_match_brute_force() -> None:
    from crossmodal_rag.training.clip import _hashed_tfidf, caption_neighbours

    texts = ["a red circle on the left", "a red circle on the right", "a blue circle on the left",
             "a red circle on the left", "a green star at the top", "a green star at the bottom", "x"]
    nb = caption_neighbours(texts, k=3)
    vecs = _hashed_tfidf(texts)
    sims = vecs @ vecs.T
    for i, row in enumerate(nb):
        found = [int(j) for j in row if j >= 0]
        # never itself, never an identical caption, each neighbour's caption different
        assert all(texts[j] != texts[i] for j in found)
        assert len({texts[j] for j in found}) == len(found)
        # oracle: the distinct other captions ranked by cosine, best first
        best = sorted({texts[j]: sims[i, j] for j in range(len(texts)) if texts[j] != texts[i]}.values(),
                      reverse=True)[:3]
        np.testing.assert_allclose([sims[i, j] for j in found], best, atol=1e-5)
    assert texts[nb[0][0]] in ("a red circle on the right", "a blue circle on the left")


def test_hard_negative_batches_come_from_the_training_split(shapes: Path, tiny_oc_spec: str,
                                                            tmp_path: Path) -> None:
    data = read_captioned_images(shapes)
    task = ClipTask(tiny_oc_spec, data, ClipTaskSettings(hard_negatives=0.5, neighbours=4))
    seen: list[list[int]] = []
    original = task.hard_batch

    def spy(indices):  # record what the loss really trained on
        batch = original(indices)
        seen.append(batch)
        return batch

    task.hard_batch = spy  # type: ignore[method-assign]
    settings = TrainSettings(max_steps=6, batch_size=8, lr=1e-3, val_fraction=0.25, eval_every=100,
                             checkpoint_every=100, device="cpu")
    from crossmodal_rag.training.loop import split_indices

    _, val_idx = split_indices(task.num_examples(), 0.25, 0)
    train(task, settings, tmp_path / "run", progress=False)
    assert len(seen) == 6
    for batch in seen:
        assert len(batch) == 8 and len(set(batch)) == 8
        assert not set(batch) & {int(i) for i in val_idx}
        seeds, added = batch[:4], batch[4:]
        # each added example is a caption neighbour of a seed (a different caption)
        caps = [task.captions[i][0] for i in seeds]
        for j in added:
            assert task.captions[j][0] not in caps
            assert any(j in task._neighbours[task._neighbour_row[s]] for s in seeds)
    with pytest.raises(ValueError, match="hard_negatives"):
        ClipTaskSettings(hard_negatives=1.0)
    bad = _cli("train", "clip", str(shapes), "--out", str(tmp_path / "bad"), "--hard-negatives", "1.5")
    assert bad.returncode == 2 and "--hard-negatives" in bad.stderr and "[0, 1)" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_hard_negative_run_resumes_exactly(shapes: Path, tiny_oc_spec: str, tmp_path: Path) -> None:
    """Neighbour draws use torch's generator, which a checkpoint restores: an interrupted and
    resumed run logs the losses of an uninterrupted one."""
    settings = TrainSettings(max_steps=6, batch_size=8, lr=1e-3, val_fraction=0.25, eval_every=3,
                             checkpoint_every=3, device="cpu")
    hn = ClipTaskSettings(hard_negatives=0.5, neighbours=4)
    data = read_captioned_images(shapes)
    full = train(ClipTask(tiny_oc_spec, data, hn), settings, tmp_path / "full", progress=False)

    crashing = ClipTask(tiny_oc_spec, data, hn)
    calls = {"n": 0}
    original = crashing.hard_batch

    def crash_at_five(indices):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(indices)

    crashing.hard_batch = crash_at_five  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        train(crashing, settings, tmp_path / "part", progress=False)
    resumed = train(ClipTask(tiny_oc_spec, data, hn), settings, tmp_path / "part", resume=True, progress=False)

    def log(path: Path) -> list[tuple]:
        return [(r["step"], r["split"], round(r["loss"], 6)) for r in map(json.loads, path.read_text().splitlines())]

    assert log(full.metrics_path) == log(resumed.metrics_path)
