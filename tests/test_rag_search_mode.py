"""Retrieval modes in RAG (RagSettings.search_mode): chat, write, the CLI's chat/write and REST
/api/ask (plain and streamed) retrieve in keyword / hybrid mode exactly what
:meth:`Collection.search <crossmodal_rag.collection.Collection.search>` returns for the same query computed apart, with the cosine
as the source score; a bad mode is a clear error (ValueError, exit code 2, HTTP 422)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.apps import ChatSession, write
from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings
from crossmodal_rag.testing import make_tiny_t5

QUERY = "tabby cat"


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5"))


@pytest.fixture
def coll(collection_copy: Path):
    with Collection.open(collection_copy) as c:
        yield c


def _expected(coll: Collection, query: str, mode: str, k: int = 3, target: str = "texts") -> list[int]:
    result = coll.search(query, k=k, target=target, mode=mode)
    assert (result.mode == mode or mode == "auto") and result, (mode, query)
    return [h.id for h in result]


def _pipe(coll: Collection, t5: str, search_mode: str, **settings: object) -> RagPipeline:
    return RagPipeline(coll, t5, RagSettings(k=3, search_mode=search_mode, **settings),
                       GenerationSettings(max_new_tokens=3))


def test_keyword_mode_differs_from_dense_here(coll: Collection) -> None:
    """The oracle below can fail: for this query the keyword ranking is not the dense one."""
    dense = [h.id for h in coll.search(QUERY, k=3, target="texts", mode="dense")]
    assert _expected(coll, QUERY, "keyword") != dense


def test_chat_retrieves_in_the_search_mode(coll: Collection, t5: str) -> None:
    for mode in ("keyword", "hybrid"):
        pipe = _pipe(coll, t5, mode)
        session = ChatSession()
        answer = session.send(pipe, QUERY)
        assert [s.id for s in answer.sources] == _expected(coll, QUERY, mode)
        # the source score is the cosine with the query embedding (priors mean what they mean in dense)
        vec = coll.embed_query(QUERY)
        cos = coll.store.vectors([s.id for s in answer.sources], coll.manifest.dim) @ vec
        np.testing.assert_allclose([s.score for s in answer.sources], cos, atol=1e-5)
        # a later turn retrieves by the conversation's retrieval query
        query = session.retrieval_query("and the espresso cup?")
        answer = session.send(pipe, "and the espresso cup?")
        assert [s.id for s in answer.sources] == _expected(coll, query, mode)
    dense = ChatSession().send(_pipe(coll, t5, "dense"), QUERY)
    assert [s.id for s in dense.sources] == [h.id for h in coll.search(QUERY, k=3, target="texts", mode="dense")]


def test_write_and_auto_mode(coll: Collection, t5: str) -> None:
    draft = "The tabby cat sat on the mat."
    answer = write(_pipe(coll, t5, "keyword"), draft)
    assert [s.id for s in answer.sources] == _expected(coll, draft, "keyword")
    # auto: what Collection.search's auto ranks (the keyword evidence rule), hybrid asked for: RRF
    answer = write(_pipe(coll, t5, "auto"), draft)
    assert [s.id for s in answer.sources] == _expected(coll, draft, "auto")
    answer = write(_pipe(coll, t5, "hybrid"), draft)
    assert [s.id for s in answer.sources] == _expected(coll, draft, "hybrid")
    # filters apply in the keyword mode too
    pipe = _pipe(coll, t5, "keyword", where=("caption~espresso",))
    assert all("espresso" in s.text for s in pipe.ask("espresso cat").sources)


def test_bad_search_mode_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown search_mode 'fuzzy'"):
        RagSettings(search_mode="fuzzy")


def test_cli_chat_and_write_take_search_mode(coll: Collection, collection_copy: Path, t5: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag.cli import main

    expected = _expected(coll, QUERY, "keyword")
    draft_expected = _expected(coll, "The tabby cat sat.", "keyword")
    coll.close()
    base = ["-q", "--collection", str(collection_copy), "--generator", t5, "--k", "3", "--max-new-tokens", "2",
            "--search-mode", "keyword", "--json"]
    assert main(["chat", QUERY, "--session", str(tmp_path / "s.json"), *base]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)["sources"]] == expected
    assert main(["write", "The tabby cat sat.", *base]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)["sources"]] == draft_expected
    assert main(["ask", QUERY, *base]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)["sources"]] == expected
    for command in (["chat", "hi"], ["write", "a draft"]):
        with pytest.raises(SystemExit) as e:
            main([*command, "--collection", str(collection_copy), "--search-mode", "fuzzy"])
        assert e.value.code == 2 and "--search-mode" in capsys.readouterr().err


def test_rest_ask_takes_search_mode(collection_copy: Path, t5: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from crossmodal_rag.web import WebSettings, create_app

    with Collection.open(collection_copy) as c:
        expected = {m: _expected(c, QUERY, m) for m in ("keyword", "hybrid", "auto")}
        dense = [h.id for h in c.search(QUERY, k=3, target="texts", mode="dense")]
    settings = WebSettings(collection=str(collection_copy), generator=t5, max_new_tokens=3,
                           thumbnail_dir=str(tmp_path / "thumbs"))
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        for _ in range(100):
            if client.get("/api/health").json()["generator_status"] == "ready":
                break
            time.sleep(0.1)
        for mode, ids in (*expected.items(), ("dense", dense)):
            body = {"question": QUERY, "k": 3, "search_mode": mode}
            r = client.post("/api/ask", json=body)
            assert r.status_code == 200, r.text
            assert [s["id"] for s in r.json()["sources"]] == ids, mode
            streamed = client.post("/api/ask", json={**body, "stream": True})
            assert streamed.status_code == 200
            events = [json.loads(line[len("data: "):]) for line in streamed.text.splitlines()
                      if line.startswith("data: ")]
            assert [s["id"] for s in events[0]["sources"]] == ids, mode
            assert [s["id"] for s in events[-1]["sources"]] == ids, mode
        # the default is auto, as the CLI's ask
        r = client.post("/api/ask", json={"question": QUERY, "k": 3})
        assert [s["id"] for s in r.json()["sources"]] == expected["auto"]
        r = client.post("/api/ask", json={"question": QUERY, "search_mode": "fuzzy"})
        assert r.status_code == 422 and "search_mode" in r.text
