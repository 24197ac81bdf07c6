"""One way to search (issue 26): the request and result types, one list of modes with one default
used by every front end, ``k`` reaching FAISS once per index without a call back into the
collection, and no parameter that hands a collection over as ``Any`` (checked with ``ast``,
proven by a planted violation)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.errors import QueryError
from crossmodal_rag.search import DEFAULT_MODE, MODES, Hit, SearchRequest, SearchResult

PACKAGE = Path(__file__).resolve().parents[1] / "crossmodal_rag"


def test_a_request_is_checked_when_made_and_names_the_choices() -> None:
    r = SearchRequest(text="a cat", where="width>=10", plus=["snow"])
    assert r.mode == DEFAULT_MODE == "auto" and r.where == ("width>=10",) and r.plus == ("snow",)
    with pytest.raises(QueryError, match="choose one of auto, dense, keyword, hybrid"):
        SearchRequest(text="a cat", mode="bm25")  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="choose one of images, texts, all"):
        SearchRequest(text="a cat", target="pictures")  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="positive integer"):
        SearchRequest(text="a cat", k=0)
    assert SearchRequest.of("a cat", k=3) == SearchRequest(text="a cat", k=3)
    assert SearchRequest.of(r, k=3).k == 3 and SearchRequest.of(r, k=3).where == r.where
    with pytest.raises(TypeError, match="unknown search option.*top_k.*valid: .*k"):
        SearchRequest.of("a cat", top_k=3)


def test_a_result_is_the_sequence_of_its_hits() -> None:
    hits = tuple(Hit(rank=r, score=1.0 / r, id=r, kind="image", path=f"/p/{r}.jpg", text=None, captions=(),
                     parent_id=None, title=None) for r in (1, 2, 3))
    result = SearchResult(hits, "dense", 0.2)
    assert len(result) == 3 and result[0] is hits[0] and list(result) == list(hits) and result == list(hits)
    assert [h.id for h in result[1:]] == [2, 3]
    dense = hits[0].to_dict()  # JSON output as before: a dense hit without the per-ranking fields
    assert "mode" not in dense and "dense_score" not in dense and "space" not in dense
    ranked = hits[0].ranked(1, mode="hybrid", dense_score=0.3, keyword_score=None, space="text").to_dict()
    assert ranked["mode"] == "hybrid" and ranked["dense_score"] == 0.3 and ranked["space"] == "text"


def test_every_front_end_has_the_one_default_mode(collection_copy: Path, tmp_path: Path) -> None:
    """A caller that names no mode gets what the CLI gets: the CLI's --mode and --search-mode,
    RagSettings, REST /api/search and /api/ask, and Collection.search."""
    from crossmodal_rag.cli import build_parser
    from crossmodal_rag.generation import RagSettings

    parser = build_parser()
    assert parser.parse_args(["search", "x", "-c", "c"]).mode == DEFAULT_MODE
    for command in (["ask", "x"], ["chat", "x"], ["write", "x"]):
        assert parser.parse_args([*command, "-c", "c"]).search_mode == DEFAULT_MODE
    assert RagSettings().search_mode == DEFAULT_MODE
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from crossmodal_rag.web import WebSettings, create_app
    from crossmodal_rag.web.models import AskIn

    assert AskIn(question="x").search_mode == DEFAULT_MODE
    settings = WebSettings(collection=str(collection_copy), thumbnail_dir=str(tmp_path / "t"),
                           load_generator_at_startup=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        params = {p["name"]: p for p in client.get("/openapi.json").json()["paths"]["/api/search"]["get"]["parameters"]}
        assert params["mode"]["schema"]["default"] == DEFAULT_MODE
        assert set(params["mode"]["schema"]["enum"]) == set(MODES)
        rest = client.get("/api/search", params={"q": "a tabby cat", "k": 4}).json()
    with Collection.open(collection_copy) as coll:
        library = coll.search("a tabby cat", k=4)
    assert library.mode == rest["mode"] == "hybrid"  # the sample collection has captions
    assert [h["id"] for h in rest["results"]] == [h.id for h in library]


def test_k_reaches_faiss_once_per_index_and_never_comes_back(collection_copy: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A search calls each index's FAISS search once with its depth, and Collection.search once:
    no step calls back into the collection's search."""
    from crossmodal_rag.store.vectors import VectorIndex

    calls: list[tuple[int, int]] = []
    real_index, real_search = VectorIndex.search, Collection.search
    entries: list[str] = []

    def counted_index(self, q, k, *args, **kwargs):
        calls.append((len(np.atleast_2d(q)), k))
        return real_index(self, q, k, *args, **kwargs)

    def counted_search(self, *args, **kwargs):
        entries.append("search")
        return real_search(self, *args, **kwargs)

    monkeypatch.setattr(VectorIndex, "search", counted_index)
    monkeypatch.setattr(Collection, "search", counted_search)
    with Collection.open(collection_copy) as coll:
        for mode, target, indexes in (("dense", "images", 1), ("dense", "all", 2), ("hybrid", "texts", 1)):
            calls.clear()
            entries.clear()
            result = coll.search("a cup of espresso", k=3, mode=mode, target=target)
            assert result.mode == mode and len(result) == 3
            assert entries == ["search"] and len(calls) == indexes, (mode, target, calls)
            depth = 3 if mode == "dense" else 100  # hybrid: fused 100 deep whatever k
            assert {k for _, k in calls} == {depth}


def _any_collections(source: str) -> list[str]:
    """Parameters named like a collection (``coll``, ``collection``) annotated ``Any``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for arg in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs):
                if arg.arg in ("coll", "collection") and arg.annotation is not None \
                        and ast.unparse(arg.annotation) in ("Any", "typing.Any", "object"):
                    found.append(f"{node.name}({arg.arg}: {ast.unparse(arg.annotation)})")
    return found


def test_the_scan_finds_a_collection_typed_any() -> None:
    planted = "from typing import Any\n\ndef search(coll: Any, q: str) -> None:\n    coll.search(q)\n"
    assert _any_collections(planted) == ["search(coll: Any)"]
    assert _any_collections("def search(coll: 'Collection') -> None: ...\n") == []


def test_no_step_takes_the_collection_as_any() -> None:
    """Every module names the collection's real type (or an interface of what the step reads),
    never ``Any``: the search wing, its front ends, and the ingest and maintenance wings."""
    found = {str(p.relative_to(PACKAGE)): hits for p in sorted(PACKAGE.rglob("*.py"))
             if (hits := _any_collections(p.read_text(encoding="utf-8")))}
    assert found == {}, found
