"""Query latency: text encode + vector search, at 1k/10k/100k items.

In one process:

* text encode: ``ClipEncoder.encode_texts([q])`` for a few dozen different short queries with a
  random model of ViT-B-32 size (open_clip pads every text to 77 tokens, so the content does not
  change the cost); median and p99 per query;
* search: the project's ``VectorIndex`` (FAISS ``IDMap2,Flat``, inner product) over N synthetic
  clustered, L2-normalised 512-d vectors, single queries (p50/p99, k=10) next to a numpy
  brute-force baseline (matrix-vector product + ``argpartition``) timed alternately in the same
  process; also FAISS limited to one OpenMP thread; and a batch of 100 queries;
* correctness: the index's top-10 ids against brute force;
* end to end: encode one text + search, timed together.

Run:  python benchmarks/bench_query.py --sizes 1000,10000,100000
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

from crossmodal_rag.encoders import load_encoder
from crossmodal_rag.store.vectors import VectorIndex

DIM = 512
K = 10

QUERIES = [
    "a dog running on the beach", "two cats sleeping on a sofa", "a red car parked in the street",
    "a bowl of fruit on a wooden table", "children playing football in a park", "a snowy mountain at sunrise",
    "a man riding a bicycle", "a plate of pasta with tomato sauce", "an old lighthouse by the sea",
    "a crowded train station", "a woman reading a book", "a bird sitting on a branch",
    "a city skyline at night", "a horse in a green field", "a kitchen with white cabinets",
    "people walking in the rain with umbrellas", "a close-up of a sunflower", "a boat on a calm lake",
    "a laptop on a desk next to a coffee cup", "a pizza with mushrooms", "an airplane taking off",
    "a group of friends at a birthday party", "a black and white photo of a bridge",
    "a cow standing near a fence", "a skateboarder doing a trick", "a bathroom with a large mirror",
    "a giraffe eating leaves", "fireworks over a river", "a vintage typewriter", "a baby laughing",
    "a stack of pancakes with syrup", "a forest path in autumn", "a tennis player serving",
    "a bus stopped at a traffic light", "a teddy bear on a bed", "an elephant crossing a dirt road",
    "a market stall selling vegetables", "a surfer riding a wave", "a clock tower in a town square",
    "a person cooking on a grill",
]


def clustered_vectors(n: int, n_queries: int, *, clusters: int = 1000, noise: float = 0.6,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` database and ``n_queries`` query vectors: unit-norm gaussian cluster centres plus
    isotropic noise of total norm about ``noise``, renormalised. Cluster sizes are skewed (Zipf-like)
    as in real collections. Queries come from the same clusters but are not in the database."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.5
    weights /= weights.sum()

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, DIM), np.float32)
        for start in range(0, m, 20_000):
            stop = min(start + 20_000, m)
            which = rng.choice(clusters, size=stop - start, p=weights)
            block = centres[which] + rng.standard_normal((stop - start, DIM), dtype=np.float32) * (
                noise / np.sqrt(DIM))
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            out[start:stop] = block
        return out

    return draw(n), draw(n_queries)


def numpy_topk(base: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute force for one query ``(D,)``: (scores, row indices), best first."""
    scores = base @ q
    part = np.argpartition(-scores, k - 1)[:k]
    order = part[np.argsort(-scores[part], kind="stable")]
    return scores[order], order


def numpy_topk_batch(base: np.ndarray, qs: np.ndarray, k: int) -> np.ndarray:
    scores = qs @ base.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    rows = np.arange(len(qs))[:, None]
    order = np.argsort(-scores[rows, part], axis=1, kind="stable")
    return part[rows, order]


def ms(seconds: list[float]) -> tuple[float, float]:
    return 1000 * _common.pct(seconds, 50), 1000 * _common.pct(seconds, 99)


