"""Decode and OCR bombs, before and after the budgets of issue 25: wall time and peak resident
memory of each hostile file, and the decode time of ordinary photos (no slowdown allowed).

Each case runs in a fresh child process (``python -c``) with the library of one source tree on
``PYTHONPATH`` and an address-space cap (``RLIMIT_AS``, default 4 GiB), so a bomb that would grow
past it fails there instead of taking the machine down; a child running longer than ``--budget``
seconds is stopped. Peak RSS is the child's ``ru_maxrss`` (imports included; ``base`` is the
figure before the case ran); decode times are taken after one warm-up decode of a small JPEG.

    git worktree add /tmp/before eacc2af
    python benchmarks/bench_decode_bombs.py --before /tmp/before > bombs.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.badimages import scan_bomb_jpeg, thin_jpeg  # noqa: E402

CACHE = Path(os.environ.get("XMRAG_BENCH_DIR", "/tmp/xmrag-bench")) / "bombs"

DECODE = """
import json, resource, time
import io
from PIL import Image
from crossmodal_rag.ingestion.images import decode_image
warm = io.BytesIO()
Image.new("RGB", (64, 48)).save(warm, "JPEG")
decode_image(warm.getvalue())  # plugins registered, first-call costs paid
data = open({path!r}, "rb").read()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range({repeat}):
    t = time.perf_counter()
    try:
        d = decode_image(data, "x")
        outcome = f"decoded {{d.width}}x{{d.height}} as {{d.image.size[0]}}x{{d.image.size[1]}}"
    except Exception as e:
        outcome = f"{{type(e).__name__}}: {{getattr(e, 'reason', e)}}"
    times.append(time.perf_counter() - t)
