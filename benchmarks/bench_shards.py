"""Fan-out overhead of one query over several index shards, in-process and on Ray Serve.

One embedding folder (synthetic clustered vectors with captions, the tiny test encoder's 32-d so
that the query embedding costs next to nothing and the fan-out is what is measured) is imported
twice: whole (the union collection) and as ``--slice i/3`` (three shards). Then, in one run:

* in-process: p50/p99 of ``Collection.search`` on the union vs ``open_shards(...).search`` over
  the three shards (in parallel threads, the default, and in turn: ``ShardSettings(parallel=False)``), dense (by vector), auto (text queries with rare words: keyword evidence
  fused with the dense ranking) and keyword (BM25 with the shards' summed statistics), every
  shard result checked against the union (hits, and scores within 1e-6);
* Ray Serve, the union as one shard deployment vs the three shards (1, then 2 replicas each)
  behind the same router: the dense queries through the router's handle, text queries over HTTP
  (1 client), and throughput at 16 concurrent HTTP clients.

Run:  python benchmarks/bench_shards.py --rows 30000 --queries 200 --auto-queries 50 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _common

from crossmodal_rag import Collection
from crossmodal_rag.ingestion.importer import import_embeddings
from crossmodal_rag.search import SearchRequest
from crossmodal_rag.search.shards import ShardSettings
from crossmodal_rag.serving import open_shards
from crossmodal_rag.testing import make_tiny_open_clip

OUT = Path(__file__).resolve().parent / "shards"


def build(work: Path, rows: int) -> tuple[str, Path, list[Path]]:
    """The tiny encoder, the embedding folder, the union and three slices (kept between runs)."""
    from tests.test_shards import _clustered, _rows

    model = work / "model"
    if not model.exists():
        make_tiny_open_clip(model)
    spec = f"open_clip:local-dir:{model}"
    src = work / f"emb-{rows}"
    if not src.exists():
        src.mkdir(parents=True)
        rng = np.random.default_rng(34)
        half = rows // 2
        for f in range(2):
            np.save(src / f"part-{f}.npy", _clustered(rng, half, 32).astype(np.float16))
            np.save(src / f"part-{f}.text.npy", _clustered(rng, half, 32).astype(np.float16))
            (src / f"part-{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(rng, f * half, half)))
    union = work / f"union-{rows}"
    shards = [work / f"shard-{rows}-{i}" for i in (1, 2, 3)]
    for folder, part in [(union, None), *zip(shards, [(1, 3), (2, 3), (3, 3)], strict=True)]:
        if not (folder / "manifest.json").exists():
            t0 = time.perf_counter()
            import_embeddings(src, folder, spec, verify=0, fsync="off", progress=False, index_type="Flat", slice=part)
            print(f"imported {folder.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return spec, union, shards


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 3), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3),
            "n": len(ms)}


def timed(call, requests: list[SearchRequest]) -> tuple[dict[str, float], list]:
    for r in requests[:5]:  # warm-up
        call(r)
    out, seconds = [], []
    for r in requests:
        t0 = time.perf_counter()
        out.append(call(r))
        seconds.append(time.perf_counter() - t0)
    return percentiles(seconds), out


def http_get(port: int, q: str) -> dict:
    url = f"http://127.0.0.1:{port}/api/search?" + urllib.parse.urlencode({"q": q, "mode": "dense", "k": 10,
                                                                         "target": "texts"})
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def throughput(port: int, texts: list[str], clients: int, seconds: float) -> dict[str, float]:
    for t in texts[:20]:  # warm-up: every replica up and answering
        http_get(port, t)
    done, partial, lat = [0], [0], []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def client(i: int) -> None:
        j = i
        while time.monotonic() < end:
            t0 = time.perf_counter()
            out = http_get(port, texts[j % len(texts)])
            with lock:
                done[0] += 1
                partial[0] += bool(out["partial"])
                lat.append(time.perf_counter() - t0)
            j += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"qps": round(done[0] / wall, 2), "queries": done[0], "partial": partial[0], **percentiles(lat)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=30000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20.0, help="each throughput run")
    ap.add_argument("--auto-queries", type=int, default=50, help="text queries in auto mode (keyword evidence fused)")
    ap.add_argument("--keyword-queries", type=int, default=50,
                    help="text queries in keyword mode (BM25 with the shards' summed statistics)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/xmr-bench-shards"))
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT / "results.json")
    args = ap.parse_args()
    _, union_dir, shard_dirs = build(args.work, args.rows)
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((args.queries, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    # target texts: an image hit's captions are read by a query whose plan scans every caption
    # (store/metadata.py captions_of uses items_kind, not items_caption: ~40 ms a hit at 30k under
    # load), which would hide the fan-out in both arms
    dense = [SearchRequest(vector=v, mode="dense", k=10, target="texts") for v in vectors]
    words = ["red", "blue", "green", "cat", "dog", "bird", "car", "boat", "tree", "house", "river", "mountain",
             "beach", "snow", "city"]
    texts = [f"{words[i % len(words)]} zx{i % 40:03d}" for i in range(args.queries)]
    auto = [SearchRequest(text=t, k=10, target="texts") for t in texts[:args.auto_queries]]
    keyword = [SearchRequest(text=f"{words[i % len(words)]} {words[(3 * i + 1) % len(words)]} zx{i % 40:03d}",
                             mode="keyword", k=10, target="texts") for i in range(args.keyword_queries)]
    results: dict[str, object] = {"machine": _common.machine_info(), "rows": args.rows, "shards": 3,
                                  "queries": args.queries}
    serial = ShardSettings(parallel=False)
    with Collection.open(union_dir) as union, open_shards(shard_dirs) as shards, \
            open_shards(shard_dirs, settings=serial) as in_turn:
        for name, reqs in (("dense", dense), ("auto", auto), ("keyword", keyword)):
            u, want = timed(union.search, reqs)
            s, got = timed(shards.search, reqs)
            t, _ = timed(in_turn.search, reqs)
            same = sum([(h.path, h.text) for h in a] == [(h.path, h.text) for h in b] for a, b in zip(want, got,
                                                                                                      strict=True))
            overlap = statistics.mean(len({(h.path, h.text) for h in a} & {(h.path, h.text) for h in b}) / max(len(a), 1)
                                      for a, b in zip(want, got, strict=True))
            scores = sum(np.allclose([h.score for h in a], [h.score for h in b], rtol=0, atol=1e-6)
                         for a, b in zip(want, got, strict=True) if len(a) == len(b))
            results[f"in_process_{name}"] = {
                "union": u, "shards_threads": s, "shards_in_turn": t, "same_as_union": f"{same}/{len(reqs)}",
                "same_scores_as_union": f"{scores}/{len(reqs)}",
                "top10_overlap": round(overlap, 3),
                "p50_ratio_threads": round(s["p50_ms"] / u["p50_ms"], 2),
                "p50_ratio_in_turn": round(t["p50_ms"] / u["p50_ms"], 2)}
            print(name, results[f"in_process_{name}"], file=sys.stderr)
    if not args.no_ray:
        import ray
        from ray import serve

        from crossmodal_rag.serving.ray_serve import RaySettings, deploy

        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        port = 8799
        runs = [("ray_union_1_replica", [union_dir], 1), ("ray_3_shards_1_replica", shard_dirs, 1),
                ("ray_3_shards_2_replicas", shard_dirs, 2)]
        for label, dirs, replicas in runs:
            t0 = time.perf_counter()
            handle = deploy(dirs, RaySettings(replicas=replicas, shard_cpus=0.25, router_cpus=0.5, port=port,
                                              deadline_s=30.0))
            row: dict[str, object] = {"deploy_s": round(time.perf_counter() - t0, 1)}
            row["handle_dense"], _ = timed(lambda r, h=handle: h.search.remote(r).result(), dense)
            row["http_text_1_client"], _ = timed(lambda r: http_get(port, texts[0]), dense[:50])
            row["http_16_clients"] = throughput(port, texts, 16, args.seconds)
            results[label] = row
            print(label, row, file=sys.stderr)
            serve.delete("crossmodal-rag")
        serve.shutdown()
        ray.shutdown()
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
