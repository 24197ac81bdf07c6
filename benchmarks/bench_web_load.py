"""Bounded load test of the web app on loopback: N concurrent clients for T seconds.

Starts ``crossmodal-rag serve`` (a subprocess, bound to 127.0.0.1) over the sample collection
indexed with a ViT-B-32-sized random CLIP, then runs a mixed request load from threads in this
process: text searches (70%), thumbnails (20%), stats/health (10%). Reports throughput, p50/p99
latency per request kind and the error count. Every request goes to 127.0.0.1 only.

With ``--soak`` a share of the requests (``--hostile``, default 25%) is hostile, and each must get
its 4xx: chunked bodies far over the limits (JSON and uploads, sent until the server answers),
over-long ``q``/``where``, the ReDoS ``where`` inputs of issue 15 (long runs of digits and blanks),
NUL bytes, ids past 2**63, a foreign ``Host`` header, broken JSON, path traversal. A separate
process probes ``/api/health`` every 100 ms on its own connection, and the server's RSS is sampled;
both are reported per 10 s window. The verdict line says whether the run ended with zero 5xx,
zero resets (a connection dropped without an answer), health p99 under 100 ms in every window,
and flat memory (RSS of the last third within 5% + 20 MB of the middle third).

With ``--batching`` it measures search alone, with the server's query batching on and off in the
same run (two servers over the same collection, runs interleaved): requests/s and p50/p99 latency
at 1, 16 and 64 concurrent clients (``--levels``), ``--seconds`` per mode and level in
``--rounds`` alternating slices, and the ratios.

    python benchmarks/bench_web_load.py --clients 16 --seconds 30
    python benchmarks/bench_web_load.py --batching --levels 1,16,64 --seconds 8 --out-json batching.json
    # the issue-15 soak (10 minutes, 64 clients, good and hostile requests):
    python benchmarks/bench_web_load.py --clients 64 --seconds 600 --soak --out-json web_soak.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
WINDOW_S = 10.0


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


# -- hostile requests ---------------------------------------------------------------------------
def hostile_requests() -> list[tuple[str, str, dict]]:
    """(method, url, httpx kwargs); each must be answered 4xx."""
    return [
        ("get", "/api/search", {"params": {"q": "cat", "k": 0}}),
        ("get", "/api/search", {"params": {"q": "x" * 5000}}),
        ("get", "/api/search", {"params": {"q": "1" * 3000}}),  # digits: quadratic in the old term pattern
        ("get", "/api/search", {"params": {"q": "cat", "where": "size>" + "1" * 5000 + "x"}}),
        ("get", "/api/search", {"params": {"q": "cat", "where": "size>1" + " " * 10_000 + "x"}}),  # ReDoS
        ("get", "/api/search", {"params": {"q": "cat", "where": "size>1" + " " * 400 + "x"}}),  # within the limit
        ("get", "/api/search", {"params": {"q": "cat", "where": ["kind=image"] * 200}}),
        ("get", "/api/search", {"params": {"q": "cat", "where": "folder=/tmp/a\x00b"}}),
        ("get", "/api/search", {"params": {"q": "c\x00at"}}),
        ("get", "/api/search", {"params": {"q": "cat", "min_score": "nan"}}),
        ("get", "/api/items/99999999", {}),
        ("get", "/api/items/9223372036854775808", {}),
        ("get", "/api/items/99999999999999999999999/thumbnail", {}),
        ("get", "/api/items/..%2F..%2Fetc%2Fpasswd/image", {}),
        ("get", "/api/health", {"headers": {"host": "evil.example"}}),
        ("post", "/api/search/image", {"files": {"image": ("x.jpg", b"not an image", "image/jpeg")}}),
        ("post", "/api/ask", {"content": b"{broken", "headers": {"content-type": "application/json"}}),
        ("post", "/api/ask", {"json": {"question": "cat?", "where": ["size>1" + " " * 40_000 + "x"]}}),
        ("post", "/api/ask", {"json": {"question": "a\x00b"}}),
        ("post", "/api/ask", {"content": b'{"question": "a \\ud800 b"}', "headers": {"content-type": "application/json"}}),
        ("post", "/api/ask", {"content": b'{"question": ' + b"[" * 100_000 + b"}",  # nested 100k deep
                              "headers": {"content-type": "application/json"}}),
    ]


def chunked_oversize(port: int, route: str, total: int = 64 * 1024 * 1024) -> tuple[int | None, str]:
    """Send a chunked body of up to ``total`` bytes until the server answers; (status, problem)."""
    if route == "/api/ask":
        ctype, first = b"application/json", b'{"question": "'
    else:
        ctype = b"multipart/form-data; boundary=zz"
        first = (b'--zz\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
                 b"Content-Type: image/jpeg\r\n\r\n")
    head = (b"POST " + route.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: " + ctype + b"\r\n\r\n")
    chunk = b"x" * (64 * 1024)
    answered = threading.Event()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:

        def send() -> None:
            try:
                sock.sendall(head + b"%x\r\n%s\r\n" % (len(first), first))
                sent = 0
                while sent < total and not answered.is_set():
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the server answered and closed: expected once over the limit

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        reply = b""
        try:
            while b"\r\n\r\n" not in reply:
                more = sock.recv(4096)
                if not more:
                    break
                reply += more
        except OSError as e:
            answered.set()
            return None, f"chunked {route}: {type(e).__name__} before an answer"
        answered.set()
        sender.join(timeout=60)
    if not reply.startswith(b"HTTP/1.1 "):
        return None, f"chunked {route}: connection closed without an answer"
    return int(reply.split(b" ", 2)[1]), ""


# -- the health probe (its own process, so client threads do not slow it down) ------------------
def _probe(base: str, seconds: float, out: multiprocessing.Queue) -> None:
    samples: list[tuple[float, float | None]] = []
    t_begin = time.perf_counter()
    with httpx.Client(base_url=base, timeout=30) as c:
        while time.perf_counter() - t_begin < seconds:
            t0 = time.perf_counter()
            try:
                ok = c.get("/api/health").status_code == 200
            except httpx.HTTPError:
                ok = False
            samples.append((t0 - t_begin, time.perf_counter() - t0 if ok else None))
            time.sleep(max(0.0, 0.1 - (time.perf_counter() - t0)))
    out.put(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--soak", action="store_true",
                    help="also send hostile requests (they must get 4xx); probe /api/health and RSS per window")
    ap.add_argument("--hostile", type=float, default=0.25, help="share of hostile requests with --soak")
    ap.add_argument("--out-json")
    ap.add_argument("--batching", action="store_true",
                    help="search only, query batching on vs off in the same run, at --levels clients")
    ap.add_argument("--levels", default="1,16,64", help="client counts for --batching")
    ap.add_argument("--max-batch", type=int, default=32, help="the batching server's max_batch")
    ap.add_argument("--batch-ms", type=float, default=2.0, help="the batching server's batch_ms")
    ap.add_argument("--rounds", type=int, default=4, help="--batching: alternating rounds per level")
    ap.add_argument("--torch-threads", type=int, default=0, help="--batching: torch threads per server (0: default)")
    ap.add_argument("--serve-model", metavar="SPEC",
                    help="serve's --model, e.g. onnx:FOLDER, an ONNX export of the same weights (issue 29)")
    args = ap.parse_args()
    if args.batching:
        compare_batching(args)
        return

    work = Path(tempfile.mkdtemp(prefix="xmr-load-"))
    try:
        coll = build_collection(work)
        port = _free_port()
        env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
        server = subprocess.Popen(
            [sys.executable, "-m", "crossmodal_rag", "serve", "--collection", str(coll), "--port", str(port),
             "--lazy-generator", "--thumbnail-dir", str(work / "thumbs"),
             *(["--model", args.serve_model] if args.serve_model else [])],
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
        try:
            result = run_load(args, base, port, ids, server.pid)
            result["server_rss_mb_before"] = rss_before
            report(result, args)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a server stuck in a request does not stop on SIGTERM
                print("the server did not stop within 30 s of SIGTERM; killed", file=sys.stderr)
                server.kill()
                server.wait(timeout=30)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_load(args: argparse.Namespace, base: str, port: int, ids: list[int], pid: int) -> dict:
    lat: dict[str, list[float]] = {"search": [], "thumbnail": [], "meta": [], "hostile": []}
    errors: list[str] = []
    resets: list[str] = []
    rss: list[tuple[float, float | None]] = []
    bad = hostile_requests()
    lock = threading.Lock()
    stop = time.perf_counter() + args.seconds

    def record(kind: str, ok: bool, dt: float, err: str) -> None:
        with lock:
            (lat[kind].append(dt) if ok else errors.append(err))

    def hostile(c: httpx.Client, rng: random.Random) -> None:
        t0 = time.perf_counter()
        if rng.random() < 0.1:  # a chunked body far over the limit, on its own connection
            route = rng.choice(["/api/ask", "/api/search/image"])
            status, problem = chunked_oversize(port, route)
            if status is None:
                with lock:
                    resets.append(problem)
                return
            record("hostile", status == 413, time.perf_counter() - t0, f"hostile: HTTP {status} for chunked {route}")
            return
        method, url, kw = rng.choice(bad)
        try:
            resp = getattr(c, method)(url, **kw)
        except httpx.TransportError as e:
            with lock:
                resets.append(f"hostile {url[:40]}: {type(e).__name__}")
            return
        record("hostile", 400 <= resp.status_code < 500, time.perf_counter() - t0,
               f"hostile: HTTP {resp.status_code} for {method.upper()} {url[:60]}")

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=base, timeout=120) as c:
            while time.perf_counter() < stop:
                r = rng.random()
                if args.soak and r < args.hostile:
                    hostile(c, rng)
                    continue
                r = rng.random()
                t0 = time.perf_counter()
                kind = "search" if r < 0.7 else "thumbnail" if r < 0.9 else "meta"
                try:
                    if kind == "search":
                        resp = c.get("/api/search", params={"q": rng.choice(QUERIES), "k": 10})
                    elif kind == "thumbnail":
                        resp = c.get(f"/api/items/{rng.choice(ids)}/thumbnail")
                    else:
                        resp = c.get(rng.choice(["/api/stats", "/api/health"]))
                except httpx.TransportError as e:
                    with lock:
                        resets.append(f"{kind}: {type(e).__name__}")
                    continue
                record(kind, resp.status_code == 200, time.perf_counter() - t0, f"{kind}: HTTP {resp.status_code}")

    def sampler() -> None:
        t_begin = time.perf_counter()
        while time.perf_counter() < stop:
            rss.append((round(time.perf_counter() - t_begin, 1), _rss(pid)))
            time.sleep(WINDOW_S)

    queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
    prober = multiprocessing.get_context("spawn").Process(target=_probe, args=(base, args.seconds, queue))
    prober.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads.append(threading.Thread(target=sampler))
    t_start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t_start
    health = queue.get(timeout=120)
    prober.join(timeout=30)
    return {"clients": args.clients, "seconds": round(elapsed, 1), "lat": lat, "errors": errors,
            "resets": resets, "rss": rss, "health": health, "server_rss_mb_after": _rss(pid)}


def _windows(health: list[tuple[float, float | None]], rss: list[tuple[float, float | None]]) -> list[dict]:
    out = []
    n = int(max((t for t, _ in health), default=0) // WINDOW_S) + 1
    for w in range(n):
        lo, hi = w * WINDOW_S, (w + 1) * WINDOW_S
        values = [x for t, x in health if lo <= t < hi]
        ok = [x for x in values if x is not None]
        row = {"t": lo, "health_n": len(values), "health_failed": len(values) - len(ok)}
        if ok:
            p50, p99 = np.percentile(ok, [50, 99]) * 1000
            row.update(health_p50_ms=round(p50, 1), health_p99_ms=round(p99, 1), health_max_ms=round(max(ok) * 1000, 1))
        mem = [m for t, m in rss if lo <= t < hi and m is not None]
        row["rss_mb"] = mem[0] if mem else None
        out.append(row)
    return out


def _flat(rss: list[tuple[float, float | None]]) -> tuple[bool, float | None, float | None]:
    mem = [m for _, m in rss if m is not None]
    if len(mem) < 3:
        return True, None, None
    third = len(mem) // 3
    middle, last = float(np.mean(mem[third:2 * third] or mem[:1])), float(np.mean(mem[2 * third:]))
    return bool(last <= middle * 1.05 + 20), round(middle, 1), round(last, 1)


def report(r: dict, args: argparse.Namespace) -> None:
    lat, errors, resets = r["lat"], r["errors"], r["resets"]
    elapsed = r["seconds"]
    total = sum(len(v) for v in lat.values())
    result = {"clients": r["clients"], "seconds": elapsed, "requests_ok": total, "errors": len(errors),
              "error_kinds": sorted(set(errors))[:10], "resets": len(resets), "reset_kinds": sorted(set(resets))[:10],
              "throughput_rps": round(total / elapsed, 1), "server_rss_mb_before": r["server_rss_mb_before"],
              "server_rss_mb_after": r["server_rss_mb_after"]}
    print(f"{r['clients']} clients, {elapsed:.1f} s: {total} ok, {len(errors)} errors, {len(resets)} resets, "
          f"{total / elapsed:.1f} req/s")
    print("kind       count   p50 ms   p99 ms")
    for kind, values in lat.items():
        if values:
            p50, p99 = np.percentile(values, [50, 99]) * 1000
            result[kind] = {"count": len(values), "p50_ms": round(p50, 1), "p99_ms": round(p99, 1)}
            print(f"{kind:<10} {len(values):>5} {p50:>8.1f} {p99:>8.1f}")
    windows = _windows(r["health"], r["rss"])
    result["windows"] = windows
    print("window s   health n  p50 ms  p99 ms  max ms  failed   RSS MB")
    for w in windows:
        print(f"{w['t']:>8.0f} {w['health_n']:>9} {w.get('health_p50_ms', float('nan')):>7.1f} "
              f"{w.get('health_p99_ms', float('nan')):>7.1f} {w.get('health_max_ms', float('nan')):>7.1f} "
              f"{w['health_failed']:>7} {w['rss_mb'] if w['rss_mb'] is not None else '-':>8}")
    five_xx = [e for e in errors if "HTTP 5" in e]
    flat, middle, last = _flat(r["rss"])
    worst_p99 = float(max((w.get("health_p99_ms", 0.0) for w in windows), default=0.0))
    health_failed = sum(w["health_failed"] for w in windows)
    result.update(http_5xx=len(five_xx), health_worst_window_p99_ms=worst_p99, health_failed=health_failed,
                  rss_middle_third_mb=middle, rss_last_third_mb=last, memory_flat=flat)
    verdict = bool(not five_xx and not resets and worst_p99 < 100 and not health_failed and flat)
    result["pass"] = verdict
    print(f"5xx: {len(five_xx)}; resets: {len(resets)}; worst /api/health p99 per window: {worst_p99:.1f} ms "
          f"({health_failed} failed); RSS middle third {middle} MB, last third {last} MB (flat: {flat})")
    print("PASS" if verdict else "FAIL", "(zero 5xx, zero resets, health p99 < 100 ms in every window, flat memory)")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=2))


# -- batching on vs off -----------------------------------------------------------------------
SERVER = """
import sys, uvicorn
from crossmodal_rag.web import WebSettings, create_app
coll, port, thumbs, max_batch, batch_ms, threads = sys.argv[1:7]
if int(threads):
    import torch
    torch.set_num_threads(int(threads))
