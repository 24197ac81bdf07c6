"""The collection manifest: a small, versioned JSON file, replaced atomically.

A manifest is read as hostile input (a collection may come from anywhere): only a regular file of
at most :data:`MAX_MANIFEST_BYTES`, its nesting measured by a linear scan before it is parsed
(at most :data:`MAX_MANIFEST_DEPTH`), and every field checked for type and bounds
(:func:`Manifest.from_dict`); file paths must stay inside the collection's ``index`` and
``embeddings`` folders. Any problem is one :class:`~crossmodal_rag.errors.CollectionError`
naming the file and the field.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import CollectionError
from ..safe_io import atomic_write_bytes

__all__ = [
    "FORMAT_VERSION",
    "MAX_DIM",
    "MAX_MANIFEST_BYTES",
    "MAX_MANIFEST_DEPTH",
    "IndexFile",
    "Manifest",
    "ShardFile",
    "check_own_folders",
    "json_depth",
]

#: Bumped whenever the on-disk layout changes incompatibly.
FORMAT_VERSION = 3  # 2: per-index types, search defaults, tuning, embedding shards; 3: collection id
MANIFEST_NAME = "manifest.json"
_FORMAT_TAG = "crossmodal-rag collection"
#: Largest manifest read: a manifest lists a few files per index (kilobytes; 8 MiB is ~40k shards).
MAX_MANIFEST_BYTES = 8 << 20
#: Deepest nesting of JSON arrays and objects accepted in a manifest (the format uses 5).
MAX_MANIFEST_DEPTH = 32
#: Largest embedding dimension accepted (CLIP models use 512-1280).
MAX_DIM = 65536
INDEX_NAMES = ("image", "text")
_MAX_INT64 = 2**63 - 1
#: Control characters (C0, DEL, C1) and lone surrogates: never in a manifest string.
_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
#: A JSON string (an unterminated one runs to the end: each match is linear) or a bracket.
_JSON_TOKEN = re.compile(r'(?s)"(?:[^"\\]++|\\.)*+"?|[\[\]{}]')
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COLLECTION_ID = re.compile(r"[0-9a-f]{32}")


def check_own_folders(folder: Path) -> None:
    """Refuse (``CollectionError``) a collection whose ``index`` or ``embeddings`` folders are
    symbolic links or not folders: a writer writes there and deletes the files no manifest lists,
    so a planted link would aim both at someone else's folder."""
    for rel in ("index", "embeddings", "embeddings/image", "embeddings/text"):
        path = folder / rel
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
            what = "a symbolic link" if stat.S_ISLNK(mode) else "not a folder"
            raise CollectionError(
                f"{path} is {what}; a collection's {rel} must be a folder of its own. Remove it "
                f"and rebuild the indexes with `crossmodal-rag reindex {folder}`")


def json_depth(text: str, limit: int = MAX_MANIFEST_DEPTH) -> int:
    """How deeply the arrays and objects of JSON ``text`` nest (brackets inside strings do not
    count), in one linear scan; stops once ``limit`` is passed (then returns ``limit + 1``)."""
    depth = deepest = 0
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()
        if c == "[" or c == "{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif c == "]" or c == "}":
            depth -= 1
    return deepest


# -- field checks: each returns the value or raises CollectionError naming the field ----------------
Check = Callable[[Any, str], Any]


def _fail(where: str, what: str, value: Any) -> CollectionError:
    if isinstance(value, (dict, list)):
        shown = f"{type(value).__name__} of {len(value)} entries"
    else:
        shown = repr(value if not isinstance(value, str) else value[:60])
        shown = shown if len(shown) <= 64 else shown[:61] + "..."
    return CollectionError(f"{where}: expected {what}, got {shown}")


def _int(lo: int = 0, hi: int = _MAX_INT64) -> Check:
    def check(v: Any, where: str) -> int:
        if type(v) is not int or not lo <= v <= hi:  # bool is not an int here
            raise _fail(where, f"an integer in [{lo}, {hi}]", v)
        return v
    return check


def _number(v: Any, where: str) -> float:
    if type(v) not in (int, float) or not math.isfinite(v):
        raise _fail(where, "a finite number", v)
    return v


def _bool(v: Any, where: str) -> bool:
    if type(v) is not bool:
        raise _fail(where, "true or false", v)
    return v


def _str(max_len: int = 256, pattern: re.Pattern[str] | None = None, *, empty: bool = True) -> Check:
    def check(v: Any, where: str) -> str:
        if not isinstance(v, str) or len(v) > max_len or (not v and not empty):
            raise _fail(where, f"a{'' if empty else ' non-empty'} string of at most {max_len} characters", v)
        if _BAD_CHARS.search(v):
            raise _fail(where, "a string without control characters or lone surrogates", v)
        if pattern is not None and not pattern.fullmatch(v):
            raise _fail(where, f"a string matching {pattern.pattern}", v)
        return v
    return check


