"""``reindex --repair``: stored vectors that cannot be built from, re-embedded from their sources.

``reindex`` builds the indexes from the float16 shards and refuses to when a stored vector is
bad (see :mod:`crossmodal_rag.maintenance.indexes`). This stage repairs them first, for each index:

    metadata + shards -> bad ids -> re-embedded (source) | committed vector kept | removed
                      -> metadata rewritten -> shards rewritten whole -> (reindex builds)

A bad id is one whose float16 copy is not finite or not of unit norm, whose committed
(metadata) vector is, or whose copy and committed vector disagree. Each is re-embedded with the
collection's own encoder (fingerprint-checked): an image from its source file, when the file
still has the bytes it was indexed with; a caption, passage, window or OCR text from its stored
text. An image whose source is gone or changed keeps its committed vector when that one is
sound; otherwise the item is removed, and reported with the reason. Shard files that cannot be
used (unreadable, of another dimension, not written by this collection) are dropped and their
ids rewritten from the metadata.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..store.audit import FLOAT16_ATOL, METADATA_NORM_TOLERANCE, audit_shards, name_items
from ..store.layout import INDEX_NAMES
from ..store.shards import vector_faults

if TYPE_CHECKING:
    from ..encoders import ClipEncoder
    from ..store.manifest import Manifest
    from ..store.metadata import Item, MetadataStore
    from ..store.persist import IndexState

__all__ = ["RepairReport", "repair_vectors"]

logger = logging.getLogger(__name__)

_CHUNK = 10_000


class RepairTarget(Protocol):
    """What a repair reads and writes of a collection opened writable (:class:`crossmodal_rag.Collection`);
    it is also the :class:`~crossmodal_rag.maintenance.reembed_items.ItemSource` of the re-embedding."""

    folder: Path  # named in errors
    store: MetadataStore  # the items and their stored vectors
    state: IndexState  # the indexes and shards rewritten

    def get(self, ids: int | list[int]) -> list[Item]: ...

    @property
    def manifest(self) -> Manifest: ...

    @property
    def encoder(self) -> ClipEncoder: ...

    def require_writable(self) -> None: ...

    def remove(self, ids: list[int] | None = None, paths: list[str] | None = None) -> dict[str, Any]: ...


@dataclass
class RepairReport:
    """What :func:`repair_vectors` did."""

    reembedded: list[int] = field(default_factory=list)  # ids re-embedded from their sources
    kept: list[int] = field(default_factory=list)  # source gone: the committed vector copied back
    removed: list[dict[str, Any]] = field(default_factory=list)  # {"id", "path", "reason"}
    shards_dropped: list[dict[str, str]] = field(default_factory=list)  # {"index", "file", "reason"}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bad_ids(coll: RepairTarget, name: str, live: np.ndarray, usable: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(bad ids, ids whose committed vector is bad)`` of index ``name``: a float16 copy or a
    committed vector that is not finite or not of unit norm, or the two disagreeing."""
    store, dim = coll.store, coll.manifest.dim
    held = usable.held_ids()
    bad: list[np.ndarray] = []
    bad_meta: list[np.ndarray] = []
    for start in range(0, len(live), _CHUNK):
        chunk = live[start : start + _CHUNK]
        meta, unreadable = store.vectors_as_stored(chunk.tolist(), dim)
        meta[unreadable] = np.nan
        faults = vector_faults(chunk, meta, METADATA_NORM_TOLERANCE)
        bad_meta.append(faults.ids)
        here = np.isin(chunk, held)
        if here.any():
            copies = usable.lookup(chunk[here])
            differ = ~(np.abs(copies - meta[here]).max(axis=1) <= FLOAT16_ATOL)  # NaN: differs
            bad.append(chunk[here][differ])
    empty = np.zeros(0, np.int64)
    meta_ids = np.concatenate(bad_meta or [empty])
    return np.union1d(np.concatenate(bad or [empty]), meta_ids), meta_ids


