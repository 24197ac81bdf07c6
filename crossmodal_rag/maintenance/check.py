"""``check``: verify that what a collection stores agrees, reading only.

The index files the manifest on disk names (loaded fresh, memory-mapped: not an open
collection's in-memory indexes, which are reconciled on open), the float16 shards and the
metadata are compared id by id and vector by vector (see :mod:`crossmodal_rag.store.audit` for
how each index type's vectors are compared). Every stored vector's values are checked too, not
a sample: each float16 shard row and each vector an index can reconstruct must be finite and of
unit norm (within :data:`~crossmodal_rag.store.shards.UNIT_NORM_TOLERANCE`), and each shard
file must be one the collection wrote (:mod:`crossmodal_rag.store.binding`). Bad vectors are
named (id and path, :data:`~crossmodal_rag.store.audit.MAX_NAMED` in a message, up to
:data:`MAX_LISTED` in :attr:`CheckReport.bad_vectors`) with the command that repairs them.
The text space is checked in the same metadata snapshot. :meth:`crossmodal_rag.Collection.check`
calls :func:`check_collection`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CollectionError
from ..store.audit import (
    CHECK_ALL_MAX_VECTORS,
    METADATA_NORM_TOLERANCE,
    audit_shards,
    audit_vectors,
    examples,
    id_disagreement,
    index_faults,
    name_items,
    sample_ids,
)
from ..store.binding import check_collection_id, foreign_index
from ..store.layout import INDEX_NAMES
from ..store.manifest import Manifest
from ..store.metadata import MetadataStore
from ..store.shards import UNIT_NORM_TOLERANCE, EmbeddingShards, VectorFaults
from ..store.vectors import VectorIndex

__all__ = ["CHECK_ALL_MAX_VECTORS", "MAX_LISTED", "CheckReport", "check_collection"]

#: Bad vectors listed one by one in :attr:`CheckReport.bad_vectors` (the messages count them all).
MAX_LISTED = 100


@dataclass
class CheckReport:
    """Result of :meth:`Collection.check <crossmodal_rag.Collection.check>`."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    #: Each bad stored vector found, up to :data:`MAX_LISTED`: ``{"index": "image" | "text",
    #: "where": "shards" | "index" | "metadata" | "text_space", "id", "path", "problem"}``.
    bad_vectors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes, "counts": self.counts,
                "bad_vectors": self.bad_vectors}

    def list_bad(self, store: MetadataStore, index: str, where: str, faults: VectorFaults) -> None:
        """Add ``faults`` to :attr:`bad_vectors` while there is room."""
        room = MAX_LISTED - len(self.bad_vectors)
        pairs = [(int(i), "not finite") for i in faults.nonfinite[:max(room, 0)]]
        pairs += [(int(i), "not unit norm") for i in faults.off_norm[:max(room - len(pairs), 0)]]
        if not pairs:
            return
        try:
            items = store.get_items([i for i, _ in pairs])
        except CollectionError:
            items = {}
        for i, problem in pairs:
            item = items.get(i)
            self.bad_vectors.append({"index": index, "where": where, "id": i, "problem": problem,
                                     "path": item.path if item is not None else None})


@dataclass
class _Stored:
    """What the manifest on disk names, loaded for checking."""

    manifest: Manifest
    indexes: dict[str, VectorIndex]  # the index files that loaded
    shards: dict[str, EmbeddingShards]  # every shard the manifest lists
    problems: list[str]  # what could not be loaded


def check_collection(folder: Path, store: MetadataStore, dim: int, *, verify_hash: bool = True,
                     max_vectors: int | None = CHECK_ALL_MAX_VECTORS, seed: int = 0) -> CheckReport:
    """Check the collection in ``folder`` (metadata ``store``, ``dim``-d vectors). Every id is
    compared, and every vector (the metadata's, its float16 copy, the index's) for indexes of up
    to ``max_vectors`` vectors (None: no limit); larger ones by a random sample of that many
    drawn from ``seed``, said so in the notes. The values of every float16 copy and of every
    vector the index files can reconstruct are checked whatever the size. Reads only."""
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
            usable, shard_faults = _check_shards(folder, store, name, stored.shards[name], live, m.dim, report)
            index_bad = _check_index_values(folder, store, name, m.files[name].path if index else "", index,
                                            report)
            _check_vectors(folder, store, dim, name, index, usable, usable.held_ids(),
                           sample_ids(live, max_vectors, seed), len(live), seed, report,
                           known_bad=(shard_faults, index_bad))
        report.counts = {**store.counts(), **report.counts}
        from ..search.text_space_audit import check_text_space  # index --text-model: its own index

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
        for sh in shards.values():  # open the maps now: a writer may replace the files next
            for s in sh.shards:
                sh.unusable(s)
        if not problems or Manifest.read(folder).to_dict() == m.to_dict():
            break
    return _Stored(m, disk, shards, problems)


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


def _fault_lines(store: MetadataStore, what: str, total: int, faults: VectorFaults, tolerance: float | None,
                 fix: str) -> list[str]:
    """One problem per kind of fault: how many of ``total``, the items named, the fix."""
    lines = []
    if len(faults.nonfinite):
        lines.append(f"{what}: {len(faults.nonfinite)} of {total} vector(s) are not finite (NaN or "
                     f"infinity): {name_items(store, faults.nonfinite)}; {fix}")
    if len(faults.off_norm):
        lines.append(f"{what}: {len(faults.off_norm)} of {total} vector(s) are not of unit norm "
                     f"(|1 - norm| > {tolerance}; zero, denormal or rescaled): "
                     f"{name_items(store, faults.off_norm)}; {fix}")
    return lines


