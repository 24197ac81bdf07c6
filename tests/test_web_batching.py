"""Batched search serving: concurrent searches give exactly the single-search results, and the
batches really form (encoder forwards counted). Real app, real uvicorn, tiny models."""

from __future__ import annotations

import asyncio
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from crossmodal_rag import Collection
from crossmodal_rag.web import WebSettings, create_app
from crossmodal_rag.web.batching import SearchBatcher, SearchRequest
from tests.servers import served_app


@pytest.fixture(scope="module")
def coll_dir(tmp_path_factory: pytest.TempPathFactory, sample_collection: Path) -> Path:
    dest = tmp_path_factory.mktemp("serving") / "coll"
    shutil.copytree(sample_collection, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest




# -- batched search ------------------------------------------------------------------------------
# REST searches in auto mode by default (hybrid here, not batched): these ask for dense
SEARCHES = [
    {"mode": "dense", "q": "a cup of coffee", "k": 5},
    {"mode": "dense", "q": "an astronaut", "k": 3},
    {"mode": "dense", "q": '"a cat" + snow - indoors', "k": 5},
    {"mode": "dense", "q": "2:rocket + 0.5:\"night sky\"", "k": 4},
    {"mode": "dense", "q": "coins", "k": 5, "target": "texts"},
    {"mode": "dense", "q": "a flower", "k": 6, "target": "all"},
    {"mode": "dense", "q": "a brick wall", "k": 5, "where": ["kind=image", "width>=100"]},
    {"mode": "dense", "q": "a portrait", "k": 5, "min_score": "0.01"},
    {"mode": "dense", "q": "handwriting", "k": 2},
    {"mode": "dense", "q": "stars in space", "k": 5},
    {"mode": "dense", "q": "a cup of coffee", "k": 5},  # the same text twice in one batch
    {"mode": "dense", "q": "a cat", "k": 5, "min_score": "auto", "target": "texts"},
]


def _single(coll: Collection, p: dict) -> list[tuple[int, float]]:
    hits = coll.search(p["q"], k=p["k"], target=p.get("target", "images"), where=p.get("where"),
                       min_score=p.get("min_score"), mode="dense")
    return [(h.id, h.score) for h in hits]


def test_concurrent_searches_are_batched_and_equal_single_searches(coll_dir: Path, tmp_path: Path) -> None:
    """17 concurrent text searches (arithmetic, filters, targets, thresholds, bad queries) with a
    window long enough for all to meet: each answer equals the library's search alone (ids, and
    scores to float32 rounding), the bad query gets its own 422, and far fewer encoder forwards
    than requests ran."""
    app = create_app(WebSettings(collection=str(coll_dir), thumbnail_dir=str(tmp_path / "t"),
                                 load_generator_at_startup=False, max_batch=64, batch_ms=400, max_workers=1))
    with served_app(app) as (base, st):
        forwards: list[int] = []
        real = st.collection.encoder.encode_texts

        def counted(texts, *a, **kw):
            forwards.append(len(list(texts)) if not isinstance(texts, str) else 1)
            return real(texts, *a, **kw)

        st.collection.encoder.encode_texts = counted  # the real encoder, its calls counted
        # refused while read (a dangling operator), and terms that cancel out (found only once the
        # batch's real vectors are in): each its own 422
        bad = ["+ cat", "cat - cat"]
        requests = [*SEARCHES, *({"q": q, "k": 5, "mode": "dense"} for q in bad), *SEARCHES[:3]]

        def get(p: dict) -> httpx.Response:
            return httpx.get(base + "/api/search", params=p, timeout=120)

        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(get, requests))
        during = list(forwards)  # (the library's own searches below share the encoder)
        with Collection.open(coll_dir) as coll:
            for p, r in zip(requests, answers, strict=True):
                if p["q"] in bad:
                    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_query", r.text
                    continue
                assert r.status_code == 200, r.text
                got = [(h["id"], h["score"]) for h in r.json()["results"]]
                want = _single(coll, p)
                assert [i for i, _ in got] == [i for i, _ in want], p
                np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
        assert st.batcher.stats.requests == len(requests)
        assert max(st.batcher.stats.sizes) >= 8, st.batcher.stats.sizes  # the batch really formed
        assert len(during) <= 3 and st.batcher.stats.text_forwards == len(during), during
        assert sum(during) < sum(len(p["q"].split()) for p in requests)  # repeated texts embedded once


