"""Removing items from a collection, by id or by source path: the counterpart of
:mod:`crossmodal_rag.ingestion.runner`. One metadata transaction, mirrored in the in-memory indexes, then
the calibration is refreshed and the indexes persisted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..search.calibration import write_calibration

if TYPE_CHECKING:
    from ..ingestion.runner import IngestTarget

__all__ = ["remove"]


def remove(target: IngestTarget, ids: list[int] | None = None,
           paths: list[str] | None = None) -> dict[str, Any]:
    """Remove items of ``target`` (a collection opened writable) by id and/or by source path.

    Removing a path that is one of several copies of the same image only forgets that path (an
    ``index`` counted it as a duplicate): the item stays, and ``"forgotten"`` says which item and
    which paths still hold it. Returns ``{"removed": [ids...], "unknown": [ids or paths not
    found], "forgotten": [{"path", "item", "kept_by": [paths]}, ...]}``.
    """
    target.require_writable()
    store = target.store
    unknown: list[Any] = []
    forgotten: list[dict[str, Any]] = []
    with store.transaction():
        targets: set[int] = set()
        if ids:
            found = store.get_items(ids)
            unknown.extend(i for i in ids if i not in found)
            targets.update(found)
        for p in paths or []:
            key = str(Path(p).expanduser().resolve())
            entry = store.path_entry(key)
            if entry is None:
                unknown.append(p)
                continue
            store.forget_path(key)
            kept_by = store.paths_of(entry[0])
            if kept_by:
                forgotten.append({"path": p, "item": entry[0], "kept_by": kept_by})
            else:
                targets.add(entry[0])
        gone = store.delete_items(sorted(targets))
    target.apply({}, gone)
    if gone:
        write_calibration(store, target.manifest.dim)  # score thresholds follow the contents
    target.persist()
    forgotten = [f for f in forgotten if f["item"] not in gone]  # its id was removed too
    return {"removed": gone, "unknown": unknown, "forgotten": forgotten}
