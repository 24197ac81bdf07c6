"""Binding a collection's manifest and index files to its metadata.

The manifest names the index files, but a manifest is easy to edit, copy or swap: an entry and
a file taken from another collection would pass the size, hash and count checks, since they came
together. So the metadata (the commit log, see :mod:`crossmodal_rag.store.metadata`) records

- the collection's id (:data:`COLLECTION_ID_KEY`, 32 random hex digits made at creation), which
  the manifest repeats: a manifest with another id belongs to another collection and is refused;
- the checksums of the last index files each writer switched the manifest to
  (:data:`INDEX_FILES_KEY`, the newest :data:`KEEP` per index, so a reader that read the
  manifest just before a writer replaced it still finds its files): an index file whose checksum
  is not among them is another collection's, and is rebuilt from the metadata with a warning;
- the checksum of each float16 embedding shard the manifest lists (:data:`SHARD_FILES_KEY`,
  path -> checksum per index, of the current shards and those just before): a shard whose file
  no longer has its recorded checksum (copied from another collection, edited) is reported by
  ``check`` and rebuilt from the metadata by ``reindex``.

Collections made before either existed (no id on one side) are read as they are and bound on
their next writable open.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import CollectionError
from .manifest import MANIFEST_NAME, IndexFile, Manifest, ShardFile

if TYPE_CHECKING:
    from .metadata import MetadataStore

__all__ = ["COLLECTION_ID_KEY", "INDEX_FILES_KEY", "KEEP", "SHARD_FILES_KEY", "check_collection_id",
           "foreign_index", "foreign_shard", "new_collection_id", "recorded_shard_files",
           "remember_index_files", "remember_shard_files"]

logger = logging.getLogger(__name__)

COLLECTION_ID_KEY = "collection_id"
INDEX_FILES_KEY = "index_files"
#: Checksums kept per index: the current file's and those of the few before it.
KEEP = 4
_MAX_RECORD_CHARS = 4096
SHARD_FILES_KEY = "shard_files"
#: Shard checksums kept per index: the current shards' first, then those of earlier manifests.
KEEP_SHARDS = 1024
_MAX_SHARD_RECORD_CHARS = 1 << 20


def new_collection_id() -> str:
    return secrets.token_hex(16)


def check_collection_id(manifest: Manifest, store: MetadataStore) -> None:
    """Refuse a manifest whose collection id is not the metadata's (one side without an id:
    an older collection, accepted)."""
    stored = store.get_meta(COLLECTION_ID_KEY)
    if stored and manifest.collection_id and stored != manifest.collection_id:
        raise CollectionError(
            f"{store.path.parent / MANIFEST_NAME} belongs to another collection (id "
            f"{manifest.collection_id}) than {store.path} (id {stored[:40]}); restore the "
            "collection's own manifest from a backup")


def _recorded(store: MetadataStore) -> dict[str, list[str]] | None:
    """Index name -> recent checksums, as recorded; None if nothing (usable) is recorded."""
    text = store.get_meta(INDEX_FILES_KEY)
    if not text:
        return None
    try:
        data = json.loads(text) if len(text) <= _MAX_RECORD_CHARS else None
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(s, str) for s in v) for v in data.values()):
        logger.warning("%s: the record of its index files is damaged; index files cannot be checked "
                       "against it until the next writer records them again", store.path)
        return None
    return data


def foreign_index(store: MetadataStore, name: str, record: IndexFile,
                  live: Callable[[], int] | None = None) -> str | None:
    """Why index file ``record`` (of index ``name``) is not one this collection wrote, or None.

    A collection with no record yet (made before binding) is checked by count only: ``live``
    gives the number of items the metadata holds for the index, when the manifest's generation
    is the metadata's (None: commits are pending, no count to compare)."""
    path = store.path.parent / record.path
    recorded = _recorded(store)
    if recorded is not None and name in recorded:
        if record.sha256 in recorded[name]:
            return None
        return (f"index file {path} is not one this collection wrote: its checksum is not among "
                "those its metadata recorded (another collection's file?)")
    if live is not None:
        count = live()
        if count != record.count:
            return (f"index file {path} holds {record.count} vectors but the metadata {count} "
                    "items at the same generation (another collection's file?)")
    return None


def remember_index_files(store: MetadataStore, files: dict[str, IndexFile]) -> None:
    """Record ``files`` (about to be named by the manifest) as this collection's own."""
    recorded = _recorded(store) or {}
    for name, f in files.items():
        recorded[name] = ([f.sha256] + [s for s in recorded.get(name, []) if s != f.sha256])[:KEEP]
    store.put_meta(INDEX_FILES_KEY, json.dumps(recorded))


def recorded_shard_files(store: MetadataStore) -> dict[str, dict[str, str]] | None:
    """Index name -> {shard vectors path -> checksum} as recorded; None if nothing (usable) is
    recorded (a collection made before shards were bound, or a damaged record)."""
    text = store.get_meta(SHARD_FILES_KEY)
    if text is None:
        return None
    try:
        data = json.loads(text) if len(text) <= _MAX_SHARD_RECORD_CHARS else None
    except (ValueError, RecursionError):
        data = None
    if not isinstance(data, dict) or not all(
            isinstance(v, dict) and all(isinstance(p, str) and isinstance(h, str) for p, h in v.items())
            for v in data.values()):
        logger.warning("%s: the record of its embedding shards is damaged; shards cannot be checked "
                       "against it until the next writer records them again", store.path)
        return None
    return data


def foreign_shard(store: MetadataStore, name: str, shard: ShardFile, digest: Callable[[], str],
                  recorded: dict[str, dict[str, str]] | None = None) -> str | None:
    """Why embedding shard ``shard`` (of index ``name``) is not one this collection wrote, or
    None (also when the collection has no record yet). ``digest`` gives the file's checksum now;
    ``recorded``: :func:`recorded_shard_files`, when already read."""
    recorded = recorded_shard_files(store) if recorded is None else recorded
    if recorded is None:
        return None
    want = recorded.get(name, {}).get(shard.path)
    if want is not None and want == digest():
        return None
    path = store.path.parent / shard.path
    what = "is not among those its metadata recorded" if want is None else "differs from the one recorded"
    return (f"embedding shard {path} is not one this collection wrote: its checksum {what} "
            "(copied from another collection, or edited?)")


def remember_shard_files(store: MetadataStore, current: dict[str, dict[str, str | None]]) -> None:
    """Record the checksums of the shards a manifest is about to list: index name -> {path ->
    checksum, or None when this writer does not know it}. A path without a checksum is hashed
    by ``digest`` only in a collection with no record yet (bound now); in a bound one it stays
    unrecorded (a shard the collection did not write)."""
    before = recorded_shard_files(store) or {}
    out: dict[str, dict[str, str]] = {}
    for name, paths in current.items():
        old = before.get(name, {})
        mine = {p: h or old.get(p) for p, h in paths.items()}
        kept = {p: h for p, h in mine.items() if h}
        for p, h in old.items():  # a reader of the previous manifest still finds its shards
            if len(kept) >= KEEP_SHARDS:
                break
            kept.setdefault(p, h)
        out[name] = kept
    store.put_meta(SHARD_FILES_KEY, json.dumps(out))
