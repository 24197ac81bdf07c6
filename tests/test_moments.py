"""Dates and places in query text (issue 30): the written query sets of benchmarks/moments/ as
the oracle, relative dates against a fixed today, nothing invented for queries with neither."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from crossmodal_rag.search.moments import MAX_PARSE_CHARS, parse_moments

pytest.importorskip("dateparser")
pytest.importorskip("reverse_geocode")

SETS = Path(__file__).resolve().parent.parent / "benchmarks" / "moments"
TODAY = date(2026, 12, 7)  # the sets were written for this day (a Monday)


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (SETS / name).read_text(encoding="utf-8").splitlines() if line]


@pytest.mark.parametrize(("name", "floor"), [("queries.jsonl", 0.95), ("heldout2.jsonl", 0.95)])
def test_parse_accuracy_on_the_written_sets_and_nothing_invented(name: str, floor: float) -> None:
    rows = _rows(name)
    got = {r["query"]: set(parse_moments(r["query"], today=TODAY).where) for r in rows}
    right = [got[r["query"]] == set(r["where"]) for r in rows]
    assert sum(right) / len(rows) >= floor, [r["query"] for r, ok in zip(rows, right, strict=True) if not ok]
    neither = [r["query"] for r in rows if not r["where"]]
    assert len(neither) >= 15 and [q for q in neither if got[q]] == []  # 100%: nothing invented


def test_the_rest_of_the_query_goes_to_clip_and_the_parse_is_shown() -> None:
    m = parse_moments("photos from Paris last summer", today=TODAY)
    assert m.text == "photos" and set(m.where) == {"taken:2026-06..2026-08", "place=Paris"}
    assert m.parsed["date"] == {"text": "last summer", "period": "season", "from": "2026-06-01", "to": "2026-08-31"}
    assert m.parsed["place"] == {"text": "Paris", "place": "Paris"}
    assert parse_moments("Strand im Juli 2023", today=TODAY).to_dict() == {
        "text": "Strand", "where": ["taken:2023-07"],
        "parsed": {"date": {"text": "im Juli 2023", "period": "month", "from": "2023-07-01", "to": "2023-07-31"}}}


def test_relative_dates_follow_today() -> None:
    assert parse_moments("beach last summer", today=date(2027, 7, 15)).where == ("taken:2026-06..2026-08",)
    assert parse_moments("beach last summer", today=date(2027, 9, 1)).where == ("taken:2027-06..2027-08",)
    assert parse_moments("cat yesterday", today=date(2024, 3, 1)).where == ("taken:2024-02-29",)


def test_unchanged_without_a_date_or_place_and_when_too_long() -> None:
    for q in ("dog on the sofa", "may flowers", "iPhone 12", ""):
        assert parse_moments(q, today=TODAY).where == () and parse_moments(q, today=TODAY).text == q
    long = "beach in July 2023 " + "x" * MAX_PARSE_CHARS
    assert parse_moments(long, today=TODAY).text == long
    assert parse_moments("beach in July 2023", today=TODAY, dates=False).where == ()


@pytest.mark.parametrize("query", ['"a cat" + snow - indoors', '"a cat" + snow', '2*"beach" - "crowd"',
                                   '"summer 2023" festival', 'beach - "July 2023"'])
def test_query_arithmetic_and_quoted_text_are_read_as_written(query: str) -> None:
    """Quoted terms and + / - are query arithmetic (search/query.py): taken literally, never read
    as dates or places (found by the web batching test: '"a cat" +' became January 2026)."""
    got = parse_moments(query, today=date(2026, 12, 7))
    assert got.where == () and got.text == query, got
