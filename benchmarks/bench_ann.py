"""ANN index types at 10k / 100k / 1M vectors: build, memory, tuned latency, batch QPS, recall@10.

Every index is built **through the project's code** (``store.build.build_index`` from float16
``EmbeddingShards``, in a child process so its build time and peak RSS are its own), saved with
``VectorIndex.save``, loaded back with ``VectorIndex.load`` (RSS delta = resident index memory),
tuned by the project's ``tune_index`` to recall@10 >= 0.95 on held-out tuning queries, and then
measured at that setting on *other* held-out queries:

* single-query p50/p99 (``VectorIndex.search`` one query at a time; also with FAISS limited to
  one OpenMP thread), batch QPS (``--batch`` queries in one call), recall@10 against exact search;
* the same index opened with ``mmap=True``; at sizes in ``--sharded-sizes``, the sharded on-disk
  IVF build (time, peak RSS, search latency over its memory-mapped ``.ivfdata``);
* baselines in the same process: numpy brute force (matrix-vector product + ``argpartition``;
  one matrix product for the batch), timed in alternating blocks with the exact ``Flat`` index,
  and the copy bandwidth (``np.copyto`` of a 512 MiB buffer) giving the memory-bandwidth bound of
  one exact query (bytes scanned / bandwidth).

Data: a deterministic mixture of anisotropic gaussian clusters on a 96-d subspace of R^512,
plus isotropic off-subspace noise, L2-normalised (see ``ClusteredMixture`` and the README).
Queries are fresh draws from the same mixture, never database vectors.

Run:  python benchmarks/bench_ann.py --sizes 10000,100000 --quiet-wait 60
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

from crossmodal_rag.store.ann import (
    SearchParams,
    choose_index,
    estimate_index_bytes,
    nlist_for,
    recall_at_k,
)
from crossmodal_rag.store.build import build_index, tune_index
from crossmodal_rag.store.manifest import IndexFile, ShardFile
from crossmodal_rag.store.shards import EmbeddingShards
from crossmodal_rag.store.vectors import VectorIndex

DIM = 512
K = 10
SHARD_ROWS = 100_000
CHUNK = 65_536
DEFAULT_WORKDIR = Path(os.environ.get("XMRAG_BENCH_ANN_DIR", "/tmp/xmrag-bench/ann"))


# -- data --------------------------------------------------------------------------------------
class ClusteredMixture:
    """A deterministic mixture of anisotropic gaussian clusters on a ``latent``-d subspace of R^512.

    * ``clusters`` centres ~ N(0, I) in the latent space, with Zipf-like weights (exponent 0.6,
      shuffled), so cluster sizes vary over two orders of magnitude;
    * each cluster's covariance is ``R_s^T diag(scale_c)^2 R_s``: one of ``shapes`` random
      rotations ``R_s``, a power-law spectrum (axis i has spread i^-0.5, so each cluster is
      elongated along a few directions), a per-cluster spread drawn log-uniformly in ``spread``
      and +-30% per-axis jitter;
    * the latent points are mapped into R^512 by a random orthonormal basis, L2-normalised, then
      isotropic noise of total norm ~``off_noise`` is added (off-subspace variation) and the
      vectors are L2-normalised again.
    """

    def __init__(self, seed: int = 0, *, clusters: int = 2000, latent: int = 96, shapes: int = 16,
                 spread: tuple[float, float] = (0.5, 1.2), off_noise: float = 0.5) -> None:
        rng = np.random.default_rng(seed)
        self.latent = latent
        q, _ = np.linalg.qr(rng.standard_normal((DIM, latent)))
        self.basis = np.ascontiguousarray(q.T, dtype=np.float32)  # (latent, 512), orthonormal rows
        self.centres = rng.standard_normal((clusters, latent)).astype(np.float32)
        self.shape_of = rng.integers(0, shapes, clusters)
        self.rotations = [np.linalg.qr(rng.standard_normal((latent, latent)))[0].astype(np.float32)
                          for _ in range(shapes)]
        spectrum = 1.0 / np.arange(1, latent + 1) ** 0.5
        spectrum /= np.sqrt((spectrum**2).mean())
        size = np.exp(rng.uniform(np.log(spread[0]), np.log(spread[1]), clusters))
        jitter = rng.uniform(0.7, 1.3, (clusters, latent))
        self.scale = (size[:, None] * spectrum[None, :] * jitter).astype(np.float32)
        weights = 1.0 / np.arange(1, clusters + 1) ** 0.6
        rng.shuffle(weights)
        self.weights = weights / weights.sum()
        self.off_noise = off_noise

    def draw(self, rng: np.random.Generator, m: int) -> np.ndarray:
        """``m`` unit vectors ``(m, 512)`` float32."""
        which = rng.choice(len(self.weights), size=m, p=self.weights)
        g = rng.standard_normal((m, self.latent), dtype=np.float32) * self.scale[which]
        z = self.centres[which]
        shape = self.shape_of[which]
        for s, rot in enumerate(self.rotations):
            sel = shape == s
            if sel.any():
                z[sel] += g[sel] @ rot
        x = z @ self.basis
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += rng.standard_normal((m, DIM), dtype=np.float32) * np.float32(self.off_noise / np.sqrt(DIM))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def make_dataset(n: int, folder: Path, n_eval: int, n_tune: int, seed: int = 0
                 ) -> tuple[np.ndarray, EmbeddingShards, np.ndarray, np.ndarray]:
    """Database vectors (as the float16 shards hold them, float32 ``(n, 512)``), the shards on
    disk (ids = row numbers), evaluation and tuning queries (fresh draws, not in the database)."""
    mix = ClusteredMixture(seed)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shards = EmbeddingShards(folder, "image", DIM)
    base = np.empty((n, DIM), np.float32)  # first touch paid once, chunk by chunk
    rng = np.random.default_rng([seed, n])
    for start in range(0, n, SHARD_ROWS):
        stop = min(start + SHARD_ROWS, n)
        for lo in range(start, stop, CHUNK):
            hi = min(lo + CHUNK, stop)
            x16 = mix.draw(rng, hi - lo).astype(np.float16)
            block = x16.astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)  # what iter_chunks yields
            base[lo:hi] = block
        shards.append(np.arange(start, stop, dtype=np.int64), base[start:stop], fsync=False)
    qrng = np.random.default_rng([seed, n, 1])
    return base, shards, mix.draw(qrng, n_eval), mix.draw(qrng, n_tune)


def numpy_topk(base: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Brute force for one query ``(D,)``: row indices of the top ``k``, best first."""
    scores = base @ q
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")]


