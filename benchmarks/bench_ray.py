"""Ray embedding throughput: ``index --ray`` with 1 and 2 encoder actors vs the single-process ingest.

On N synthetic JPEG photos (no captions, so only the image path is measured) and a random model
of ViT-B-32 size, each run ingests into a fresh collection:

* single: ``crossmodal_rag.ingestion.runner.ingest()`` (DataLoader decode workers, the default settings);
* ray-A: the same through :class:`crossmodal_rag.ingestion.distributed.RayEmbedder` with A encoder actors,
  on a local Ray instance started for the run (as ``index --ray`` does).

For Ray runs three figures: images/s over the whole ingest (Ray start, actors loading the model,
embedding, commit), the Ray part's startup (until the first results came back) and images/s
after it (the steady rate, the first results left out). Every image's vector is compared with
the single-process run's (max abs difference).

Run:  python benchmarks/bench_ray.py --images 256 --batch-size 32 --actors 1,2
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
from bench_ingest import make_images

from crossmodal_rag import Collection
from crossmodal_rag.ingestion.distributed import RayEmbedder, RaySettings, clean_staging
from crossmodal_rag.ingestion.runner import IngestSettings, ingest


def _vectors(coll: Collection) -> dict[str, np.ndarray]:
    """Image vectors by path."""
    ids = coll.store.ids("image")
    vecs = coll.store.vectors(ids.tolist(), coll.manifest.dim)
    by_id = dict(zip(ids.tolist(), vecs, strict=True))
    rows = coll.store.conn.execute("SELECT path, item_id FROM paths").fetchall()
    return {path: by_id[item_id] for path, item_id in rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="synthetic photos to ingest (default 256)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--actors", default="1,2", help="comma-separated encoder-actor counts (default 1,2)")
    ap.add_argument("--actor-cpus", type=float, default=1.0, help="CPUs (torch threads) per actor")
    ap.add_argument("--repeats", type=int, default=1, help="rounds over single + each actor count")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                    help="before each run wait up to S seconds for other processes to go idle")
    ap.add_argument("--model-dir", type=Path, default=_common.DEFAULT_MODEL_DIR,
                    help="where the random ViT-B-32 model is cached")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args(argv)
    actors_list = [int(a) for a in args.actors.split(",") if a.strip()]
    logging.basicConfig(level=logging.ERROR)

    info = _common.machine_info()
    _common.print_machine(info)
    spec = _common.vit_b32_random(args.model_dir)
    work = Path(tempfile.mkdtemp(prefix="xmrag-bench-ray-", dir=args.workdir))
    runs: list[dict[str, object]] = []
    try:
        paths = make_images(work / "photos", args.images, captions=False)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"# {len(paths)} synthetic JPEGs ({mb:.1f} MB); batch size {args.batch_size}", flush=True)
        settings = IngestSettings(batch_size=args.batch_size)
        reference: dict[str, np.ndarray] | None = None
        for rep in range(args.repeats):
            for setting in ["single", *(f"ray-{a}" for a in actors_list)]:
                folder = work / f"coll-{setting}-{rep}"
                coll = Collection.create(folder, spec)  # loads the model: not part of the timing
                try:
                    _common.wait_quiet(args.quiet_wait)
                    quiet = _common.CpuMeter()
                    time.sleep(2.0)
                    background = quiet.stop()
                    background_cores = background["foreign_s"] / background["wall_s"]
                    t = time.perf_counter()
                    if setting == "single":
                        report = ingest(coll, work / "photos", settings)
                        embedder = None
                    else:
                        rs = RaySettings(actors=int(setting[4:]), actor_cpus=args.actor_cpus)
                        embedder = RayEmbedder(coll, rs)
                        try:
                            report = ingest(coll, work / "photos", settings, embedder=embedder)
                        finally:
                            embedder.cleanup()
                            clean_staging(folder)
                    wall = time.perf_counter() - t
                    vectors = _vectors(coll)
                finally:
                    coll.close()
                assert report.images_added == len(paths), report.summary()
                if reference is None:
                    reference = vectors
                diff = max(float(np.abs(vectors[p] - reference[p]).max()) for p in reference)
                row: dict[str, object] = {"setting": setting, "repeat": rep, "seconds": wall,
                                          "images_per_s": len(paths) / wall, "max_abs_diff": diff,
                                          "background_cores": background_cores}
                if embedder is not None:
                    steady_s = embedder.seconds - embedder.startup_seconds
                    row.update(ray_s=embedder.seconds, startup_s=embedder.startup_seconds,
                               steady_images_per_s=(len(paths) - embedder.first_rows) / steady_s
                               if steady_s > 0 else float("nan"),
                               commit_s=wall - embedder.seconds)
                runs.append(row)
                shutil.rmtree(folder, ignore_errors=True)
                print(f"  [{setting} round {rep}: {row['images_per_s']:.2f} images/s]", flush=True)

        print()
        print(f"{'setting':>8} {'rep':>3} {'seconds':>8} {'img/s':>7} {'ray_s':>6} {'startup_s':>9} "
              f"{'steady img/s':>12} {'commit_s':>8} {'max |dv|':>9} {'background':>10}")
        for r in runs:
            f = {k: format(r[k], fmt) if isinstance(r.get(k), float) else "-" for k, fmt in (
                ("seconds", "8.2f"), ("images_per_s", "7.2f"), ("ray_s", "6.2f"), ("startup_s", "9.2f"),
                ("steady_images_per_s", "12.2f"), ("commit_s", "8.2f"), ("max_abs_diff", "9.1e"),
                ("background_cores", "10.2f"))}
            print(f"{r['setting']:>8} {r['repeat']:>3} {f['seconds']:>8} {f['images_per_s']:>7} "
                  f"{f['ray_s']:>6} {f['startup_s']:>9} {f['steady_images_per_s']:>12} "
                  f"{f['commit_s']:>8} {f['max_abs_diff']:>9} {f['background_cores']:>10}")
        print("\nimg/s: whole ingest (for Ray: starting a local Ray instance, actors loading the model, "
              "embedding, commit).\nsteady img/s: the Ray part after its first results came back.\n"
              "background: cores used by other processes in the 2 s before the run (> 0.1: disturbed).")
        if args.out_json:
            args.out_json.write_text(json.dumps({"machine": info, "images": len(paths), "megabytes": mb,
                                                 "batch_size": args.batch_size, "runs": runs}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
