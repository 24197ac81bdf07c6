"""Search modes measured on 354 written queries: dense, keyword, hybrid (the library today) and
candidate default rules (crossmodal_rag.search.evidence), per query type.

The collection (built once, cached under ``--cache``): the passages of data/passages_qa, the
photos of data/sample with their captions (a tiny random CLIP embeds the images: only texts are
searched here) and the text drawn on the generated documents of benchmarks/ocr_docs.py (seed 0,
240 documents + 30 memos), indexed as texts as it was rendered (no OCR: the OCR benchmark
measures reading; this one ranking), all in the MiniLM text space (``--target texts``).

Through the library's public search (``Collection.search(SearchRequest(..., target="texts"))``,
or ``routing.search`` before issue 26), once per query: the dense ranking (``mode="dense"``) and
the keyword ranking of the query as typed (``mode="keyword"``), ``--depth`` deep with their
scores, and ``mode="hybrid"`` at k = 10 as the library returns it. The candidate rules are then
applied offline to those lists (a rule's keyword query, when it differs from the query, is run
through ``store.fulltext.search_store`` and cached), so every candidate costs milliseconds.
Document frequencies come from the word index (FTS5 ``fts5vocab`` of ``fts_words``).

Constants are chosen on the ``tune`` half of every query type (a seeded split) and reported on
the ``test`` half; ``all`` is both. Targets (issue 27): on every natural-language type
(natural, paraphrase, long) the default >= dense - 0.005 in recall@1, recall@5 and nDCG@10; on
every exact-token type (exact, mixed, symbols) >= keyword - 0.02; overall the best of the three.

Run:  python benchmarks/bench_search_modes.py [--cache /tmp/xmrag-search-modes] [--out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import _common  # noqa: E402

from crossmodal_rag.search import evidence as ke  # noqa: E402
from crossmodal_rag.errors import QueryError  # noqa: E402

QUERIES = REPO / "benchmarks" / "search_modes" / "queries.jsonl"
TYPES = ("natural", "paraphrase", "long", "exact", "mixed", "symbols")
NATURAL_TYPES = ("natural", "paraphrase", "long")
EXACT_TYPES = ("exact", "mixed", "symbols")
METRICS = ("r@1", "r@5", "ndcg@10")


# -- the library, before or after issue 26's search package -----------------------------------------

def library_search(coll: object, text: str, *, k: int, mode: str) -> list[list[float]]:
    """``[[id, score], ...]``: the texts the library's public search returns for ``text`` in
    ``mode`` (``Collection.search(SearchRequest)`` where issue 26's search package has it, else
    ``routing.search``); ``score`` is the mode's (cosine, BM25 or fused)."""
    try:
        from crossmodal_rag.search.request import SearchRequest
    except ImportError:  # the flat layout before issue 26
        from crossmodal_rag import routing

        hits = routing.search(coll, text, k=k, target="texts", mode=mode)[1]
    else:
        hits = coll.search(SearchRequest(text=text, target="texts", mode=mode, k=k))
    return [[int(h.id), float(h.score)] for h in hits]


def _text_space_module() -> object:
    try:
        from crossmodal_rag.search import text_space
    except ImportError:
        from crossmodal_rag import text_space
    return text_space


# -- the collection -------------------------------------------------------------------------------

