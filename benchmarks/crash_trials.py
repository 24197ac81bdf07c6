"""Crash-safety trials: SIGKILL `index` and `remove` at random moments, then check.

For each seeded trial: start the real CLI in a subprocess, kill it at a uniformly random point
of its run (calibrated from an uninterrupted run), then open the collection, run its consistency
check, and finish the job with a second run; the result must hold exactly the expected items
(no losses, no duplicates). `remove` must also be atomic: after a kill, either all or none of
the ids it was given are gone.

    python benchmarks/crash_trials.py --trials 50 --out-json crash.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from crossmodal_rag import Collection
from crossmodal_rag.testing import make_tiny_open_clip

ENV = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "crossmodal_rag", "-q", *args]


def make_source(folder: Path, n: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"picture number {i}\nrandom noise {i}\n")
    (folder / "dup.png").write_bytes((folder / "img000.png").read_bytes())


def state(coll: Path) -> tuple[bool, list[str], set[int]]:
    with Collection.open(coll) as c:
        report = c.check()
        ids = set(c.store.ids("image").tolist())
        dup = c.store.conn.execute(
            "SELECT COUNT(*) - COUNT(DISTINCT sha256) FROM items WHERE kind = 'image'").fetchone()[0]
    return report.ok and dup == 0, report.problems, ids


def kill_at_random(cmd: list[str], duration: float, rng: random.Random) -> bool:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(rng.uniform(0.05, duration))
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--out-json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xmr-crash-"))
    rng = random.Random(args.seed)
    try:
        spec = f"open_clip:local-dir:{make_tiny_open_clip(work / 'model')}"
        src = work / "src"
        make_source(src, args.images)
        ingest = lambda coll: cli("index", str(src), "-c", str(coll), "--model", spec,  # noqa: E731
                                  "--batch-size", "2", "--workers", "0")
        t0 = time.perf_counter()
        subprocess.run(ingest(work / "calib"), env=ENV, check=True, capture_output=True)
        ingest_s = time.perf_counter() - t0
        ok, _, full_ids = state(work / "calib")
        assert ok and len(full_ids) == args.images

        results = {"ingest": {"trials": 0, "killed": 0, "failures": []},
                   "remove": {"trials": 0, "killed": 0, "failures": []}}
        for trial in range(args.trials):
            coll = work / f"i{trial}"
            r = results["ingest"]
            r["trials"] += 1
            for _ in range(2):
                r["killed"] += kill_at_random(ingest(coll), ingest_s, rng)
                if (coll / "manifest.json").exists():
                    ok, problems, _ = state(coll)
                    if not ok:
                        r["failures"].append({"trial": trial, "after": "kill", "problems": problems})
            subprocess.run(ingest(coll), env=ENV, check=True, capture_output=True)
            ok, problems, ids = state(coll)
            if not ok or len(ids) != args.images:
                r["failures"].append({"trial": trial, "after": "resume", "problems": problems, "n": len(ids)})
            shutil.rmtree(coll)

        base = work / "calib"
        t0 = time.perf_counter()
        probe = work / "probe"
        shutil.copytree(base, probe, ignore=shutil.ignore_patterns(".lock"))
        subprocess.run(cli("remove", *map(str, sorted(full_ids)[:20]), "-c", str(probe)), env=ENV, check=True,
                       capture_output=True)
        remove_s = time.perf_counter() - t0
        for trial in range(args.trials):
            coll = work / f"r{trial}"
            shutil.copytree(base, coll, ignore=shutil.ignore_patterns(".lock"))
            victims = sorted(rng.sample(sorted(full_ids), 20))
            r = results["remove"]
            r["trials"] += 1
            r["killed"] += kill_at_random(cli("remove", *map(str, victims), "-c", str(coll)), remove_s, rng)
            ok, problems, ids = state(coll)
            gone = full_ids - ids
            if not ok or gone not in (set(), set(victims)):
                r["failures"].append({"trial": trial, "after": "kill", "problems": problems, "gone": len(gone)})
            left = [v for v in victims if v in ids]
            if left:
                subprocess.run(cli("remove", *map(str, left), "-c", str(coll)), env=ENV, check=True, capture_output=True)
            ok, problems, ids = state(coll)
            if not ok or ids != full_ids - set(victims):
                r["failures"].append({"trial": trial, "after": "resume", "problems": problems})
            shutil.rmtree(coll)
        for name, r in results.items():
            print(f"{name}: {r['trials']} trials, {r['killed']} kills landed mid-run, {len(r['failures'])} failures")
        if args.out_json:
            Path(args.out_json).write_text(json.dumps(results, indent=2))
        sys.exit(1 if any(r["failures"] for r in results.values()) else 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
