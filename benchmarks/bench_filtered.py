"""Filtered search on ANN indexes: recall@10 against exact filtered search, and latency.

For each index type (``IVF{nlist},Flat``, ``HNSW{m}``, ``IVF{nlist},PQ{m}np`` with re-ranking, or a family of
``store.families`` such as ``ivf_hnsw_sq8`` / ``ivf_hnsw_pqfs``),
built and tuned to recall@10 >= 0.95 (unfiltered) **through the project's code**
(``store.build.build_index`` from float16 ``EmbeddingShards``, ``tune_index`` on held-out
tuning queries), and for each filter selectivity (a seeded random subset of the ids), it runs
``VectorIndex.search(q, 10, allowed)`` one query at a time, as a user's search runs, and reports

* recall@10 against the exact filtered top-10 (brute force over the allowed vectors), the mean
  number of hits returned (10 = complete), p50 / p95 latency;
* the same with each strategy forced (``exact``: brute force over the allowed ids' vectors;
  ``widened``: the ANN search with the widened knob), so the threshold between them
  (``filtered.EXACT_MAX_ALLOWED``) can be read off the table; CPU time per query beside wall
  time (the machine these ran on is shared: wall time includes waiting for a core);
* baselines in the same run: numpy over the allowed rows of the float32 matrix in RAM
  (gather + matrix-vector product + argpartition), and a numpy full scan with a mask.

Data: ``bench_ann.ClusteredMixture`` (512-d, 2,000 anisotropic clusters), queries are fresh
draws (never database vectors).

Run:  python benchmarks/bench_filtered.py --n 100000 --queries 200
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import threadpoolctl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import bench_ann

from crossmodal_rag.store import filtered
from crossmodal_rag.store.ann import choose_index, filtered_params, nlist_for, recall_at_k
from crossmodal_rag.store.build import build_index, tune_index
from crossmodal_rag.store.families import family_spec
from crossmodal_rag.store.vectors import VectorIndex

K = 10
STRATEGIES = ("library", "exact", "widened")


def filtered_truth(base: np.ndarray, allowed: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact filtered top-``K`` ids ``(Q, K)`` (ids = row numbers)."""
    scores = queries @ base[allowed].T
    top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
    order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable")
    return allowed[np.take_along_axis(top, order, 1)]


def numpy_gather(base: np.ndarray, allowed: np.ndarray, q: np.ndarray) -> np.ndarray:
    scores = base[allowed] @ q
    part = np.argpartition(-scores, K - 1)[:K]
    return allowed[part[np.argsort(-scores[part], kind="stable")]]


def numpy_masked(base: np.ndarray, mask: np.ndarray, q: np.ndarray) -> np.ndarray:
    scores = np.where(mask, base @ q, -np.inf)
    part = np.argpartition(-scores, K - 1)[:K]
    return part[np.argsort(-scores[part], kind="stable")]


def timed(fn, queries: np.ndarray, warm: int = 3) -> tuple[tuple[list[float], list[float]], list[np.ndarray]]:
    """(wall seconds, CPU seconds of this process) per call of ``fn(q)``, and what each returned.
    CPU time is what the search itself costs; on a loaded machine wall time adds waiting."""
    for q in queries[:warm]:
        fn(q)
    wall, cpu, found = [], [], []
    for q in queries:
        t, c = time.perf_counter(), time.process_time()
        found.append(fn(q))
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - t)
    return (wall, cpu), found


def lat(times: tuple[list[float], list[float]]) -> dict[str, float]:
    wall, cpu = times
    return {"p50_ms": 1000 * _common.pct(wall, 50), "p95_ms": 1000 * _common.pct(wall, 95),
            "cpu_p50_ms": 1000 * _common.pct(cpu, 50)}