def _check_shards(folder: Path, store: MetadataStore, name: str, shards: EmbeddingShards, live: np.ndarray,
                  dim: int, report: CheckReport) -> tuple[EmbeddingShards, VectorFaults]:
    """Every shard file usable, every live float16 vector finite and of unit norm, and every
    live item committed before the last shard write held by a usable shard. Returns the usable
    shards and the faulty live ids."""
    audit = audit_shards(store, name, shards, live, dim, new_from=shards.max_id)
    for _, why in audit.unusable:
        report.problems.append(f"{why}; `crossmodal-rag reindex {folder}` rebuilds it from the metadata")
    repair = (f"`crossmodal-rag reindex` refuses to build from them: re-embed them with "
              f"`crossmodal-rag reindex --repair {folder}`")
    report.problems.extend(_fault_lines(store, f"{name} embedding shards", len(live), audit.faults,
                                        UNIT_NORM_TOLERANCE, repair))
    report.list_bad(store, name, "shards", audit.faults)
    if len(audit.missing) and audit.unusable:  # the files above hold them: said there
        report.notes.append(f"{len(audit.missing)} {name} item(s) have no usable copy in the embedding "
                            f"shards (e.g. {examples(audit.missing)}); `reindex` takes them from the metadata")
    elif len(audit.missing):
        fix = (f"re-embed them with `crossmodal-rag reindex --repair {folder}`" if len(audit.bad_metadata)
               else f"`crossmodal-rag reindex {folder}` rebuilds them from the metadata")
        report.problems.append(f"{len(audit.missing)} {name} item(s) are missing from the embedding "
                               f"shards (e.g. {examples(audit.missing)}); {fix}")
    report.problems.extend(_fault_lines(store, f"{name} metadata (items missing from the shards)",
                                        len(audit.missing), audit.bad_metadata, METADATA_NORM_TOLERANCE,
                                        f"re-embed them with `crossmodal-rag reindex --repair {folder}`"))
    report.list_bad(store, name, "metadata", audit.bad_metadata)
    dropped = {s.path for s, _ in audit.unusable}
    usable = EmbeddingShards(folder, name, dim, [s for s in shards.shards if s.path not in dropped])
    return usable, audit.faults


def _check_index_values(folder: Path, store: MetadataStore, name: str, path: str, index: VectorIndex | None,
                        report: CheckReport) -> VectorFaults | None:
    """Every vector the index file holds is finite (and of unit norm where stored exactly)."""
    if index is None:
        return None
    faults, unsupported = index_faults(index)
    if unsupported:
        return None
    report.notes.append(f"{name} index: checked the values of all {len(index)} vectors it holds")
    report.problems.extend(_fault_lines(store, f"{name} index ({path})", len(index), faults, UNIT_NORM_TOLERANCE,
                                        f"rebuild it with `crossmodal-rag reindex {folder}`"))
    report.list_bad(store, name, "index", faults)
    return faults


def _check_vectors(folder: Path, store: MetadataStore, dim: int, name: str, index: VectorIndex | None,
                   shards: EmbeddingShards, held: np.ndarray, ids: np.ndarray, total: int, seed: int,
                   report: CheckReport, known_bad: tuple[VectorFaults, VectorFaults | None]) -> None:
    """Each sampled id's metadata vector against its float16 copy and the index's vector
    (``known_bad``: ids whose shard copy and index vector were already reported as bad values)."""
    def metadata(chunk: np.ndarray) -> np.ndarray:
        vectors, unreadable = store.vectors_as_stored(chunk.tolist(), dim)
        vectors[unreadable] = np.nan
        return vectors

    audit = audit_vectors(index, ids, metadata, shards, held)
    how = (f"all {len(ids)} of {total}" if len(ids) == total else
           f"{len(ids)} of {total}")
    sampled = "" if len(ids) == total else f" (seeded random sample, seed {seed})"
    against = "the float16 shards" + ("" if index is None or audit.unsupported else " and the index file")
    report.notes.append(f"{name} index: compared {how} {name} vectors{sampled} of the metadata "
                        f"with {against}")
    if audit.unsupported:
        report.notes.append(f"{name} index vectors not compared: {audit.unsupported}")
    bad_meta = audit.bad_metadata
    if bad_meta is not None and len(bad_meta):
        report.problems.extend(_fault_lines(store, f"{name} metadata", len(ids), bad_meta, METADATA_NORM_TOLERANCE,
                                            f"re-embed them with `crossmodal-rag reindex --repair {folder}`"))
        report.list_bad(store, name, "metadata", bad_meta)
    shard_bad, index_bad = known_bad
    skip = np.union1d(shard_bad.ids, bad_meta.ids if bad_meta is not None else [])
    bad_index = np.setdiff1d(audit.bad_index, np.union1d(skip, index_bad.ids if index_bad is not None else []))
    bad_shards = np.setdiff1d(audit.bad_shards, skip)
    if len(bad_index):
        report.problems.append(
            f"{name} index: {len(bad_index)} of {len(ids)} vector(s) compared differ from "
            f"the metadata beyond the precision of its codes (e.g. {examples(bad_index)}); "
            f"rebuild it with `crossmodal-rag reindex {folder}`")
    if len(bad_shards):
        report.problems.append(
            f"{name} embedding shards: {len(bad_shards)} of {len(np.intersect1d(ids, held))} "
            f"float16 copies differ from the metadata vectors (e.g. {examples(bad_shards)}): "
            f"{name_items(store, bad_shards, 5)}; "
            f"`reindex` builds from these copies: re-embed them with `crossmodal-rag reindex --repair {folder}`")