def build(cache: Path, rebuild: bool = False) -> Path:
    """The benchmark collection under ``cache/coll`` (made once; ``rebuild`` remakes it)."""
    import shutil

    from crossmodal_rag import Collection
    from crossmodal_rag.testing import make_tiny_open_clip

    sys.path.insert(0, str(REPO / "benchmarks" / "search_modes"))
    import make_queries

    folder = cache / "coll"
    if folder.exists() and not rebuild:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    cache.mkdir(parents=True, exist_ok=True)
    corpus = cache / "texts.jsonl"
    rows = [{"id": p.key, "text": p.text, "topic": p.kind} for p in make_queries.load_passages()]
    rows += [{"id": d.key, "text": d.text, "topic": d.layout} for d in make_queries.load_docs()]
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    clip = make_tiny_open_clip(cache / "tiny-clip")
    t = time.perf_counter()
    with Collection.create(folder, f"open_clip:local-dir:{clip}") as coll:
        coll.add(REPO / "data" / "sample")
        coll.add(corpus)
        _text_space_module().sync_text_space(coll, "minilm")
    print(f"# built {folder} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return folder


def gold_ids(coll: object, corpus: Path) -> dict[str, list[int]]:
    """Query-set key -> item ids: ``p000`` and ``doc:NAME`` by external id (a text the collection
    already held, such as two memos with the same three lines, by its text), ``image:STEM`` the
    image's captions."""
    out: dict[str, list[int]] = {}
    by_text: dict[str, int] = {}
    ids = list(range(1, len(coll) + 1000))
    for item in coll.get(ids):
        if item.kind == "passage" and item.ext_id:
            out.setdefault(item.ext_id, []).append(item.id)
            by_text[" ".join(item.text.split())] = item.id
        elif item.kind == "caption" and item.path:
            out.setdefault(f"image:{Path(item.path).stem}", []).append(item.id)
    for line in corpus.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["id"] not in out:
            out[row["id"]] = [by_text[" ".join(row["text"].split())]]
    return out


def document_frequencies(folder: Path) -> tuple[dict[str, int], int]:
    """(word -> number of texts holding it, number of texts) from the word index. Stands in for a
    library call the wiring will add beside store.fulltext (FTS5's fts5vocab, read-only)."""
    conn = sqlite3.connect(f"file:{folder / 'metadata.sqlite'}?mode=ro", uri=True)
    try:
        conn.execute("CREATE VIRTUAL TABLE temp.vocab USING fts5vocab(main, 'fts_words', 'row')")
        df = dict(conn.execute("SELECT term, doc FROM temp.vocab").fetchall())
        n = int(conn.execute("SELECT count(*) FROM fts_words").fetchone()[0])
    finally:
        conn.close()
    return df, n


# -- rankings through the library -----------------------------------------------------------------

@dataclass
class Lists:
    """One query's rankings: ``[[id, score], ...]`` best first; ``*_error`` when the mode refused."""

    dense: list[list[float]]
    keyword: list[list[float]]
    hybrid10: list[list[float]]
    keyword_error: str | None = None
    hybrid_error: str | None = None
    dense_ms: float = 0.0


def run_lists(coll: object, queries: list[dict], depth: int) -> dict[str, Lists]:
    out = {}
    for q in queries:
        t = time.perf_counter()
        lists = Lists(library_search(coll, q["query"], k=depth, mode="dense"), [], [])
        lists.dense_ms = round((time.perf_counter() - t) * 1000, 1)
        try:
            lists.keyword = library_search(coll, q["query"], k=depth, mode="keyword")
        except QueryError as e:
            lists.keyword_error = str(e)
        try:
            lists.hybrid10 = library_search(coll, q["query"], k=10, mode="hybrid")
        except QueryError as e:
            lists.hybrid_error = str(e)
        out[q["id"]] = lists
    return out


class KeywordRuns:
    """Keyword rankings ``[(id, BM25), ...]`` of rule-built keyword queries
    (``store.fulltext.search_store``), cached by query text."""

    def __init__(self, coll: object, depth: int) -> None:
        self.coll, self.depth, self.cache = coll, depth, {}

    def __call__(self, query: str) -> list[tuple[int, float]]:
        from crossmodal_rag.store import fulltext

        if query not in self.cache:
            try:
                self.cache[query] = fulltext.search_store(self.coll.store, query, limit=self.depth)
            except QueryError:
                self.cache[query] = []
        return self.cache[query]


def windowed_dense(coll: object, query: str, depth: int) -> list[list[float]]:
    """Dense ranking of a long query read in windows (not what the library does today: it
    truncates the query to the encoder's 256 tokens): each window searched, an item scored by its
    best window's cosine."""
    space = _text_space_module().open_text_space(coll)
    best: dict[int, float] = {}
    for window in space.encoder.text_windows(query):
        for i, score in library_search(coll, window, k=depth, mode="dense"):
            best[int(i)] = max(best.get(int(i), -1.0), score)
    return [[i, sc] for i, sc in sorted(best.items(), key=lambda p: -p[1])[:depth]]


# -- metrics --------------------------------------------------------------------------------------

def metrics(ranked: Sequence[int], gold: set[int]) -> dict[str, float]:
    """recall@1 / recall@5 (a gold item in the top k) and nDCG@10 (binary gains, every gold item)."""
    top = list(ranked[:10])
    dcg = sum(1 / math.log2(r + 2) for r, i in enumerate(top) if i in gold)
    idcg = sum(1 / math.log2(r + 2) for r in range(min(len(gold), 10)))
    return {"r@1": float(any(i in gold for i in top[:1])), "r@5": float(any(i in gold for i in top[:5])),
            "ndcg@10": dcg / idcg}


def table(results: dict[str, list[int]], queries: list[dict], gold: dict[str, set[int]],
          ids: set[str] | None = None) -> dict[str, dict[str, float]]:
    """Type (and ``overall``: the mean over queries; ``macro``: the mean of the types) -> metric means."""
    per: dict[str, list[dict[str, float]]] = {t: [] for t in TYPES}
    for q in queries:
        if ids is None or q["id"] in ids:
            per[q["type"]].append(metrics(results[q["id"]], gold[q["id"]]))
    out = {t: {m: sum(r[m] for r in rs) / len(rs) for m in METRICS} | {"n": len(rs)} for t, rs in per.items() if rs}
    every = [r for rs in per.values() for r in rs]
    out["overall"] = {m: sum(r[m] for r in every) / len(every) for m in METRICS} | {"n": len(every)}
    out["macro"] = {m: sum(out[t][m] for t in TYPES if t in out) / sum(t in out for t in TYPES) for m in METRICS}
    return out


def margins(cand: dict, dense: dict, keyword: dict) -> dict[str, float]:
    """Per type, the worst metric margin against its target (>= 0: met)."""
    out = {}
    for t in NATURAL_TYPES:
        out[t] = min(cand[t][m] - (dense[t][m] - 0.005) for m in METRICS)
    for t in EXACT_TYPES:
        out[t] = min(cand[t][m] - (keyword[t][m] - 0.02) for m in METRICS)
    return out


# -- rules ----------------------------------------------------------------------------------------

def current_hybrid(lists: Lists, k: int) -> list[int]:
    """The library's hybrid today: both lists max(4k, 40) deep, RRF k = 60; a refused keyword
    query fails the search (no results)."""
    if lists.keyword_error:
        return []
    depth = max(4 * k, 40)
    fused = ke.weighted_rrf([int(i) for i, _ in lists.dense[:depth]], [int(i) for i, _ in lists.keyword[:depth]],
                            1.0, rrf_k=60, limit=k)
    return [i for i, _ in fused]


def rule_name(s: ke.EvidenceSettings) -> str:
    """The settings that differ from the module's defaults, e.g. ``rrf df<=0.05 w=2/0.5 cov^1``."""
    w = f"w={s.exact_weight:g}/{s.rare_weight:g}"
    parts = [s.fusion, f"df<={s.max_df_fraction:g}", w]
    if s.fusion == "rrf":
        parts.append(f"k={s.rrf_k}")
    if s.coverage_power:
        parts.append(f"cov^{s.coverage_power:g}")
    if s.min_coverage:
        parts.append(f"cov>={s.min_coverage:g}")
    parts.append(f"long={s.long_terms}x{s.long_weight:g}" if s.long_terms else "long=dense")
    if s.depth != 100:
        parts.append(f"depth={s.depth}")
    return " ".join(parts)


def apply_rule(s: ke.EvidenceSettings, query: str, dense: list[list[float]], df: dict[str, int], n: int,
               kw: KeywordRuns) -> list[int]:
    """The ranking a candidate default gives: evidence from the query's words, then fusion."""
    ev = ke.weigh_evidence(query, df, n, s)
    keyword = kw(ev.keyword_query) if ev.mode == "hybrid" else []
    return [i for i, _ in ke.fuse_evidence(ev, [(int(i), sc) for i, sc in dense], keyword, settings=s)]


def short_grid() -> list[ke.EvidenceSettings]:
    """Candidates for queries (pasted texts searched densely: tuned after, see long_grid)."""
    out = []
    for df_frac, power, min_cov in itertools.product((0.02, 0.05, 0.1), (0.0, 1.0, 2.0), (0.0, 0.3)):
        for w_exact, w_rare, rrf_k in itertools.product((1.0, 2.0, 3.0, 5.0), (0.0, 0.5, 1.0, 2.0), (10, 30, 60)):
            out.append(ke.EvidenceSettings(fusion="rrf", max_df_fraction=df_frac, exact_weight=w_exact,
                                           rare_weight=w_rare, rrf_k=rrf_k, coverage_power=power,
                                           min_coverage=min_cov))
        for a_exact, a_rare in itertools.product((0.3, 0.4, 0.5, 0.6, 0.7, 0.8), (0.0, 0.2, 0.4, 0.6)):
            out.append(ke.EvidenceSettings(fusion="minmax", max_df_fraction=df_frac, exact_weight=a_exact,
                                           rare_weight=a_rare, coverage_power=power, min_coverage=min_cov))
    return out


def long_grid(best: ke.EvidenceSettings) -> list[ke.EvidenceSettings]:
    """``best`` with each way of treating pasted texts (dense alone, or their rarest words)."""
    weights = (0.2, 0.4, 0.6, 0.8) if best.fusion == "minmax" else (0.25, 0.5, 1.0, 2.0)
    out = [best]
    for terms, weight in itertools.product((4, 8, 16), weights):
        out.append(ke.EvidenceSettings(**{**asdict(best), "long_terms": terms, "long_weight": weight}))
    return out


def split(queries: list[dict], seed: int) -> tuple[set[str], set[str]]:
    """Half of every type (and of every corpus within it) to tune on, the rest to test on."""
    rng = random.Random(seed)
    tune: set[str] = set()
    groups: dict[tuple[str, str], list[str]] = {}
    for q in queries:
        groups.setdefault((q["type"], q["corpus"]), []).append(q["id"])
    for key in sorted(groups):
        ids = groups[key][:]
        rng.shuffle(ids)
        tune.update(ids[: (len(ids) + 1) // 2])
    return tune, {q["id"] for q in queries} - tune


def choose(rules: list[ke.EvidenceSettings], scored: dict, dense: dict, keyword: dict,
           types: Sequence[str] = TYPES) -> ke.EvidenceSettings:
    """The rule meeting every target (of ``types``) on the tune split with the best macro
    nDCG@10 (then recall@1, then the simplest: earliest in the grid); if none meets them all,
    the one whose worst margin is largest."""
    def key(i_r: tuple[int, ke.EvidenceSettings]) -> tuple:
        i, r = i_r
        m = {t: v for t, v in margins(scored[r], dense, keyword).items() if t in types}
        worst = min(m.values())
        macro = sum(scored[r][t]["ndcg@10"] for t in types) / len(types)
        r1 = sum(scored[r][t]["r@1"] for t in types) / len(types)
        return (worst >= 0, round(macro, 6) if worst >= 0 else worst, round(r1, 6), -i)
    return max(enumerate(rules), key=key)[1]


# -- report ---------------------------------------------------------------------------------------

def markdown(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """``rows``: mode -> type -> metrics; one line per type and mode."""
    modes = list(rows)
    head = "| type (n) | " + " | ".join(modes) + " |"
    lines = [head, "|---|" + "---|" * len(modes)]
    for t in (*TYPES, "overall", "macro"):
        n = next((rows[m][t].get("n") for m in modes if t in rows[m]), None)
        label = f"{t} ({n})" if n else t
        cells = [" / ".join(f"{rows[m][t][x]:.3f}" for x in METRICS) if t in rows[m] else "" for m in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stability(queries: list[dict], lists: dict[str, Lists], fuse: Callable[[Lists, int], list[int]],
              ks: Sequence[int] = (3, 5, 10, 20, 50)) -> dict[str, float]:
    """Share of queries whose first 3 rows differ between ``k`` and the first 3 rows at k = 10."""
    out = {}
    for k in ks:
        differ = sum(fuse(lists[q["id"]], k)[:3] != fuse(lists[q["id"]], 10)[:3] for q in queries
                     if not lists[q["id"]].keyword_error)
        out[f"k={k}"] = round(differ / len(queries), 3)
    return out


def splits(results: dict[str, list[int]], queries: list[dict], gold: dict[str, set[int]],
           tune: set[str], test: set[str]) -> dict[str, dict]:
    return {name: table(results, queries, gold, ids) for name, ids in (("tune", tune), ("test", test), ("all", None))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "xmrag-search-modes")
    ap.add_argument("--rebuild", action="store_true", help="remake the cached collection and rankings")
    ap.add_argument("--depth", type=int, default=100, help="depth of the dense and keyword rankings")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    from crossmodal_rag import Collection

    info = _common.machine_info()
    import subprocess

    info["library_files_changed_since_commit"] = subprocess.run(
        ["git", "status", "--short", "--", "crossmodal_rag"], capture_output=True, text=True, cwd=REPO,
        check=False).stdout.split("\n")[:40]
    _common.print_machine(info)
    queries = [json.loads(line) for line in QUERIES.read_text(encoding="utf-8").splitlines()]
    folder = build(args.cache, args.rebuild)
    coll = Collection.open(folder)
    keys = gold_ids(coll, args.cache / "texts.jsonl")
    gold = {q["id"]: {i for g in q["gold"] for i in keys[g]} for q in queries}
    df, n_texts = document_frequencies(folder)
    # the rankings through the library, cached by query text
    cached = args.cache / f"lists-{args.depth}-bytext.json"
    by_text: dict[str, Lists] = {}
    if cached.is_file() and not args.rebuild:
        by_text = {k: Lists(**v) for k, v in json.loads(cached.read_text(encoding="utf-8")).items()}
    todo = [q for q in queries if q["query"] not in by_text]
    if todo:
        t = time.perf_counter()
        by_text.update({q["query"]: lists for q, lists in zip(todo, run_lists(coll, todo, args.depth).values(),
                                                              strict=True)})
        cached.write_text(json.dumps({k: asdict(v) for k, v in by_text.items()}), encoding="utf-8")
        print(f"# rankings of {len(todo)} queries in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    lists = {q["id"]: by_text[q["query"]] for q in queries}
    windows_file = args.cache / f"windowed-{args.depth}-bytext.json"
    windowed_by_text = json.loads(windows_file.read_text(encoding="utf-8")) \
        if windows_file.is_file() and not args.rebuild else {}
    longs = [q for q in queries if q["type"] == "long" and q["query"] not in windowed_by_text]
    if longs:
        windowed_by_text.update({q["query"]: windowed_dense(coll, q["query"], args.depth) for q in longs})
        windows_file.write_text(json.dumps(windowed_by_text), encoding="utf-8")
    windowed = {q["id"]: windowed_by_text[q["query"]] for q in queries if q["type"] == "long"}
    kw = KeywordRuns(coll, args.depth)
    tune, test = split(queries, args.split_seed)

    base = {
        "dense": {q["id"]: [int(i) for i, _ in lists[q["id"]].dense] for q in queries},
        "keyword": {q["id"]: [int(i) for i, _ in lists[q["id"]].keyword] for q in queries},
        "hybrid (today)": {q["id"]: [int(i) for i, _ in lists[q["id"]].hybrid10] for q in queries},
    }
    offline = {q["id"]: current_hybrid(lists[q["id"]], 10) for q in queries}
    agree = sum(offline[i] == base["hybrid (today)"][i] for i in offline) / len(offline)
    tables = {name: splits(res, queries, gold, tune, test) for name, res in base.items()}
    dense_t, kw_t = tables["dense"]["tune"], tables["keyword"]["tune"]

    def run(s: ke.EvidenceSettings, dense_of: Callable[[dict], list[list[float]]] = lambda q: lists[q["id"]].dense,
            ) -> dict[str, list[int]]:
        return {q["id"]: apply_rule(s, q["query"], dense_of(q), df, n_texts, kw) for q in queries}

    # stage 1: the rule for queries (pasted texts dense), chosen on the tune split
    t = time.perf_counter()
    short = short_grid()
    scored = {}
    for s in short:
        scored[s] = table(run(s), queries, gold, tune)
    best_short = choose(short, scored, dense_t, kw_t)
    # stage 2: pasted texts, with the stage-1 rule fixed
    longs_grid = long_grid(best_short)
    for s in longs_grid[1:]:
        scored[s] = table(run(s), queries, gold, tune)
    best = choose(longs_grid, scored, dense_t, kw_t, types=("long",))
    print(f"# {len(short) + len(longs_grid) - 1} candidate rules in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    feasible = [s for s in short if min(margins(scored[s], dense_t, kw_t).values()) >= 0]
    default = ke.EvidenceSettings()
    tables["default: " + rule_name(best)] = splits(run(best), queries, gold, tune, test)
    contenders = {"best rrf": [s for s in short if s.fusion == "rrf"],
                  "best minmax": [s for s in short if s.fusion == "minmax"],
                  "no coverage": [s for s in short if s.coverage_power == 0 and s.min_coverage == 0]}
    for label, group in contenders.items():
        pick = choose(group, scored, dense_t, kw_t)
        if pick != best_short:
            tables[f"{label}: {rule_name(pick)}"] = splits(run(pick), queries, gold, tune, test)
    if default != best:
        tables["module default: " + rule_name(default)] = splits(run(default), queries, gold, tune, test)
    report: dict = {"machine": info, "queries": len(queries), "texts": n_texts,
                    "split": {"tune": len(tune), "test": len(test), "seed": args.split_seed},
                    "offline_hybrid_equals_library": agree, "chosen": rule_name(best),
                    "chosen_settings": asdict(best), "module_default_is_chosen": default == best,
                    "feasible_on_tune": f"{len(feasible)} of {len(short)}",
                    "keyword_errors": {t: sum(bool(lists[q["id"]].keyword_error) for q in queries if q["type"] == t)
                                       for t in TYPES},
                    "hybrid_errors": {t: sum(bool(lists[q["id"]].hybrid_error) for q in queries if q["type"] == t)
                                      for t in TYPES}}
    report["tables"] = tables
    for split_name in ("test", "all"):
        rows = {name: tb[split_name] for name, tb in tables.items()}
        print(f"\n## {split_name} split: recall@1 / recall@5 / nDCG@10\n")
        print(markdown(rows))
        d, k = tables["dense"][split_name], tables["keyword"][split_name]
        print()
        for name in list(tables)[3:]:
            print(f"margins against the targets ({split_name}), {name}: "
                  + ", ".join(f"{t} {v:+.3f}" for t, v in margins(tables[name][split_name], d, k).items()))
    print(f"\n# {len(feasible)} of {len(short)} query rules meet every target on the tune split")
    ranked = sorted(short, key=lambda s: -scored[s]["macro"]["ndcg@10"])
    report["top_rules_tune"] = [{"rule": rule_name(s), "macro_ndcg10": round(scored[s]["macro"]["ndcg@10"], 4),
                                 "worst_margin": round(min(margins(scored[s], dense_t, kw_t).values()), 4)}
                                for s in ranked[:10]]
    for row in report["top_rules_tune"][:6]:
        print(f"#   top on tune: {row}")
    modes: dict[str, dict[str, int]] = {}
    for q in queries:
        ev = ke.weigh_evidence(q["query"], df, n_texts, best)
        modes.setdefault(q["type"], {}).setdefault(ev.mode, 0)
        modes[q["type"]][ev.mode] += 1
    report["chosen_modes"] = modes
    print(f"# modes the chosen rule ran, per type: {modes}")
    # pasted texts: the dense side reading the whole query (windows) instead of its first 256 tokens
    long_rows = {"dense (today: truncated)": tables["dense"]["all"]["long"]}
    wd = {q["id"]: [int(i) for i, _ in windowed[q["id"]]] for q in queries if q["type"] == "long"}
    long_rows["dense, query in windows"] = table({**base["dense"], **wd}, queries, gold)["long"]
    long_rows["default"] = tables["default: " + rule_name(best)]["all"]["long"]
    long_rows["default on windowed dense"] = table(
        run(best, lambda q: windowed[q["id"]] if q["id"] in windowed else lists[q["id"]].dense),
        queries, gold)["long"]
    report["long_windowed"] = long_rows
    print(f"\n## pasted texts (long, all {len(wd)}): recall@1 / recall@5 / nDCG@10\n")
    print("| ranking | long |\n|---|---|")
    for name, row in long_rows.items():
        print(f"| {name} | " + " / ".join(f"{row[m]:.3f}" for m in METRICS) + " |")
    # depth: stability of the library's hybrid with k, and the chosen rule at fixed depths
    report["hybrid_top3_differs_from_k10"] = stability(queries, lists, current_hybrid)
    print(f"\n# hybrid today, share of queries whose top 3 differs from k=10: {report['hybrid_top3_differs_from_k10']}")
    depth_rows = {}
    for depth in (10, 20, 40, 100):
        if depth <= args.depth:
            depth_rows[f"depth={depth}"] = table(run(ke.EvidenceSettings(**{**asdict(best), "depth": depth})),
                                                 queries, gold)
    report["chosen_by_depth"] = depth_rows
    print("\n## chosen rule at fixed fused depths (all queries)\n")
    print(markdown(depth_rows))
    print(f"\n# offline replay of hybrid (today) equals the library's k=10 results on {agree:.3f} of queries")
    print(f"# keyword mode refused: {report['keyword_errors']}; hybrid: {report['hybrid_errors']}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
