"""Several collections as one (search/shards.py, serving/local.py) and `import --slice`: three
slices of one embedding folder searched together against one collection holding the union (the
oracle), in every mode, with --where, --min-score and query arithmetic; a shard of another
encoder refused by name; a failing or slow shard gives a partial result, then recovery."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from crossmodal_rag import Collection
from crossmodal_rag.cli import main
from crossmodal_rag.ingestion.importer import import_embeddings, parse_slice, slice_bounds
from crossmodal_rag.search import SearchRequest, SearchResult
from crossmodal_rag.search.shards import ShardSet, ShardSettings, ShardsUnavailableError
from crossmodal_rag.serving import ShardMismatchError, open_shards, read_shard_list

N_ROWS = 2400  # in two embedding files of 1,200: the three slices cut across the file boundary
WORDS = ("red", "blue", "green", "cat", "dog", "bird", "car", "boat", "tree", "house", "river", "mountain",
         "beach", "snow", "city", "night", "market", "street", "garden", "kitchen")
CODES = [f"zx{k:03d}" for k in range(40)]  # rare words: informative keyword evidence


def _rows(rng: np.random.Generator, start: int, n: int) -> list[dict]:
    rows = []
    for k in range(start, start + n):
        words = rng.choice(WORDS, size=int(rng.integers(3, 8)), p=_zipf(len(WORDS))).tolist()
        if k % 7 == 0:
            words.append(CODES[k % len(CODES)])
        rows.append({"image_path": f"img/{k:05d}.jpg", "caption": " ".join(words), "year": 2000 + k % 20,
                     "width": 100 + k % 900, "height": 100})
    return rows


def _zipf(n: int) -> np.ndarray:
    p = 1.0 / np.arange(1, n + 1)
    return p / p.sum()


def _clustered(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    centres = rng.standard_normal((12, dim))
    x = centres[rng.integers(0, 12, n)] + 0.6 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Loose layout: part-0.npy/.text.npy/.jsonl and part-1..., 1,200 rows each, 32-d."""
    folder = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(34)
    half = N_ROWS // 2
    for f in range(2):
        np.save(folder / f"part-{f}.npy", _clustered(rng, half, 32).astype(np.float16))
        np.save(folder / f"part-{f}.text.npy", _clustered(rng, half, 32).astype(np.float16))
        (folder / f"part-{f}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in _rows(rng, f * half, half)), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, source: Path, tiny_oc_spec: str) -> tuple[Path, list[Path]]:
    """The union collection and three slices of the same folder."""
    out = tmp_path_factory.mktemp("colls")
    union = out / "union"
    import_embeddings(source, union, tiny_oc_spec, verify=0, fsync="off", progress=False, index_type="Flat")
    shards = []
    for i in (1, 2, 3):
        shards.append(out / f"shard-{i}")
        import_embeddings(source, shards[-1], tiny_oc_spec, verify=0, fsync="off", progress=False,
                          index_type="Flat", slice=(i, 3))
    return union, shards


@pytest.fixture(scope="module")
def opened(built: tuple[Path, list[Path]]):
    union, shards = built
    with Collection.open(union) as u, open_shards(shards) as s:
        yield u, s


def _key(hit) -> tuple[str, str | None]:
    return (hit.kind, hit.path if hit.kind == "image" else hit.text)


def test_slices_cover_the_source_once(built: tuple[Path, list[Path]], source: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_slice("2/3") == (2, 3)
    for bad in ("0/3", "4/3", "1", "a/b"):
        with pytest.raises(ValueError, match="I/N"):
            parse_slice(bad)
    assert [slice_bounds(10, (i, 3)) for i in (1, 2, 3)] == [(0, 3), (3, 6), (6, 10)]
    union, shards = built
    with Collection.open(union) as u:
        paths = u.store.paths_under(str(source))
    seen: list[str] = []
    for shard in shards:
        with Collection.open(shard) as c:
            assert c.counts()["images"] == c.counts()["captions"] == N_ROWS // 3
            seen += c.store.paths_under(str(source))
    assert len(seen) == len(set(seen)) == N_ROWS and set(seen) == set(paths)
    with pytest.raises(SystemExit) as bad:
        main(["import", str(source), "-c", str(tmp_path / "x"), "--model", "m", "--slice", "4/3"])
    assert bad.value.code == 2 and "is not I/N" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("request_", [
    SearchRequest(text="a red cat", mode="dense", k=25),
    SearchRequest(text="a red cat", mode="dense", k=25, target="texts", where=("year>=2010",)),
    SearchRequest(text='"snow" + night - city', mode="dense", k=10, target="all"),
    SearchRequest(text="boat", mode="dense", k=40, min_score=0.2),
], ids=["images", "texts-where", "arithmetic-all", "min-score"])
def test_dense_is_the_union_exactly(opened, request_: SearchRequest) -> None:
    union, shards = opened
    want = union.search(request_)
    got = shards.search(request_)
    assert not got.partial and got.shards == ("shard-1", "shard-2", "shard-3")
    assert [_key(h) for h in got] == [_key(h) for h in want]
    assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-6)
    assert {h.shard for h in got} <= {"shard-1", "shard-2", "shard-3"}
    assert got.to_dict()["results"][0]["shard"] == got[0].shard


def _same_keyword_ranking(got, want) -> None:
    """Hit for hit the union's scores (within 1e-6), and each text the union's score for it
    (texts of equal score may stand in either order)."""
    assert len(got) == len(want)
    assert np.allclose([h.keyword_score for h in got], [h.keyword_score for h in want], rtol=0, atol=1e-6)
    union_score = {_key(h): h.keyword_score for h in want}
    tied_out = {round(want[-1].keyword_score, 6)} if len(want) else set()
    for h in got:
        if _key(h) in union_score:
            assert abs(h.keyword_score - union_score[_key(h)]) <= 1e-6
        else:  # cut at k among equal scores: the union kept another text of that score
            assert round(h.keyword_score, 6) in tied_out, _key(h)


def test_keyword_and_fused_modes_against_the_union(opened) -> None:
    """Keyword: BM25 with the shards' summed statistics (store/bm25.py) is the union's ranking,
    ids and scores; auto decides as the union does (global document frequencies) and fuses
    into its answer."""
    union, shards = opened
    for query, target, k in (("zx007", "texts", 500), ("zx012 green", "texts", 10),
                             ("kitchen garden river", "texts", 10), ('"red cat" boat', "images", 25),
                             ("beach + snow - city", "all", 30)):
        want = union.search(query, mode="keyword", k=k, target=target)
        got = shards.search(query, mode="keyword", k=k, target=target)
        assert not got.partial and len(got) >= min(k, 8), query
        _same_keyword_ranking(got, want)
    every = union.search("zx007", mode="keyword", k=500, target="texts")
    assert {_key(h) for h in shards.search("zx007", mode="keyword", k=500, target="texts")} == {_key(h) for h in every}
    local = shards.shards[0].collection.search("kitchen garden river", mode="keyword", k=10, target="texts")
    assert local[0].keyword_score != pytest.approx(union.search("kitchen garden river", mode="keyword", k=1,
                                                                target="texts")[0].keyword_score, abs=1e-6)
    for mode in ("auto", "hybrid"):
        want = union.search("zx021 beach", mode=mode, k=10, target="texts")
        got = shards.search("zx021 beach", mode=mode, k=10, target="texts")
        assert got.mode == want.mode == "hybrid" and got.reason == want.reason
        assert len({_key(h) for h in got} & {_key(h) for h in want}) >= 9
        assert all(h.dense_score is not None for h in got)
    common = shards.search("red", k=5)  # a common word: auto stays dense, as for the union
    assert common.mode == union.search("red", k=5).mode == "dense"


def test_shard_of_another_encoder_is_refused_by_name(built: tuple[Path, list[Path]], tmp_path: Path,
                                                     source: Path) -> None:
    from crossmodal_rag.testing import make_tiny_open_clip

    _, shards = built
    other = make_tiny_open_clip(tmp_path / "other-model", seed=1)  # 32-d as well, other weights
    odd = tmp_path / "odd"
    import_embeddings(source, odd, f"open_clip:local-dir:{other}", verify=0, fsync="off", progress=False,
                      index_type="Flat", slice=(1, 30))
    with pytest.raises(ShardMismatchError, match=r"shard odd .*another encoder"):
        open_shards([shards[0], odd])
    listing = tmp_path / "shards.txt"
    listing.write_text(f"# three slices\n{shards[0]}\n\n{shards[1]}  # second\n")
    assert read_shard_list(listing) == [shards[0], shards[1]]


class Flaky:
    """A shard that fails (or stalls) while ``down`` is set, else answers as ``inner``."""

    def __init__(self, inner, stall: float = 0.0) -> None:
        self.inner, self.stall, self.down, self.calls = inner, stall, False, 0
        self.name, self.has_text_space = inner.name, inner.has_text_space

    def _gate(self) -> None:
        self.calls += 1
        if self.down:
            if self.stall:
                time.sleep(self.stall)
            else:
                raise ConnectionError("replica died")

    def search(self, request: SearchRequest) -> SearchResult:
        self._gate()
        return self.inner.search(request)

    def keyword_stats(self, query, arithmetic):
        self._gate()
        return self.inner.keyword_stats(query, arithmetic)

    def keyword(self, request, query, arithmetic, routed, stats=None):
        self._gate()
        return self.inner.keyword(request, query, arithmetic, routed, stats)

    def doc_freqs(self, words):
        self._gate()
        return self.inner.doc_freqs(words)

    def get(self, ids):
        self._gate()
        return self.inner.get(ids)

    def path_entry(self, path):
        self._gate()
        return self.inner.path_entry(path)

    def counts(self):
        self._gate()
        return self.inner.counts()


def test_a_failing_or_slow_shard_gives_a_partial_result_then_recovers(opened) -> None:
    _, shards = opened
    flaky = [Flaky(shards.shards[0]), Flaky(shards.shards[1], stall=1.0), shards.shards[2]]
    fan = ShardSet(flaky, shards.embed, settings=ShardSettings(deadline_s=0.5, retries=1))
    full = fan.search("a red cat", mode="dense", k=20)
    assert not full.partial
    flaky[0].down = flaky[1].down = True
    calls = flaky[0].calls
    part = fan.search("a red cat", mode="dense", k=20)
    assert flaky[0].calls == calls + 2  # asked, then retried once
    assert part.partial and part.shards == ("shard-3",)
    assert dict(part.missing)["shard-1"] == "ConnectionError: replica died"
    assert "no answer within 0.5 s" in dict(part.missing)["shard-2"]
    alone = shards.shards[2].search(SearchRequest(text="a red cat", mode="dense", k=20))
    assert [h.path for h in part] == [h.path for h in alone]
    assert part.to_dict()["partial"] is True and part.to_dict()["missing_shards"][0]["shard"] == "shard-1"
    flaky[2] = Flaky(shards.shards[2])
    fan_all_down = ShardSet(flaky, shards.embed, settings=ShardSettings(deadline_s=0.5))
    flaky[2].down = True
    with pytest.raises(ShardsUnavailableError, match="no shard answered"):
        fan_all_down.search("a red cat", mode="dense", k=5)
    in_turn = ShardSet([flaky[0], shards.shards[2]], shards.embed, settings=ShardSettings(parallel=False))
    flaky[0].down = True
    assert dict(in_turn.search("a red cat", mode="dense", k=5).missing) == {"shard-1": "ConnectionError: replica died"}
    for f in flaky:
        f.down = False
    assert not in_turn.search("a red cat", mode="dense", k=5).partial
    in_turn.close()
    time.sleep(1.0)  # the stalled call ends
    assert fan.search("a red cat", mode="dense", k=20) == full
    fan.close()
    fan_all_down.close()


def test_cli_search_over_repeated_c_and_a_shard_list(built: tuple[Path, list[Path]], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    union, shards = built
    assert main(["search", "a red cat", "-c", str(union), "--mode", "dense", "-k", "5", "--json", "-q"]) == 0
    a = json.loads(capsys.readouterr().out)
    args = [a for s in shards for a in ("-c", str(s))]
    assert main(["search", "a red cat", *args, "--mode", "dense", "-k", "5", "--json", "-q"]) == 0
    b = json.loads(capsys.readouterr().out)
    assert [h["path"] for h in a["results"]] == [h["path"] for h in b["results"]]
    assert b["partial"] is False and all(h["shard"].startswith("shard-") for h in b["results"])
    listing = tmp_path / "shards.txt"
    listing.write_text("".join(f"{s}\n" for s in shards))
    assert main(["search", "a red cat", "--shards", str(listing), "--mode", "dense", "-k", "5", "-q"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split("\t")[5] for r in rows] == [h["path"] for h in a["results"]]


# -- the web app, its OpenAI front end and the MCP tools over shards (serve -c A -c B; mcp -c A -c B) --

LOCAL = "http://127.0.0.1"


def _settings_over(shards: list[Path], lm_dir: Path, tmp: Path, **extra: object):
    from crossmodal_rag.web import WebSettings

    return WebSettings(collection=str(shards[0]), shards=tuple(map(str, shards[1:])), generator=str(lm_dir),
                       max_new_tokens=2, show_paths=True, load_generator_at_startup=False, max_k=50,
                       thumbnail_dir=str(tmp), **extra)  # type: ignore[arg-type]


def test_web_app_openai_and_mcp_over_shards_answer_as_the_union(built, opened, lm_dir: Path, sample_dir: Path,
                                                                tmp_path: Path) -> None:
    """The routes of `serve` over three shards in one process: text and image search equal to the
    union (dense, keyword), items named by shard, counts summed, answers and chat completions
    retrieving from every shard (streamed too); one shard down: partial, never a 500."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from PIL import Image

    from crossmodal_rag.web import create_app
    from crossmodal_rag.web.backend import ShardBackend

    union, shards = opened
    cat = (sample_dir / "cat.jpg").read_bytes()
    with TestClient(create_app(_settings_over(built[1], lm_dir, tmp_path)), base_url=LOCAL) as c:
        got = c.get("/api/search", params={"q": "a red cat", "mode": "dense", "k": 8, "where": "year>=2005"}).json()
        want = union.search("a red cat", mode="dense", k=8, where="year>=2005")
        assert got["partial"] is False and got["shards"] == ["shard-1", "shard-2", "shard-3"]
        assert [h["path"] for h in got["results"]] == [h.path for h in want]
        kw = c.get("/api/search", params={"q": "kitchen garden river", "mode": "keyword", "k": 10,
                                          "target": "texts"}).json()
        want_kw = union.search("kitchen garden river", mode="keyword", k=10, target="texts")
        assert np.allclose([h["keyword_score"] for h in kw["results"]], [h.keyword_score for h in want_kw], atol=1e-6)
        r = c.post("/api/search/image", files={"image": ("cat.jpg", cat, "image/jpeg")},
                   data={"k": "5", "plus": ["snow"], "where": ["width>=300"]})
        assert r.status_code == 200, r.text
        with Image.open(sample_dir / "cat.jpg") as im:
            want_img = union.search(SearchRequest(image=im.convert("RGB"), plus=("snow",), k=5, where=("width>=300",)))
        assert [h["path"] for h in r.json()["results"]] == [h.path for h in want_img]
        first = r.json()["results"][0]
        assert first["image_url"] == f"/api/items/{first['id']}/image?shard={first['shard']}"
        item = c.get(f"/api/items/{first['id']}", params={"shard": first["shard"]}).json()
        assert item["path"] == first["path"] and item["shard"] == first["shard"]
        assert c.get(f"/api/items/{first['id']}").json()["error"]["code"] == "shard_required"
        assert c.get(f"/api/items/{first['id']}", params={"shard": "nope"}).status_code == 404
        assert c.get(first["thumbnail_url"]).json()["error"]["code"] == "gone"  # imported rows: no files on disk
        stats = c.get("/api/stats").json()
        assert stats["counts"] == union.counts() and stats["missing_shards"] == []

        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert models[1] == "shard-1+shard-2+shard-3"
        emb = c.post("/v1/embeddings", json={"model": models[0], "input": ["a red cat"]}).json()
        assert np.allclose(emb["data"][0]["embedding"], union.encoder.encode_texts(["a red cat"])[0], atol=1e-6)
        question = "a red cat by the river"
        want_src = [h.text for h in union.search(question, mode="dense", k=4, target="texts")]
        chat = c.post("/v1/chat/completions", json={"model": models[1], "k": 4,
                                                   "messages": [{"role": "user", "content": question}]}).json()
        assert [s["caption"] for s in chat["sources"]] == want_src and {s["shard"] for s in chat["sources"]} <= set(
            stats["shards"])
        with c.stream("POST", "/v1/chat/completions", json={"model": models[1], "k": 4, "stream": True,
                                                            "messages": [{"role": "user", "content": question}]}) as st:
            lines = [x for x in st.iter_lines() if x.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and json.loads(lines[0][6:])["sources"][0]["shard"].startswith("shard-")
        r = c.post("/api/ask/image", files={"image": ("cat.jpg", cat, "image/jpeg")}, data={"k": "3"})
        assert r.status_code == 200, r.text
        assert all(s["shard"] and s["thumbnail_url"].endswith(f"?shard={s['shard']}") for s in r.json()["sources"])

    flaky = Flaky(shards.shards[1])
    backend = ShardBackend(ShardSet([shards.shards[0], flaky, shards.shards[2]], shards.embed,
                                    settings=ShardSettings(deadline_s=5, retries=1)), shards.first, lambda: None)
    with TestClient(create_app(_settings_over(built[1], lm_dir, tmp_path), backend=lambda: backend),
                    base_url=LOCAL) as c:
        flaky.down = True
        part = c.get("/api/search", params={"q": "a red cat", "mode": "dense", "k": 5}).json()
        assert part["partial"] is True and part["missing_shards"][0]["shard"] == "shard-2"
        assert all(h["shard"] != "shard-2" for h in part["results"])
        kw = c.get("/api/search", params={"q": "zx007", "mode": "keyword", "k": 5}).json()
        assert kw["partial"] is True and kw["missing_shards"][0]["shard"] == "shard-2"
        assert c.get("/api/stats").json()["missing_shards"][0]["shard"] == "shard-2"
        r = c.get("/api/items/1", params={"shard": "shard-2"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shard_unavailable"
        flaky.down = False
        assert c.get("/api/search", params={"q": "a red cat", "k": 5}).json()["partial"] is False
        assert c.get("/api/items/1", params={"shard": "shard-2"}).json()["shard"] == "shard-2"
        assert c.get("/api/stats").json()["counts"] == union.counts()

    from crossmodal_rag.agents.tools import AgentSettings, AgentTools
    from crossmodal_rag.web.state import AppState

    st = AppState(_settings_over(built[1], lm_dir, tmp_path, max_batch=1))
    try:
        tools = AgentTools(st, AgentSettings())
        import asyncio

        found = asyncio.run(tools.search("a red cat", mode="dense", k=3))
        assert found["partial"] is False and [h["path"] for h in found["results"]] == [
            h.path for h in union.search("a red cat", mode="dense", k=3)]
        top = found["results"][0]
        assert top["uri"] == f"xmr://shard/{top['shard']}/item/{top['id']}"
        d, _ = asyncio.run(tools.item(top["id"], with_thumbnail=False, shard=top["shard"]))
        assert d["path"] == top["path"] and d["uri"] == top["uri"]
        assert asyncio.run(tools.stats())["counts"] == union.counts()
    finally:
        st.close()
    args = [a for s in built[1] for a in ("-c", str(s))]
    assert main(["mcp", *args, "--allow-write", str(tmp_path)]) == 2
    from crossmodal_rag.cli import build_parser
    from crossmodal_rag.cli.serve import web_settings
    from crossmodal_rag.cli.shards import shard_folders

    parsed = build_parser().parse_args(["serve", *args])
    web = web_settings(parsed, shard_folders(parsed))
    assert (web.collection, web.shards) == (str(built[1][0]), tuple(map(str, built[1][1:])))


# -- on Ray Serve: one local cluster for the module (start-up is the slow part) --------------------

@pytest.fixture(scope="module")
def served(built: tuple[Path, list[Path]], lm_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    import socket

    from ray import serve

    from crossmodal_rag.serving.ray_serve import RaySettings, deploy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        web = _settings_over(built[1], lm_dir, tmp_path_factory.mktemp("thumbs"))
        handle = deploy(built[1], RaySettings(shard_cpus=0.25, router_cpus=0.25, port=port, deadline_s=3.0), web)
        yield handle, port
    finally:
        serve.shutdown()
        ray.shutdown()


def _get(port: int, path: str = "/api/search", **params: object) -> dict:
    import urllib.parse
    import urllib.request

    url = f"http://127.0.0.1:{port}{path}?" + urllib.parse.urlencode(params, doseq=True)
    with urllib.request.urlopen(url, timeout=60) as r:
        assert r.status == 200
        return json.loads(r.read())


def test_ray_serve_answers_as_the_union_then_survives_a_dead_replica(built, opened, served, sample_dir: Path) -> None:
    """The router runs serve's web app over the shard deployments: search (text, keyword, an
    upload), items by shard and the OpenAI chat answer as the union or the in-process shards do."""
    import urllib.request

    import ray

    union, shards = opened
    handle, port = served
    want = union.search("a red cat", mode="dense", k=10, where="year>=2005")
    got = _get(port, q="a red cat", mode="dense", k=10, where="year>=2005")
    assert got["partial"] is False and [h["path"] for h in got["results"]] == [h.path for h in want]
    kw = _get(port, q="kitchen garden river", mode="keyword", k=10, target="texts")
    want_kw = union.search("kitchen garden river", mode="keyword", k=10, target="texts")
    assert np.allclose([h["keyword_score"] for h in kw["results"]], [h.keyword_score for h in want_kw], atol=1e-6)
    boundary = "xmrboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"cat.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + (sample_dir / "cat.jpg").read_bytes() + (
        f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n5\r\n--{boundary}--\r\n").encode()
    upload = urllib.request.Request(f"http://127.0.0.1:{port}/api/search/image", data=body, method="POST",
                                    headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(upload, timeout=60) as r:
        image_hits = json.loads(r.read())["results"]
    local = shards.search(SearchRequest(image=str(sample_dir / "cat.jpg"), k=5))
    assert [(h["shard"], h["id"]) for h in image_hits] == [(h.shard, h.id) for h in local]
    item = _get(port, path=f"/api/items/{image_hits[0]['id']}", shard=image_hits[0]["shard"])
    assert item["path"] == image_hits[0]["path"]
    chat = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                  headers={"Content-Type": "application/json"},
                                  data=json.dumps({"model": "shard-1+shard-2+shard-3", "k": 4, "messages": [
                                      {"role": "user", "content": "a red cat by the river"}]}).encode())
    with urllib.request.urlopen(chat, timeout=120) as r:
        sources = json.loads(r.read())["sources"]
    assert [s["caption"] for s in sources] == [h.text for h in union.search("a red cat by the river", mode="dense",
                                                                              k=4, target="texts")]
    fused = handle.search.remote(SearchRequest(text="zx021 beach", k=10, target="texts")).result()
    local = shards.search("zx021 beach", k=10, target="texts")
    assert fused["mode"] == local.mode == "hybrid" and not fused["partial"]
    assert [(h["shard"], h["id"]) for h in fused["results"]] == [(h.shard, h.id) for h in local]
    assert np.allclose([h["dense_score"] for h in fused["results"]], [h.dense_score for h in local], atol=1e-5)

    # the shard's node loses its disk and its replica dies: the replacement cannot open the shard
    # until the folder is back (a replica alone is replaced by Serve within the deadline)
    folder = built[1][1]
    away = folder.with_name("shard-2-away")
    folder.rename(away)
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True)
                   if "shard-shard-2" in a["name"] and "REPLICA" in a["name"].upper())
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    seen_partial, recovered, end = None, None, time.monotonic() + 120
    try:
        while time.monotonic() < end and seen_partial is None:
            out = _get(port, q="a red cat", mode="dense", k=10)
            seen_partial = out if out["partial"] else None
            time.sleep(0.2)
    finally:
        away.rename(folder)
    while time.monotonic() < end and recovered is None:
        out = _get(port, q="a red cat", mode="dense", k=10)
        recovered = out if not out["partial"] else None
        time.sleep(0.5)
    assert seen_partial is not None, "the dead replica's shard was never reported missing"
    assert [m["shard"] for m in seen_partial["missing_shards"]] == ["shard-2"]
    assert all(h["shard"] != "shard-2" for h in seen_partial["results"])
    assert recovered is not None and recovered["shards"] == ["shard-1", "shard-2", "shard-3"]
    assert [h["path"] for h in recovered["results"]] == [h.path for h in union.search("a red cat", mode="dense", k=10)]


def test_ask_and_eval_retrieve_from_every_shard(built: tuple[Path, list[Path]], lm_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """ask over several -c retrieves as from a knowledge collection holding the union."""
    union, shards = built
    common = ["--generator", str(lm_dir), "-k", "4", "--max-new-tokens", "2", "--json", "-q"]
    assert main(["ask", "a red cat by the river", "-c", str(shards[0]), "--knowledge", str(union), *common]) == 0
    want = json.loads(capsys.readouterr().out)
    args = [a for s in shards for a in ("-c", str(s))]
    assert main(["ask", "a red cat by the river", *args, *common]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [s["caption"] for s in got["sources"]] == [s["caption"] for s in want["sources"]]
    assert all(s["shard"].startswith("shard-") for s in got["sources"]) and "shard" not in want["sources"][0]
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"question": "a red cat by the river", "answers": ["cat"]}) + "\n")
    assert main(["eval", "generation", str(qa), *args, *common[:-2], "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 1


def test_recommend_over_shards_matches_the_union(built: tuple[Path, list[Path]],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Liked SHARD:ID items over three shards recommend what the same liked items recommend in
    the union (MMR over the same candidates)."""
    union, shards = built
    with Collection.open(shards[1]) as c:
        liked = c.search(SearchRequest(vector=np.ones(32, np.float32), mode="dense", k=1))[0]
    with Collection.open(union) as u:
        same = u.store.path_entry(liked.path)[0]
    assert main(["recommend", "-c", str(union), "--liked", str(same), "-k", "6", "--json", "-q"]) == 0
    want = json.loads(capsys.readouterr().out)
    args = [a for s in shards for a in ("-c", str(s))]
    assert main(["recommend", *args, "--liked-in", f"shard-2:{liked.id}", "-k", "6", "--json", "-q"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in got] == [r["path"] for r in want] and len(got) == 6
    assert main(["recommend", *args, "--liked", "3", "-q"]) == 2
    assert "--liked-in SHARD:ID" in capsys.readouterr().err