def measure_size(n: int, encoder, args: argparse.Namespace) -> dict[str, object]:
    """Build an index of ``n`` clustered vectors and time searches in it; one table row."""
    default_threads = faiss.omp_get_max_threads()
    t = time.perf_counter()
    base, queries = clustered_vectors(n, max(args.queries, args.batch), seed=n)
    ids = np.arange(1, n + 1, dtype=np.int64) * 7 + 3  # ids are not row numbers
    gen_s = time.perf_counter() - t
    t = time.perf_counter()
    index = VectorIndex(DIM)
    index.add(ids, base)
    add_s = time.perf_counter() - t

    # correctness: top-10 ids vs brute force
    exact = 0
    max_score_diff = 0.0
    for q in queries[: args.queries]:
        s_ix, i_ix = index.search(q, K)
        s_np, r_np = numpy_topk(base, q, K)
        if set(i_ix[0].tolist()) == set(ids[r_np].tolist()):
            exact += 1
        max_score_diff = max(max_score_diff, float(np.abs(s_ix[0] - s_np).max()))

    # Single queries. Each method runs in blocks of consecutive queries, the blocks of the three
    # methods taking turns (so drift hits all alike). Not query by query: FAISS (its own
    # OpenMP), numpy (OpenBLAS) and torch keep separate thread pools whose idle threads spin
    # for a while after each call, and on 2 cores a call right after another library's call
    # is slowed by those spinning threads (measured: 0.07 ms -> 4 ms at 1k). The first 2
    # queries of each block are not timed; "after encode" below measures the realistic case.
    def one_thread_search(q):
        faiss.omp_set_num_threads(1)
        try:
            return index.search(q, K)
        finally:
            faiss.omp_set_num_threads(default_threads)

    methods = {
        "index": lambda q: index.search(q, K),
        "index_1thread": one_thread_search,
        "numpy": lambda q: numpy_topk(base, q, K),
    }
    _common.wait_quiet(args.quiet_wait)
    meter = _common.CpuMeter()
    times: dict[str, list[float]] = {m: [] for m in methods}
    block = max(args.queries // args.rounds, 1)
    for r in range(args.rounds):
        qs = queries[r * block : (r + 1) * block]
        for name, fn in methods.items():
            for q in qs[:2]:
                fn(q)
            for q in qs:
                t = time.perf_counter()
                fn(q)
                times[name].append(time.perf_counter() - t)

    # batches: same scheme, one untimed call before each timed one
    qb = queries[: args.batch]
    b_ix, b_np = [], []
    for _ in range(args.batch_repeats):
        index.search(qb, K)
        t = time.perf_counter()
        _, bi = index.search(qb, K)
        b_ix.append(time.perf_counter() - t)
        numpy_topk_batch(base, qb, K)
        t = time.perf_counter()
        br = numpy_topk_batch(base, qb, K)
        b_np.append(time.perf_counter() - t)
    batch_agree = float(np.mean([set(a.tolist()) == set(ids[b].tolist())
                                 for a, b in zip(bi, br, strict=True)]))

    # End to end, as a query happens: encode one text (torch), then search. One loop per search
    # method, so the search always follows torch's encode and the encode always follows that
    # method's search (each slows the other: see above). Encode and search are timed apart too.
    after: dict[str, list[float]] = {m: [] for m in methods}
    enc_in_loop: dict[str, list[float]] = {m: [] for m in methods}
    total: dict[str, list[float]] = {m: [] for m in methods}
    for name, fn in methods.items():
        fn(encoder.encode_texts([QUERIES[0]])[0])
        for qtext in QUERIES:
            t = time.perf_counter()
            v = encoder.encode_texts([qtext])
            t1 = time.perf_counter()
            fn(v[0])
            t2 = time.perf_counter()
            enc_in_loop[name].append(t1 - t)
            after[name].append(t2 - t1)
            total[name].append(t2 - t)
    e2e = total["index"]
    cpu = meter.stop()
    t_ix, t_ix1, t_np = times["index"], times["index_1thread"], times["numpy"]

    row = {
        "n": n, "gen_s": gen_s, "add_s": add_s,
        "top10_exact_frac": exact / args.queries, "max_score_diff": max_score_diff,
        "index_p50_ms": ms(t_ix)[0], "index_p99_ms": ms(t_ix)[1],
        "index_1thread_p50_ms": ms(t_ix1)[0], "index_1thread_p99_ms": ms(t_ix1)[1],
        "numpy_p50_ms": ms(t_np)[0], "numpy_p99_ms": ms(t_np)[1],
        "batch_index_ms": 1000 * _common.median(b_ix), "batch_numpy_ms": 1000 * _common.median(b_np),
        "batch_top10_agree": batch_agree,
        "e2e_p50_ms": ms(e2e)[0], "e2e_p99_ms": ms(e2e)[1],
        "after_encode_index_p50_ms": ms(after["index"])[0],
        "after_encode_index_1thread_p50_ms": ms(after["index_1thread"])[0],
        "after_encode_numpy_p50_ms": ms(after["numpy"])[0],
        **{f"e2e_{m}_p50_ms": ms(total[m])[0] for m in methods},
        **{f"e2e_{m}_p99_ms": ms(total[m])[1] for m in methods},
        **{f"encode_in_loop_{m}_p50_ms": ms(enc_in_loop[m])[0] for m in methods},
        "foreign_cpu_frac": cpu["foreign_s"] / cpu["wall_s"],
    }
    print(f"# n={n}: vectors made in {gen_s:.1f}s, VectorIndex.add {add_s:.2f}s; top-10 equal to brute "
          f"force for {exact}/{args.queries} queries (batch: {batch_agree:.0%}), max score diff "
          f"{max_score_diff:.1e}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,10000,100000", help="comma-separated index sizes")
    ap.add_argument("--queries", type=int, default=200, help="single-query searches timed per size")
    ap.add_argument("--rounds", type=int, default=4, help="blocks per method for single queries")
    ap.add_argument("--batch", type=int, default=100, help="queries in the batched search")
    ap.add_argument("--batch-repeats", type=int, default=7)
    ap.add_argument("--text-rounds", type=int, default=2, help="passes over the text queries for encode timing")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                    help="before each measurement wait up to S seconds for other processes to go idle")
    ap.add_argument("--model-dir", type=Path, default=_common.DEFAULT_MODEL_DIR)
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    logging.basicConfig(level=logging.ERROR)

    info = _common.machine_info()
    info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    _common.print_machine(info)
    result: dict[str, object] = {"machine": info, "k": K, "dim": DIM}

    # -- text encoding ---------------------------------------------------------------------
    encoder = load_encoder(_common.vit_b32_random(args.model_dir), "cpu").load()
    for q in QUERIES[:3]:
        encoder.encode_texts([q])  # warm up
    _common.wait_quiet(args.quiet_wait)
    meter = _common.CpuMeter()
    enc_s: list[float] = []
    for _ in range(args.text_rounds):
        for q in QUERIES:
            t = time.perf_counter()
            encoder.encode_texts([q])
            enc_s.append(time.perf_counter() - t)
    cpu = meter.stop()
    t = time.perf_counter()
    encoder.encode_texts(QUERIES)
    batch_enc_s = time.perf_counter() - t
    e50, e99 = ms(enc_s)
    print(f"\ntext encode, 1 query: p50 {e50:.1f} ms, p99 {e99:.1f} ms over {len(enc_s)} "
          f"({len(QUERIES)} different texts); a batch of {len(QUERIES)}: {len(QUERIES) / batch_enc_s:.1f} "
          f"texts/s; other processes used {cpu['foreign_s'] / cpu['wall_s']:.0%} of a core meanwhile")
    result["text_encode"] = {"p50_ms": e50, "p99_ms": e99, "n": len(enc_s), "texts": len(QUERIES),
                             "batch_texts_per_s": len(QUERIES) / batch_enc_s,
                             "foreign_cpu_frac": cpu["foreign_s"] / cpu["wall_s"]}

    # -- search ------------------------------------------------------------------------------
    rows = []
    for n in sizes:
        rows.append(measure_size(n, encoder, args))
    result["search"] = rows

    print()
    print(f"single query, k={K}, ms (p50 / p99), each method on its own (see the code); ratio = "
          f"VectorIndex p50 / numpy p50; batch = {args.batch} queries in one call, ms (median)")
    print(f"{'N':>7} | {'VectorIndex':>13} | {'faiss 1 thr':>13} | {'numpy':>13} | {'ratio':>5} | "
          f"{'batch VI':>8} | {'batch np':>8} | {'top10 ok':>8} | {'foreign':>7}")
    for r in rows:
        print(f"{r['n']:>7} | {r['index_p50_ms']:>5.2f} / {r['index_p99_ms']:>5.2f} | "
              f"{r['index_1thread_p50_ms']:>5.2f} / {r['index_1thread_p99_ms']:>5.2f} | "
              f"{r['numpy_p50_ms']:>5.2f} / {r['numpy_p99_ms']:>5.2f} | "
              f"{r['index_p50_ms'] / r['numpy_p50_ms']:>5.2f} | {r['batch_index_ms']:>8.1f} | "
              f"{r['batch_numpy_ms']:>8.1f} | {r['top10_exact_frac']:>8.0%} | {r['foreign_cpu_frac']:>7.0%}")
    print()
    print("a query as it happens: encode one text (torch), then search, in a loop; ms p50 (p99) of the "
          "total, and its two parts (p50)")
    print(f"{'N':>7} | {'search':>13} | {'total':>15} | {'encode part':>11} | {'search part':>11}")
    for r in rows:
        for m, label in (("index", "VectorIndex"), ("index_1thread", "faiss 1 thr"), ("numpy", "numpy")):
            print(f"{r['n']:>7} | {label:>13} | {r[f'e2e_{m}_p50_ms']:>6.1f} ({r[f'e2e_{m}_p99_ms']:>6.1f}) | "
                  f"{r[f'encode_in_loop_{m}_p50_ms']:>11.1f} | {r[f'after_encode_{m}_p50_ms']:>11.2f}")
    print(f"\ntext encode alone: p50 {e50:.1f} ms, p99 {e99:.1f} ms. foreign = share of one core used by "
          "other processes during that size's measurements (> 5% means disturbed).")
    if args.out_json:
        args.out_json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
