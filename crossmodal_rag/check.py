"""``check``: verify that what a collection stores agrees, reading only.

The index files the manifest on disk names (loaded fresh, memory-mapped: not an open
collection's in-memory indexes, which are reconciled on open), the float16 shards and the
metadata are compared id by id and vector by vector (see :mod:`crossmodal_rag.store.audit` for
how each index type's vectors are compared). :meth:`crossmodal_rag.Collection.check` calls
:func:`check_collection`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CollectionError
from .store.audit import CHECK_ALL_MAX_VECTORS, audit_vectors, examples, id_disagreement, sample_ids
from .store.binding import check_collection_id, foreign_index
from .store.layout import INDEX_NAMES
from .store.manifest import Manifest
from .store.metadata import MetadataStore
from .store.shards import EmbeddingShards
from .store.vectors import VectorIndex

__all__ = ["CHECK_ALL_MAX_VECTORS", "CheckReport", "check_collection"]


@dataclass
class CheckReport:
    """Result of :meth:`Collection.check <crossmodal_rag.Collection.check>`."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes, "counts": self.counts}


@dataclass
class _Stored:
    """What the manifest on disk names, loaded for checking."""

    manifest: Manifest
    indexes: dict[str, VectorIndex]  # the index files that loaded
    shards: dict[str, EmbeddingShards]
    held: dict[str, np.ndarray]  # ids each index's shards hold
    problems: list[str]  # what could not be loaded


def check_collection(folder: Path, store: MetadataStore, dim: int, *, verify_hash: bool = True,
                     max_vectors: int | None = CHECK_ALL_MAX_VECTORS, seed: int = 0) -> CheckReport:
    """Check the collection in ``folder`` (metadata ``store``, ``dim``-d vectors). Every id is
    compared, and every vector (the metadata's, its float16 copy, the index's) for indexes of up
    to ``max_vectors`` vectors (None: no limit); larger ones by a random sample of that many
    drawn from ``seed``, said so in the notes. Reads only."""
    report = CheckReport(ok=True)
    report.problems.extend(store.integrity_problems())
    try:
        stored = _load_stored(folder, store, verify_hash)
    except CollectionError as e:  # the manifest itself
        report.problems.append(str(e))
        report.ok = False
        return report
    report.problems.extend(stored.problems)
    m = stored.manifest
    with store.snapshot():  # one consistent view of the metadata (a writer may run)
        pending = store.generation - m.generation
        if pending:
            report.notes.append(f"{pending} metadata commit(s) newer than the index files; they "
                                "are replayed from the metadata on open")
        for name in INDEX_NAMES:
            live = store.ids(name)
            index = stored.indexes.get(name)
            if index is not None:
                report.counts[f"{name}_index"] = len(index)
                _check_ids(folder, name, m.files[name].path, index, live, pending, report)
            _check_vectors(folder, store, dim, name, index, stored.shards[name], stored.held[name],
                           sample_ids(live, max_vectors, seed), len(live), seed, report)
            _check_shards(folder, name, stored.shards[name], stored.held[name], live, report)
        report.counts = {**store.counts(), **report.counts}
    from .text_space_audit import check_text_space  # index --text-model: its own index

    text_problems, text_notes = check_text_space(folder, store)
    report.problems.extend(text_problems)
    report.notes.extend(text_notes)
    report.ok = not report.problems
    return report