def measure_filter(index: VectorIndex, allowed: np.ndarray, queries: np.ndarray, truth: np.ndarray,
                   default_max: int) -> dict[str, dict[str, Any]]:
    """Recall, completeness and latency of the filtered search under each strategy."""
    out = {}
    scan = filtered._SCAN_IDS_PER_EXACT_ID
    for strategy in STRATEGIES:
        filtered.EXACT_MAX_ALLOWED = {"library": default_max, "exact": len(allowed) + 1,
                                      "widened": -1}[strategy]
        filtered._SCAN_IDS_PER_EXACT_ID = 0 if strategy == "exact" else scan  # brute force only
        try:
            times, found = timed(lambda q: index.search(q[None], K, allowed)[1][0], queries)
        finally:
            filtered.EXACT_MAX_ALLOWED, filtered._SCAN_IDS_PER_EXACT_ID = default_max, scan
        ids = np.stack(found)
        out[strategy] = {"recall": recall_at_k(ids, truth), "hits": float((ids >= 0).sum(1).mean()),
                         **lat(times)}
    return out


def _numpy_baselines(base: np.ndarray, allowed: np.ndarray, queries: np.ndarray, truth: np.ndarray
                     ) -> dict[str, Any]:
    mask = np.zeros(len(base), bool)
    mask[allowed] = True
    tg, fg = timed(lambda q: numpy_gather(base, allowed, q), queries)
    tm, _ = timed(lambda q: numpy_masked(base, mask, q), queries)
    return {"allowed": len(allowed), "gather": lat(tg), "masked": lat(tm),
            "gather_recall": recall_at_k(np.stack(fg), truth)}


def type_specs(n: int, hnsw_m: int, pq_m: int, names: list[str]) -> list[tuple[str, str]]:
    named = {"ivf": f"IVF{nlist_for(n)},Flat", "hnsw": f"HNSW{hnsw_m}",
             "ivfpq": f"IVF{nlist_for(n)},PQ{pq_m}np", "auto": choose_index(n, bench_ann.DIM)}
    return [(name, named.get(name) or family_spec(name, n, bench_ann.DIM)) for name in names]


