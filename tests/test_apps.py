from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection, QueryError
from crossmodal_rag.apps import ChatSession, recommend, write
from crossmodal_rag.apps.recommend import mmr
from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings
from crossmodal_rag.testing import make_tiny_t5


@pytest.fixture(scope="module")
def pipeline(sample_collection: Path, tmp_path_factory: pytest.TempPathFactory):
    t5 = make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5")
    coll = Collection.open(sample_collection)
    yield RagPipeline(coll, str(t5), RagSettings(k=3), GenerationSettings(max_new_tokens=4))
    coll.close()


def test_mmr_by_hand() -> None:
    q = np.array([1.0, 0.0])
    c = np.array([[1.0, 0.0], [0.99, 0.141], [0.6, 0.8]])
    assert [j for j, _ in mmr(q, c, 3, 0.0)] == [0, 1, 2]
    # diversity 0.7: after picking 0, item 1 (sim 0.99 to it) scores 0.3*0.99 - 0.7*0.99 and
    # item 2 scores 0.3*0.6 - 0.7*0.6, so item 2 comes second
    picked = mmr(q, c, 2, 0.7)
    assert [j for j, _ in picked] == [0, 2]
    assert picked[1][1] == pytest.approx(0.3 * 0.6 - 0.7 * 0.6)
    with pytest.raises(QueryError):
        mmr(q, c, 1, 1.5)


def test_recommend_excludes_liked_and_matches_brute_force(sample_collection: Path) -> None:
    with Collection.open(sample_collection) as coll:
        ids = coll.store.ids("image")[:2].tolist()
        recs = recommend(coll, ids, k=4, diversity=0.0)
        assert len(recs) == 4 and not set(ids) & {r.hit.id for r in recs}
        vecs = coll.store.vectors(ids, coll.manifest.dim)
        profile = vecs.mean(0) / np.linalg.norm(vecs.mean(0))
        all_ids = [i for i in coll.store.ids("image").tolist() if i not in ids]
        scores = coll.store.vectors(all_ids, coll.manifest.dim) @ profile
        expected = [all_ids[j] for j in np.argsort(-scores)[:4]]
        assert [r.hit.id for r in recs] == expected
        assert [r.hit.rank for r in recs] == [1, 2, 3, 4]
        with pytest.raises(QueryError, match="not in the collection"):
            recommend(coll, [999999])
        with pytest.raises(QueryError, match="needs liked"):
            recommend(coll, [])


def test_chat_history_shapes_query_and_prompt_and_resumes(pipeline: RagPipeline, tmp_path: Path) -> None:
    session = ChatSession()
    session.send(pipeline, "tell me about the cat photo")
    assert session.retrieval_query("what colour is it?") == "tell me about the cat photo what colour is it?"
    answer = session.send(pipeline, "what colour is it?")
    assert "User: tell me about the cat photo" in answer.prompts[0] and "what colour is it?" in answer.prompts[0]
    path = tmp_path / "s.json"
    session.save(path)
    resumed = ChatSession.load(path)
    assert [t.content for t in resumed.turns] == [t.content for t in session.turns]
    assert resumed.turns[1].sources and "posterior" in resumed.turns[1].sources[0]
    path.write_text(json.dumps({"format": "nope"}))
    with pytest.raises(Exception, match="not a crossmodal-rag chat session"):
        ChatSession.load(path)
    with pytest.raises(QueryError):
        session.send(pipeline, "  ")


def test_write_cites_sources(pipeline: RagPipeline) -> None:
    ans = write(pipeline, "The photo shows a cat.")
    assert "Draft: The photo shows a cat." in ans.prompts[0] and "[1]" in ans.prompts[0]
    assert sum(s.posterior for s in ans.sources) == pytest.approx(1.0)
    with pytest.raises(QueryError):
        write(pipeline, "")
