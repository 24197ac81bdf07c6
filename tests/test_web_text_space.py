"""REST ``/api/search`` on a collection with a text space: ``texts`` and ``all`` queries are
answered as the CLI and :meth:`Collection.search <crossmodal_rag.collection.Collection.search>` answer them (same ids, same order,
same scores), with the batcher on; ``images`` queries stay CLIP's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sentence_models import make_text_space_collection

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from crossmodal_rag import Collection
from crossmodal_rag.cli import main
from crossmodal_rag.search.text_space import open_text_space
from crossmodal_rag.web import WebSettings, create_app

PASSAGES = ["the red bridge crosses the river", "a cargo ship carried salt", "the festival is held in may",
            "a cup of coffee on a wooden table", "an old pagoda in the rain"]
QUERIES = ["a cup of coffee", "ship salt", "the pagoda"]


@pytest.fixture(scope="module")
def coll_dir(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str, sample_dir: Path) -> Path:
    return make_text_space_collection(tmp_path_factory.mktemp("webts"), tiny_oc_spec, sample_dir,
                                      PASSAGES, seed=6)


def test_rest_search_routes_texts_like_the_cli(coll_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    settings = WebSettings(collection=str(coll_dir), thumbnail_dir=str(tmp_path / "t"),
                           load_generator_at_startup=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        assert c.app.state.web.batcher is not None  # batching on: text-space queries go around it
        for q in QUERIES:
            for target in ("texts", "all"):
                r = c.get("/api/search", params={"q": q, "k": 5, "target": target, "mode": "dense"})
                assert r.status_code == 200, r.text
                got = [(h["id"], round(h["score"], 5)) for h in r.json()["results"]]
                with Collection.open(coll_dir) as coll:
                    hits = coll.search(q, k=5, target=target, mode="dense")
                    if target == "texts":  # the oracle's oracle: the text space searched directly
                        space = open_text_space(coll)
                        assert [h.id for h in hits] == [h.id for h in space.search(coll.store, q, 5)]
                assert got == [(h.id, round(h.score, 5)) for h in hits]
                assert main(["search", "-c", str(coll_dir), q, "-k", "5", "--target", target, "--mode", "dense",
                             "--json"]) == 0
                cli = json.loads(capsys.readouterr().out)["results"]
                assert [h["id"] for h in cli] == [i for i, _ in got]
        # images: CLIP, through the batcher as before
        r = c.get("/api/search", params={"q": "a cup", "k": 3, "target": "images"})
        with Collection.open(coll_dir) as coll:
            assert [h["id"] for h in r.json()["results"]] == [h.id for h in coll.search("a cup", k=3)]


def test_a_refused_text_space_is_a_json_503_naming_reindex(coll_dir: Path, tmp_path: Path) -> None:
    """A text space the collection refuses (here: its collection id blanked) is the server's state,
    not the client's input: 503 with the fix, never a bare 500; image searches go on."""
    import shutil

    folder = tmp_path / "c"
    shutil.copytree(coll_dir, folder)
    manifest_path = folder / "text_space" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "collection_id": ""}))
    settings = WebSettings(collection=str(folder), thumbnail_dir=str(tmp_path / "t"),
                           load_generator_at_startup=False)
    with TestClient(create_app(settings), base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        r = c.get("/api/search", params={"q": "a cup of coffee", "k": 3, "target": "texts", "mode": "dense"})
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["code"] == "collection_damaged" and "reindex" in error["message"]
        assert str(tmp_path) not in error["message"]  # no absolute server path leaves it
        r = c.get("/api/search", params={"q": "a cup", "k": 3, "target": "images", "mode": "dense"})
        assert r.status_code == 200, r.text
