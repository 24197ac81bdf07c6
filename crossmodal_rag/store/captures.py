"""SQL of capture metadata (issue 30): when, where and with what each image was taken.

Schema (version 5, step :func:`captures_step`): one ``captures`` row per image that was read
(``item_id`` -> the image; removed with it), holding :data:`CAPTURE_COLUMNS`: the local time it
was taken (ISO text, so it sorts and compares as written), the UTC offset and which field gave
the date, GPS latitude/longitude/altitude, make, model, lens, orientation, and the place the
coordinates reverse-geocode to (city, region, country code and name). An image with no row was
indexed before version 5: a plain ``index`` run reads its header and adds the row (back-fill);
until then every capture field of it is NULL and no capture filter matches it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

__all__ = ["CAPTURE_COLUMNS", "capture_rows", "capture_summary", "captures_of", "captures_pending",
           "captures_step", "has_captures", "write_captures"]

#: The columns of a capture row after ``item_id``, in order.
CAPTURE_COLUMNS: tuple[str, ...] = (
    "taken", "taken_offset", "taken_source", "lat", "lon", "alt", "make", "model", "lens",
    "orientation", "city", "region", "country", "country_name")

_TABLE = """CREATE TABLE IF NOT EXISTS captures (
    item_id      INTEGER PRIMARY KEY REFERENCES items(id) ON DELETE CASCADE,
    taken        TEXT,
    taken_offset INTEGER,
    taken_source TEXT,
    lat          REAL,
    lon          REAL,
    alt          REAL,
    make         TEXT,
    model        TEXT,
    lens         TEXT,
    orientation  INTEGER,
    city         TEXT,
    region       TEXT,
    country      TEXT,
    country_name TEXT
)"""
_TYPES = {"taken_offset": int, "orientation": int, "lat": float, "lon": float, "alt": float}


def captures_step(conn: sqlite3.Connection) -> None:
    """Version 5: the ``captures`` table (idempotent)."""
    conn.execute(_TABLE)
    conn.execute("CREATE INDEX IF NOT EXISTS captures_taken ON captures(taken)")


def has_captures(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'captures'"
                        ).fetchone() is not None


def write_captures(conn: sqlite3.Connection, rows: Iterable[tuple[int, dict[str, Any]]]) -> int:
    """Insert or replace the capture row of each ``(image id, fields)`` (call inside the store's
    transaction); fields not in :data:`CAPTURE_COLUMNS` are ignored. Returns the rows written."""
    cols = ", ".join(CAPTURE_COLUMNS)
    marks = ", ".join("?" * (len(CAPTURE_COLUMNS) + 1))
    values = [(int(item_id), *(fields.get(c) for c in CAPTURE_COLUMNS)) for item_id, fields in rows]
    conn.executemany(f"INSERT OR REPLACE INTO captures(item_id, {cols}) VALUES ({marks})", values)
    return len(values)


def capture_rows(conn: sqlite3.Connection) -> dict[int, dict[str, Any]]:
    """image id -> its capture fields (values of a wrong SQLite type read as None)."""
    if not has_captures(conn):
        return {}
    out: dict[int, dict[str, Any]] = {}
    for row in conn.execute(f"SELECT item_id, {', '.join(CAPTURE_COLUMNS)} FROM captures"):
        if not isinstance(row[0], int):
            continue
        out[row[0]] = {c: _typed(c, v) for c, v in zip(CAPTURE_COLUMNS, row[1:], strict=True)}
    return out


def _typed(column: str, value: Any) -> Any:
    want = _TYPES.get(column, str)
    if value is None:
        return None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value if isinstance(value, want) and not isinstance(value, bool) else None


def captures_of(conn: sqlite3.Connection, image_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """image id -> its capture fields, for the ids in ``image_ids`` that have a row."""
    if not has_captures(conn):
        return {}
    ids = sorted({int(i) for i in image_ids})
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT item_id, {', '.join(CAPTURE_COLUMNS)} FROM captures "
                                f"WHERE item_id IN ({marks})", chunk):
            out[row[0]] = {c: _typed(c, v) for c, v in zip(CAPTURE_COLUMNS, row[1:], strict=True)}
    return out


def captures_pending(conn: sqlite3.Connection) -> list[tuple[int, str]]:
    """(image id, its first path) of every image with a path and no capture row, by id."""
    if not has_captures(conn):
        return []
    rows = conn.execute(
        "SELECT i.id, MIN(p.path) FROM items i JOIN paths p ON p.item_id = i.id "
        "LEFT JOIN captures c ON c.item_id = i.id "
        "WHERE i.kind = 'image' AND c.item_id IS NULL GROUP BY i.id ORDER BY i.id").fetchall()
    return [(int(i), str(p)) for i, p in rows if isinstance(i, int) and isinstance(p, str)]


def capture_summary(conn: sqlite3.Connection, top: int = 5) -> dict[str, Any]:
    """For ``info``: images with a date and with GPS, the time span, the ``top`` places
    (city, country) and cameras (make model) with their counts."""
    if not has_captures(conn):
        return {}
    dated, located, first, last = conn.execute(
        "SELECT COUNT(taken), COUNT(lat), MIN(taken), MAX(taken) FROM captures").fetchone()
    places = conn.execute(
        "SELECT city, country, COUNT(*) AS n FROM captures WHERE city IS NOT NULL "
        "GROUP BY city, country ORDER BY n DESC, city LIMIT ?", (top,)).fetchall()
    cameras = conn.execute(
        "SELECT TRIM(COALESCE(make, '') || ' ' || COALESCE(model, '')) AS cam, COUNT(*) AS n "
        "FROM captures WHERE make IS NOT NULL OR model IS NOT NULL "
        "GROUP BY cam ORDER BY n DESC, cam LIMIT ?", (top,)).fetchall()
    return {"dated": dated, "located": located, "taken_from": first, "taken_to": last,
            "top_places": [{"city": c, "country": k, "images": n} for c, k, n in places],
            "top_cameras": [{"camera": c, "images": n} for c, n in cameras]}
