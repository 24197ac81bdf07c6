"""Index families ``auto`` chooses among (IVF over an HNSW coarse quantiser with SQ8 / float16 /
fast-scan PQ codes, exact float16 codes), their multi-knob tuning and filtered search — checked
against brute force on small clustered synthetic sets."""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from crossmodal_rag.errors import CollectionError
from crossmodal_rag.store import exact_codes, families
from crossmodal_rag.store.ann import choose_index, describe_index, estimate_index_bytes, recall_at_k
from crossmodal_rag.store.build import build_index, drop_self, exact_top_k, tune_index
from crossmodal_rag.store.families import Measured, family_spec, rank_families
from crossmodal_rag.store.shards import EmbeddingShards
from crossmodal_rag.store.tuning import knob_grid

D = 32


def clustered(n: int, d: int = D, seed: int = 0, clusters: int = 40, noise: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    n = 6000
    x, fresh = np.split(clustered(n + 80), [n])  # queries: fresh draws of the same mixture
    ids = np.arange(n, dtype=np.int64) * 2 + 5
    shards = EmbeddingShards(tmp_path_factory.mktemp("fam"), "image", D)
    for start in range(0, n, 2500):
        shards.append(ids[start : start + 2500], x[start : start + 2500], fsync=False)
    live = ids[ids % 3 != 0]
    exact = shards.lookup(live)  # the vectors search re-ranks with (float16 shards, normalised)
    return shards, live, exact, fresh


def brute(exact: np.ndarray, live: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = q @ exact.T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), live[order]


@pytest.mark.parametrize(("spec", "kind", "codes"), [
    ("IVF64_HNSW32,SQ8", "ivf", "sq8"), ("IVF64_HNSW32,SQfp16", "ivf", "fp16"),
    ("IVF64_HNSW32,PQ16x4fs", "ivf", "pqfs"), ("IVF64,Flat", "ivf", "flat"), ("SQfp16", "flat", "fp16"),
    ("Flat", "flat", "flat"), ("HNSW16", "hnsw", "flat"), ("HNSW16,SQ8", "hnsw", "sq8"),
])
def test_describe_index_names_codes(spec: str, kind: str, codes: str) -> None:
    from crossmodal_rag.store.vectors import make_faiss_index

    d = describe_index(make_faiss_index(D, spec))
    assert (d["kind"], d["codes"], d["pq"]) == (kind, codes, codes != "flat")
    if kind == "ivf":
        assert d["coarse"] == ("hnsw" if "_HNSW" in spec else "flat")


def test_family_specs_and_sizes() -> None:
    # by hand: 8 sqrt(1e6) = 8000 -> 8192 lists; 4 sqrt(1e6) -> 4096; d/4 = 128 4-bit sub-quantisers
    assert family_spec("ivf_hnsw_sq8", 1_000_000, 512) == "IVF8192_HNSW32,SQ8"
    assert family_spec("ivf_flat", 1_000_000, 512) == "IVF4096,Flat"
    assert family_spec("ivf_hnsw_pqfs", 1_000_000, 512) == "IVF8192_HNSW32,PQ128x4fs"
    assert family_spec("ivf_hnsw_pqfs", 1_000_000, 512, budget_per_vector=40) == "IVF8192_HNSW32,PQ64x4fs"
    assert family_spec("hnsw", 100_000, 128) == "HNSW16" and family_spec("hnsw", 1_000_000, 512) == "HNSW32"
    assert family_spec("hnsw", 100_000, 384) == "HNSW32"  # text embeddings at 100k need the links
    with pytest.raises(ValueError, match="ivf_hnsw_sq8"):
        family_spec("ivf_sq4", 10, 512)
    # per vector: SQ8 d + 8 id bytes; float16 2d + 8; 4-bit PQ m/2 + 8 (plus centroids and their graph)
    n = 1_000_000
    fixed = 8192 * 512 * 4 + 8192 * 8 + int(8192 * 64 * 4 * 1.1)
    assert estimate_index_bytes("IVF8192_HNSW32,SQ8", n, 512) == n * 520 + fixed
    assert estimate_index_bytes("IVF8192_HNSW32,SQfp16", n, 512) == n * 1032 + fixed
    assert estimate_index_bytes("IVF8192_HNSW32,PQ128x4fs", n, 512) == n * 72 + fixed + 128 * 16 * 4 * 4


@pytest.mark.parametrize("spec", ["IVF32_HNSW32,SQ8", "IVF32_HNSW32,SQfp16", "IVF32_HNSW32,PQ8x4fs", "SQfp16"])
def test_estimate_matches_serialised_size(data, spec: str) -> None:
    shards, live, _, _ = data
    index, _ = build_index(spec, shards, live, seed=1)
    actual = len(faiss.serialize_index(index.index))
    assert abs(estimate_index_bytes(spec, len(live), D) - actual) <= 0.15 * actual


def test_rank_families_follows_measurements() -> None:
    table = (Measured("ivf_hnsw_pqfs", 100_000, 0.95, 0.3, 90), Measured("ivf_hnsw_sq8", 100_000, 0.96, 0.5, 580),
             Measured("hnsw", 100_000, 0.93, 0.2, 2300, reached=False),
             Measured("ivf_hnsw_sq8", 1_000_000, 0.96, 0.6, 540), Measured("ivf_flat", 1_000_000, 0.95, 3.0, 2070))
    order = rank_families(150_000, table)
    assert order[:2] == ["ivf_hnsw_pqfs", "ivf_hnsw_sq8"] and order[-1] == "hnsw"  # missed target: last
    assert rank_families(3_000_000, table)[:2] == ["ivf_hnsw_sq8", "ivf_flat"]
    assert sorted(rank_families(10, ())) == sorted(families.APPROXIMATE)
    # faster but 2.3 KB/vector: after the families within the default 1.2 KB
    big = (Measured("hnsw", 1_000_000, 0.96, 0.7, 2330), Measured("ivf_hnsw_fp16", 1_000_000, 0.95, 0.9, 1050),
           Measured("ivf_flat", 1_000_000, 0.96, 1.2, 2064))
    assert rank_families(1_000_000, big)[:3] == ["ivf_hnsw_fp16", "hnsw", "ivf_flat"]


def test_auto_picks_by_count_and_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_index(40_000, 512) == "Flat"
    assert choose_index(40_000, 512, 50 << 20) == "SQfp16"  # Flat's 82 MB do not fit, float16 does
    big = choose_index(1_000_000, 512)
    assert estimate_index_bytes(big, 1_000_000, 512) / 1e6 <= 1200  # <= 1.2 KB per vector
    assert big == family_spec(rank_families(1_000_000)[0], 1_000_000, 512)
    tight = choose_index(1_000_000, 512, 100 << 20)
    assert "x4fs" in tight and estimate_index_bytes(tight, 1_000_000, 512) <= 100 << 20
    with pytest.raises(CollectionError, match="max-index-memory"):
        choose_index(1_000_000, 512, 10 << 20)
    # 100 B/vector fits 72-byte codes but not with the centroids: fewer sub-quantisers then
    smaller = choose_index(300_000, 512, 30_000_000)
    assert smaller.endswith("PQ64x4fs") and estimate_index_bytes(smaller, 300_000, 512) <= 30_000_000
    monkeypatch.setattr(families, "MEASURED", (Measured("ivf_hnsw_fp16", 1_000_000, 0.97, 0.1, 1040),))
    assert choose_index(1_000_000, 512) == "IVF8192_HNSW32,SQfp16"
    assert choose_index(1_000_000, 512, 700 << 20) == family_spec(
        next(f for f in families.APPROXIMATE if f != "ivf_hnsw_fp16"), 1_000_000, 512)


def test_drop_self_by_hand() -> None:
    ids = np.array([[7, 3, 9], [4, 5, 6], [-1, -1, -1], [1, 2, 3]])
    got = drop_self(ids, np.array([3, 8, -1, 1]), 2)
    assert got.tolist() == [[7, 9], [4, 5], [-1, -1], [2, 3]]


@pytest.mark.parametrize("spec", ["IVF32_HNSW32,SQ8", "IVF32_HNSW32,PQ8x4fs", "HNSW16,SQ8"])
def test_tuning_covers_every_knob_and_picks_cheapest(data, spec: str) -> None:
    shards, live, exact, q = data
    index, _ = build_index(spec, shards, live, seed=2)
    index.exact_vectors = shards.lookup
    param, _, depths = knob_grid(index.index, 10)
    stored = live[::40]
    tuning = tune_index(index, shards, live, shards.lookup(stored), target_recall=0.9, query_ids=stored)
    assert tuning.reached and tuning.param == param
    assert {r["rerank"] for r in tuning.measured} <= set(depths) and len({r["rerank"] for r in tuning.measured}) > 1
    chosen = tuning.measured[-1]
    assert chosen["p50_ms"] == min(r["p50_ms"] for r in tuning.measured if r["recall_lo"] >= 0.9)
    assert index.params.to_dict() == {param: chosen["value"], "rerank": chosen["rerank"]}
    # the setting generalises to queries the collection has never seen
    _, found = index.search(q, 10)
    assert recall_at_k(found, brute(exact, live, q, 10)[1]) >= 0.85


def test_exact_fp16_codes_equal_brute_force(data, monkeypatch: pytest.MonkeyPatch) -> None:
    shards, live, exact, q = data
    index, _ = build_index("SQfp16", shards, live)
    index.exact_vectors = shards.lookup
    want_s, want_i = brute(exact, live, q, 10)
    got_s, got_i = index.search(q, 10)
    assert np.array_equal(got_i, want_i) and np.allclose(got_s, want_s, atol=1e-6)
    for one in range(5):  # the single-query path
        assert np.array_equal(index.search(q[one], 10)[1][0], want_i[one])
    # a shortlist of exactly k cannot prove itself complete: the search widens, still exact
    calls = []
    real = index.index.search
    monkeypatch.setattr(index.index, "search", lambda *a, **kw: calls.append(a[1]) or real(*a, **kw),
                        raising=False)
    _, widened = exact_codes.search_codes_exact(index.index, q, 10, shards.lookup, depth=1)
    assert np.array_equal(widened, want_i) and len(calls) > 1 and calls[1] == 40
    # filtered: the exact top-k among the allowed ids
    allowed = live[::7]
    keep = np.isin(live, allowed)
    _, want_f = brute(exact[keep], live[keep], q, 10)
    assert np.array_equal(index.search(q, 10, allowed=allowed)[1], want_f)


def test_exact_codes_bound_covers_float16_error(data) -> None:
    shards, live, exact, q = data
    index, _ = build_index("SQfp16", shards, live)
    codes = index.index.index  # inside IDMap2
    recon = codes.reconstruct_n(0, codes.ntotal)
    gap = np.abs(q @ recon.T - q @ exact.T).max(axis=1)  # code score vs re-rank score, same item
    assert (gap <= exact_codes.error_bound(index.index, q)).all()


@pytest.mark.parametrize("spec", ["IVF32_HNSW32,SQ8", "IVF32_HNSW32,PQ8x4fs", "IVF32_HNSW32,SQfp16"])
@pytest.mark.parametrize("fraction", [0.02, 0.2, 0.6])
def test_filtered_recall_on_new_families(data, spec: str, fraction: float) -> None:
    shards, live, exact, q = data
    index, _ = build_index(spec, shards, live, seed=4)
    index.exact_vectors = shards.lookup
    tune_index(index, shards, live, q[:40], target_recall=0.95)
    allowed = np.sort(np.random.default_rng(3).choice(live, int(fraction * len(live)), replace=False))
    keep = np.isin(live, allowed)
    _, want = brute(exact[keep], live[keep], q[40:], 10)
    _, got = index.search(q[40:], 10, allowed=allowed)
    assert np.isin(got, allowed).all()
    assert recall_at_k(got, want) >= 0.9


def test_fast_scan_build_stays_in_memory(data, tmp_path: Path) -> None:
    shards, live, _, q = data
    index, report = build_index("IVF32_HNSW32,PQ8x4fs", shards, live, sharded=True, out_dir=tmp_path)
    assert not report.sharded and len(index) == len(live) and index.on_disk_data() is None
    sq8, report = build_index("IVF32_HNSW32,SQ8", shards, live, sharded=True, out_dir=tmp_path)
    assert report.sharded and sq8.on_disk_data() is not None
    index.exact_vectors = sq8.exact_vectors = shards.lookup
    truth = exact_top_k(shards, live, q, 10)
    from crossmodal_rag.store.ann import SearchParams

    for ix in (index, sq8):
        _, found = ix.search(q, 10, params=SearchParams(nprobe=32, rerank=16))
        assert recall_at_k(found, truth) >= 0.9


def test_two_level_coarse_training(data, monkeypatch: pytest.MonkeyPatch) -> None:
    from crossmodal_rag.store import build

    shards, live, exact, q = data
    monkeypatch.setattr(build, "TWO_LEVEL_MIN_NLIST", 64)
    trained = []
    real = build.train_coarse_two_level
    monkeypatch.setattr(build, "train_coarse_two_level", lambda *a: trained.append(real(*a)) or trained[-1])
    index, _ = build_index("IVF64_HNSW32,SQ8", shards, live, seed=1)
    assert trained == [True] and faiss.extract_index_ivf(index.index).quantizer.ntotal == 64
    index.exact_vectors = shards.lookup
    from crossmodal_rag.store.ann import SearchParams

    _, found = index.search(q, 10, params=SearchParams(nprobe=16, rerank=4))
    assert recall_at_k(found, brute(exact, live, q, 10)[1]) >= 0.9
    assert build_index("IVF32,Flat", shards, live)[0] is not None and trained[-1] is False


def test_split_counts_by_hand() -> None:
    from crossmodal_rag.store.build import _split_counts

    got = _split_counts(np.array([1000, 10, 0, 1, 489]), 100)
    assert got.sum() == 100 and got[2] == 0 and got[3] == 1 and got[1] >= 1
    assert got[0] > got[4] > got[1]  # in proportion to the points
    assert _split_counts(np.array([3, 2]), 5).tolist() == [3, 2]  # never more than the points


def test_recall_lower_bound_by_hand() -> None:
    from crossmodal_rag.store.tuning import CONFIDENCE_Z, recall_lower_bound

    truth = np.array([[1, 2], [3, 4], [5, 6], [7, 8]])
    found = np.array([[1, 2], [3, 9], [5, 6], [9, 9]])  # per query: 1, 0.5, 1, 0
    per = np.array([1, 0.5, 1, 0])
    assert recall_lower_bound(found, truth) == pytest.approx(0.625 - CONFIDENCE_Z * per.std(ddof=1) / 2)
    assert recall_lower_bound(truth, truth) == 1.0


def test_tuning_stops_a_depth_whose_recall_plateaus() -> None:
    """A fake index whose recall at depth 0 stops at 0.9 (lossy codes) and reaches 1.0 at depth 2
    from nprobe 8: depth 0 is abandoned after the plateau, not walked to every list."""
    from crossmodal_rag.store.tuning import tune_grid
    from crossmodal_rag.store.vectors import make_faiss_index

    index = make_faiss_index(8, "IVF64_HNSW32,SQ8")  # only its knobs are read
    truth = np.arange(200).reshape(20, 10)
    asked = []

    def search(q: np.ndarray, k: int, p):
        asked.append((p.nprobe, p.rerank))
        # cost grows with the lists probed and the re-rank depth, as a real index's does (a
        # free fake left the choice between depth 2 and 4 at nprobe 8 to timer noise)
        time.sleep(0.0003 * (p.nprobe + 4 * p.rerank))
        good = min(9, 2 + p.nprobe) if p.rerank == 0 else (10 if p.nprobe >= 8 else 4 + p.nprobe // 2)
        found = truth.copy()
        found[:, good:] = -1
        return np.zeros(found.shape, np.float32), found[: len(q)]

    tuning = tune_grid(search, index, np.zeros((20, 8), np.float32), truth, k=10, target_recall=0.95)
    walked0 = sorted({n for n, r in asked if r == 0})
    assert walked0 == [1, 2, 3, 4, 6, 8, 12, 16]  # 0.3, 0.4, 0.5, 0.6, 0.8, 0.9, 0.9, 0.9: stop
    assert tuning.reached and (tuning.value, tuning.rerank) == (8, 2)


def test_tuning_calibrates_how_far_a_filtered_search_widens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Widening nprobe by the default 2 / s left an IVF with an HNSW coarse quantiser at recall
    0.79 under a 10% filter on this data (1,000 clusters, many lists); tuning now measures the
    factor that reaches the target on the index itself, and filtered searches hold it."""
    from crossmodal_rag.store import filtered
    from crossmodal_rag.store.ann import SearchParams

    monkeypatch.setattr(filtered, "EXACT_MAX_ALLOWED", 0)  # every filter takes the widened path
    n, d = 30_000, 128
    x, fresh = np.split(clustered(n + 300, d, seed=1, clusters=1000, noise=1.0), [n])
    ids = np.arange(n, dtype=np.int64)
    shards = EmbeddingShards(tmp_path, "image", d)
    shards.append(ids, x, fsync=False)
    exact = shards.lookup(ids)
    index, _ = build_index("IVF1024_HNSW32,SQfp16", shards, ids, seed=4)
    index.exact_vectors = shards.lookup
    tune_index(index, shards, ids, x[:200], target_recall=0.95, query_ids=ids[:200])
    assert index.params.filter_factor is not None and index.params.filter_factor > 2
    assert SearchParams.from_dict(index.params.to_dict()) == index.params  # stored with the index
    for fraction in (0.1, 0.3):
        allowed = np.sort(np.random.default_rng(7).choice(ids, int(fraction * n), replace=False))
        keep = np.isin(ids, allowed)
        _, want = brute(exact[keep], ids[keep], fresh, 10)
        _, got = index.search(fresh, 10, allowed=allowed)
        assert np.isin(got, allowed).all()
        assert recall_at_k(got, want) >= 0.93, (fraction, index.params)
