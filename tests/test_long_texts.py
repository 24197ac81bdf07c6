"""Texts longer than the encoder's context: windows, each indexed and mapped back to its item."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.encoders import load_encoder

FILLER = " ".join(f"word{i}" for i in range(400))


def test_windows_fit_cover_and_overlap(tiny_oc_spec: str, tiny_hf_dir: Path) -> None:
    for spec in (tiny_oc_spec, f"hf:{tiny_hf_dir}"):
        enc = load_encoder(spec)
        windows = enc.text_windows(FILLER)
        assert len(windows) > 1
        budget = enc.max_text_tokens - 2
        assert all(enc.backend.count_tokens(w) <= budget for w in windows)
        words = FILLER.split()
        seen = [w for win in windows for w in win.split()]
        assert set(seen) == set(words)  # nothing left out
        assert len(seen) > len(words)  # neighbours overlap
        assert windows[0].split()[0] == words[0] and windows[-1].split()[-1] == words[-1]
        assert enc.text_windows("short text") == ["short text"]


def test_long_passage_is_found_by_its_tail(tmp_path: Path, tiny_oc_spec: str) -> None:
    tail = "the secret ingredient is smoked paprika"
    rows = [{"id": "long", "text": f"{FILLER} {tail}"}] + [{"id": f"s{i}", "text": f"short passage {i}"} for i in range(10)]
    corpus = tmp_path / "p.jsonl"
    corpus.write_text("\n".join(json.dumps(r) for r in rows))
    with Collection.create(tmp_path / "c", tiny_oc_spec) as coll:
        report = coll.add(corpus)
        assert report.passages_added == 11
        counts = coll.counts()
        assert counts["passages"] == 11 and counts["windows"] >= 1
        assert coll.check().ok
        q = coll.encoder.encode_texts([tail])[0]
        hits = coll.search_vectors(q[None], k=3, target="texts")[0]
        # oracle: an item's score is its best window's score, computed here from the texts
        item_scores = {r["id"]: float(np.max(coll.encoder.encode_texts(coll.encoder.text_windows(r["text"])) @ q))
                       for r in rows}
        expected = sorted(item_scores, key=lambda i: -item_scores[i])[:3]
        assert [coll.get(h.id)[0].ext_id for h in hits] == expected
        np.testing.assert_allclose([h.score for h in hits], [item_scores[i] for i in expected], atol=1e-4)
        assert len({h.id for h in hits}) == 3  # one hit per item, never per window
        long_id = next(it.id for it in coll.get(coll.store.ids("text").tolist()) if it.ext_id == "long")
        everything = coll.search_vectors(q[None], k=11, target="texts")[0]
        assert len(everything) == 11 and long_id in {h.id for h in everything}
        assert coll.search_vectors(q[None], k=2, target="texts", where=["text~paprika"])[0][0].id == long_id
        coll.remove(ids=[long_id])
        assert "windows" not in coll.counts() and coll.check().ok


def test_long_caption_and_query_never_crash(tmp_path: Path, tiny_oc_spec: str, photos: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    (photos / "cat.txt").write_text(FILLER + " tabby\n" + "x" * 20000 + "\n\u200b\U0001f431 ü\x07\n")
    with Collection.create(tmp_path / "c", tiny_oc_spec) as coll:
        report = coll.add(photos)
        assert report.images_added == 5 and coll.check().ok
        with caplog.at_level(logging.WARNING, logger="crossmodal_rag"):
            hits = coll.search("cat " * 3000, k=2, mode="dense")
        assert len(hits) == 2 and "truncated" in caplog.text
        assert len(coll.search("\U0001f431\u200b", k=1, target="texts", mode="dense")) == 1
