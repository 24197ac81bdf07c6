"""ANN index families on distributions the defaults were not tuned on: recall, latency, bytes.

For each distribution and size, every family of ``store.families`` (and what ``auto`` picks) is
built **through the project's code** (``build_index`` from float16 ``EmbeddingShards``), tuned by
``tune_index`` (main knob x re-rank depth, cheapest p50 reaching recall@10 0.95) on held-out
*database* vectors (as a collection tunes on its own vectors), then measured on *fresh* queries
of the same distribution: recall@10, single-query p50/p99 on one thread, batch QPS (2 threads),
resident bytes per vector (serialised index size / n; the float16 shards re-ranking reads are the
collection's own and not counted), build time. Baselines in the same process: numpy brute force
for one query and the copy bandwidth (the read-bandwidth bound of an exact float32 scan).

Distributions (``--dists``):
* ``clustered``: bench_ann's anisotropic gaussian mixture on a 96-d subspace of R^512;
* ``powerlaw``: 4,000 clusters with power-law sizes (Zipf exponent 1.1) in a 128-d subspace of
  R^512, each with a power-law spectrum (spread of axis i ~ 1/i, randomly rotated), plus isotropic
  noise off the subspace;
* ``powerlaw_iso``: the same with isotropic 128-d clusters (the largest holds 11% of the vectors
  in a ball where neighbours are nearly equidistant): the hard case, reported as a frontier.

Data, shards and ground truth are cached under ``--workdir`` and reused between runs.

Run:  nice python benchmarks/bench_ann_families.py --sizes 100000 --dists clustered,powerlaw
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
from bench_ann import ClusteredMixture, numpy_topk

from crossmodal_rag.store.ann import choose_index, recall_at_k
from crossmodal_rag.store.build import build_index, tune_index
from crossmodal_rag.store.families import FAMILIES, family_spec
from crossmodal_rag.store.manifest import ShardFile
from crossmodal_rag.store.shards import EmbeddingShards

DIM, K, SHARD_ROWS, CHUNK = 512, 10, 100_000, 50_000


class PowerLawSubspace:
    """Gaussian clusters with power-law sizes (Zipf ``exponent``) in a ``latent``-d subspace of
    R^512, plus isotropic noise off it. ``decay`` > 0 gives each cluster a power-law spectrum
    (axis i of a random rotation, one of ``shapes``, spreads ~ i^-decay), as real embeddings
    have; ``decay`` = 0 makes every cluster an isotropic ``latent``-d ball, where nearest
    neighbours inside a big cluster are nearly equidistant (``powerlaw_iso``: the hard case)."""

    def __init__(self, seed: int = 7, *, clusters: int = 4000, latent: int = 128, exponent: float = 1.1,
                 spread: float = 0.45, off_noise: float = 0.35, decay: float = 0.0, shapes: int = 8) -> None:
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.standard_normal((DIM, latent)))
        self.basis = np.ascontiguousarray(q.T, dtype=np.float32)
        self.centres = rng.standard_normal((clusters, latent)).astype(np.float32)
        w = 1.0 / np.arange(1, clusters + 1) ** exponent
        self.weights = w / w.sum()
        self.spread = np.float32(spread * rng.uniform(0.6, 1.4, clusters)).astype(np.float32)
        self.latent, self.off_noise, self.decay = latent, off_noise, decay
        spectrum = 1.0 / np.arange(1, latent + 1) ** decay
        self.spectrum = (spectrum / np.sqrt((spectrum**2).mean())).astype(np.float32)
        self.shape_of = rng.integers(0, shapes, clusters)
        self.rotations = [np.linalg.qr(rng.standard_normal((latent, latent)))[0].astype(np.float32)
                          for _ in range(shapes if decay else 0)]

    def draw(self, rng: np.random.Generator, m: int) -> np.ndarray:
        which = rng.choice(len(self.weights), size=m, p=self.weights)
        g = rng.standard_normal((m, self.latent), dtype=np.float32) * self.spread[which, None] * self.spectrum
        z = self.centres[which].copy()
        if self.rotations:
            for s, rot in enumerate(self.rotations):
                sel = self.shape_of[which] == s
                z[sel] += g[sel] @ rot
        else:
            z += g
        x = z @ self.basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += rng.standard_normal((m, DIM), dtype=np.float32) * np.float32(self.off_noise / np.sqrt(DIM))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


DISTS = {"clustered": lambda: ClusteredMixture(0), "powerlaw": lambda: PowerLawSubspace(7, decay=1.0),
         "powerlaw_iso": lambda: PowerLawSubspace(7)}


def dataset(dist: str, n: int, workdir: Path, n_eval: int) -> tuple[EmbeddingShards, np.ndarray, np.ndarray]:
    """(shards, float32 base as the shards hold it, fresh evaluation queries), cached on disk."""
    folder = workdir / f"{dist}-{n}"
    meta = folder / "shards.json"
    base_path, q_path = folder / "base.f32.npy", folder / "queries.npy"
    if meta.is_file() and base_path.is_file() and q_path.is_file():
        shards = EmbeddingShards(folder, "image", DIM, [ShardFile(**s) for s in json.loads(meta.read_text())])
        return shards, np.load(base_path, mmap_mode="r"), np.load(q_path)[:n_eval]
    folder.mkdir(parents=True, exist_ok=True)
    gen = DISTS[dist]()
    rng = np.random.default_rng([n, 11])
    shards = EmbeddingShards(folder, "image", DIM)
    base = np.lib.format.open_memmap(base_path, mode="w+", dtype=np.float32, shape=(n, DIM))
    for start in range(0, n, SHARD_ROWS):
        stop = min(start + SHARD_ROWS, n)
        for lo in range(start, stop, CHUNK):
            hi = min(lo + CHUNK, stop)
            block = gen.draw(rng, hi - lo).astype(np.float16).astype(np.float32)
            base[lo:hi] = block / np.linalg.norm(block, axis=1, keepdims=True)
        shards.append(np.arange(start, stop, dtype=np.int64), base[start:stop], fsync=False)
    base.flush()
    np.save(q_path, gen.draw(np.random.default_rng([n, 12]), max(n_eval, 1000)))
    meta.write_text(json.dumps([s.__dict__ for s in shards.shards]))
    return shards, np.load(base_path, mmap_mode="r"), np.load(q_path)[:n_eval]


def truth_for(folder: Path, base: np.ndarray, queries: np.ndarray) -> np.ndarray:
    path = folder / f"truth{len(queries)}.npy"
    if path.is_file():
        return np.load(path)
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for lo in range(0, len(base), 131_072):
        s, i = faiss.knn(queries, np.ascontiguousarray(base[lo : lo + 131_072]), K,
                         metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = np.concatenate([best_s, s], 1), np.concatenate([best_i, i + lo], 1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    np.save(path, best_i)
    return best_i


def single_times(index, queries: np.ndarray) -> tuple[list[float], np.ndarray]:
    faiss.omp_set_num_threads(1)
    try:
        for q in queries[:3]:
            index.search(q[None], K)
        out, found = [], []
        for q in queries:
            t = time.perf_counter()
            _, ids = index.search(q[None], K)
            out.append((time.perf_counter() - t) * 1000)
            found.append(ids[0])
        return out, np.stack(found)
    finally:
        faiss.omp_set_num_threads(2)


def measure_family(family: str, spec: str, shards: EmbeddingShards, base: np.ndarray, queries: np.ndarray,
                   truth: np.ndarray, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    n = len(base)
    live = np.arange(n, dtype=np.int64)
    t0 = time.perf_counter()
    index, report = build_index(spec, shards, live, seed=0)
    build_s = time.perf_counter() - t0
    index.exact_vectors = shards.lookup
    exact = index.kind == "flat"  # nothing to tune: a few queries check recall, a few are timed
    tune_rows = np.random.default_rng(5).choice(n, size=50 if exact else args.tune_queries, replace=False)
    tune_rows = np.sort(tune_rows)
    tune_q = np.ascontiguousarray(base[tune_rows])
    t0 = time.perf_counter()
    tuning = tune_index(index, shards, live, tune_q, k=K, target_recall=args.target_recall,
                        query_ids=tune_rows)
    tune_s = time.perf_counter() - t0
    path = folder / "index.tmp.faiss"
    faiss.write_index(index.index, str(path))
    size = path.stat().st_size
    path.unlink()
    timed = min(args.timed, 40) if exact else args.timed
    bound_ms = size / read_bandwidth() * 1000 if exact else None  # its own bytes, measured just before
    times, found_single = single_times(index, queries[:timed])
    batch = queries[:200] if exact else queries
    index.search(queries[:50], K)
    bt = []
    for _ in range(1 if exact else 2):
        t = time.perf_counter()
        _, found = index.search(batch, K)
        bt.append(time.perf_counter() - t)
    row = {
        "family": family, "spec": spec, "build_s": round(build_s, 1), "train_vectors": report.train_vectors,
        "tune_s": round(tune_s, 1), "params": index.params.to_dict(), "tuning_reached": tuning.reached,
        "tuning": tuning.to_dict(), "bytes_per_vector": round(size / n, 1),
        "recall_at_10": round(recall_at_k(found, truth[: len(batch)]), 4), "batch_queries": len(batch),
        "recall_at_10_single": round(recall_at_k(found_single, truth[:timed]), 4),
        "p50_1thr_ms": round(_common.pct(times, 50), 3), "p99_1thr_ms": round(_common.pct(times, 99), 3),
        "batch_qps": round(len(batch) / min(bt), 1),
    }
    if bound_ms is not None:  # an exact scan: how near the read-bandwidth bound of its bytes
        row["read_bound_ms"] = round(bound_ms, 2)
        row["vs_read_bound"] = round(row["p50_1thr_ms"] / bound_ms, 2)
    logging.info("%s", {k: v for k, v in row.items() if k != "tuning"})
    return row


def read_bandwidth(mib: int = 1024, reps: int = 5) -> float:
    """Bytes per second one thread streams from memory: the fastest of a few reductions that read
    a pre-touched ``mib`` MiB buffer once and do next to no arithmetic (integer sum, max, or),
    best of ``reps`` -- the bound an exact scan of the same bytes cannot beat."""
    buf = np.random.default_rng(0).integers(0, 1 << 16, mib << 19, dtype=np.uint16)
    u64, f32 = buf.view(np.uint64), buf.view(np.float32)
    best = float("inf")
    for reduce in (u64.sum, lambda: np.nanmax(f32), lambda: np.bitwise_or.reduce(u64)):
        for _ in range(reps):
            t = time.perf_counter()
            reduce()
            best = min(best, time.perf_counter() - t)
    return buf.nbytes / best


def markdown(folder: Path) -> str:
    """The tables of every ``families_*.json`` in ``folder``, one per distribution and size."""
    out = []
    for path in sorted(folder.glob("families_*.json"), key=lambda p: (json.loads(p.read_text())["n"], p.name)):
        r = json.loads(path.read_text())
        if "read_bandwidth_gbs" in r:
            bound = (f"one thread reads {r['read_bandwidth_gbs']} GB/s (measured in the same run): the read "
                     f"bound of an exact scan is {r['read_bound_ms']} ms over float32, "
                     f"{r['read_bound_ms'] / 2:.2f} ms over float16")
        else:  # runs before the read-bandwidth probe measured a copy
            bound = (f"read bound of an exact float32 scan {r['read_bound_ms']} ms at the copy bandwidth "
                     f"{r['copy_bandwidth_gbs']} GB/s measured in the same run")
        out += [f"### {r['dist']}, {r['n']:,} x {r['dim']} (auto -> `{r['auto']}`)", "",
                f"numpy brute force p50 {r['numpy_brute_force_p50_ms']} ms (one query, same run); {bound}.", "",
                "| family | index | build s | bytes/vector | tuned setting | recall@10 | p50 / p99 ms (1 thread) "
                "| vs numpy | batch q/s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in r["rows"]:
            setting = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
            if not row["tuning_reached"]:
                setting += " (target missed)"
            pick = " **(auto)**" if row["spec"] == r["auto"] else ""
            rows = row["tuning"].get("measured") or [{}]
            if row["tuning"].get("param") and "recall_lo" not in rows[-1]:
                setting += " †"  # tuned by the bare mean rule, before the confidence bound
            speed = r["numpy_brute_force_p50_ms"] / max(row["p50_1thr_ms"], 1e-9)
            out.append(f"| {row['family']}{pick} | `{row['spec']}` | {row['build_s']} | {row['bytes_per_vector']:.0f} "
                       f"| {setting} | {row['recall_at_10']:.3f} | {row['p50_1thr_ms']:.3f} / {row['p99_1thr_ms']:.2f} "
                       f"| {speed:.0f}x | {row['batch_qps']:.0f} |")
        for row in r["rows"]:
            if "vs_read_bound" in row:
                out.append(f"Exact `{row['spec']}`: p50 {row['p50_1thr_ms']:.2f} ms against the read bound of "
                           f"its own bytes, {row['read_bound_ms']:.2f} ms (bandwidth measured just before): "
                           f"**{row['vs_read_bound']:.2f}x**.")
        out.append("")
    out.append("† tuned to a bare mean recall of 0.95 on the tuning queries (before the 95% lower "
               "confidence bound rule); other rows: the bound reached 0.95.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000")
    ap.add_argument("--dists", default="clustered,powerlaw")
    ap.add_argument("--families", default="ivf_hnsw_sq8,ivf_hnsw_pqfs,ivf_hnsw_fp16,ivf_flat,hnsw,exact_fp16",
                    help=f"comma-separated, of: {', '.join(FAMILIES)} (and auto's pick if not among them)")
    ap.add_argument("--spec", action="append", default=[], metavar="NAME=SPEC",
                    help="also measure this index spec under this row name (e.g. "
                         "ivf_hnsw_fp16_16k=IVF16384_HNSW32,SQfp16); repeatable")
    ap.add_argument("--eval-queries", type=int, default=1000)
    ap.add_argument("--timed", type=int, default=300, help="single queries timed (40 for exact)")
    ap.add_argument("--tune-queries", type=int, default=300)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/xmrag-bench/ann-families"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "ann")
    ap.add_argument("--report", action="store_true", help="print the tables of --out's JSON files and exit")
    args = ap.parse_args(argv)
    if args.report:
        print(markdown(args.out))
        return 0
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    faiss.cvar.distance_compute_blas_threshold = 4
    machine = _common.machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    for n in [int(s) for s in args.sizes.split(",")]:
        for dist in args.dists.split(","):
            shards, base, queries = dataset(dist, n, args.workdir, args.eval_queries)
            folder = args.workdir / f"{dist}-{n}"
            truth = truth_for(folder, base, queries)
            faiss.omp_set_num_threads(1)
            bf = [time.perf_counter()]
            for q in queries[:20]:
                numpy_topk(base, q, K)
                bf.append(time.perf_counter())
            faiss.omp_set_num_threads(2)
            numpy_ms = _common.median(list(np.diff(bf) * 1000))
            bw = read_bandwidth()
            result: dict[str, Any] = {
                "dist": dist, "n": n, "dim": DIM, "machine": machine, "auto": choose_index(n, DIM),
                "numpy_brute_force_p50_ms": round(numpy_ms, 2),
                "read_bound_ms": round(n * DIM * 4 / bw * 1000, 2), "read_bandwidth_gbs": round(bw / 1e9, 1),
                "command": "python benchmarks/bench_ann_families.py " + " ".join(argv or sys.argv[1:]),
                "rows": [],
            }
            out = args.out / f"families_{dist}_{n}.json"
            extra = [tuple(x.split("=", 1)) for x in args.spec]
            names = {*args.families.split(","), *(name for name, _ in extra)}
            if out.is_file():  # keep rows of families measured by an earlier run
                old = json.loads(out.read_text())
                result["rows"] = [r for r in old.get("rows", []) if r["family"] not in names]
            todo = [(f, family_spec(f, n, DIM)) for f in args.families.split(",") if f] + extra
            if result["auto"] not in {spec for _, spec in todo} | {r["spec"] for r in result["rows"]}:
                todo.append(("auto", result["auto"]))
            for family, spec in todo:
                row = measure_family(family, spec, shards, base, queries, truth, args, folder)
                result["rows"].append(row)
                out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
