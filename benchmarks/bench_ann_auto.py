"""``auto`` that measures, against an exhaustive sweep of FAISS families, in the same run.

For each dataset (real MiniLM sentence embeddings from ``embed_summaries.py``, and the synthetic
``powerlaw`` / ``clustered`` mixtures of ``bench_ann_families.py``) and size:

1. the vectors go into float16 ``EmbeddingShards`` as a collection holds them;
2. **auto**: ``store.autoindex.auto_index_type`` measures the candidate families on the
   collection's own vectors (held-out queries drawn from them; nothing fresh is shown to it),
   the chosen type is built by ``build_index``, tuned by ``tune_index`` (leave-one-out on 500
   stored vectors, checked on half of them) and raised to the measured floor, as ``reindex``
   does;
3. **sweep**: every family of ``store.families`` plus hand-picked types (``--extra``, e.g.
   ``HNSW32``) is built and tuned *exhaustively on fresh queries* (the oracle a FAISS user tuning
   by hand on real queries would have): set A (fresh) tunes, set B (other fresh queries) scores;
4. every index is timed on B, one query at a time on one OpenMP thread, in ``--rounds``
   interleaved rounds (median of the rounds' medians), with numpy brute force (float32
   matrix-vector product + argpartition, one query) timed in the same rounds.

Run:  nice python benchmarks/bench_ann_auto.py --data real:/tmp/xmrag-bench/minilm_110k.npy,powerlaw,clustered --n 100000
      python benchmarks/bench_ann_auto.py --report
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
from bench_ann_families import DISTS

from crossmodal_rag.store.ann import SearchParams, recall_at_k
from crossmodal_rag.store.autoindex import auto_index_type, measured_floor
from crossmodal_rag.store.build import build_index, exact_top_k, tune_index
from crossmodal_rag.store.families import FAMILIES, family_spec
from crossmodal_rag.store.shards import EmbeddingShards
from crossmodal_rag.store.tuning import tune_grid

K = 10
OUT = Path(__file__).resolve().parent / "ann"


def load_dataset(name: str, n: int, n_fresh: int, workdir: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """(label, base ``(n, D)``, fresh queries ``(n_fresh, D)``), rounded through float16 as the
    shards store them. ``real:PATH``: rows of an embeddings ``.npy`` (the last ``n_fresh`` rows
    are the queries, never in the base); otherwise a synthetic distribution's fresh draws."""
    if name.startswith("real:"):
        x = np.load(name[5:], mmap_mode="r")
        if len(x) < n + n_fresh:
            raise SystemExit(f"{name} holds {len(x)} vectors, need {n} + {n_fresh}")
        base, fresh = np.asarray(x[:n]), np.asarray(x[len(x) - n_fresh:])
        label = "real"
    else:
        gen = DISTS[name]()
        base = np.concatenate([gen.draw(np.random.default_rng([n, 11, s]), min(50_000, n - s))
                               for s in range(0, n, 50_000)])
        fresh = gen.draw(np.random.default_rng([n, 12]), n_fresh)
        label = name
    base = base.astype(np.float16).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    return label, np.ascontiguousarray(base), np.ascontiguousarray(fresh, dtype=np.float32)


def make_shards(base: np.ndarray, folder: Path) -> EmbeddingShards:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shards = EmbeddingShards(folder, "image", base.shape[1])
    for s in range(0, len(base), 100_000):
        shards.append(np.arange(s, min(s + 100_000, len(base)), dtype=np.int64), base[s:s + 100_000], fsync=False)
    return shards