def numpy_topk_batch(base: np.ndarray, qs: np.ndarray, k: int, chunk: int = 131_072) -> np.ndarray:
    """Brute force for a batch ``(Q, D)``: ``(Q, k)`` row indices, in row chunks (bounded memory)."""
    best_s = np.full((len(qs), 0), -np.inf, np.float32)
    best_i = np.zeros((len(qs), 0), np.int64)
    for lo in range(0, len(base), chunk):
        s = qs @ base[lo : lo + chunk].T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        best_i = np.concatenate([best_i, top + lo], axis=1)
        keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, 1)


def copy_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Bytes per second of ``np.copyto`` between two pre-touched ``mib`` MiB buffers (median);
    each byte counted once (the memory traffic is twice that: one read, one write)."""
    src = np.ones(mib << 18, np.float32)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return src.nbytes / _common.median(times)


# -- memory ------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


# -- building (child process) ------------------------------------------------------------------
def build_child(job: dict[str, Any]) -> dict[str, Any]:
    """Build one index from the shards with ``build_index`` and save it; runs in its own process."""
    folder = Path(job["folder"])
    shards = EmbeddingShards(folder, "image", DIM, [ShardFile(**s) for s in job["shards"]])
    live = np.arange(job["n"], dtype=np.int64)
    rss0, anon0 = rss_mib(), _status_kib("RssAnon") / 1024
    peak_anon = [anon0]
    done = threading.Event()

    def sample() -> None:  # VmHWM also counts mapped file pages (shards, parts); anon does not
        while not done.wait(0.02):
            peak_anon[0] = max(peak_anon[0], _status_kib("RssAnon") / 1024)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    index, report = build_index(job["spec"], shards, live, seed=0, sharded=job["sharded"],
                                out_dir=folder / "index", basename=job["basename"], workers=2)
    build_s = time.perf_counter() - t
    done.set()
    sampler.join()
    peak = _status_kib("VmHWM") / 1024
    record = index.save(folder, f"index/{job['basename']}.faiss", fsync=False)
    return {"build_s": build_s, "report": report.to_dict(), "rss_before_mib": rss0,
            "peak_rss_mib": peak, "peak_anon_mib": peak_anon[0] - anon0, "record": record.__dict__}


def load_child(job: dict[str, Any]) -> dict[str, Any]:
    """RSS growth of loading a saved index into RAM, in a fresh process (no reused heap)."""
    rss0 = rss_mib()
    index = VectorIndex.load(Path(job["folder"]), IndexFile(**job["record"]), DIM, job["spec"])
    return {"rss_mib": rss_mib() - rss0, "count": len(index)}


def run_child(flag: str, job: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, flag, json.dumps(job)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{flag} {job.get('spec')} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_build(folder: Path, shards: EmbeddingShards, n: int, spec: str, basename: str,
              sharded: bool) -> dict[str, Any]:
    job = {"folder": str(folder), "shards": [s.to_dict() for s in shards.shards], "n": n,
           "spec": spec, "basename": basename, "sharded": sharded}
    return run_child("--build-child", job)


# -- measuring ---------------------------------------------------------------------------------
def ms(seconds: list[float]) -> tuple[float, float]:
    return 1000 * _common.pct(seconds, 50), 1000 * _common.pct(seconds, 99)


def time_single(fn, queries: np.ndarray, warm: int = 3, found: list | None = None) -> list[float]:
    """Seconds per call of ``fn(q)`` for each query (after ``warm`` untimed calls); the ids each
    call returned are appended to ``found`` when given."""
    for q in queries[:warm]:
        fn(q)
    out = []
    for q in queries:
        t = time.perf_counter()
        res = fn(q)
        out.append(time.perf_counter() - t)
        if found is not None:
            found.append(res[1][0])
    return out


def one_thread(fn):
    def run(q):
        old = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            return fn(q)
        finally:
            faiss.omp_set_num_threads(old)
    return run


def measure_index(index: VectorIndex, queries: np.ndarray, truth: np.ndarray, args) -> dict[str, Any]:
    """Single-query p50/p99 (2 and 1 FAISS threads, alternating blocks), batch QPS, recall@10."""
    single = queries[: args.queries]
    fns = {"2thr": lambda q: index.search(q, K), "1thr": one_thread(lambda q: index.search(q, K))}
    times: dict[str, list[float]] = {m: [] for m in fns}
    found: list[np.ndarray] = []
    rounds = max(1, min(args.rounds, len(single)))
    block = -(-len(single) // rounds)
    for r in range(rounds):
        qs = single[r * block : (r + 1) * block]
        for name, fn in fns.items():
            times[name] += time_single(fn, qs, found=found if name == "2thr" else None)
    found_single = np.stack(found)
    batch = queries[: args.batch]
    index.search(batch[: min(len(batch), 50)], K)  # warm-up
    bt, found = [], None
    for _ in range(args.batch_repeats):
        t = time.perf_counter()
        _, found = index.search(batch, K)
        bt.append(time.perf_counter() - t)
    b = _common.median(bt)
    return {
        "p50_ms": ms(times["2thr"])[0], "p99_ms": ms(times["2thr"])[1],
        "p50_1thr_ms": ms(times["1thr"])[0], "p99_1thr_ms": ms(times["1thr"])[1],
        "batch_s": b, "batch_qps": len(batch) / b,
        "recall_at_10": recall_at_k(found, truth[: len(batch)]),
        "recall_at_10_single": recall_at_k(found_single, truth[: len(single)]),
    }


def type_specs(names: list[str], n: int, hnsw_m: int, pq_m: int) -> list[tuple[str, str]]:
    """(label, FAISS factory string) for each requested type at size ``n``."""
    nlist = nlist_for(n)
    named = {
        "flat": "Flat",
        "hnsw": f"HNSW{hnsw_m}",
        "ivf": f"IVF{nlist},Flat",
        "ivfpq": f"IVF{nlist},PQ{pq_m}np",
        "opq": f"OPQ{pq_m},IVF{nlist},PQ{pq_m}np",
        "auto": choose_index(n, DIM),
    }
    out = []
    for name in names:
        out.append((name, named[name]) if name in named else (name, name))  # raw factory string
    return out


def measure_size(n: int, args, save) -> dict[str, Any]:
    folder = args.workdir / f"n{n}"
    t = time.perf_counter()
    base, shards, queries, tune_q = make_dataset(n, folder, max(args.batch, args.queries), args.tune_queries)
    live = np.arange(n, dtype=np.int64)
    gen_s = time.perf_counter() - t
    truth = numpy_topk_batch(base, queries, K)  # ids = row numbers
    auto = choose_index(n, DIM)
    print(f"# n={n}: data + float16 shards in {gen_s:.1f}s; auto -> {auto}", flush=True)
    out: dict[str, Any] = {"n": n, "gen_s": gen_s, "auto": auto, "nlist_for": nlist_for(n), "types": []}

    # baselines: copy bandwidth, numpy brute force (single queries alternate with Flat below)
    _common.wait_quiet(args.quiet_wait)
    meter = _common.CpuMeter()
    bw = copy_bandwidth()
    single = queries[: args.queries]
    np_times = time_single(functools.partial(numpy_topk, base, k=K), single[: max(10, len(single) // 2)])
    nb = []
    for _ in range(args.batch_repeats):
        t = time.perf_counter()
        numpy_topk_batch(base, queries[: args.batch], K)
        nb.append(time.perf_counter() - t)
    scanned = base.nbytes
    out["baseline"] = {
        "copy_bw_gbps": bw / 1e9, "copy_traffic_gbps": 2 * bw / 1e9, "bytes_scanned": scanned,
        "bound_ms": 1000 * scanned / bw, "bound_traffic_ms": 1000 * scanned / (2 * bw),
        "numpy_p50_ms": ms(np_times)[0], "numpy_p99_ms": ms(np_times)[1],
        "numpy_batch_qps": args.batch / _common.median(nb),
        "foreign_cpu_frac": (c := meter.stop())["foreign_s"] / c["wall_s"],
    }
    print(f"# copy {bw / 1e9:.1f} GB/s (bytes copied/s), bound for one exact query "
          f"{out['baseline']['bound_ms']:.1f} ms (read+write traffic: {out['baseline']['bound_traffic_ms']:.1f} ms); "
          f"numpy p50 {out['baseline']['numpy_p50_ms']:.2f} ms", flush=True)

    tuned_ivf: dict[str, SearchParams] = {}
    for label, spec in type_specs(args.types, n, args.hnsw_m, args.pq_m):
        row: dict[str, Any] = {"type": label, "spec": spec, "is_auto": spec == auto,
                               "estimate_mib": estimate_index_bytes(spec, n, DIM) / 2**20}
        try:
            _common.wait_quiet(args.quiet_wait)
            meter = _common.CpuMeter()
            built = run_build(folder, shards, n, spec, f"{label}-{n}", sharded=False)
            c = meter.stop()
            row.update(build_s=built["build_s"], train_vectors=built["report"]["train_vectors"],
                       build_peak_rss_mib=built["peak_rss_mib"] - built["rss_before_mib"],
                       build_peak_anon_mib=built.get("peak_anon_mib"),
                       file_mib=built["record"]["bytes"] / 2**20,
                       build_foreign_cpu_frac=c["foreign_s"] / c["wall_s"])
            record = IndexFile(**built["record"])
            row["rss_mib"] = run_child("--load-child", {"folder": str(folder), "record": built["record"],
                                                        "spec": spec})["rss_mib"]
            index = VectorIndex.load(folder, record, DIM, spec)
            index.exact_vectors = shards.lookup
            _common.wait_quiet(args.quiet_wait)
            meter = _common.CpuMeter()
            t = time.perf_counter()
            tuning = tune_index(index, shards, live, tune_q, k=K, target_recall=args.target_recall)
            row["tune_s"] = time.perf_counter() - t
            row["tuning"] = tuning.to_dict()
            row["setting"] = index.params.to_dict()
            if spec == "Flat":  # exact: alternate with the numpy baseline
                row.update(measure_index(index, queries, truth, args))
                np2 = time_single(functools.partial(numpy_topk, base, k=K), single[: max(10, len(single) // 2)])
                np_all = np_times + np2
                out["baseline"]["numpy_p50_ms"], out["baseline"]["numpy_p99_ms"] = ms(np_all)
                row["ratio_to_bound"] = row["p50_ms"] / out["baseline"]["bound_ms"]
                row["ratio_to_traffic_bound"] = row["p50_ms"] / out["baseline"]["bound_traffic_ms"]
                row["ratio_to_numpy"] = row["p50_ms"] / out["baseline"]["numpy_p50_ms"]
            else:
                row.update(measure_index(index, queries, truth, args))
            row["foreign_cpu_frac"] = (c := meter.stop())["foreign_s"] / c["wall_s"]
            if index.kind == "ivf":
                tuned_ivf[spec] = index.params
            del index
            # the same file memory-mapped
            try:
                mm = VectorIndex.load(folder, record, DIM, spec, mmap=True,
                                      params=SearchParams.from_dict(row["setting"]))
                mm.exact_vectors = shards.lookup
                few = 30 if spec == "Flat" else 100  # a mapped exact scan is slow: see RESULTS
                mt = time_single(functools.partial(mm.search, k=K), single[: min(len(single), few)])
                _, mf = mm.search(queries[: args.batch], K)
                row.update(mmap_p50_ms=ms(mt)[0], mmap_p99_ms=ms(mt)[1],
                           mmap_recall_at_10=recall_at_k(mf, truth[: args.batch]))
                del mm
            except Exception as e:  # recorded, the run goes on
                row["mmap_error"] = str(e)
            _remove_index(folder, record)
        except Exception as e:  # one failed type must not lose the others
            row["error"] = str(e)[-2000:]
            logging.exception("%s at n=%d failed", spec, n)
        out["types"].append(row)
        _print_row(n, row)
        save(out)
        if n in args.sharded_sizes and spec in tuned_ivf and "sharded" not in out:
            # the first IVF type again, built shard by shard on disk, searched at the same setting
            out["sharded"] = [_measure_sharded(folder, shards, n, spec, tuned_ivf[spec], queries, truth, args)]
            _print_sharded(out["sharded"][-1])
            save(out)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def _measure_sharded(folder: Path, shards: EmbeddingShards, n: int, spec: str, params: SearchParams,
                     queries: np.ndarray, truth: np.ndarray, args) -> dict[str, Any]:
    row: dict[str, Any] = {"spec": spec, "setting": params.to_dict()}
    try:
        _common.wait_quiet(args.quiet_wait)
        meter = _common.CpuMeter()
        built = run_build(folder, shards, n, spec, f"sharded-{n}", sharded=True)
        c = meter.stop()
        row.update(build_s=built["build_s"], parts=built["report"]["parts"],
                   build_peak_rss_mib=built["peak_rss_mib"] - built["rss_before_mib"],
                   build_peak_anon_mib=built.get("peak_anon_mib"),
                   file_mib=built["record"]["bytes"] / 2**20,
                   ivfdata_mib=(built["record"]["data_bytes"] or 0) / 2**20,
                   build_foreign_cpu_frac=c["foreign_s"] / c["wall_s"])
        record = IndexFile(**built["record"])
        rss0 = rss_mib()
        index = VectorIndex.load(folder, record, DIM, spec, params=params)
        row["rss_mib_after_load"] = rss_mib() - rss0
        index.exact_vectors = shards.lookup
        single = queries[: args.queries]
        mt = time_single(functools.partial(index.search, k=K), single)
        _, found = index.search(queries[: args.batch], K)
        row.update(p50_ms=ms(mt)[0], p99_ms=ms(mt)[1], recall_at_10=recall_at_k(found, truth[: args.batch]),
                   rss_mib_after_search=rss_mib() - rss0)
        del index
        _remove_index(folder, record)
    except Exception as e:
        row["error"] = str(e)[-2000:]
        logging.exception("sharded %s at n=%d failed", spec, n)
    return row


def _remove_index(folder: Path, record: IndexFile) -> None:
    (folder / record.path).unlink(missing_ok=True)
    if record.data_path:
        (folder / record.data_path).unlink(missing_ok=True)


def _setting(row: dict[str, Any]) -> str:
    s = row.get("setting") or {}
    text = ", ".join(f"{k}={v}" for k, v in s.items()) or "-"
    tuning = row.get("tuning") or {}
    if tuning.get("param") and not tuning.get("reached", True):
        text += " (target missed)"
    return text


def _print_row(n: int, r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"{n:>8} | {r['spec']:<18} | FAILED: {r['error'].splitlines()[-1]}", flush=True)
        return
    print(f"{n:>8} | {r['spec']:<18} | build {r['build_s']:7.1f} s | file {r['file_mib']:7.1f} MiB | "
          f"rss {r['rss_mib']:7.1f} MiB | {_setting(r):<16} | recall {r['recall_at_10']:.3f} | "
          f"p50 {r['p50_ms']:7.2f} p99 {r['p99_ms']:7.2f} (1thr {r['p50_1thr_ms']:6.2f}) ms | "
          f"{r['batch_qps']:8.0f} q/s | mmap p50 {r.get('mmap_p50_ms', float('nan')):6.2f} ms | "
          f"foreign {r['build_foreign_cpu_frac']:.0%}/{r['foreign_cpu_frac']:.0%}", flush=True)


def _print_sharded(r: dict[str, Any]) -> None:
    if "error" in r:
        print(f"sharded {r['spec']}: FAILED {r['error'].splitlines()[-1]}", flush=True)
        return
    print(f"sharded on-disk {r['spec']}: build {r['build_s']:.1f} s ({r['parts']} parts), peak RSS "
          f"+{r['build_peak_rss_mib']:.0f} MiB; mmap search p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms, "
          f"recall {r['recall_at_10']:.3f}", flush=True)


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# ANN indexes ({m['date']}, {m['cpu']}, nproc {m['nproc']}, {m['ram_gib']} GiB)", "",
             f"`{m['argv']}`", "",
             f"k={K}; target recall@10 {result['target_recall']}; single queries = {result['queries']}, "
             f"batch = {result['batch']} queries in one call; HNSW efConstruction = FAISS default (40).", ""]
    for size in result["sizes"]:
        b = size["baseline"]
        lines += [f"## {size['n']:,} vectors (auto -> `{size['auto']}`)", "",
                  f"copy bandwidth {b['copy_bw_gbps']:.1f} GB/s (bytes copied per second; traffic "
                  f"{b['copy_traffic_gbps']:.1f} GB/s); exact scan {b['bytes_scanned'] / 1e6:.0f} MB -> "
                  f"bound {b['bound_ms']:.1f} ms (traffic-based {b['bound_traffic_ms']:.1f} ms); numpy brute "
                  f"force p50 {b['numpy_p50_ms']:.2f} / p99 {b['numpy_p99_ms']:.2f} ms, batch "
                  f"{b['numpy_batch_qps']:.0f} q/s (foreign {b['foreign_cpu_frac']:.0%})", "",
                  "| type | build s | build peak RSS MiB | file MiB | RSS MiB (est.) | tuned setting | "
                  "recall@10 | p50 / p99 ms | p50 1 thread | batch q/s | mmap p50 ms | foreign build/search |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in size["types"]:
            name = f"`{r['spec']}`" + (" (auto)" if r["is_auto"] else "")
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error'].splitlines()[-1][:80]} |" + " |" * 10)
                continue
            extra = ""
            if "ratio_to_bound" in r:
                extra = (f" ({r['ratio_to_bound']:.2f}x bound, {r['ratio_to_traffic_bound']:.2f}x traffic bound, "
                         f"{r['ratio_to_numpy']:.2f}x numpy)")
            lines.append(
                f"| {name} | {r['build_s']:.1f} | {r['build_peak_rss_mib']:.0f} | {r['file_mib']:.1f} | "
                f"{r['rss_mib']:.0f} ({r['estimate_mib']:.0f}) | {_setting(r)} | {r['recall_at_10']:.3f} | "
                f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}{extra} | {r['p50_1thr_ms']:.2f} | {r['batch_qps']:.0f} | "
                f"{r.get('mmap_p50_ms', float('nan')):.2f} | {r['build_foreign_cpu_frac']:.0%} / "
                f"{r['foreign_cpu_frac']:.0%} |")
        for s in size.get("sharded", []):
            if "error" in s:
                lines.append(f"\nsharded `{s['spec']}`: failed ({s['error'].splitlines()[-1]})")
                continue
            lines += ["", f"Sharded on-disk build of `{s['spec']}` ({s['parts']} parts): {s['build_s']:.1f} s, "
                      f"peak RSS +{s['build_peak_rss_mib']:.0f} MiB; header {s['file_mib']:.1f} MiB + "
                      f".ivfdata {s['ivfdata_mib']:.0f} MiB; mmap search at {s['setting']}: p50 "
                      f"{s['p50_ms']:.2f} / p99 {s['p99_ms']:.2f} ms, recall@10 {s['recall_at_10']:.3f} "
                      f"(RSS +{s['rss_mib_after_search']:.0f} MiB after searching)."]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated database sizes")
    ap.add_argument("--types", default="flat,hnsw,ivf,ivfpq",
                    help="comma-separated: flat, hnsw, ivf, ivfpq, opq, auto, or FAISS factory strings "
                    "separated by ';' (e.g. 'IVF16384,Flat')")
    ap.add_argument("--queries", type=int, default=300, help="single queries timed per index")
    ap.add_argument("--rounds", type=int, default=3, help="alternating blocks (2 vs 1 FAISS thread)")
    ap.add_argument("--batch", type=int, default=1000, help="queries in one batched call")
    ap.add_argument("--batch-repeats", type=int, default=3)
    ap.add_argument("--tune-queries", type=int, default=200, help="held-out queries given to tune()")
    ap.add_argument("--target-recall", type=float, default=0.95)
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--pq-m", type=int, default=64)
    ap.add_argument("--sharded-sizes", default="1000000",
                    help="sizes at which the sharded on-disk IVF build is measured too")
    ap.add_argument("--quiet-wait", type=float, default=0.0, metavar="S",
                    help="before each measurement wait up to S seconds for other processes to go idle")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "ann")
    ap.add_argument("--keep", action="store_true", help="keep the shards in --workdir")
    ap.add_argument("--build-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--load-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.build_child:
        print(json.dumps(build_child(json.loads(args.build_child))))
        return 0
    if args.load_child:
        print(json.dumps(load_child(json.loads(args.load_child))))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    sep = ";" if ";" in args.types else ","
    args.types = [t.strip() for t in args.types.split(sep) if t.strip()]
    args.sharded_sizes = {int(s) for s in args.sharded_sizes.split(",") if s.strip()}

    info = _common.machine_info()
    info["faiss_omp_threads"] = faiss.omp_get_max_threads()
    _common.print_machine(info)
    result: dict[str, Any] = {"machine": info, "k": K, "dim": DIM, "target_recall": args.target_recall,
                              "queries": args.queries, "batch": args.batch, "hnsw_m": args.hnsw_m,
                              "pq_m": args.pq_m, "sizes": []}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "ann_" + "_".join(f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M" for n in sizes)
    def save(partial: dict[str, Any] | None = None) -> None:
        done = result["sizes"] + ([partial] if partial is not None else [])
        snapshot = {**result, "sizes": done}
        (args.out_dir / f"{stem}.json").write_text(json.dumps(snapshot, indent=2))
        (args.out_dir / f"{stem}.md").write_text(markdown(snapshot))

    for n in sizes:
        result["sizes"].append(measure_size(n, args, save))
        save()
    print(f"\nwritten {args.out_dir / stem}.json and .md")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