def repair_vectors(coll: RepairTarget, *, batch_size: int = 32) -> RepairReport:
    """Repair the stored vectors of ``coll`` (a :class:`~crossmodal_rag.collection.Collection`
    opened writable) as the module docstring says;
    afterwards every live item has a sound committed vector and a sound float16 copy, and the
    indexes are left for ``reindex`` to rebuild."""
    coll.require_writable()
    state, store, dim = coll.state, coll.store, coll.manifest.dim
    report = RepairReport()
    bad: dict[str, np.ndarray] = {}
    meta_bad: dict[str, np.ndarray] = {}
    for name in INDEX_NAMES:
        live = store.ids(name)
        shards = state.shards[name]
        audit = audit_shards(store, name, shards, live, dim)
        for shard, why in audit.unusable:
            report.shards_dropped.append({"index": name, "file": shard.path, "reason": why})
        shards.without([s for s, _ in audit.unusable])
        differ, meta_bad[name] = _bad_ids(coll, name, live, shards)
        bad[name] = np.union1d(audit.faults.ids, differ)
    if not any(len(b) for b in bad.values()):
        _rewrite(coll, {n: np.zeros(0, np.int64) for n in INDEX_NAMES}, report)
        return report
    encoder = coll.encoder  # the collection's own, fingerprint-checked
    from .reembed_items import image_vectors, text_vectors  # torch: only when re-embedding

    vectors: dict[str, np.ndarray] = {}
    failures: dict[int, str] = {}
    if len(bad["image"]):
        vectors["image"], failures = image_vectors(coll, encoder, bad["image"], batch_size)
    if len(bad["text"]):
        vectors["text"] = text_vectors(coll, encoder, bad["text"])
    gone = np.asarray(sorted(failures), dtype=np.int64)
    kept = np.setdiff1d(gone, meta_bad["image"])  # a sound committed vector to fall back on
    removed = np.setdiff1d(gone, kept)
    paths = {it.id: it.path for it in coll.get(removed.tolist())}
    report.removed = [{"id": int(i), "path": paths.get(int(i)), "reason": failures[int(i)]} for i in removed]
    report.kept = kept.tolist()
    with store.transaction():
        for name, vecs in vectors.items():
            fresh = ~np.isin(bad[name], gone)
            store.replace_vectors(bad[name][fresh].tolist(), vecs[fresh])
            report.reembedded += bad[name][fresh].tolist()
    report.reembedded.sort()
    for entry in report.removed:
        logger.warning("item %s (%s) removed: its stored vector is unusable and its source is gone "
                       "(%s)", entry["id"], entry["path"], entry["reason"])
    if len(kept):
        logger.warning("image item(s) %s: source gone, their committed vectors kept",
                       name_items(store, kept))
    _rewrite(coll, bad, report, removed)
    if len(removed):
        coll.remove(ids=removed.tolist())
    from ..search.calibration import write_calibration  # score thresholds follow the vectors

    write_calibration(store, dim)
    return report


def _rewrite(coll: RepairTarget, replace: dict[str, np.ndarray], report: RepairReport,
             removed: np.ndarray | None = None) -> None:
    """Rewrite each index's shards from the metadata where they changed: the ``replace`` ids,
    and the ids of dropped shard files."""
    state, store, dim = coll.state, coll.store, coll.manifest.dim
    dropped = {d["index"] for d in report.shards_dropped}
    for name in INDEX_NAMES:
        if not len(replace[name]) and name not in dropped:
            continue
        live = store.ids(name)
        if removed is not None and len(removed):
            live = np.setdiff1d(live, removed, assume_unique=True)
        state.shards[name].rewrite(live, lambda ids: store.vectors(ids.tolist(), dim),
                                   replace=replace[name], fsync=state.fsync)
        state.rebuild.add(name)
        state.dirty.add(name)