def _exactly(expected: Any) -> Check:
    def check(v: Any, where: str) -> Any:
        if v != expected or type(v) is not type(expected):
            raise _fail(where, repr(expected), v)
        return v
    return check


def _optional(inner: Check) -> Check:
    return lambda v, where: None if v is None else inner(v, where)


def _relpath(top: str) -> Check:
    """A path relative to the collection folder, under ``top``: no absolute path, no ``..``."""
    text = _str(1024, empty=False)

    def check(v: Any, where: str) -> str:
        text(v, where)
        parts = v.split("/")
        if parts[0] != top or len(parts) < 2 or any(p in ("", ".", "..") for p in parts) or "\\" in v:
            raise _fail(where, f"a relative path inside the collection's {top}/ folder", v)
        return v
    return check


def _map(value: Check, *, keys: tuple[str, ...] | None = INDEX_NAMES, max_items: int = 64) -> Check:
    """A JSON object: keys from ``keys`` (None: short strings), values checked by ``value``."""
    key_check = _str(64, empty=False)

    def check(v: Any, where: str) -> dict[str, Any]:
        if not isinstance(v, dict) or len(v) > max_items:
            raise _fail(where, f"an object of at most {max_items} entries", v)
        out = {}
        for k, item in v.items():
            if keys is not None and k not in keys:
                raise _fail(where, f"keys from {list(keys)}", k)
            key_check(k, where)
            out[k] = value(item, f"{where}.{k}")
        return out
    return check


def _list(item: Check, max_items: int = 100_000) -> Check:
    def check(v: Any, where: str) -> list[Any]:
        if not isinstance(v, list) or len(v) > max_items:
            raise _fail(where, f"a list of at most {max_items} entries", v)
        return [item(x, f"{where}[{n}]") for n, x in enumerate(v)]
    return check


def _scalar(v: Any, where: str) -> Any:
    """A JSON number, string, boolean or null (a flat record's value)."""
    if v is None or type(v) is bool:
        return v
    if type(v) in (int, float):
        return _number(v, where)
    return _str(1024)(v, where)


_POSITIVE_INT32 = _int(1, 2**31 - 1)
_SEARCH_PARAMS = {"nprobe": _POSITIVE_INT32, "ef_search": _POSITIVE_INT32, "rerank": _int(0, 2**31 - 1),
                  "filter_factor": _POSITIVE_INT32}
#: What ``crossmodal-rag info`` reads of a tuning record (other keys: flat values).
_TUNING = {"param": _str(32), "value": _optional(_int(0, 2**31 - 1)), "target_recall": _number,
           "reached": _bool, "k": _int(0, 2**31 - 1), "queries": _int(), "measured": _list(_map(_scalar, keys=None), 10_000)}


def _record(checks: dict[str, Check], *, required: tuple[str, ...] = (), others: Check | None = _scalar,
            max_items: int = 64) -> Check:
    """A JSON object whose named keys pass their checks (``required`` ones present); other keys
    pass ``others`` (None: not allowed)."""
    def check(v: Any, where: str) -> dict[str, Any]:
        if not isinstance(v, dict) or len(v) > max_items:
            raise _fail(where, f"an object of at most {max_items} entries", v)
        missing = [k for k in required if k not in v]
        if missing:
            raise CollectionError(f"{where}: missing {missing}")
        out = {}
        for k, item in v.items():
            _str(64, empty=False)(k, where)
            if k in checks:
                out[k] = checks[k](item, f"{where}.{k}")
            elif others is None:
                raise CollectionError(f"{where}: unknown key {k!r} (valid: {sorted(checks)})")
            else:
                out[k] = others(item, f"{where}.{k}")
        return out
    return check


def _strict(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _fail(where, "a JSON object", data)
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k)[:64] for k in set(data) - known)
    if unknown:
        raise CollectionError(f"{where}: unknown keys {unknown} (valid: {sorted(known)})")
    return data


def _checked(cls: type, data: Any, where: str, checks: dict[str, Check]) -> dict[str, Any]:
    """``data`` with every field of ``cls`` it holds checked; missing required fields refused."""
    data = _strict(cls, data, where)
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in data]
    if missing:
        raise CollectionError(f"{where}: missing {missing}")
    return {k: checks[k](v, f"{where}: {k}") for k, v in data.items()}


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
    def from_dict(cls, data: dict[str, Any], where: str = "manifest index file") -> IndexFile:
        return cls(**_checked(cls, data, where, _INDEX_FILE_FIELDS))


_INDEX_FILE_FIELDS: dict[str, Check] = {
    "path": _relpath("index"), "bytes": _int(), "sha256": _str(64, _SHA256), "count": _int(),
    "data_path": _optional(_relpath("index")), "data_bytes": _optional(_int()),
}


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
    def from_dict(cls, data: dict[str, Any], where: str = "manifest embedding shard") -> ShardFile:
        return cls(**_checked(cls, data, where, _SHARD_FIELDS))


