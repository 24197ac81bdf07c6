"""Metadata filters: ``--where EXPR`` conditions turned into the set of item ids a search may
return; the search keeps to those ids (exactly, or widened on ANN indexes: store/filtered.py).

Grammar (one condition per ``--where``; several are ANDed)::

    EXPR  := FIELD OP VALUE
    OP    := "=" | "!=" | "<" | "<=" | ">" | ">=" | "~"        ("~" = contains, case-insensitive)

    path    = GLOB | ~ TEXT      the image file's path (any of its paths), e.g. path=*/2023/*.jpg
    name    = GLOB               the file name, e.g. name=IMG_*.jpg
    folder  = DIR                the image lies under DIR (!= : not under)
    type    = jpeg|png|...       file type (format); jpg and tif are accepted
    size    <op> N[KB|MB|GB]     file size in bytes
    width, height <op> N         pixels (items without a measured size: the manifest's own
                                 width/height column, if it has one)
    added   <op> DATE            when it was indexed, ISO date or date-time (UTC)
    caption ~ TEXT | = TEXT      a caption of the image (for a caption: the caption itself)
    text    ~ TEXT               caption or passage text
    ocr     ~ TEXT | = TEXT      the text read in the image (index --ocr; for OCR text: itself)
    title   ~ TEXT | = TEXT      a passage's title
    kind    = image|caption|passage|ocr
    KEY     <op> VALUE           any extra column a manifest carried (numbers compare as numbers);
                                 also written extra.KEY

Capture metadata (when, where, which camera; see :mod:`.capture_filters`): ``taken>=2023-07-01``,
``taken:2023-07``, ``place~Paris``, ``country=FR``, ``camera~iPhone``, ``near=48.85,2.35,5km``,
``has:gps``, and ``city``, ``region``, ``make``, ``model``, ``lens``.

For captions and OCR text, the image fields refer to their image. An item without the field (e.g. a
passage and ``width``) does not match.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import QueryError
from ..store.metadata import MetadataStore
from .capture_filters import (
    CAPTURE_FILTER_FIELDS,
    capture_matches,
    capture_texts,
    parse_capture_value,
)
from .query import bad_character

__all__ = ["MAX_GLOB_STARS", "MAX_WHERE_CHARS", "MAX_WHERE_CONDITIONS", "Condition", "allowed_ids",
           "parse_where"]

#: Longest ``--where`` expression accepted (a glob of a 4096-byte path fits); a longer one is
#: refused before it is parsed.
MAX_WHERE_CHARS = 8192
#: Most ``--where`` conditions one search may AND together.
MAX_WHERE_CONDITIONS = 64
#: Most ``*`` wildcards (runs of them) in a ``path``/``name`` glob: each becomes a group of the
#: compiled pattern (4,000 of them took 150 ms to compile and 220 KB to keep).
MAX_GLOB_STARS = 64

# The scanner reads an expression once, left to right; every pattern is possessive, so no input
# makes it backtrack (linear time on any input).
_SPACE = re.compile(r"\s*+")
_NAME = re.compile(r"[A-Za-z_][\w.\-]*+")
_STARS = re.compile(r"\*++")
_NUMBER = re.compile(r"([0-9]++(?:\.[0-9]++)?+|\.[0-9]++)\s*+([A-Za-z]*+)")
_OPS = ("<=", ">=", "!=", "=", "<", ">", "~")
_NUMERIC = {"size", "width", "height", "added"}
_KNOWN = {"path", "name", "folder", "type", "format", "size", "width", "height", "added", "caption",
          "text", "title", "kind", "ocr"} | CAPTURE_FILTER_FIELDS
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2, "g": 1024**3, "gb": 1024**3}
_TYPE_ALIASES = {"jpg": "jpeg", "tif": "tiff"}
_SHOWN = 120  # characters of a long expression shown around the position at fault


@dataclass(frozen=True)
class Condition:
    field: str  # a known field, or "extra.KEY"
    op: str
    value: Any
    source: str  # the expression as written
    # path/name globs, compiled once here (not kept in fnmatch's cache of 32,768 patterns)
    glob: re.Pattern[str] | None = dataclasses.field(default=None, compare=False, repr=False)


def _error(expr: str, pos: int, message: str) -> QueryError:
    shown, at = expr, pos
    if len(expr) > _SHOWN:  # a window around the position, not the whole expression
        start = max(0, min(pos - _SHOWN // 2, len(expr) - _SHOWN))
        shown = ("..." if start else "") + expr[start : start + _SHOWN] + ("..." if start + _SHOWN < len(expr) else "")
        at = pos - start + (3 if start else 0)
    pointer = " " * at + "^"
    return QueryError(f"--where {shown!r}: {message} (at position {pos})\n  {shown}\n  {pointer}")


def parse_where(exprs: Iterable[str] | str | None, *,
                max_chars: int | None = MAX_WHERE_CHARS) -> list[Condition]:
    """Parse ``--where`` expressions; raises :class:`QueryError` naming the position at fault.

    At most :data:`MAX_WHERE_CONDITIONS` expressions of at most ``max_chars`` characters each
    (:data:`MAX_WHERE_CHARS`; None: no limit), without NUL characters or lone surrogates; each is
    read in one pass, in time linear in its length.
    """
    if exprs is None:
        return []
    if isinstance(exprs, str):
        exprs = [exprs]
    exprs = list(itertools.islice(exprs, MAX_WHERE_CONDITIONS + 1))
    if len(exprs) > MAX_WHERE_CONDITIONS:
        raise QueryError(f"more than {MAX_WHERE_CONDITIONS} --where conditions (MAX_WHERE_CONDITIONS); "
                         "combine them or filter in fewer steps")
    return [_parse_one(expr, max_chars) for expr in exprs]


def _parse_one(expr: Any, max_chars: int | None) -> Condition:
    if not isinstance(expr, str):
        raise QueryError(f"--where expressions are text, got {type(expr).__name__}")
    if max_chars is not None and len(expr) > max_chars:
        raise QueryError(f"--where expression of {len(expr)} characters is longer than the limit of "
                         f"{max_chars} (MAX_WHERE_CHARS); shorten the value")
    bad = bad_character(expr)
    if bad is not None:
        raise _error(expr, bad[0], f"contains {bad[1]}")
    if not expr.strip():
        raise _error(expr, 0, "empty expression")
    name, op, raw, oppos, vpos = _scan(expr)
    if raw.startswith(("'", '"')) and raw.endswith(raw[0]) and len(raw) >= 2:
        raw = raw[1:-1]
    if raw == "":
        raise _error(expr, vpos, "missing value")
    key = name.lower()
    field = key if key in _KNOWN else f"extra.{name[6:] if key.startswith('extra.') else name}"
    if key == "format":
        field = "type"
    value: Any = raw
    if field in _NUMERIC:
        if op == "~":
            raise _error(expr, oppos, f"'{field}' compares with = != < <= > >=, not ~")
        value = _parse_number(field, raw, expr, vpos)
    elif field == "type":
        value = _TYPE_ALIASES.get(raw.lower().lstrip("."), raw.lower().lstrip("."))
    elif field == "kind":
        if raw not in ("image", "caption", "passage", "ocr"):
            raise _error(expr, vpos, "kind is image, caption or passage (or ocr: text read in an image)")
    elif field == "folder":
        value = _folder(raw, expr, vpos)
    elif field in CAPTURE_FILTER_FIELDS:
        try:
            value = parse_capture_value(field, op, raw)
        except ValueError as e:
            raise _error(expr, vpos if field in ("taken", "near", "has") else oppos, str(e)) from None
    glob = _glob(raw, expr, vpos) if field == "name" or (field == "path" and op != "~") else None
    if op in ("<", "<=", ">", ">=") and field in ("path", "name", "folder", "type", "caption",
                                                  "text", "title", "kind", "ocr"):
        raise _error(expr, oppos, f"'{field}' compares with = != or ~ only")
    return Condition(field, op, value, expr, glob)


def _scan(expr: str) -> tuple[str, str, str, int, int]:
    """``FIELD OP VALUE`` -> (field, op, value stripped, op position, value position)."""
    start = _SPACE.match(expr).end()
    name = _NAME.match(expr, start)
    if name is None:
        raise _error(expr, start, "expected a field name")
    oppos = _SPACE.match(expr, name.end()).end()
    op = next((o for o in _OPS if expr.startswith(o, oppos)), None)
    if op is None and expr.startswith(":", oppos) and name.group().lower() in ("taken", "has"):
        op = ":"  # taken:2023-07, has:gps
    if op is None:
        raise _error(expr, name.end(), "expected an operator (= != < <= > >= ~)")
    vpos = _SPACE.match(expr, oppos + len(op)).end()
    return name.group(), op, expr[vpos:].rstrip(), oppos, vpos


def _glob(raw: str, expr: str, pos: int) -> re.Pattern[str]:
    stars = sum(1 for _ in _STARS.finditer(raw))
    if stars > MAX_GLOB_STARS:
        raise _error(expr, pos, f"a glob with {stars} '*' wildcards; the limit is {MAX_GLOB_STARS} "
                                "(MAX_GLOB_STARS)")
    return re.compile(fnmatch.translate(raw))


def _folder(raw: str, expr: str, pos: int) -> str:
    try:
        return str(Path(raw).expanduser().resolve())
    except (OSError, RuntimeError, ValueError) as e:  # e.g. ~user of no such user, a symlink loop
        raise _error(expr, pos, f"cannot use folder {raw[:_SHOWN]!r}: {e}") from None


def _parse_number(field: str, raw: str, expr: str, pos: int) -> float:
    if field == "added":
        try:
            dt = datetime.fromisoformat(raw)
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            return dt.timestamp()
        except (ValueError, OverflowError):
            raise _error(expr, pos, "expected an ISO date like 2024-05-01 or 2024-05-01T12:00") from None
    m = _NUMBER.fullmatch(raw)
    if not m or m.group(2).lower() not in (_UNITS if field == "size" else {""}):
        unit = " (units: KB, MB, GB)" if field == "size" else ""
        raise _error(expr, pos, f"expected a number{unit}")
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def _compare(actual: Any, op: str, wanted: Any) -> bool:
    if actual is None:
        return False
    if op == "=":
        return actual == wanted
    if op == "!=":
        return actual != wanted
    if op == "<":
        return actual < wanted
    if op == "<=":
        return actual <= wanted
    if op == ">":
        return actual > wanted
    if op == ">=":
        return actual >= wanted
    return str(wanted).lower() in str(actual).lower()  # "~"


def _match_text(values: list[str], op: str, wanted: str) -> bool:
    if op == "~":
        return any(wanted.lower() in v.lower() for v in values)
    hit = any(v == wanted for v in values)
    return hit if op == "=" else not hit and bool(values)


def _match_extra(extra: dict[str, Any], key: str, op: str, wanted: str) -> bool:
    if key not in extra:
        return False
    actual = extra[key]
    if op in ("<", "<=", ">", ">="):
        try:
            return _compare(float(actual), op, float(wanted))
        except (TypeError, ValueError):
            return _compare(str(actual), op, wanted)
    if op in ("=", "!="):
        try:
            same = float(actual) == float(wanted)
        except (TypeError, ValueError):
            same = str(actual) == wanted
        return same if op == "=" else not same
    return wanted.lower() in str(actual).lower()


def _image_matches(cond: Condition, row: dict[str, Any]) -> bool | None:
    """Match a condition on an image's own fields; None when the field is not an image field."""
    f, op, v = cond.field, cond.op, cond.value
    paths: list[str] = row["paths"]
    if f == "path":
        if op == "~":
            return any(v.lower() in p.lower() for p in paths)
        glob = cond.glob or re.compile(fnmatch.translate(v))
        hit = any(glob.match(p) is not None for p in paths)
        return hit if op == "=" else bool(paths) and not hit
    if f == "name":
        glob = cond.glob or re.compile(fnmatch.translate(v))
        hit = any(glob.match(Path(p).name) is not None for p in paths)
        return hit if op != "!=" else bool(paths) and not hit
    if f == "folder":
        under = any(p == v or p.startswith(v.rstrip("/") + "/") for p in paths)
        return under if op != "!=" else bool(paths) and not under
    if f == "type":
        fmt = (row["format"] or "").lower()
        fmt = "jpeg" if fmt == "mpo" else fmt
        return _compare(fmt, op, v) if op != "~" else v in fmt
    if f == "size":
        return _compare(row["size_bytes"], op, v)
    if f in ("width", "height"):
        return _compare(_pixels(row, f), op, v)
    return None


