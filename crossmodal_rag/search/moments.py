"""Dates and places in the query text: "beach in July 2023", "photos from Paris last summer",
"Strand im Juli 2023" become capture filters plus the rest of the query for CLIP.

    text -> dateparser's search (en, de, fr, es; relative dates against ``today``) -> a period
         -> seasons ("last summer", "Sommer 2022", "l'été dernier") -> a period
         -> a capitalised place after a preposition ("from Paris", "in Deutschland") -> a place
         -> Moments(rest of the query, where=("taken:2023-07", "place=Paris"), parsed={...})

Dates come from ``dateparser`` (a maintained multilingual parser); what is added here is which of
its matches to trust, so that a query with no date stays as written: a match is kept when it
names a year, a month or day with a year or a preposition, a relative period ("last week", "vor
zwei Jahren", "el mes pasado") or a relative day ("yesterday", "gestern", "ayer"); a lone month
or weekday ("may flowers", "sunday best"), a number that is not a year ("iPhone 12") or a time
of day ("friday night lights") is not a date. Places are the GeoNames cities of 15,000 people
or more and the countries, with the common German, French and Spanish names of a few; a place
must follow a preposition and be capitalised ("in nice weather" is not Nice). Seasons are of the
northern hemisphere (summer = June to August). Input is bounded (:data:`MAX_PARSE_CHARS`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

__all__ = ["MAX_PARSE_CHARS", "SORTS", "Moments", "moments_in", "parse_moments", "sort_hits"]

logger = logging.getLogger(__name__)

#: Longest query text searched for dates and places (a longer one is left as written).
MAX_PARSE_CHARS = 300
_LANGUAGES = ["en", "de", "fr", "es"]
_PREPOSITIONS = {"in", "im", "from", "at", "near", "during", "on", "of", "since", "aus", "bei", "vom",
                 "von", "am", "à", "a", "en", "au", "aux", "de", "du", "des", "le", "la", "el", "del",
                 "desde", "cerca", "durante", "pendant", "während", "around", "um", "the", "l'", "d'"}
_PLACE_PREPOSITIONS = {"in", "im", "from", "at", "near", "around", "aus", "bei", "à", "en", "au", "aux",
                       "de", "desde", "cerca", "of"}
_RELATIVE_DAYS = {"yesterday", "today", "gestern", "heute", "vorgestern", "aujourd'hui", "avant-hier",
                  "ayer", "hoy", "anteayer"}
_SEASONS = {"summer": 6, "sommer": 6, "été": 6, "ete": 6, "verano": 6,
            "autumn": 9, "fall": 9, "herbst": 9, "automne": 9, "otoño": 9, "otono": 9,
            "winter": 12, "hiver": 12, "invierno": 12,
            "spring": 3, "frühling": 3, "frühjahr": 3, "printemps": 3, "primavera": 3}
_LAST = {"last", "past", "letzte", "letzten", "letzter", "letztes", "vergangenen", "vergangener", "dernier",
         "dernière", "passé", "pasado", "pasada"}
_THIS = {"this", "diesen", "dieser", "dieses", "cet", "cette", "este", "esta"}
#: Common names of places in German, French and Spanish that GeoNames lists in English.
_EXONYMS = {"münchen": "Munich", "wien": "Vienna", "roma": "Rome", "lisboa": "Lisbon",
            "firenze": "Florence", "venezia": "Venice", "londres": "London", "nueva york": "New York City",
            "new york": "New York City", "praha": "Prague", "prag": "Prague", "köln": "Cologne",
            "mailand": "Milan", "milano": "Milan", "rom": "Rome", "venedig": "Venice", "florenz": "Florence",
            "neapel": "Naples", "napoli": "Naples", "genf": "Geneva", "genève": "Geneva", "moskau": "Moscow",
            "varsovie": "Warsaw", "warschau": "Warsaw", "bruxelles": "Brussels", "brüssel": "Brussels"}
_COUNTRY_NAMES = {"deutschland": "DE", "allemagne": "DE", "alemania": "DE", "germany": "DE",
                  "frankreich": "FR", "francia": "FR", "spanien": "ES", "espagne": "ES", "españa": "ES",
                  "italien": "IT", "italie": "IT", "italia": "IT", "japon": "JP", "japón": "JP",
                  "österreich": "AT", "autriche": "AT", "schweiz": "CH", "suisse": "CH", "suiza": "CH",
                  "griechenland": "GR", "grèce": "GR", "grecia": "GR", "usa": "US", "amerika": "US",
                  "états-unis": "US", "estados unidos": "US", "england": "GB", "angleterre": "GB",
                  "inglaterra": "GB", "niederlande": "NL", "pays-bas": "NL", "holland": "NL",
                  "portugal": "PT", "mexiko": "MX", "mexique": "MX", "méxico": "MX"}


#: Orders of search results: by the search's score, or by the time taken (oldest or newest first).
SORTS = ("relevance", "taken", "-taken")


@dataclass(frozen=True)
class Moments:
    """What a query's text said about when and where, and the rest of it."""

    text: str  # the query with the date and place phrases taken out (for CLIP)
    where: tuple[str, ...] = ()  # the capture filters they became (--where syntax)
    parsed: dict[str, Any] = field(default_factory=dict)  # {"date": {...}, "place": {...}} as found

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "where": list(self.where), "parsed": self.parsed}


