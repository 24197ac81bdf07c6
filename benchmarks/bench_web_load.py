"""Bounded load test of the web app on loopback: N concurrent clients for T seconds.

Starts ``crossmodal-rag serve`` (a subprocess, bound to 127.0.0.1) over the sample collection
indexed with a ViT-B-32-sized random CLIP, then runs a mixed request load from threads in this
process: text searches (70%), thumbnails (20%), stats/health (10%). Reports throughput, p50/p99
latency per request kind and the error count. Every request goes to 127.0.0.1 only.

    python benchmarks/bench_web_load.py --clients 16 --seconds 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
QUERIES = ["a cat", "a cup of coffee", "an astronaut", "a rocket at night", "old coins", "a flower",
           "a brick wall", "a portrait of a woman in uniform", "handwriting on paper", "stars in space"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_collection(work: Path) -> Path:
    import open_clip

    from crossmodal_rag import Collection
    from crossmodal_rag.testing import make_tiny_open_clip

    model = make_tiny_open_clip(work / "vitb32", model_cfg=open_clip.get_model_config("ViT-B-32"))
    coll = work / "coll"
    with Collection.create(coll, f"open_clip:local-dir:{model}") as c:
        c.add(REPO / "data" / "sample")
    return coll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--soak", action="store_true",
                    help="also send bad requests (they must get 4xx) and sample server memory every 10 s")
    ap.add_argument("--out-json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="xmr-load-"))
    try:
        coll = build_collection(work)
        port = _free_port()
        env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
        server = subprocess.Popen(
            [sys.executable, "-m", "crossmodal_rag", "serve", "--collection", str(coll), "--port", str(port),
             "--lazy-generator", "--thumbnail-dir", str(work / "thumbs")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as probe:
            for _ in range(600):
                try:
                    if probe.get("/api/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            ids = [h["id"] for h in probe.get("/api/search", params={"q": "x", "k": 15}).json()["results"]]
        rss_before = _rss(server.pid)

        lat: dict[str, list[float]] = {"search": [], "thumbnail": [], "meta": [], "bad": []}
        errors: list[str] = []
        rss: list[tuple[float, float | None]] = []
        bad_requests = [
            ("get", "/api/search", {"params": {"q": "cat", "k": 0}}),
            ("get", "/api/search", {"params": {"q": "x" * 5000}}),
            ("get", "/api/items/99999999", {}),
            ("post", "/api/search/image", {"files": {"image": ("x.jpg", b"not an image", "image/jpeg")}}),
            ("post", "/api/ask", {"content": b"{broken", "headers": {"content-type": "application/json"}}),
            ("get", "/api/items/..%2F..%2Fetc%2Fpasswd/image", {}),
        ]
        lock = threading.Lock()
        stop = time.perf_counter() + args.seconds

        def client(seed: int) -> None:
            rng = random.Random(seed)
            with httpx.Client(base_url=base, timeout=60) as c:
                while time.perf_counter() < stop:
                    r = rng.random()
                    t0 = time.perf_counter()
                    try:
                        if args.soak and r > 0.9:
                            kind = "bad"
                            method, url, kw = rng.choice(bad_requests)
                            resp = getattr(c, method)(url, **kw)
                            ok = 400 <= resp.status_code < 500
                            err = f"bad: HTTP {resp.status_code} for {url}"
                            dt = time.perf_counter() - t0
                            with lock:
                                (lat[kind].append(dt) if ok else errors.append(err))
                            continue
                        if r < 0.7:
                            kind = "search"
                            resp = c.get("/api/search", params={"q": rng.choice(QUERIES), "k": 10})
                        elif r < 0.9:
                            kind = "thumbnail"
                            resp = c.get(f"/api/items/{rng.choice(ids)}/thumbnail")
                        else:
                            kind = "meta"
                            resp = c.get(rng.choice(["/api/stats", "/api/health"]))
                        ok = resp.status_code == 200
                        err = f"{kind}: HTTP {resp.status_code}"
                    except httpx.HTTPError as e:
                        ok, err = False, f"{kind}: {type(e).__name__}"
                    dt = time.perf_counter() - t0
                    with lock:
                        (lat[kind].append(dt) if ok else errors.append(err))

        def sampler() -> None:
            t_begin = time.perf_counter()
            while time.perf_counter() < stop:
                rss.append((round(time.perf_counter() - t_begin, 1), _rss(server.pid)))
                time.sleep(10)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
        threads.append(threading.Thread(target=sampler))
        t_start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t_start
        rss_after = _rss(server.pid)
        server.terminate()
        server.wait(timeout=30)

        total = sum(len(v) for v in lat.values())
        result = {"clients": args.clients, "seconds": round(elapsed, 1), "requests_ok": total,
                  "errors": len(errors), "error_kinds": sorted(set(errors))[:10],
                  "throughput_rps": round(total / elapsed, 1),
                  "server_rss_mb_before": rss_before, "server_rss_mb_after": rss_after}
        print(f"{args.clients} clients, {elapsed:.1f} s: {total} ok, {len(errors)} errors, "
              f"{total / elapsed:.1f} req/s")
        print("kind       count   p50 ms   p99 ms")
        for kind, values in lat.items():
            if values:
                p50, p99 = np.percentile(values, [50, 99]) * 1000
                result[kind] = {"count": len(values), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}
                print(f"{kind:<10} {len(values):>5} {p50:>8.1f} {p99:>8.1f}")
        all_lat = [x for v in lat.values() for x in v]
        if all_lat:
            p50, p99 = np.percentile(all_lat, [50, 99]) * 1000
            result["all"] = {"p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}
            print(f"{'all':<10} {len(all_lat):>5} {p50:>8.1f} {p99:>8.1f}")
        print(f"server RSS: {rss_before} MB before, {rss_after} MB after")
        if rss:
            result["rss_samples_mb"] = rss
            print("RSS over time (s, MB):", ", ".join(f"{t:.0f}:{m}" for t, m in rss))
        five_xx = [e for e in errors if "HTTP 5" in e]
        result["http_5xx"] = len(five_xx)
        print(f"5xx responses: {len(five_xx)}")
        if args.out_json:
            Path(args.out_json).write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _rss(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


if __name__ == "__main__":
    main()
