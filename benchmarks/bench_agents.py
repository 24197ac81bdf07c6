"""Agents' protocols against the library, same run: the MCP ``search`` round trip over stdio
(the real ``crossmodal-rag mcp`` subprocess, the SDK's own client) vs the same search through
the library in this process; and ``/v1/embeddings`` throughput vs ``/api/search``'s encode path
(one text per request, k=1, dense) vs the library's ``encode_texts``, on one served app.

The collection is the sample photos indexed with a tiny random CLIP (default: the overhead of
the protocols is what is measured) or, with ``--vit-b32``, a random ViT-B-32 (real encoder cost).
Searches alternate library / MCP query by query, so load from other processes hits both alike;
the library's search runs in a worker thread, as the server runs it (on a loaded 2-core machine,
torch's two OpenMP threads called from the main thread cost ~160 ms per tiny query, from a worker
thread ~2 ms: a comparison across the two would measure OpenMP, not the protocol).

    python benchmarks/bench_agents.py --queries 200 --texts 256
    python benchmarks/bench_agents.py --vit-b32 --queries 50 --texts 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks._common import machine_info, pct, print_machine, vit_b32_random  # noqa: E402

QUERIES = ["a cat", "a cup of coffee", "an astronaut", "a rocket at night", "old coins", "a flower",
           "a brick wall", "a portrait of a woman in uniform", "handwriting on paper", "stars in space"]


def build(work: Path, spec: str) -> Path:
    from crossmodal_rag import Collection

    folder = work / "coll"
    with Collection.create(folder, spec) as c:
        c.add(REPO / "data" / "sample")
    return folder


async def mcp_vs_library(coll: Path, n: int, work: Path) -> dict[str, float]:
    from mcp import Client, StdioServerParameters

    from crossmodal_rag import Collection

    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    params = StdioServerParameters(command=sys.executable, env=env, args=[
        "-m", "crossmodal_rag", "-q", "mcp", "-c", str(coll), "--thumbnail-dir", str(work / "t")])
    lib, rpc = [], []
    with Collection.open(coll) as c:
        c.encoder.load()
        async with Client(params, read_timeout_seconds=300) as client:
            for q in QUERIES:  # warm both sides
                await asyncio.to_thread(c.search, q, k=10, mode="dense")
                await client.call_tool("search", {"text": q, "k": 10, "mode": "dense"})
            for i in range(n):
                q = QUERIES[i % len(QUERIES)]
                t0 = time.perf_counter()
                want = [h.id for h in await asyncio.to_thread(c.search, q, k=10, mode="dense")]
                t1 = time.perf_counter()
                res = await client.call_tool("search", {"text": q, "k": 10, "mode": "dense"})
                t2 = time.perf_counter()
                got = [h["id"] for h in json.loads(res.content[0].text)["results"]]
                assert got == want, (q, got, want)
                lib.append(t1 - t0)
                rpc.append(t2 - t1)
    return {"library_p50_ms": pct(lib, 50) * 1e3, "mcp_p50_ms": pct(rpc, 50) * 1e3,
            "overhead_p50_ms": (pct(rpc, 50) - pct(lib, 50)) * 1e3, "mcp_p99_ms": pct(rpc, 99) * 1e3,
            "library_p99_ms": pct(lib, 99) * 1e3, "queries": n}


def embeddings_vs_search(coll: Path, texts: int, batch: int, work: Path) -> dict[str, float]:
    import httpx
    import uvicorn

    from crossmodal_rag.web import WebSettings, create_app

    app = create_app(WebSettings(collection=str(coll), generator=str(work / "none"),
                                 load_generator_at_startup=False, thumbnail_dir=str(work / "t2")))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    items = [f"{QUERIES[i % len(QUERIES)]} {i}" for i in range(texts)]
    out: dict[str, float] = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as h:
            model = h.get("/v1/models").json()["data"][0]["id"]
            st = app.state.web
            st.collection.encoder.encode_texts(items[:batch])  # warm
            h.get("/api/search", params={"q": "warm", "k": 1, "mode": "dense"})
            t0 = time.perf_counter()
            for i in range(0, texts, batch):
                st.collection.encoder.encode_texts(items[i:i + batch])
            out["library_texts_per_s"] = texts / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for i in range(0, texts, batch):
                r = h.post("/v1/embeddings", json={"model": model, "input": items[i:i + batch]})
                assert r.status_code == 200, r.text
            out["v1_embeddings_texts_per_s"] = texts / (time.perf_counter() - t0)
            t0 = time.perf_counter()
            for q in items:
                assert h.get("/api/search", params={"q": q, "k": 1, "mode": "dense"}).status_code == 200
            out["api_search_texts_per_s"] = texts / (time.perf_counter() - t0)
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
    out["batch"] = batch
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vit-b32", action="store_true", help="a random ViT-B-32 instead of the tiny model")
    ap.add_argument("--out-json", type=Path)
    args = ap.parse_args()
    info = machine_info()
    print_machine(info)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.vit_b32:
            spec = vit_b32_random()
        else:
            from crossmodal_rag.testing import make_tiny_open_clip

            spec = f"open_clip:local-dir:{make_tiny_open_clip(work / 'tiny', seed=0)}"
        coll = build(work, spec)
        load0 = os.getloadavg()[0]
        result = {"model": "vit-b-32 (random)" if args.vit_b32 else "tiny open_clip (random)",
                  "mcp": asyncio.run(mcp_vs_library(coll, args.queries, work)),
                  "embeddings": embeddings_vs_search(coll, args.texts, args.batch, work),
                  "load_before": load0, "load_after": os.getloadavg()[0], "machine": info}
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2))
    if args.out_json:
        args.out_json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