def parse_moments(text: str, *, today: date | None = None, dates: bool = True,
                  places: bool = True) -> Moments:
    """Find a date (or season) and a place in ``text``; see the module docstring. ``today``:
    what relative dates resolve against (default: this machine's date)."""
    if not text or len(text) > MAX_PARSE_CHARS or _arithmetic(text):
        return Moments(text)
    today = today or date.today()
    tokens = text.split()
    where: list[str] = []
    parsed: dict[str, Any] = {}
    if dates:
        found = _season(tokens, today) or _date(tokens, today)
        if found is not None:
            (start, end), span, period = found
            parsed["date"] = {"text": " ".join(tokens[span[0]:span[1]]), "period": period,
                              "from": start.isoformat(), "to": (end - timedelta(days=1)).isoformat()}
            where.append(f"taken:{_period_text(start, end, period)}")
            tokens = tokens[:span[0]] + tokens[span[1]:]
    if places:
        found_place = _place(tokens)
        if found_place is not None:
            kind, value, span = found_place
            parsed["place"] = {"text": " ".join(tokens[span[0] + 1:span[1]]), kind: value}
            where.append(f"{kind}={value}")
            tokens = tokens[:span[0]] + tokens[span[1]:]
    if not where:
        return Moments(text)
    rest = " ".join(tokens).strip(" ,;")
    return Moments(rest or text, tuple(where), parsed)


def _arithmetic(text: str) -> bool:
    """Whether ``text`` is written as query arithmetic (quoted terms, ``+``/``-`` between terms, a
    weight ``2*``: :mod:`.query`): then it is taken literally, no date or place read from it."""
    return '"' in text or any(t in ("+", "-") or t[:1] in "+-" or "*" in t for t in text.split())


def _period_text(start: date, end: date, period: str) -> str:
    last = end - timedelta(days=1)
    if period == "year":
        return f"{start.year:04d}"
    if period == "month":
        return f"{start.year:04d}-{start.month:02d}"
    if period == "day":
        return start.isoformat()
    if period == "season":
        return f"{start.year:04d}-{start.month:02d}..{last.year:04d}-{last.month:02d}"
    return f"{start.isoformat()}..{last.isoformat()}"


def _norm(token: str) -> str:
    return token.strip(".,;:!?\"()").casefold()


