"""SQL of generated captions: descriptions a vision-language model wrote for images without one.

A generated caption is an ordinary ``caption`` item (so it is embedded, in the keyword index and
in the text space like any caption) whose ``origin`` starts with :data:`GENERATED_ORIGIN`
followed by the model that wrote it; human captions never carry that origin, so the two stay
apart: an image with a human caption is never captioned, and ``--recaption`` replaces only
generated ones.
"""

from __future__ import annotations

import sqlite3
from typing import Any

__all__ = ["GENERATED_ORIGIN", "generated_among", "generated_caption_ids", "images_to_caption", "is_generated"]

GENERATED_ORIGIN = "generated:"


def _conn(store: Any) -> sqlite3.Connection:
    """The connection of a MetadataStore (or a connection itself)."""
    return store if isinstance(store, sqlite3.Connection) else store.conn


def is_generated(origin: str | None) -> bool:
    """Whether a caption's ``origin`` marks it as generated."""
    return isinstance(origin, str) and origin.startswith(GENERATED_ORIGIN)


def images_to_caption(store: Any, recaption: bool = False) -> list[tuple[int, str]]:
    """(image id, its first path) of every image with a path and no human caption, by id: those
    with no caption at all, and with ``recaption`` also those whose captions are all generated."""
    generated_ok = "" if recaption else (
        "AND NOT EXISTS (SELECT 1 FROM items g WHERE g.kind = 'caption' AND g.parent_id = i.id) ")
    rows = _conn(store).execute(
        "SELECT i.id, MIN(p.path) FROM items i JOIN paths p ON p.item_id = i.id "
        "WHERE i.kind = 'image' AND NOT EXISTS (SELECT 1 FROM items c WHERE c.kind = 'caption' "
        "AND c.parent_id = i.id AND (c.origin IS NULL OR substr(c.origin, 1, ?) != ?)) "
        f"{generated_ok}GROUP BY i.id ORDER BY i.id",
        (len(GENERATED_ORIGIN), GENERATED_ORIGIN)).fetchall()
    return [(int(i), str(p)) for i, p in rows if isinstance(i, int) and isinstance(p, str)]


def generated_caption_ids(store: Any, image_ids: list[int]) -> list[int]:
    """Ids of the generated captions of ``image_ids``."""
    conn, out = _conn(store), []
    ids = [int(i) for i in image_ids]
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        out += [int(r[0]) for r in conn.execute(
            f"SELECT id FROM items WHERE kind = 'caption' AND parent_id IN ({marks}) "
            "AND substr(origin, 1, ?) = ? ORDER BY id", (*chunk, len(GENERATED_ORIGIN), GENERATED_ORIGIN))]
    return out


def generated_among(store: Any, caption_ids: list[int]) -> set[int]:
    """The generated captions among ``caption_ids``."""
    conn, out = _conn(store), set()
    ids = [int(i) for i in caption_ids]
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        out |= {int(r[0]) for r in conn.execute(
            f"SELECT id FROM items WHERE id IN ({marks}) AND kind = 'caption' AND substr(origin, 1, ?) = ?",
            (*chunk, len(GENERATED_ORIGIN), GENERATED_ORIGIN)) if isinstance(r[0], int)}
    return out