_ID = _int(-(2**63), _MAX_INT64)
_SHARD_FIELDS: dict[str, Check] = {
    "path": _relpath("embeddings"), "ids_path": _relpath("embeddings"), "count": _int(),
    "min_id": _ID, "max_id": _ID,
}


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
    collection_id: str = ""  # 32 hex digits, also in the metadata: binds the two ("" = older)

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
        """A manifest from its JSON form, every field checked for type and bounds."""
        checked = _checked(cls, data, where, _MANIFEST_FIELDS)
        checked["files"] = {k: IndexFile.from_dict(v, f"{where}: files.{k}")
                            for k, v in checked.get("files", {}).items()}
        checked["embeddings"] = {k: [ShardFile.from_dict(s, f"{where}: embeddings.{k}[{n}]")
                                     for n, s in enumerate(v)]
                                 for k, v in checked.get("embeddings", {}).items()}
        return cls(**checked)

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        path = folder / MANIFEST_NAME
        if not folder.is_dir():
            raise CollectionError(
                f"collection folder {folder} does not exist; create it with "
                f"`crossmodal-rag index SOURCE --collection {folder}`"
            )
        if not path.exists() and not path.is_symlink():
            raise CollectionError(
                f"{folder} is not a crossmodal-rag collection (no {MANIFEST_NAME}); create one with "
                f"`crossmodal-rag index SOURCE --collection {folder}`"
            )
        data = _parse(path, _read_text(path))
        if data.get("format") != _FORMAT_TAG:
            raise CollectionError(f"{path} is not a crossmodal-rag collection manifest")
        version = data.get("format_version")
        if type(version) is not int or version < 1:
            raise CollectionError(f"{path}: format_version {str(version)[:20]!r} is not a format version")
        if version > FORMAT_VERSION:
            raise CollectionError(
                f"{path} has format version {version}, newer than this crossmodal-rag supports "
                f"({FORMAT_VERSION}); upgrade crossmodal-rag"
            )
        return cls.from_dict(data, where=str(path))

    def write(self, folder: Path, *, fsync: bool = True) -> None:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        atomic_write_bytes(folder / MANIFEST_NAME, text.encode("utf-8"), fsync=fsync)


_MANIFEST_FIELDS: dict[str, Check] = {
    "encoder": _str(4096, empty=False),
    "dim": _int(1, MAX_DIM),
    "index_type": _str(256, empty=False),
    "metric": _exactly("inner_product"),
    "format": _exactly(_FORMAT_TAG),
    "format_version": _int(1, FORMAT_VERSION),
    "library_version": _str(64),
    "created_at": _str(64),
    "updated_at": _str(64),
    "generation": _int(),
    "counts": _map(_int(), keys=None, max_items=16),
    "files": _map(lambda v, where: v),  # each an IndexFile, checked by IndexFile.from_dict
    "max_index_memory": _optional(_int(1)),
    "index_types": _map(_str(256, empty=False)),
    "search_params": _map(_record(_SEARCH_PARAMS, others=None)),
    "tuning": _map(_record(_TUNING, required=tuple(_TUNING))),
    "build": _map(_record({"auto": _record({"candidates": _list(_map(_scalar, keys=None), 64),  # autoselect
                                            "curves": _list(_map(_scalar, keys=None), 10_000)})})),
    "embeddings": _map(_list(lambda v, where: v)),  # each a ShardFile, checked by ShardFile.from_dict
    "collection_id": _str(32, re.compile(f"(?:{_COLLECTION_ID.pattern})?")),
}


def _read_text(path: Path) -> str:
    """The manifest's text: a regular file (links followed) of at most MAX_MANIFEST_BYTES."""
    from ..safe_io import read_regular

    try:
        raw = read_regular(path, max_bytes=MAX_MANIFEST_BYTES, what="manifest")
        return raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "reason", None) or e
        raise CollectionError(f"{path} is unreadable: {reason}") from e


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse(path: Path, text: str) -> dict[str, Any]:
    """JSON ``text`` as an object, its nesting measured before parsing."""
    depth = json_depth(text)
    if depth > MAX_MANIFEST_DEPTH:
        raise CollectionError(f"{path} nests arrays/objects more than {MAX_MANIFEST_DEPTH} deep; it is "
                              "not a manifest this library wrote")
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # ValueError: bad JSON, or an int of 4300+ digits
        raise CollectionError(f"{path} is not valid JSON: {str(e)[:200]}") from e
    if not isinstance(data, dict):
        raise CollectionError(f"{path} is not a crossmodal-rag collection manifest (not a JSON object)")
    return data
