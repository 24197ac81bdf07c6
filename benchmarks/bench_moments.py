"""Parse accuracy of dates and places in query text (issue 30) on a held-out query set.

``benchmarks/moments/queries.jsonl`` holds 145 written queries (English, German, French,
Spanish: absolute and relative dates, months, seasons, years, places, both, and queries with
neither) with the filter a person means by each; relative dates resolve against ``--today``
(the set was written for 2026-12-07). A query counts as right when the parsed filters equal the
expected ones exactly (as a set); "nothing invented" is the share of queries with neither that
parse to no filter at all.

    python benchmarks/bench_moments.py [--today 2026-12-07] [--show-errors]
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

from crossmodal_rag.search.moments import parse_moments

SET = Path(__file__).parent / "moments" / "queries.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--today", default="2026-12-07")
    ap.add_argument("--show-errors", action="store_true")
    ap.add_argument("--set", default=str(SET), help="a JSONL query set (default: queries.jsonl; "
                    "moments/heldout2.jsonl was written after the rules were settled, never tuned on)")
    args = ap.parse_args()
    today = date.fromisoformat(args.today)
    rows = [json.loads(line) for line in Path(args.set).read_text(encoding="utf-8").splitlines() if line.strip()]
    parse_moments("warm up in Paris 2020", today=today)  # load dateparser and the place names
    groups: dict[str, list[bool]] = {"date only": [], "place only": [], "date and place": [], "neither": []}
    errors = []
    t0 = time.perf_counter()
    for r in rows:
        got = parse_moments(r["query"], today=today)
        ok = set(got.where) == set(r["where"])
        has_date = any(w.startswith("taken") for w in r["where"])
        has_place = any(not w.startswith("taken") for w in r["where"])
        key = ("date and place" if has_date and has_place else "date only" if has_date
               else "place only" if has_place else "neither")
        groups[key].append(ok)
        if not ok:
            errors.append((r["query"], r["where"], list(got.where)))
    seconds = time.perf_counter() - t0
    total = [ok for g in groups.values() for ok in g]
    print("| queries | right | accuracy |\n|---|---|---|")
    for name, g in groups.items():
        if g:
            print(f"| {name} | {sum(g)}/{len(g)} | {sum(g) / len(g):.3f} |")
    print(f"| **all** | {sum(total)}/{len(total)} | **{sum(total) / len(total):.3f}** |")
    print(f"\n{1000 * seconds / len(rows):.1f} ms per query (after the first, which loads dateparser "
          f"and the place names); today = {today}")
    if args.show_errors:
        for q, want, got in errors:
            print(f"- {q!r}: want {want}, got {got}")


if __name__ == "__main__":
    main()
