"""The collection manifest: a small, versioned JSON file, replaced atomically."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import CollectionError

__all__ = ["FORMAT_VERSION", "IndexFile", "Manifest", "ShardFile", "atomic_write_bytes", "fsync_dir"]

#: Bumped whenever the on-disk layout changes incompatibly.
FORMAT_VERSION = 2  # 2: per-index types, search defaults, tuning, embedding shards
MANIFEST_NAME = "manifest.json"
_FORMAT_TAG = "crossmodal-rag collection"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _strict(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CollectionError(f"{where}: unknown keys {unknown} (valid: {sorted(known)})")
    return data


@dataclass(frozen=True)
class IndexFile:
    """One FAISS index file, as the manifest records it."""

    path: str  # relative to the collection folder
    bytes: int  # file size, checked before FAISS reads the file
    sha256: str  # content hash, checked by `crossmodal-rag check`
    count: int  # number of vectors in it
    data_path: str | None = None  # on-disk inverted lists (.ivfdata) the index reads, if any
    data_bytes: int | None = None  # their size, checked on open

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexFile:
        return cls(**_strict(cls, data, "manifest index file"))


@dataclass(frozen=True)
class ShardFile:
    """One shard as the manifest records it."""

    path: str  # float16 vectors, relative to the collection folder
    ids_path: str  # int64 ids
    count: int
    min_id: int
    max_id: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardFile:
        known = {"path", "ids_path", "count", "min_id", "max_id"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CollectionError(f"manifest embedding shard: unknown keys {unknown} (valid: {sorted(known)})")
        return cls(**data)


@dataclass(frozen=True)
class Manifest:
    """What a collection is and which index files are current."""

    encoder: str  # canonical model spec the collection was built with
    dim: int  # embedding dimension
    index_type: str = "Flat"  # requested type: "auto" or a FAISS index-factory string
    metric: str = "inner_product"  # on L2-normalised vectors, i.e. cosine similarity
    format: str = _FORMAT_TAG
    format_version: int = FORMAT_VERSION
    library_version: str = ""  # crossmodal-rag version that last wrote the manifest
    created_at: str = ""  # ISO-8601 UTC
    updated_at: str = ""  # ISO-8601 UTC
    generation: int = 0  # metadata generation the index files reflect
    counts: dict[str, int] = field(default_factory=dict)  # images / captions / passages
    files: dict[str, IndexFile] = field(default_factory=dict)  # "image" / "text" -> file
    max_index_memory: int | None = None  # bytes; the budget "auto" chooses an index type under
    index_types: dict[str, str] = field(default_factory=dict)  # index -> factory string in use
    search_params: dict[str, dict[str, int]] = field(default_factory=dict)  # index -> defaults
    tuning: dict[str, Any] = field(default_factory=dict)  # index -> what tuning measured
    build: dict[str, Any] = field(default_factory=dict)  # index -> seed, training size, sharding
    embeddings: dict[str, list[ShardFile]] = field(default_factory=dict)  # index -> float16 shards

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def index_type_of(self, name: str) -> str:
        """The factory string index ``name`` uses (collections from format 1 have one type)."""
        t = self.index_types.get(name)
        if t:
            return t
        return "Flat" if self.index_type == "auto" else self.index_type

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "manifest") -> Manifest:
        if not isinstance(data, dict):
            raise CollectionError(f"{where}: expected a JSON object")
        data = dict(_strict(cls, data, where))
        try:
            data["files"] = {k: IndexFile.from_dict(v) for k, v in data.get("files", {}).items()}
            data["embeddings"] = {k: [ShardFile.from_dict(s) for s in v]
                                  for k, v in data.get("embeddings", {}).items()}
            return cls(**data)
        except TypeError as e:
            raise CollectionError(f"{where}: {e}") from e

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise CollectionError(
                f"collection folder {folder} does not exist; create it with "
                f"`crossmodal-rag index SOURCE --collection {folder}`"
            )
        if not path.is_file():
            raise CollectionError(
                f"{folder} is not a crossmodal-rag collection (no {MANIFEST_NAME}); create one with "
                f"`crossmodal-rag index SOURCE --collection {folder}`"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CollectionError(f"{path} is unreadable or not valid JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != _FORMAT_TAG:
            raise CollectionError(f"{path} is not a crossmodal-rag collection manifest")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise CollectionError(
                f"{path} has format version {version!r}, newer than this crossmodal-rag supports "
                f"({FORMAT_VERSION}); upgrade crossmodal-rag"
            )
        return cls.from_dict(data, where=str(path))

    def write(self, folder: Path, *, fsync: bool = True) -> None:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        atomic_write_bytes(folder / MANIFEST_NAME, text.encode("utf-8"), fsync=fsync)
