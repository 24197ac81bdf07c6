"""Search latency while slow image decodes are in flight (issue 25): before and after the decode pool.

Builds the sample collection with a ViT-B-32-sized random CLIP (with the code of ``--repo``, so a
baseline checkout reads its own format), starts that checkout's ``crossmodal-rag serve`` on
127.0.0.1, and sends ``--uploads`` uploads of a scan bomb (a progressive JPEG of ``--side`` x
``--side`` with ``--scans`` extra scans; ~60 s to decode at 7000 and 20,000) to
``/api/search/image``, each client disconnecting ``--disconnect-after`` seconds after its body is
sent (as in the issue's report). Meanwhile one client searches by text every 0.5 s, one search at
a time, for ``--seconds``; the report gives each search's latency, the longest, and how long
searches were blocked. With ``--wait-uploads`` the upload clients wait for their answers instead
(status and time reported).

    python benchmarks/bench_web_decode.py --out-json after.json
    git worktree add /tmp/before eacc2af
    python benchmarks/bench_web_decode.py --repo /tmp/before --seconds 180 --out-json before.json
"""

from __future__ import annotations

import argparse
import json
import os
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
sys.path.insert(0, str(REPO))

from benchmarks._common import machine_info, vit_b32_random  # noqa: E402
from tests.hostile_uploads import scan_bomb  # noqa: E402

BUILD = """
import sys
from pathlib import Path
from crossmodal_rag import Collection
with Collection.create(Path(sys.argv[1]), sys.argv[2]) as c:
    c.add(Path(sys.argv[3]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(repo: Path) -> dict[str, str]:
    return {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1", "PYTHONPATH": str(repo), "CROSSMODAL_RAG_TEXT_MODEL": "none"}


def start_server(repo: Path, coll: Path, work: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "crossmodal_rag", "serve", "-c", str(coll), "--port", str(port),
                             "--lazy-generator", "--thumbnail-dir", str(work / "thumbs")],
                            cwd=repo, env=_env(repo), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


def upload(port: int, data: bytes, disconnect_after: float | None, out: list) -> None:
    """Send a multipart upload; hang up ``disconnect_after`` s later, or wait for the answer."""
    boundary = "bench25"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"bomb.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=900) as sock:
        sock.sendall(head + body)
        if disconnect_after is not None:
            time.sleep(disconnect_after)
            out.append({"disconnected_after_s": disconnect_after})
            return
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer else None
    text = answer.split(b"\r\n\r\n", 1)[-1][:300].decode("utf-8", "replace")
    out.append({"status": status, "seconds": round(time.perf_counter() - t0, 2), "body": text})


def probe(port: int, seconds: float, start: float) -> list[tuple[float, float]]:
    """(seconds since the uploads began, latency) of text searches, one at a time, every 0.5 s."""
    rows = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=900) as c:
        i = 0
        while time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            r = c.get("/api/search", params={"q": f"a red flower {i}", "k": 10})
            assert r.status_code == 200, r.text
            rows.append((round(t0 - start, 2), round(time.perf_counter() - t0, 4)))
            i += 1
            time.sleep(0.5)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=REPO, help="checkout whose server to measure (default: this one)")
    ap.add_argument("--side", type=int, default=7000)
    ap.add_argument("--scans", type=int, default=20_000)
    ap.add_argument("--uploads", type=int, default=2)
    ap.add_argument("--disconnect-after", type=float, default=3.0)
    ap.add_argument("--wait-uploads", action="store_true", help="wait for the uploads' answers instead")
    ap.add_argument("--seconds", type=float, default=90.0, help="how long to keep searching")
    ap.add_argument("--out-json")
    args = ap.parse_args()

    repo = args.repo.resolve()
    bomb = scan_bomb(args.side, args.scans)
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        work = Path(tmp)
        coll = work / "coll"
        subprocess.run([sys.executable, "-c", BUILD, str(coll), vit_b32_random(), str(REPO / "data" / "sample")],
                       cwd=repo, env=_env(repo), check=True)
        proc, port = start_server(repo, coll, work)
        try:
            quiet = probe(port, 5.0, time.perf_counter())  # before any upload
            uploads: list = []
            start = time.perf_counter()
            threads = [threading.Thread(target=upload, args=(port, bomb, None if args.wait_uploads
                                                             else args.disconnect_after, uploads))
                       for _ in range(args.uploads)]
            for t in threads:
                t.start()
            time.sleep(0.5)
            rows = probe(port, args.seconds, start)
            for t in threads:
                t.join()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    lat = np.array([r[1] for r in rows])
    slow = [r for r in rows if r[1] > 1.0]
    result = {
        "repo": str(repo), "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo,
                                                    capture_output=True, text=True).stdout.strip(),
        "bomb": {"side": args.side, "scans": args.scans, "bytes": len(bomb)}, "uploads": uploads,
        "quiet_p50_ms": round(1000 * float(np.median([r[1] for r in quiet])), 1),
        "searches": len(rows), "p50_ms": round(1000 * float(np.median(lat)), 1),
        "max_s": round(float(lat.max()), 2), "over_1s": len(slow),
        "blocked_s": round(sum(r[1] for r in slow), 1), "rows": rows, "machine": machine_info(),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "machine")}, indent=1))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
