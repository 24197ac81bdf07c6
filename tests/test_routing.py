"""Query routing with a text space: texts from the sentence encoder, images from CLIP, --target all
fused by reciprocal rank (oracle: the two lists searched separately, fused by hand), and the text
space's min-score auto."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sentence_models import make_text_space_collection

from crossmodal_rag import Collection
from crossmodal_rag.errors import QueryError
from crossmodal_rag.search import SearchRequest, routing
from crossmodal_rag.search.fusion import reciprocal_rank_fusion
from crossmodal_rag.search.text_space import open_text_space

PASSAGES = ["the red bridge crosses the river", "a cargo ship carried salt", "the festival is held in may"]


@pytest.fixture(scope="module")
def coll_dir(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str, sample_dir: Path) -> Path:
    return make_text_space_collection(tmp_path_factory.mktemp("routing"), tiny_oc_spec, sample_dir,
                                      PASSAGES, seed=5)


def _rag(coll: Collection, question: str, **options: object) -> tuple[list, float | None]:
    """What the RAG pipeline retrieves: hits not cut by min_score, and its threshold."""
    result = coll.search(SearchRequest(text=question, mode="dense", cut=False, dense_scores=True, **options))
    return list(result), result.threshold


def test_routes(coll_dir: Path, sample_dir: Path) -> None:
    with Collection.open(coll_dir) as coll:
        space = open_text_space(coll)
        assert coll.text_space is not None and coll.text_model == space.spec
        assert {h.space for h in coll.search("a cup", target="images", k=3)} == {"clip"}  # CLIP's job
        image = str(next(sample_dir.glob("*.jpg")))
        assert {h.space for h in coll.search(image=image, target="texts", k=3)} == {"clip"}
        assert {h.space for h in coll.search("a cup", plus=["tea"], target="texts", k=3)} == {"clip"}
        assert {h.space for h in coll.search("a cup", target="texts", k=3, text_space=False)} == {"clip"}
        result = coll.search("a cup of coffee", k=4, target="texts", mode="dense")
        assert result.mode == "dense" and {h.space for h in result} == {"text"}
        assert [h.id for h in result] == [h.id for h in space.search(coll.store, "a cup of coffee", 4)]

        fused = coll.search("a cup of coffee", k=5, target="all", mode="dense")
        depth = 5
        images = coll.search("a cup of coffee", k=depth, target="images", mode="dense")
        text_hits = space.search(coll.store, "a cup of coffee", depth)
        want = reciprocal_rank_fusion([[("image", h.id) for h in images], [("text", h.id) for h in text_hits]],
                                      limit=5)
        got = [("image" if h.kind == "image" else "text", h.id) for h in fused]
        assert got == [key for key, _ in want]
        assert [h.rank for h in fused] == [1, 2, 3, 4, 5]
        own = {("image", h.id): h.score for h in images} | {("text", h.id): h.score for h in text_hits}
        assert all(h.score == own[key] for h, key in zip(fused, got, strict=True))  # own cosine kept


def test_text_space_min_score_auto(coll_dir: Path) -> None:
    with Collection.open(coll_dir) as coll:
        space = open_text_space(coll)
        threshold = routing.text_space_threshold(space)
        v = space.vectors
        pairs = [float(v[i] @ v[j]) for i in range(len(v)) for j in range(len(v)) if i != j]
        assert min(pairs) <= threshold <= max(pairs)
        hits = coll.search(PASSAGES[1], k=20, target="texts", mode="dense", min_score="auto")
        assert hits and all(h.score >= threshold for h in hits) and hits.threshold == threshold
        every = coll.search(PASSAGES[1], k=20, target="texts", mode="dense")
        assert [h.id for h in hits] == [h.id for h in every if h.score >= threshold]
        assert np.isclose(hits[0].score, 1.0, atol=1e-5)  # the passage itself


def test_ask_min_score_is_the_text_space_own_threshold(coll_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag.cli import main
    from crossmodal_rag.testing import make_tiny_t5

    q = PASSAGES[1]
    with Collection.open(coll_dir) as coll:
        text_auto = routing.text_space_threshold(open_text_space(coll))
        with pytest.raises(QueryError, match="no calibration"):  # CLIP has none for text -> texts here
            coll.resolve_min_score("auto", query_is_image=False, target="texts")
        hits, threshold = _rag(coll, q, k=3, target="texts", min_score="auto")
        assert threshold == text_auto
        # not cut by the threshold: the nearest sources stay for an abstention
        assert [h.id for h in hits] == [h.id for h in coll.search(q, k=3, target="texts", mode="dense")]
        fused = coll.search(q, k=3, target="all", mode="dense")
        own = (coll.resolve_min_score("auto", query_is_image=False, target="images") if fused[0].kind == "image"
               else text_auto)
        assert _rag(coll, q, k=3, target="all", min_score="auto")[1] == own
    t5 = make_tiny_t5(tmp_path / "t5")
    base = ["-c", str(coll_dir), "-g", str(t5), "--k", "3", "--target", "texts", "--max-new-tokens", "2", "--json",
            "--search-mode", "dense"]

    def ask(min_score: str) -> dict:
        assert main(["ask", q, "--min-score", min_score, *base]) == 0
        return json.loads(capsys.readouterr().out)

    answer = ask("auto")
    assert answer["min_score"] == pytest.approx(text_auto)
    assert answer["abstained"] == (hits[0].score < text_auto)
    top = hits[0].score
    above = ask(f"{top + 1e-3:.6f}")  # just above the top text-space cosine: abstains, sources shown
    assert above["abstained"] and [s["id"] for s in above["sources"]] == [h.id for h in hits]
    assert not ask(f"{top - 1e-3:.6f}")["abstained"]


def test_chat_and_write_retrieve_from_the_text_space(coll_dir: Path, t5_dir: Path) -> None:
    """chat and write go through the pipeline's own retrieval: in a collection with a text space a
    text question retrieves its texts there, as ``ask`` does (oracle: Collection.search as the
    pipeline asks it: not cut by min_score, the cosine as score), and
    ``min_score`` applies in that space (the text space's own ``auto``)."""
    from crossmodal_rag.apps.chat import ChatSession
    from crossmodal_rag.apps.write import write
    from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings

    q = PASSAGES[2]
    with Collection.open(coll_dir) as coll:
        want, threshold = _rag(coll, q, k=2, target="texts", min_score="auto")
        assert threshold == routing.text_space_threshold(open_text_space(coll))
        pipeline = RagPipeline(coll, str(t5_dir), RagSettings(k=2, target="texts", min_score="auto",
                                                              search_mode="dense"),
                               GenerationSettings(max_new_tokens=2))
        chat = ChatSession().send(pipeline, q)
        drafted = write(pipeline, q)
        for answer in (chat, drafted):
            assert [s.id for s in answer.sources] == [h.id for h in want]
            assert [s.score for s in answer.sources] == pytest.approx([h.score for h in want])
            assert answer.min_score == pytest.approx(threshold)