print(json.dumps({{"outcome": outcome, "times": times, "base_mb": base / 1024,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

OCR = """
import json, resource, time
from crossmodal_rag.ingestion.ocr import OcrSettings, create_ocr_engine, ocr_image
engine = create_ocr_engine(OcrSettings(threads=1)).load()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    r = ocr_image({path!r}, engine)
    outcome = f"read: {{len(r.lines)}} lines"
except Exception as e:
    outcome = f"{{type(e).__name__}}: {{str(e).splitlines()[0][:160] if str(e) else ''}}"
print(json.dumps({{"outcome": outcome, "times": [time.perf_counter() - t], "base_mb": base / 1024,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def _png(width: int, height: int) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    raw = b"".join(b"\x00" + b"\xff" * width * 3 for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _photo(width: int, height: int, progressive: bool = False, fmt: str = "JPEG") -> bytes:
    """A photo-like image: smooth gradients, a few shapes, sensor noise."""
    rng = np.random.default_rng(width + height)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([x / width * 200 + 30, y / height * 180 + 40, (x + y) / (width + height) * 150 + 60], -1)
    for _ in range(6):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(height // 10, height // 3)
        arr[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 255, 3)
    arr += rng.normal(0, 4, arr.shape).astype(np.float32)
    buf = io.BytesIO()
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    img.save(buf, fmt, **({"quality": 90, "progressive": progressive} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _big_progressive(side: int) -> bytes:
    """A progressive side x side JPEG of smooth gradients (4:4:4), about 3 MB at 16000."""
    arr = np.empty((side, side, 3), np.uint8)
    x = np.linspace(0, 255, side, dtype=np.float32)[None, :]
    for top in range(0, side, 1000):
        y = np.linspace(0, 255, side, dtype=np.float32)[top:top + 1000, None]
        arr[top:top + 1000] = np.stack(np.broadcast_arrays(x + 0 * y, y + 0 * x, (x + y) / 2), -1)
    img = Image.fromarray(arr)
    del arr
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=75, progressive=True, subsampling=0)
    return buf.getvalue()


def cases() -> list[tuple[str, str, str, int]]:
    """(name, kind, path, repeat): writes the files once into CACHE."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = []

    def file(name: str, make) -> str:
        path = CACHE / name
        if not path.exists():
            path.write_bytes(make())
        return str(path)

    out.append(("scan bomb: progressive JPEG, 20,000 scans, 2048x2048",
                "decode", file("scan-bomb.jpg", lambda: scan_bomb_jpeg(20_000, (2048, 2048))), 1))
    out.append(("progressive JPEG 16000x16000 (4:4:4)", "decode", file("prog-16000.jpg", lambda: _big_progressive(16000)), 1))
    out.append(("progressive JPEG 8192x8192 (4:4:4, the largest allowed)", "decode",
                file("prog-8192.jpg", lambda: _big_progressive(8192)), 1))
    out.append(("thin JPEG 60000x2", "decode", file("thin-60000x2.jpg", lambda: thin_jpeg(60000, 2)), 1))
    out.append(("OCR: PNG 1000x1", "ocr", file("strip-1000x1.png", lambda: _png(1000, 1)), 1))
    out.append(("OCR: PNG 60000x1", "ocr", file("strip-60000x1.png", lambda: _png(60000, 1)), 1))
    out.append(("OCR: PNG 2048x256 (8:1, the costliest single read)", "ocr",
                file("wide-2048x256.png", lambda: _png(2048, 256)), 1))
    out.append(("OCR: PNG 2048x24 (85:1, a mosaic of 14 tiles)", "ocr", file("strip-2048x24.png", lambda: _png(2048, 24)), 1))
    out.append(("photo: baseline JPEG 4000x3000", "decode", file("photo-12mp.jpg", lambda: _photo(4000, 3000)), 7))
    out.append(("photo: progressive JPEG 4000x3000", "decode",
                file("photo-12mp-prog.jpg", lambda: _photo(4000, 3000, True)), 7))
    out.append(("photo: baseline JPEG 640x480", "decode", file("photo-vga.jpg", lambda: _photo(640, 480)), 21))
    out.append(("photo: PNG 2000x1500", "decode", file("photo-3mp.png", lambda: _photo(2000, 1500, fmt="PNG")), 7))
    return out


def run(tree: Path, kind: str, path: str, repeat: int, cap_gib: float, budget: float) -> dict:
    code = (DECODE if kind == "decode" else OCR).format(path=path, repeat=repeat)

    def limit() -> None:
        cap = int(cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    t = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=budget,
                           preexec_fn=limit, env=env, cwd=tree)
    except subprocess.TimeoutExpired:
        return {"outcome": f"stopped after {budget:.0f} s", "wall": time.perf_counter() - t}
    wall = time.perf_counter() - t
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["?"])[-1][:160]
        return {"outcome": f"child failed (rc {r.returncode}): {tail}", "wall": wall}
    out = json.loads(lines[-1])
    out["wall"] = wall
    return out


def _cell(res: dict) -> str:
    if "times" not in res:
        return f"{res['outcome']} ({res['wall']:.1f} s)"
    t = statistics.median(res["times"])
    shown = f"{t * 1000:.1f} ms" if t < 1 else f"{t:.2f} s"
    return f"{shown}, peak {res['peak_mb']:.0f} MB (base {res['base_mb']:.0f}); {res['outcome']}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the revision before the budgets")
    ap.add_argument("--cap-gib", type=float, default=4.0, help="address-space cap of each child")
    ap.add_argument("--budget", type=float, default=180.0, help="seconds before a child is stopped")
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    args = ap.parse_args()
    print(f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, Pillow {Image.__version__} · {dt.date.today()} · "
          f"cap {args.cap_gib:g} GiB of address space per child, stopped after {args.budget:.0f} s\n")
    print("| case | file | before | after |")
    print("| --- | ---: | --- | --- |")
    for name, kind, path, repeat in cases():
        if args.only not in name:
            continue
        before = run(args.before, kind, path, repeat, args.cap_gib, args.budget)
        after = run(REPO, kind, path, repeat, args.cap_gib, args.budget)
        size = os.path.getsize(path)
        shown = f"{size / 1024:.0f} KB" if size < 2**20 else f"{size / 2**20:.1f} MB"
        print(f"| {name} | {shown} | {_cell(before)} | {_cell(after)} |", flush=True)


if __name__ == "__main__":
    main()