def _season(tokens: list[str], today: date) -> tuple[tuple[date, date], tuple[int, int], str] | None:
    for i, tok in enumerate(tokens):
        word = _norm(tok.split("'")[-1])  # l'été
        if word not in _SEASONS:
            continue
        month = _SEASONS[word]
        lo, hi, year = i, i + 1, None
        for j in range(i + 1, min(i + 3, len(tokens))):  # "summer 2022", "verano de 2022"
            t = _norm(tokens[j])
            if t.isdigit() and len(t) == 4:
                year, hi = int(t), j + 1
                break
            if t in _LAST:  # "l'été dernier", "el verano pasado"
                year, hi = _last_season(month, today), j + 1
                break
            if t not in ("de", "del", "of"):
                break
        if year is None and i > 0 and _norm(tokens[i - 1]) in _LAST | _THIS:
            lo = i - 1
            year = _last_season(month, today) if _norm(tokens[lo]) in _LAST else today.year
            if _norm(tokens[lo]) in _THIS and month == 12 and today.month < 12:
                year -= 1  # this winter, in January: the one that began last December
        if year is None or not 1826 <= year <= today.year + 1:
            continue
        while lo > 0 and _norm(tokens[lo - 1]) in _PREPOSITIONS:
            lo -= 1
        start = date(year, month, 1)
        end_month = month + 3
        end = date(year + (end_month > 12), (end_month - 1) % 12 + 1, 1)
        return (start, end), (lo, hi), "season"
    return None


def _last_season(month: int, today: date) -> int:
    """The year of the latest season starting in ``month`` that has ended by ``today``."""
    year = today.year
    while True:
        end_month = month + 3
        end = date(year + (end_month > 12), (end_month - 1) % 12 + 1, 1)
        if end <= today:
            return year
        year -= 1


def _date(tokens: list[str], today: date) -> tuple[tuple[date, date], tuple[int, int], str] | None:
    try:
        from dateparser.date import DateDataParser
        from dateparser.search import search_dates
    except ImportError:
        logger.info("dateparser is not installed: dates in queries are not read (pip install dateparser)")
        return None
    base = datetime(today.year, today.month, today.day)
    settings = {"RELATIVE_BASE": base, "PREFER_DATES_FROM": "past"}
    text = " ".join(tokens)
    try:
        matches = search_dates(text, languages=_LANGUAGES, settings=settings) or []
    except Exception as e:  # a parser failure never stops the search: the query stays as written
        logger.info("dateparser could not read %r: %s", text[:80], e)
        return None
    ddp = DateDataParser(languages=_LANGUAGES, settings=settings)
    spans = [s for s in (_span(tokens, phrase) for phrase, _ in matches) if s is not None]
    # search_dates guesses one language for the whole text and misses "la semaine dernière" in a
    # French query; the phrases of two to four words are then read one by one
    spans += [(i, i + n) for n in (4, 3, 2) for i in range(len(tokens) - n + 1)]
    for first, hi in spans:
        while hi > first and _norm(tokens[hi - 1]) in _PREPOSITIONS | {"and", "und", "et", "y"}:
            hi -= 1
        lo = first
        while lo < hi and _norm(tokens[lo]) in _PREPOSITIONS:
            lo += 1
        core = [_norm(t) for t in tokens[lo:hi]]
        if not core:
            continue
        data = ddp.get_date_data(" ".join(tokens[first:hi]))  # "la semaine dernière" with its article
        if data.date_obj is None and first < lo:
            data = ddp.get_date_data(" ".join(tokens[lo:hi]))
        if data.date_obj is None or not _trusted(core, data.date_obj, data.period, today, lo, tokens):
            continue
        while lo > 0 and _norm(tokens[lo - 1]) in _PREPOSITIONS:
            lo -= 1
        return _range(data.date_obj.date(), data.period), (lo, hi), data.period or "day"
    return None