def p50_single(search: Any, queries: np.ndarray) -> float:
    times = []
    for q in queries:
        t = time.perf_counter()
        search(q)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def run(name: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    build_threads = faiss.omp_get_max_threads()  # builds: OMP_NUM_THREADS (1 on a shared machine)
    label, base, fresh = load_dataset(name, n, 2 * args.fresh, Path(args.workdir))
    dim = base.shape[1]
    shards = make_shards(base, Path(args.workdir) / f"shards-{label}-{n}")
    live = np.arange(n, dtype=np.int64)
    qa, qb = fresh[: args.fresh], fresh[args.fresh:]
    ta, tb = exact_top_k(shards, live, qa, K), exact_top_k(shards, live, qb, K)
    result: dict[str, Any] = {"data": name, "label": label, "n": n, "dim": dim, "machine": _common.machine_info(),
                              "fresh_queries": [len(qa), len(qb)], "rows": [],
                              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "load_start": [round(v, 2) for v in os.getloadavg()]}
    # -- auto, as reindex runs it ------------------------------------------------------------
    t0 = time.perf_counter()
    if args.auto_record:  # the choice an earlier run measured (its JSON): rebuild and re-time only
        record = json.loads(Path(args.auto_record).read_text())["auto_record"]
        spec = record["index_type"]
    else:
        spec, record = auto_index_type(shards, live, seed=0, max_memory=args.max_memory)
    auto_s = time.perf_counter() - t0 if not args.auto_record else record["seconds"]
    logging.info("%s: auto chose %s in %.0f s: %s", label, spec, auto_s, record["reason"])
    result.update(auto=spec, auto_seconds=round(auto_s, 1), auto_record=record)
    specs = {f: family_spec(f, n, dim) for f in args.families}
    specs.update({s: s for s in args.extra})
    seen: set[str] = set()
    specs = {f: s for f, s in specs.items() if s and not (s in seen or seen.add(s))}
    if spec not in specs.values():
        specs["auto"] = spec
    built: list[tuple[dict[str, Any], Any, SearchParams]] = []
    for family, s in specs.items():
        t0 = time.perf_counter()
        index, _ = build_index(s, shards, live, seed=0)
        index.exact_vectors = shards.lookup
        build_s = time.perf_counter() - t0
        size = int(faiss.serialize_index(index.index).nbytes)
        row: dict[str, Any] = {"family": family, "spec": s, "build_s": round(build_s, 1),
                               "bytes_per_vector": round(size / n, 1)}

        def search(q: np.ndarray, kk: int, p: SearchParams, index: Any = index) -> tuple[np.ndarray, np.ndarray]:
            return index.search(q, kk, params=p)

        # the sweep: tuned exhaustively on fresh set A
        faiss.omp_set_num_threads(1)
        tuning = tune_grid(search, index.index, qa, ta, k=K, target_recall=args.target_recall)
        oracle = SearchParams(**({tuning.param: tuning.value} if tuning.param else {}), rerank=tuning.rerank)
        row["sweep_params"] = oracle.to_dict()
        built.append((row, index, oracle))
        if s == spec:  # auto's own tuning of its pick, without fresh queries
            stored = np.sort(np.random.default_rng(1).choice(n, size=500, replace=False))
            tuned = tune_index(index, shards, live, base[stored], k=K, target_recall=args.target_recall,
                               query_ids=stored)
            own = measured_floor(record, spec, index.params)
            auto_row = {**row, "family": f"auto ({family})", "auto_params": own.to_dict(),
                        "tuning": tuned.to_dict()}
            built.append((auto_row, index, own))
        faiss.omp_set_num_threads(build_threads)
        logging.info("%s %s built in %.1f s, sweep setting %s", label, s, build_s, oracle.to_dict())
    faiss.omp_set_num_threads(1)
    rounds: dict[int, list[float]] = {i: [] for i in range(len(built) + 1)}
    for _ in range(args.rounds):
        rounds[len(built)].append(p50_single(lambda q: np.argpartition(-(base @ q), K)[:K], qb[: args.timed]))
        for i, (_row, index, p) in enumerate(built):
            rounds[i].append(p50_single(lambda q, index=index, p=p: index.search(q[None], K, params=p), qb[: args.timed]))
    faiss.omp_set_num_threads(build_threads)
    result["numpy_p50_ms"] = round(float(np.median(rounds[len(built)])), 3)
    for i, (row, index, p) in enumerate(built):
        _, found = index.search(qb, K, params=p)
        row["recall_at_10"] = round(recall_at_k(found, tb), 4)
        row["p50_ms"] = round(float(np.median(rounds[i])), 4)
        row["vs_numpy"] = round(result["numpy_p50_ms"] / row["p50_ms"], 1)
        result["rows"].append(row)
    ok = [r for r in result["rows"] if not r["family"].startswith("auto") and r["recall_at_10"] >= args.target_recall]
    auto_rows = [r for r in result["rows"] if r["family"].startswith("auto")]
    if ok and auto_rows:
        best = min(ok, key=lambda r: r["p50_ms"])
        result["best_swept"] = best["spec"]
        result["auto_vs_best"] = round(auto_rows[0]["p50_ms"] / best["p50_ms"], 2)
    result["load_end"] = [round(v, 2) for v in os.getloadavg()]
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    OUT.mkdir(exist_ok=True)
    (OUT / f"auto_{label}_{n}{args.tag}.json").write_text(json.dumps(result, indent=1))
    logging.info("%s", report_one(result))
    return result


def report_one(r: dict[str, Any]) -> str:
    rec = r["auto_record"]
    out = [f"### {r['label']}, {r['n']:,} x {r['dim']} (auto -> `{r['auto']}`, measured in {r['auto_seconds']:.0f} s)",
           "", f"auto's reason: {rec['reason']}.", "",
           f"numpy brute force p50 {r['numpy_p50_ms']} ms (one query, same rounds). Best swept family at "
           f"recall@10 >= 0.95: `{r.get('best_swept')}`; auto / best = **{r.get('auto_vs_best')}x**.", "",
           "| family | index | build s | bytes/vector | setting | recall@10 (fresh) | p50 ms (1 thread) | vs numpy |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["rows"]:
        params = row.get("auto_params", row["sweep_params"])
        setting = ", ".join(f"{k}={v}" for k, v in params.items()) or "-"
        out.append(f"| {row['family']} | `{row['spec']}` | {row['build_s']} | {row['bytes_per_vector']:.0f} | "
                   f"{setting} | {row['recall_at_10']:.3f} | {row['p50_ms']:.3f} | {row['vs_numpy']:.0f}x |")
    out += ["", "auto's own measurement (sample of the collection, held-out stored vectors; p50 scaled to n):", "",
            "| family | index | status | setting | recall@10 (set B) | p50 ms (scaled) | MiB |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in rec["candidates"]:
        setting = f"{c['param']}={c['value']}" if c.get("param") else "-"
        out.append(f"| {c['family']} | `{c['spec']}` | {c['status']} | {setting} | {c['recall']:.3f} | "
                   f"{c['est_p50_ms']:.3f} | {c['scaled_bytes'] / 2**20:.1f} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="powerlaw,clustered")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--fresh", type=int, default=500, help="fresh queries per set (A tunes the sweep, B scores)")
    ap.add_argument("--timed", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--families", default=",".join(f for f in FAMILIES if f != "flat"))
    ap.add_argument("--extra", default="HNSW32", help="hand-picked factory strings swept too")
    ap.add_argument("--max-memory", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/xmrag-bench/auto")
    ap.add_argument("--auto-record", default=None, help="reuse the auto choice of this earlier JSON")
    ap.add_argument("--tag", default="", help="suffix of the output JSON's name")
    ap.add_argument("--report", action="store_true", help="print the tables of benchmarks/ann/auto_*.json")
    args = ap.parse_args(argv)
    if args.report:
        for path in sorted(OUT.glob("auto_*.json")):
            print(report_one(json.loads(path.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("crossmodal_rag.store.tuning").setLevel(logging.WARNING)
    args.families = [f for f in args.families.split(",") if f]
    args.extra = [s for s in args.extra.split(",") if s]
    for name in args.data.split(","):
        run(name, args.n, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