def _pixels(row: dict[str, Any], field: str) -> float | None:
    """An image's ``width``/``height``: the one measured when it was added, else the metadata
    column of that name (e.g. an imported item whose file was not readable at import)."""
    if row[field] is not None:
        return row[field]
    try:
        value = float(row["extra"][field])
    except (KeyError, TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def allowed_ids(store: MetadataStore, conditions: list[Condition]) -> dict[str, np.ndarray]:
    """Ids per index ("image", "text") of the items that satisfy every condition."""
    items: dict[int, dict[str, Any]] = {}
    captions: dict[int, list[str]] = {}
    ocr: dict[int, list[str]] = {}  # image id -> its OCR text
    for d in store.filter_candidates():  # any SQLite type in any column: a damaged row is refused
        items[d["id"]] = d
        if d["kind"] in ("caption", "ocr"):
            (captions if d["kind"] == "caption" else ocr).setdefault(d["parent_id"], []).append(d["text"] or "")
    extra_keys = {k for d in items.values() for k in d["extra"]}
    for c in conditions:
        if c.field.startswith("extra.") and c.field[len("extra."):] not in extra_keys:
            pos = len(c.source) - len(c.source.lstrip())
            known = ", ".join(sorted(_KNOWN - {"format"}))
            extras = ", ".join(sorted(extra_keys)) or "none"
            raise _error(c.source, pos, f"unknown field '{c.field[len('extra.'):]}'; fields: {known}; "
                                        f"extra columns in this collection: {extras}")
    image_ok: list[int] = []
    text_ok: list[int] = []
    for row in items.values():
        d = items.get(row["parent_id"]) if row["kind"] == "window" else row  # a window counts as its item
        if d is None:
            continue
        image = d if d["kind"] == "image" else items.get(d["parent_id"]) if d["kind"] in ("caption", "ocr") else None
        if all(_item_matches(c, d, image, captions, ocr) for c in conditions):
            (image_ok if d["kind"] == "image" else text_ok).append(row["id"])
    return {"image": np.array(sorted(image_ok), dtype=np.int64),
            "text": np.array(sorted(text_ok), dtype=np.int64)}


def _item_matches(c: Condition, d: dict[str, Any], image: dict[str, Any] | None,
                  captions: dict[int, list[str]], ocr: dict[int, list[str]] | None = None) -> bool:
    f, op, v = c.field, c.op, c.value
    if f in CAPTURE_FILTER_FIELDS:  # a caption or OCR text: its image's capture
        cap = image.get("capture") if image else None
        extra = {**(image["extra"] if image and image is not d else {}), **d["extra"]}
        if isinstance(v, str) and f in extra and not capture_texts(f, cap):
            return _match_extra(extra, f, op, v)  # a manifest column of that name (camera=canon)
        return capture_matches(f, op, v, cap)
    if f == "ocr":
        texts = (ocr or {}).get(d["id"], []) if d["kind"] == "image" else [d["text"] or ""] if d["kind"] == "ocr" else []
        return _match_text(texts, op, v)
    if f == "kind":
        return _compare(d["kind"], op, v) if op != "~" else v in d["kind"]
    if f == "added":
        return _compare(d["added_at"], op, v)
    if f == "caption":
        texts = captions.get(d["id"], []) if d["kind"] == "image" else [d["text"] or ""] if d["kind"] == "caption" else []
        return _match_text(texts, op, v)
    if f == "text":
        texts = [d["text"]] if d["text"] else captions.get(d["id"], [])
        return _match_text(texts, op, v)
    if f == "title":
        return _match_text([d["title"]] if d["title"] else [], op, v)
    if f.startswith("extra."):
        extra = {**(image["extra"] if image and image is not d else {}), **d["extra"]}
        return _match_extra(extra, f[len("extra."):], op, str(v))
    if image is None:
        return False
    result = _image_matches(c, image)
    return bool(result)