def _trusted(core: list[str], when: datetime, period: str | None, today: date, lo: int,
             tokens: list[str]) -> bool:
    years = [t for t in core if t.isdigit() and len(t) == 4]
    if when.hour or when.minute or when.second:
        return False  # a time of day ("friday night", "at noon", "a second")
    if when.year < 1826 or when.date() > today + timedelta(days=1):
        return False
    if any(t.isdigit() and len(t) != 4 for t in core) and len(core) == 1:
        return False  # "12" of "iPhone 12"
    if years:
        return all(1826 <= int(y) <= today.year + 1 for y in years)
    if len(core) == 1:
        return core[0] in _RELATIVE_DAYS
    if period == "month" and len(core) == 1:
        return False
    relative = any(t in _LAST | _THIS or t in ("ago", "vor", "il", "hace", "y") for t in core)
    preposition = lo > 0 and _norm(tokens[lo - 1]) in _PREPOSITIONS
    return relative or preposition or any(c.isdigit() for t in core for c in t)


def _range(day: date, period: str | None) -> tuple[date, date]:
    if period == "year":
        return date(day.year, 1, 1), date(day.year + 1, 1, 1)
    if period == "month":
        return date(day.year, day.month, 1), date(day.year + (day.month == 12), day.month % 12 + 1, 1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    return day, day + timedelta(days=1)


def _span(tokens: list[str], phrase: str) -> tuple[int, int] | None:
    words = phrase.split()
    n = len(words)
    for i in range(len(tokens) - n + 1):
        if [t.strip(".,;:!?") for t in tokens[i:i + n]] == [w.strip(".,;:!?") for w in words]:
            return i, i + n
    return None


def _place(tokens: list[str]) -> tuple[str, str, tuple[int, int]] | None:
    from ..ingestion.places import place_names

    try:
        cities, countries = place_names()
    except Exception as e:  # no geocoder data: places are not read
        logger.info("places in queries are not read: %s", e)
        return None
    for i, tok in enumerate(tokens[:-1]):
        if _norm(tok) not in _PLACE_PREPOSITIONS:
            continue
        for n in (3, 2, 1):
            words = tokens[i + 1:i + 1 + n]
            if len(words) < n or not words[0][:1].isupper():
                continue
            name = " ".join(w.strip(".,;:!?\"()") for w in words)
            key = name.casefold()
            code = _COUNTRY_NAMES.get(key) or countries.get(key)
            if code:
                return "country", code, (i, i + 1 + n)
            city = _EXONYMS.get(key) or cities.get(key)
            if city:
                return "place", city, (i, i + 1 + n)
    return None


def moments_in(searchable: Any, text: str | None, *, today: date | None = None) -> Moments | None:
    """:func:`parse_moments` of ``text`` for a search of ``searchable`` (an open collection):
    dates only when some of its images are dated, places only when some have a place; None when
    it has neither (a collection of passages keeps every query as written) or ``text`` is None."""
    store = getattr(searchable, "store", None)
    if text is None or store is None or not hasattr(store, "capture_summary"):
        return None
    summary = store.capture_summary(top=1)
    dated, placed = bool(summary.get("dated")), bool(summary.get("top_places"))
    if not (dated or placed):
        return None
    return parse_moments(text, today=today, dates=dated, places=placed)


def sort_hits(hits: list[Any], order: str) -> list[Any]:
    """``hits`` (:class:`~crossmodal_rag.search.hits.Hit`) in ``order`` (:data:`SORTS`), ranked
    again from 1; hits without a date taken come last, in their order."""
    if order not in SORTS:
        raise ValueError(f"sort must be one of {', '.join(SORTS)}, got {order!r}")
    if order == "relevance":
        return list(hits)
    dated = [h for h in hits if (h.capture or {}).get("taken")]
    undated = [h for h in hits if not (h.capture or {}).get("taken")]
    dated.sort(key=lambda h: h.capture["taken"], reverse=order == "-taken")
    return [h.ranked(i) for i, h in enumerate(dated + undated, start=1)]