def test_concurrent_image_searches_share_one_image_forward(coll_dir: Path, tmp_path: Path, sample_dir: Path) -> None:
    app = create_app(WebSettings(collection=str(coll_dir), thumbnail_dir=str(tmp_path / "t"),
                                 load_generator_at_startup=False, max_batch=8, batch_ms=400, max_workers=1))
    files = sorted(sample_dir.glob("*.jpg"))[:4]
    with served_app(app) as (base, st):
        def post(i: int) -> httpx.Response:
            data = {"k": "4", "target": "texts" if i % 2 else "images"}
            if i == 3:
                data["plus"] = "at night"
            return httpx.post(base + "/api/search/image", data=data, timeout=120,
                              files={"image": (files[i].name, files[i].read_bytes(), "image/jpeg")})

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, range(4)))
        with Collection.open(coll_dir) as coll:
            for i, r in enumerate(answers):
                assert r.status_code == 200, r.text
                want = coll.search(image=files[i], k=4, target="texts" if i % 2 else "images",
                                   plus=["at night"] if i == 3 else None, mode="dense")
                assert [h["id"] for h in r.json()["results"]] == [h.id for h in want]
                np.testing.assert_allclose([h["score"] for h in r.json()["results"]], [h.score for h in want],
                                           atol=1e-5)
        assert st.batcher.stats.image_forwards < 4 and max(st.batcher.stats.sizes) >= 2


def test_batching_off_searches_one_by_one(coll_dir: Path, tmp_path: Path) -> None:
    app = create_app(WebSettings(collection=str(coll_dir), thumbnail_dir=str(tmp_path / "t"),
                                 load_generator_at_startup=False, max_batch=1))
    with served_app(app) as (base, st):
        assert st.batcher is None
        r = httpx.get(base + "/api/search", params=SEARCHES[2], timeout=60)
        with Collection.open(coll_dir) as coll:
            assert [h["id"] for h in r.json()["results"]] == [i for i, _ in _single(coll, SEARCHES[2])]


def test_bad_serving_settings_are_refused() -> None:
    for kwargs in ({"max_batch": 0}, {"batch_ms": -1}, {"max_queued_generations": -1}):
        with pytest.raises(ValueError, match="max_batch must be"):
            WebSettings(collection="x", **kwargs)


def test_batcher_windows_full_batches_and_lone_requests() -> None:
    """The scheduling alone (a recording run function): a full batch goes at once, the rest
    waits for the window while it runs; a lone request on an idle batcher goes at once; a
    cancelled one is skipped."""
    import anyio

    runs: list[tuple[float, list[str]]] = []

    def run(collection, requests, stats):
        runs.append((time.perf_counter(), [r.text for r in requests]))
        return [[r.text] for r in requests]

    async def main() -> None:
        b = SearchBatcher(None, anyio.CapacityLimiter(1), max_batch=4, batch_ms=300, run=run)
        t0 = time.perf_counter()
        got = await asyncio.gather(*(b.search(SearchRequest(text=str(i))) for i in range(6)))
        assert got == [[str(i)] for i in range(6)]
        assert [names for _, names in runs] == [["0", "1", "2", "3"], ["4", "5"]]
        assert runs[0][0] - t0 < 0.25  # full: not held for the window
        assert runs[1][0] - t0 >= 0.29  # the rest waited for it
        runs.clear()
        lone = SearchBatcher(None, anyio.CapacityLimiter(1), max_batch=32, batch_ms=1000, run=run)
        t0 = time.perf_counter()
        assert await lone.search(SearchRequest(text="x")) == [["x"]][0]
        assert runs[0][0] - t0 < 0.5  # an idle server does not hold a lone request for the window
        runs.clear()
        busy = anyio.CapacityLimiter(1)
        await busy.acquire()  # the only worker is busy: the next batch waits for it
        held = SearchBatcher(None, busy, max_batch=32, batch_ms=0, run=run)
        task = asyncio.ensure_future(held.search(SearchRequest(text="gone")))
        stay = asyncio.ensure_future(held.search(SearchRequest(text="stays")))
        await asyncio.sleep(0.05)
        task.cancel()  # its client went away while it waited
        busy.release()
        assert await stay == ["stays"]
        assert [names for _, names in runs] == [["stays"]]

    asyncio.run(main())


@pytest.mark.parametrize(("target", "where", "min_score"), [("images", None, None), ("all", None, 0.0),
                                                            ("texts", ["kind=caption"], None)])
def test_a_batch_of_query_vectors_is_one_index_search(coll_dir: Path, target: str, where, min_score) -> None:
    """``search_vectors`` with Q rows: one index search per index for the first fetch of all rows,
    and each row's hits equal to searching it alone."""
    from crossmodal_rag.store.vectors import VectorIndex

    with Collection.open(coll_dir) as coll:
        queries = coll.encoder.encode_texts([p["q"] for p in SEARCHES if "+" not in p["q"]])
        alone = [coll.search_vectors(q[None], k=7, target=target, where=where, min_score=min_score)[0]
                 for q in queries]
        calls: list[int] = []
        real = VectorIndex.search

        def counted(self, q, *args, **kwargs):
            calls.append(len(np.atleast_2d(q)))
            return real(self, q, *args, **kwargs)

        VectorIndex.search = counted
        try:
            together = coll.search_vectors(queries, k=7, target=target, where=where, min_score=min_score)
        finally:
            VectorIndex.search = real
    assert [[(h.id, h.rank) for h in hits] for hits in together] == [[(h.id, h.rank) for h in hits] for hits in alone]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-6)
    assert calls[: 2 if target == "all" else 1] == [len(queries)] * (2 if target == "all" else 1), calls