def run(args) -> dict[str, Any]:
    folder = args.workdir / f"n{args.n}"
    base, shards, queries, tune_q = bench_ann.make_dataset(args.n, folder, args.queries, args.tune_queries)
    live = np.arange(args.n, dtype=np.int64)
    rng = np.random.default_rng(args.seed)
    filters = {s: np.sort(rng.choice(args.n, max(1, round(args.n * s)), replace=False)).astype(np.int64)
               for s in args.selectivities}
    out: dict[str, Any] = {"machine": _common.machine_info(), "n": args.n, "k": K,
                           "queries": args.queries, "exact_max_allowed": filtered.EXACT_MAX_ALLOWED,
                           "baselines": {}, "types": []}
    truths = {s: filtered_truth(base, a, queries) for s, a in filters.items()}
    for s, allowed in filters.items():  # BLAS on one thread: a second one waits when loaded
        with threadpoolctl.threadpool_limits(1, "blas"):
            baseline = _numpy_baselines(base, allowed, queries, truths[s])
        out["baselines"][str(s)] = baseline
        print(f"# selectivity {s}: {len(allowed)} allowed; numpy gather p50 "
              f"{baseline['gather']['p50_ms']:.2f} ms, masked full scan p50 "
              f"{baseline['masked']['p50_ms']:.2f} ms", flush=True)
    for label, spec in type_specs(args.n, args.hnsw_m, args.pq_m, args.types):
        _common.wait_quiet(args.quiet_wait)
        meter = _common.CpuMeter()
        t = time.perf_counter()
        index, _ = build_index(spec, shards, live, seed=0)
        index.exact_vectors = shards.lookup
        build_s = time.perf_counter() - t
        tuning = tune_index(index, shards, live, tune_q, k=K, target_recall=args.target_recall)
        _, found = index.search(queries, K)
        row: dict[str, Any] = {"type": label, "spec": spec, "build_s": build_s,
                               "setting": index.params.to_dict(), "tuned_reached": tuning.reached,
                               "unfiltered_recall": recall_at_k(found, bench_ann.numpy_topk_batch(base, queries, K)),
                               "filters": {}}
        print(f"# {spec}: built in {build_s:.0f} s, tuned {row['setting']}, unfiltered recall "
              f"{row['unfiltered_recall']:.3f}", flush=True)
        for s, allowed in filters.items():
            m = measure_filter(index, allowed, queries, truths[s], filtered.EXACT_MAX_ALLOWED)
            widened = filtered_params(index.index, index.params, len(allowed) / args.n, K).to_dict()
            row["filters"][str(s)] = {"allowed": len(allowed), "widened_setting": widened, **m}
            lib = m["library"]
            print(f"  {spec} s={s}: recall {lib['recall']:.3f} hits {lib['hits']:.2f} p50 "
                  f"{lib['p50_ms']:.2f} p95 {lib['p95_ms']:.2f} | exact {m['exact']['recall']:.3f} "
                  f"{m['exact']['p50_ms']:.2f} (cpu {m['exact']['cpu_p50_ms']:.2f}) ms | widened {widened} "
                  f"{m['widened']['recall']:.3f} {m['widened']['p50_ms']:.2f} "
                  f"(cpu {m['widened']['cpu_p50_ms']:.2f}) ms", flush=True)
        c = meter.stop()
        row["foreign_cpu_frac"] = c["foreign_s"] / c["wall_s"]
        out["types"].append(row)
        del index
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"n = {result['n']:,}, k = {result['k']}, {result['queries']} held-out queries, "
             f"EXACT_MAX_ALLOWED = {result['exact_max_allowed']:,}", "",
             "| index (tuned, unfiltered recall) | selectivity (allowed) | recall@10 | hits | p50 / p95 ms "
             "(CPU p50) | forced exact: recall, p50 (CPU) ms | forced widened (setting): recall, p50 (CPU) ms "
             "| numpy gather / masked p50 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["types"]:
        head = f"`{row['spec']}` ({', '.join(f'{k} {v}' for k, v in row['setting'].items())}, " \
               f"{row['unfiltered_recall']:.3f})"
        for s, f in row["filters"].items():
            b = result["baselines"][s]
            lib, ex, wi = f["library"], f["exact"], f["widened"]
            setting = ", ".join(f"{k} {v}" for k, v in f["widened_setting"].items() if k != "rerank")
            lines.append(
                f"| {head} | {float(s):.1%} ({f['allowed']:,}) | **{lib['recall']:.3f}** | {lib['hits']:.1f} "
                f"| {lib['p50_ms']:.2f} / {lib['p95_ms']:.2f} ({lib['cpu_p50_ms']:.2f}) "
                f"| {ex['recall']:.3f}, {ex['p50_ms']:.2f} ({ex['cpu_p50_ms']:.2f}) "
                f"| ({setting}) {wi['recall']:.3f}, {wi['p50_ms']:.2f} ({wi['cpu_p50_ms']:.2f}) "
                f"| {b['gather']['p50_ms']:.2f} / {b['masked']['p50_ms']:.2f} |")
            head = ""
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="database size")
    ap.add_argument("--types", default="ivf,hnsw,ivfpq",
                    help="comma-separated: ivf, hnsw, ivfpq, auto, or a family of store.families "
                         "(ivf_hnsw_sq8, ivf_hnsw_pqfs, ivf_hnsw_fp16, exact_fp16, ...)")
    ap.add_argument("--selectivities", default="0.001,0.01,0.1,0.5")
    ap.add_argument("--queries", type=int, default=200, help="held-out queries, searched one by one")
    ap.add_argument("--tune-queries", type=int, default=200, help="held-out queries given to tune()")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--pq-m", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random filters")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S")
    ap.add_argument("--workdir", type=Path, default=bench_ann.DEFAULT_WORKDIR.parent / "filtered")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "ann")
    ap.add_argument("--keep", action="store_true", help="keep the shards in --workdir")
    args = ap.parse_args(argv)
    args.types = [t for t in args.types.split(",") if t]
    args.selectivities = [float(s) for s in args.selectivities.split(",")]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"filtered_{args.n // 1000}k"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