settings = WebSettings(collection=coll, thumbnail_dir=thumbs, load_generator_at_startup=False,
                       max_batch=int(max_batch), batch_ms=float(batch_ms))
uvicorn.run(create_app(settings), host="127.0.0.1", port=int(port), log_level="warning")
"""


def _start_server(coll: Path, work: Path, max_batch: int, batch_ms: float,
                  torch_threads: int = 0) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(coll), str(port), str(work / f"thumbs{port}"),
                             str(max_batch), str(batch_ms), str(torch_threads)], env=env, stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(base + "/api/health", timeout=5).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the server (max_batch={max_batch}) did not start")
        time.sleep(0.2)


def _search_load(base: str, clients: int, seconds: float, seed: int, lat: list[float], errors: list[str]) -> float:
    """``clients`` closed-loop search clients (asyncio, one connection each) for ``seconds``;
    latencies and errors are appended; returns the seconds it ran."""
    import asyncio

    async def client(c: httpx.AsyncClient, rng: random.Random, stop: float) -> None:
        while time.perf_counter() < stop:
            q = f"{rng.choice(QUERIES)} {rng.randrange(1000)}"  # distinct texts: no help from repeats
            t0 = time.perf_counter()
            try:
                r = await c.get("/api/search", params={"q": q, "k": 10})
            except httpx.TransportError as e:
                errors.append(type(e).__name__)
                continue
            (lat.append(time.perf_counter() - t0) if r.status_code == 200 else errors.append(f"HTTP {r.status_code}"))

    async def run() -> float:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
            await c.get("/api/search", params={"q": "warm up", "k": 10})
            t0 = time.perf_counter()
            stop = t0 + seconds
            await asyncio.gather(*(client(c, random.Random(seed * 1000 + i), stop) for i in range(clients)))
            return time.perf_counter() - t0

    return asyncio.run(run())


def _row(mode: str, clients: int, elapsed: float, lat: list[float], errors: list[str]) -> dict:
    p50, p99 = (np.percentile(lat, [50, 99]) * 1000).tolist() if lat else (float("nan"), float("nan"))
    return {"batching": mode, "clients": clients, "seconds": round(elapsed, 2), "ok": len(lat),
            "errors": len(errors), "rps": round(len(lat) / elapsed, 2), "p50_ms": round(p50, 1),
            "p99_ms": round(p99, 1)}


def compare_batching(args: argparse.Namespace) -> None:
    """Search throughput and latency with batching on and off, interleaved, same collection."""
    levels = [int(x) for x in args.levels.split(",")]
    work = Path(tempfile.mkdtemp(prefix="xmr-batching-"))
    servers: list[subprocess.Popen] = []
    try:
        coll = build_collection(work)
        on, base_on = _start_server(coll, work, args.max_batch, args.batch_ms, args.torch_threads)
        servers.append(on)
        off, base_off = _start_server(coll, work, 1, 0.0, args.torch_threads)
        servers.append(off)
        rows = []
        for i, n in enumerate(levels):
            # rounds of each mode in turn (which goes first alternates), so drift of a busy
            # machine's load falls on both alike; each mode's samples are pooled
            runs = {"on": ([], [], [0.0]), "off": ([], [], [0.0])}
            for r in range(args.rounds):
                pair = [("on", base_on), ("off", base_off)]
                for mode, base in pair if (i + r) % 2 == 0 else pair[::-1]:
                    lat, errors, elapsed = runs[mode]
                    elapsed[0] += _search_load(base, n, args.seconds / args.rounds, i * 100 + r, lat, errors)
            for mode in ("on", "off"):
                lat, errors, elapsed = runs[mode]
                row = _row(mode, n, elapsed[0], lat, errors)
                rows.append(row)
                print(f"batching {mode:>3}  {n:>3} clients: {row['rps']:>7.1f} req/s  p50 {row['p50_ms']:>7.1f} ms  "
                      f"p99 {row['p99_ms']:>7.1f} ms  ({row['ok']} ok, {row['errors']} errors)", flush=True)
        ratios = {}
        for n in levels:
            a = next(r for r in rows if r["batching"] == "on" and r["clients"] == n)
            b = next(r for r in rows if r["batching"] == "off" and r["clients"] == n)
            ratios[n] = {"throughput_on_over_off": round(a["rps"] / b["rps"], 2) if b["rps"] else None,
                         "p50_on_over_off": round(a["p50_ms"] / b["p50_ms"], 2) if b["p50_ms"] else None,
                         "p99_on_over_off": round(a["p99_ms"] / b["p99_ms"], 2) if b["p99_ms"] else None}
            print(f"{n:>3} clients: throughput on/off {ratios[n]['throughput_on_over_off']}x, "
                  f"p50 on/off {ratios[n]['p50_on_over_off']}, p99 on/off {ratios[n]['p99_on_over_off']}")
        if args.out_json:
            Path(args.out_json).write_text(json.dumps({"max_batch": args.max_batch, "batch_ms": args.batch_ms,
                                                       "seconds": args.seconds, "rounds": args.rounds,
                                                       "torch_threads": args.torch_threads,
                                                       "load_average": os.getloadavg(), "rows": rows,
                                                       "ratios": ratios},
                                                      indent=2))
    finally:
        for proc in servers:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
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
