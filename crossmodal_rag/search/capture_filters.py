"""``--where`` conditions on capture metadata (issue 30): when, where and with what a photo was
taken. :mod:`.filters` parses the expression; this module reads the value and matches a capture
row (:mod:`crossmodal_rag.store.captures`) against it::

    taken   <op> DATE | taken:DATE | taken:DATE..DATE
            DATE is 2023, 2023-07, 2023-07-14 or 2023-07-14T18:03, a period: taken:2023-07 is all
            of July, taken>=2023-07 from its start, taken<=2023-07 to its end; compared with the
            local time the photo was taken (what its camera's clock said)
    place   ~ TEXT | = TEXT      the city, region, country name or code
    city, region ~ | = TEXT
    country = FR | France        ISO code or name (case-insensitive); ~ TEXT: contains
    camera  ~ TEXT | = TEXT      make and model ("Apple iPhone 12"), or the lens
    make, model, lens ~ | = TEXT
    near    = LAT,LON[,R]        within R (default 1km; units m, km, mi) by great-circle distance
    has:gps | has:date | has:camera | has:place    (has!=gps: without)

An image without capture metadata matches no condition here except ``has!=...``. A text field
whose name is also an extra column of the collection's manifest (``camera=canon``) reads that
column where the image has no capture value for it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..ingestion.places import great_circle_km

__all__ = ["CAPTURE_FILTER_FIELDS", "HAS_WHAT", "Near", "Period", "capture_matches", "capture_texts", "parse_capture_value",
           "parse_period"]

#: Field names of capture conditions.
CAPTURE_FILTER_FIELDS = frozenset({"taken", "place", "city", "region", "country", "camera", "make",
                                   "model", "lens", "near", "has"})
#: What ``has:`` may ask for, and the capture columns that answer it.
HAS_WHAT = {"gps": ("lat",), "location": ("lat",), "date": ("taken",), "taken": ("taken",),
            "camera": ("make", "model"), "place": ("city", "country")}
_TEXT_OPS = ("=", "!=", "~")
_PERIOD = re.compile(r"(\d{4})(?:-(\d{1,2})(?:-(\d{1,2})(?:[T ](\d{1,2}):(\d{2})(?::(\d{2}))?)?)?)?")
_NEAR_UNITS = {"": 1.0, "km": 1.0, "m": 0.001, "mi": 1.609344}
_NEAR = re.compile(r"\s*(-?\d{1,3}(?:\.\d{1,12})?)\s*,\s*(-?\d{1,3}(?:\.\d{1,12})?)"
                   r"\s*(?:,\s*(\d{1,6}(?:\.\d{1,6})?)\s*(km|m|mi)?)?\s*")


@dataclass(frozen=True)
class Period:
    """A stretch of local time ``[start, end)`` as ISO strings (they compare as written)."""

    start: str
    end: str


@dataclass(frozen=True)
class Near:
    lat: float
    lon: float
    km: float


def _iso(d: datetime) -> str:
    return d.isoformat(timespec="seconds")


def parse_period(text: str) -> Period:
    """``2023``, ``2023-07``, ``2023-07-14``, ``2023-07-14T18:03[:05]`` or ``A..B`` -> a
    :class:`Period`; ValueError naming the forms otherwise."""
    if ".." in text:
        a, _, b = text.partition("..")
        first, last = parse_period(a.strip()), parse_period(b.strip())
        if last.end < first.start:
            raise ValueError(f"the range {text!r} ends before it starts")
        return Period(first.start, last.end)
    m = _PERIOD.fullmatch(text.strip())
    if m is None:
        raise ValueError("expected a date like 2023, 2023-07, 2023-07-14 or 2023-07-14T18:03 "
                         "(or a range 2023-06..2023-08)")
    y, mo, d, h, mi, s = (int(g) if g is not None else None for g in m.groups())
    try:
        if mo is None:
            return Period(_iso(datetime(y, 1, 1)), _iso(datetime(y + 1, 1, 1)) if y < 9999 else "9999-99")
        if d is None:
            start = datetime(y, mo, 1)
            nxt = datetime(y + (mo == 12), mo % 12 + 1, 1) if (y, mo) != (9999, 12) else None
            return Period(_iso(start), _iso(nxt) if nxt else "9999-99")
        start = datetime(y, mo, d, h or 0, mi or 0, s or 0)
        step = timedelta(days=1) if h is None else timedelta(minutes=1) if s is None else timedelta(seconds=1)
        return Period(_iso(start), _iso(start + step))
    except (ValueError, OverflowError) as e:
        raise ValueError(f"{text!r} is not a date: {e}") from None


def _near(text: str) -> Near:
    m = _NEAR.fullmatch(text)
    if m is None:
        raise ValueError("expected LAT,LON or LAT,LON,RADIUS like 48.85,2.35,5km (units m, km, mi)")
    lat, lon = float(m.group(1)), float(m.group(2))
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise ValueError(f"{lat},{lon} is not on Earth (latitude -90..90, longitude -180..180)")
    km = float(m.group(3)) * _NEAR_UNITS[(m.group(4) or "").lower()] if m.group(3) else 1.0
    if not 0 < km <= 20_040:
        raise ValueError(f"radius {km} km is out of range (0 < R <= 20040 km, half the Earth)")
    return Near(lat, lon, km)


def parse_capture_value(field: str, op: str, raw: str) -> Any:
    """The value of a capture condition, checked; ValueError with the message to show."""
    if field == "taken":
        if op == "~":
            raise ValueError("'taken' compares with = != < <= > >= or :, not ~")
        return parse_period(raw)
    if op == ":" and field != "has":
        raise ValueError(f"'{field}' compares with {' '.join(_TEXT_OPS)}; ':' is for taken and has")
    if field == "near":
        if op != "=":
            raise ValueError("near is written near=LAT,LON,RADIUS")
        return _near(raw)
    if field == "has":
        what = raw.lower()
        if op not in (":", "=", "!=") or what not in HAS_WHAT:
            raise ValueError(f"has is written has:WHAT (or has!=WHAT), WHAT one of {', '.join(HAS_WHAT)}")
        return what
    if op not in _TEXT_OPS:
        raise ValueError(f"'{field}' compares with = != or ~ only")
    return raw


def capture_texts(field: str, cap: dict[str, Any] | None) -> list[str]:
    """The texts a text field (place, city, region, country, camera, make, model, lens) reads."""
    if cap is None:
        return []
    if field == "place":
        keys = ("city", "region", "country_name", "country")
    elif field == "country":
        keys = ("country", "country_name")
    elif field == "camera":
        camera = " ".join(v for v in (cap.get("make"), cap.get("model")) if v)
        return [t for t in (camera, cap.get("model"), cap.get("lens")) if t]
    else:
        keys = (field,)
    return [cap[k] for k in keys if cap.get(k)]


def capture_matches(field: str, op: str, value: Any, cap: dict[str, Any] | None) -> bool:
    """Whether an image's capture row ``cap`` (None: not read) satisfies the condition."""
    if field == "has":
        present = cap is not None and any(cap.get(c) is not None for c in HAS_WHAT[value])
        return not present if op == "!=" else present
    if cap is None:
        return False
    if field == "taken":
        t = cap.get("taken")
        if not isinstance(t, str):
            return False
        inside = value.start <= t < value.end
        return {"=": inside, ":": inside, "!=": not inside, "<": t < value.start, "<=": t < value.end,
                ">": t >= value.end, ">=": t >= value.start}[op]
    if field == "near":
        lat, lon = cap.get("lat"), cap.get("lon")
        if lat is None or lon is None or not (math.isfinite(lat) and math.isfinite(lon)):
            return False
        return bool(great_circle_km(value.lat, value.lon, lat, lon) <= value.km)
    texts = [t.casefold() for t in capture_texts(field, cap)]
    wanted = str(value).casefold()
    if op == "~":
        return any(wanted in t for t in texts)
    same = wanted in texts
    return same if op == "=" else bool(texts) and not same

