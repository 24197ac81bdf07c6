"""Ingest throughput: does the pipeline keep the model busy?

In one process, on N synthetic JPEG photos and a random model of ViT-B-32 size:

* model-only: images/s of ``ClipEncoder.encode_pixels`` on already-preprocessed tensors, batch
  size B (the baseline; measured before and after every full-ingest run, since the machine drifts);
* decode+preprocess only: images/s of exactly the per-image work an ingest worker does (stat, read,
  SHA-256, safe decode, model preprocess), in this process, one image after the other;
* full ingest: ``crossmodal_rag.ingestion.runner.ingest()`` into a fresh collection, once per ``--workers``
  value, images/s plus the report's timing breakdown.

The target (foundation issue): full-ingest images/s >= 90% of model-only images/s at the same batch
size. The ratio printed for each run is against the mean of the two model-only runs around it.

Run:  python benchmarks/bench_ingest.py --images 256 --batch-size 32 --workers 0,1
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common

from crossmodal_rag import Collection
from crossmodal_rag.encoders import load_encoder
from crossmodal_rag.ingestion import runner as ingest_module
from crossmodal_rag.ingestion.images import DEFAULT_MAX_IMAGE_PIXELS, decode_image
from crossmodal_rag.ingestion.runner import DecodeDataset, IngestSettings, ingest

# Mostly 4:3 camera-like sizes around 640x480, both orientations, some larger.
_SIZES = [(640, 480), (640, 480), (640, 480), (480, 640), (800, 600), (1024, 768), (640, 427), (500, 375)]
_WORDS = ["a", "red", "blue", "green", "circle", "square", "on", "the", "left", "right", "of", "large",
          "small", "photo", "with", "shapes", "bright", "dark", "background"]


def make_photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A deterministic photo-like image: smooth 2-D colour gradient, shapes, blur, sensor noise."""
    w, h = size
    c0, c1, c2 = (rng.uniform(0, 255, 3) for _ in range(3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx / max(w - 1, 1))[..., None]
    v = (yy / max(h - 1, 1))[..., None]
    base = c0 * (1 - u) * (1 - v) + c1 * u + c2 * v * (1 - u)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(-0.1, 0.9) * w, rng.uniform(-0.1, 0.9) * h
        x1, y1 = x0 + rng.uniform(0.05, 0.5) * w, y0 + rng.uniform(0.05, 0.5) * h
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            pts = [(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 4.0, (h, w, 3)).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def make_images(folder: Path, n: int, *, captions: bool, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        size = _SIZES[int(rng.integers(0, len(_SIZES)))]
        p = folder / f"img_{i:06d}.jpg"
        make_photo(rng, size).save(p, "JPEG", quality=int(rng.integers(80, 95)))
        if captions:
            words = rng.choice(_WORDS, size=int(rng.integers(4, 10)))
            p.with_suffix(".txt").write_text(" ".join(words) + "\n")
        paths.append(p)
    return paths


def model_only(encoder, pixels: torch.Tensor, batch_size: int) -> float:
    """Seconds to encode all of ``pixels`` in batches of ``batch_size``."""
    t = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        encoder.encode_pixels(pixels[start : start + batch_size])
    return time.perf_counter() - t


def _nice_worker(worker_id: int, increment: int) -> None:
    os.nice(increment)


def _phase_batches(threads: int):
    """A stand-in for ``ingest._batches``: each batch is decoded by a pool of ``threads`` threads
    while the model waits (torch limited to one thread meanwhile), then the model runs on all
    cores. No overlap, but no fight for cores either."""
    from concurrent.futures import ThreadPoolExecutor

    def _batches(paths, transform, settings):  # same signature as ingest._batches
        dataset = ingest_module.DecodeDataset(paths, transform, settings.max_image_pixels)
        model_threads = torch.get_num_threads()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for start in range(0, len(dataset), settings.batch_size):
                torch.set_num_threads(1)
                try:
                    batch = list(pool.map(dataset.__getitem__,
                                          range(start, min(start + settings.batch_size, len(dataset)))))
                finally:
                    torch.set_num_threads(model_threads)
                yield batch

    return _batches


@contextlib.contextmanager
def variant(name: str):
    """How one full-ingest run decodes; yields the IngestSettings.workers value.

    ``N``: the library as it is, N DataLoader workers. EXPERIMENTS, patched into
    ``crossmodal_rag.ingestion.runner`` for the run only (the library has no such settings): ``Nnice``: N
    workers reniced to 19; ``phaseN``: no DataLoader, each batch decoded by N threads, then encoded.
    """
    saved = ingest_module.DataLoader, ingest_module._batches
    try:
        if name.isdigit():
            yield int(name)
        elif name.endswith("nice") and name[:-4].isdigit():
            ingest_module.DataLoader = functools.partial(
                saved[0], worker_init_fn=functools.partial(_nice_worker, increment=19))
            yield int(name[:-4])
        elif name.startswith("phase") and name[5:].isdigit():
            ingest_module._batches = _phase_batches(int(name[5:]))
            yield 0
        else:
            raise SystemExit(f"unknown --workers value {name!r} (N, Nnice or phaseN)")
    finally:
        ingest_module.DataLoader, ingest_module._batches = saved


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="synthetic photos to ingest (default 256)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", default="0,1",
                    help="comma-separated runs: N = IngestSettings.workers N; experiments (patched in "
                    "for the run): Nnice = N workers reniced to 19, phaseN = decode each batch with N "
                    "threads, then encode (no DataLoader)")
    ap.add_argument("--repeats", type=int, default=1, help="full-ingest runs per workers value")
    ap.add_argument("--captions", action="store_true", help="give each image a .txt caption (text encoding "
                    "then adds to the ingest time; off by default so only the image path is measured)")
    ap.add_argument("--min-clean", type=int, default=0, metavar="K",
                    help="after --repeats rounds, keep running the settings that have fewer than K "
                    "undisturbed runs (foreign <= --disturbed), until --max-minutes")
    ap.add_argument("--max-minutes", type=float, default=8.0,
                    help="time budget for the extra rounds of --min-clean (default 8)")
    ap.add_argument("--disturbed", type=float, default=0.05,
                    help="a run is disturbed when other processes used more than this share of a core")
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="torch.set_num_threads in this process (default: leave torch's default)")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                    help="before each measurement wait up to S seconds for other processes to go idle "
                    "(for shared machines; the foreign column shows what was left)")
    ap.add_argument("--model-dir", type=Path, default=_common.DEFAULT_MODEL_DIR,
                    help="where the random ViT-B-32 model is cached")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args(argv)
    workers_list = [w.strip() for w in args.workers.split(",") if w.strip()]
    logging.basicConfig(level=logging.ERROR)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    info = _common.machine_info()
    _common.print_machine(info)
    spec = _common.vit_b32_random(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="xmrag-bench-ingest-", dir=args.workdir))
    try:
        t = time.perf_counter()
        paths = make_images(work / "photos", args.images, captions=args.captions)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"# {len(paths)} synthetic JPEGs ({mb:.1f} MB) made in {time.perf_counter() - t:.1f}s; "
              f"batch size {args.batch_size}; torch threads {torch.get_num_threads()}"
              + (f"; OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if os.environ.get("OMP_WAIT_POLICY") else ""))

        encoder = load_encoder(spec, "cpu").load()

        # (b) decode + preprocess only, single process: the exact work of an ingest worker.
        dataset = DecodeDataset(paths, encoder.preprocess, DEFAULT_MAX_IMAGE_PIXELS)
        dataset[0]  # warm up
        _common.wait_quiet(args.quiet_wait)
        decode_meter = _common.CpuMeter()
        t = time.perf_counter()
        items = [dataset[i] for i in range(len(dataset))]
        decode_s = time.perf_counter() - t
        decode_foreign = decode_meter.stop()
        assert not any(it["error"] for it in items), [it["error"] for it in items if it["error"]]
        pixels = torch.stack([it["pixels"] for it in items])
        del items
        # the same work split in two: read + SHA-256 + safe decode, then the model's preprocess
        _common.wait_quiet(args.quiet_wait)
        t = time.perf_counter()
        decoded = [decode_image(p.read_bytes(), str(p)).image for p in paths]
        split_decode_s = time.perf_counter() - t
        t = time.perf_counter()
        for im in decoded:
            encoder.preprocess(im)
        split_prep_s = time.perf_counter() - t
        del decoded

        # (a) model only, warmed up; then full ingests, each between two model-only runs.
        encoder.encode_pixels(pixels[: args.batch_size])

        def timed_model_only() -> dict[str, float]:
            _common.wait_quiet(args.quiet_wait)
            meter = _common.CpuMeter()
            model_only(encoder, pixels, args.batch_size)
            m = meter.stop()
            m["images_per_s"] = len(paths) / m["wall_s"]
            return m

        model_runs = [timed_model_only()]
        runs: list[dict[str, object]] = []
        deadline = time.perf_counter() + 60 * args.max_minutes

        def schedule():
            """Rounds over the settings (interleaved, so drift hits all alike): --repeats rounds,
            then more rounds for settings short of --min-clean undisturbed runs, until the deadline."""
            for rep in range(args.repeats):
                yield from ((rep, w) for w in workers_list)
            rep = args.repeats
            while time.perf_counter() < deadline:
                short = [w for w in workers_list
                         if sum(1 for r in runs if r["workers"] == w
                                and r["foreign_cpu_frac"] <= args.disturbed) < args.min_clean]
                if not short:
                    return
                yield from ((rep, w) for w in short)
                rep += 1

        for rep, workers in schedule():
            folder = work / f"coll-w{workers}-r{rep}"
            coll = Collection.create(folder, spec)
            try:
                with variant(workers) as n_workers:
                    _common.wait_quiet(args.quiet_wait)
                    meter = _common.CpuMeter()
                    report = ingest(coll, work / "photos",
                                    IngestSettings(batch_size=args.batch_size, workers=n_workers))
                    cpu = meter.stop()
            finally:
                coll.close()
            assert report.images_added == len(paths), report.summary()
            shutil.rmtree(folder, ignore_errors=True)
            model_runs.append(timed_model_only())
            before, after = model_runs[-2], model_runs[-1]
            baseline_ips = (before["images_per_s"] + after["images_per_s"]) / 2
            timings = dict(report.timings)
            timings["other"] = report.seconds - sum(timings.values())
            foreign = max(cpu["foreign_s"] / cpu["wall_s"], before["foreign_s"] / before["wall_s"],
                          after["foreign_s"] / after["wall_s"])
            runs.append({"workers": workers, "repeat": rep, "seconds": report.seconds,
                         "images_per_s": len(paths) / report.seconds,
                         "model_only_images_per_s": baseline_ips,
                         "ratio": (len(paths) / report.seconds) / baseline_ips,
                         "encode_images_per_s": len(paths) / report.timings["encode_images"],
                         "own_cpu_s": cpu["own_cpu_s"], "foreign_cpu_frac": foreign,
                         "steal_s": cpu["steal_s"], "timings": timings})
            print(f"  [workers={workers} round {rep}: {runs[-1]['ratio']:.1%} of model-only, "
                  f"foreign {foreign:.0%}]", flush=True)
        model_ips = [m["images_per_s"] for m in model_runs]

        print()
        print(f"model-only encode_pixels, batch {args.batch_size}: "
              + ", ".join(f"{m['images_per_s']:.2f} ({m['foreign_s'] / m['wall_s']:.0%})" for m in model_runs)
              + " images/s (foreign) "
              f"(median {_common.median(model_ips):.2f}; {1000 / _common.median(model_ips):.1f} ms/image)")
        print(f"decode+preprocess only (1 process): {len(paths) / decode_s:.1f} images/s "
              f"({1000 * decode_s / len(paths):.1f} ms/image; foreign "
              f"{decode_foreign['foreign_s'] / decode_foreign['wall_s']:.0%}); of which read+decode "
              f"{1000 * split_decode_s / len(paths):.1f} ms, preprocess (resize, crop, normalise) "
              f"{1000 * split_prep_s / len(paths):.1f} ms")
        print()
        print(f"{'workers':>7} {'rep':>3} {'seconds':>8} {'img/s':>7} {'model img/s':>11} {'ratio':>6} "
              f"{'enc img/s':>9} {'decode_wait':>11} {'encode_img':>10} {'encode_txt':>10} {'write':>6} "
              f"{'other':>6} {'cpu_s':>6} {'foreign':>7} {'steal_s':>7}")
        for r in runs:
            tm = r["timings"]
            print(f"{r['workers']:>7} {r['repeat']:>3} {r['seconds']:>8.2f} {r['images_per_s']:>7.2f} "
                  f"{r['model_only_images_per_s']:>11.2f} {r['ratio']:>6.1%} {r['encode_images_per_s']:>9.2f} "
                  f"{tm['decode_wait']:>11.2f} {tm['encode_images']:>10.2f} {tm['encode_texts']:>10.2f} "
                  f"{tm['write']:>6.2f} {tm['other']:>6.2f} {r['own_cpu_s']:>6.1f} "
                  f"{r['foreign_cpu_frac']:>7.0%} {r['steal_s']:>7.2f}")
        print()
        print("ratio = full-ingest img/s / model-only img/s (mean of the model-only runs just before and "
              "after); target >= 90%.\nenc img/s = images / encode_images time inside the ingest (the model "
              "slowed by whatever runs beside it). cpu_s = CPU seconds of this process and its workers. "
              "foreign = share of one core's time used by OTHER processes during the run or its baselines "
              f"(worst of the three); rows with foreign > {args.disturbed:.0%} are disturbed.")
        for workers in workers_list:
            clean = [r["ratio"] for r in runs if r["workers"] == workers and r["foreign_cpu_frac"] <= args.disturbed]
            every = [r["ratio"] for r in runs if r["workers"] == workers]
            print(f"workers={workers}: median ratio {_common.median(every):.1%} over {len(every)} run(s); "
                  + (f"{_common.median(clean):.1%} over {len(clean)} undisturbed" if clean
                     else "no undisturbed run"))
        if args.out_json:
            args.out_json.write_text(json.dumps({
                "machine": info, "images": len(paths), "megabytes": mb, "batch_size": args.batch_size,
                "torch_threads": torch.get_num_threads(), "captions": args.captions,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "model_only_runs": model_runs,
                "decode_preprocess_images_per_s": len(paths) / decode_s,
                "decode_foreign_cpu_frac": decode_foreign["foreign_s"] / decode_foreign["wall_s"],
                "read_decode_ms_per_image": 1000 * split_decode_s / len(paths),
                "preprocess_ms_per_image": 1000 * split_prep_s / len(paths), "runs": runs,
            }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