def _load_stored(folder: Path, store: MetadataStore, verify_hash: bool, attempts: int = 3) -> _Stored:
    """The manifest on disk now, its index files (memory-mapped) and its shards (mapped, so
    files a writer replaces meanwhile stay readable), and the problems loading them. Read
    again if a writer switched the manifest while the files were being opened."""
    for _ in range(attempts):
        m = Manifest.read(folder)  # before the metadata snapshot: never newer than it
        check_collection_id(m, store)
        disk: dict[str, VectorIndex] = {}
        problems: list[str] = []
        for name in INDEX_NAMES:
            record = m.files.get(name)
            if record is None:
                problems.append(f"manifest lists no {name} index file")
                continue
            try:
                disk[name] = VectorIndex.load(folder, record, m.dim, m.index_type_of(name),
                                              verify_hash=verify_hash, mmap=True)
            except CollectionError as e:
                problems.append(str(e))
                continue
            foreign = foreign_index(store, name, record)
            if foreign:
                problems.append(f"{foreign}; it was not used (rebuilt from the metadata on open)")
                del disk[name]
        shards = {n: EmbeddingShards(folder, n, m.dim, m.embeddings.get(n)) for n in INDEX_NAMES}
        held = {}
        for name, sh in shards.items():
            try:
                held[name] = sh.held_ids()
            except CollectionError as e:
                problems.append(str(e))
                held[name] = np.zeros(0, np.int64)
        if not problems or Manifest.read(folder).to_dict() == m.to_dict():
            break
    return _Stored(m, disk, shards, held, problems)


def _check_ids(folder: Path, name: str, path: str, index: VectorIndex, live: np.ndarray, pending: int,
               report: CheckReport) -> None:
    """The ids of the index file against the metadata's: equal unless commits are pending."""
    extra, missing = id_disagreement(index.ids(), live)
    if not len(extra) and not len(missing):
        return
    parts = [f"{len(extra)} id(s) in the index file only"
             + (f" (e.g. {examples(extra)})" if len(extra) else ""),
             f"{len(missing)} in the metadata only" + (f" (e.g. {examples(missing)})" if len(missing) else "")]
    what = f"{name} index ({path}, {len(index)} ids) and the metadata ({len(live)} ids) differ: {', '.join(parts)}"
    if pending:  # removals and additions since the index was written: expected
        report.notes.append(f"{what}; expected, as {pending} commit(s) are newer than the index")
    else:
        report.problems.append(f"{what}; rebuild the index with `crossmodal-rag reindex {folder}`")


def _check_vectors(folder: Path, store: MetadataStore, dim: int, name: str, index: VectorIndex | None,
                   shards: EmbeddingShards, held: np.ndarray, ids: np.ndarray, total: int, seed: int,
                   report: CheckReport) -> None:
    """Each sampled id's metadata vector against its float16 copy and the index's vector."""
    audit = audit_vectors(index, ids, lambda chunk: store.vectors(chunk.tolist(), dim), shards, held)
    how = (f"all {len(ids)} of {total}" if len(ids) == total else
           f"{len(ids)} of {total}")
    sampled = "" if len(ids) == total else f" (seeded random sample, seed {seed})"
    against = "the float16 shards" + ("" if index is None or audit.unsupported else " and the index file")
    report.notes.append(f"{name} index: compared {how} {name} vectors{sampled} of the metadata "
                        f"with {against}")
    if audit.unsupported:
        report.notes.append(f"{name} index vectors not compared: {audit.unsupported}")
    if audit.bad_index:
        report.problems.append(
            f"{name} index: {len(audit.bad_index)} of {len(ids)} vector(s) compared differ from "
            f"the metadata beyond the precision of its codes (e.g. {examples(audit.bad_index)}); "
            f"rebuild it with `crossmodal-rag reindex {folder}`")
    if audit.bad_shards:
        report.problems.append(
            f"{name} embedding shards: {len(audit.bad_shards)} of {len(np.intersect1d(ids, held))} "
            f"float16 copies differ from the metadata vectors (e.g. {examples(audit.bad_shards)}); "
            "`reindex` builds from these copies: remove and re-add those items first")


def _check_shards(folder: Path, name: str, shards: EmbeddingShards, held: np.ndarray, live: np.ndarray,
                  report: CheckReport) -> None:
    """Every live item committed before the last shard write has a float16 copy."""
    unsharded = np.setdiff1d(live, held)
    # committed after the last persist: the next writer syncs them; only a gap is a problem
    behind = unsharded[unsharded <= shards.max_id]
    if len(behind):
        report.problems.append(f"{len(behind)} {name} item(s) are missing from the embedding "
                               f"shards (e.g. {examples(behind)}); run `crossmodal-rag reindex "
                               f"{folder}`")
