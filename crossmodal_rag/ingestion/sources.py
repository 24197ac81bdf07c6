"""Ingest sources: read a folder, a JSONL/CSV manifest, a COCO captions file or a passage corpus
into records (an image with its captions, or a text passage), plus problems for bad rows.

Every reader streams records and never raises for one bad row: the row becomes a
:class:`Problem` and reading goes on. A row is checked on its own: nested at most
``MAX_NESTING`` deep, no NUL in a path, no text that is not valid Unicode (a lone surrogate from
a ``\\ud800`` escape, or a byte that is not UTF-8 in a CSV row), ids of usable types. A source
that cannot be read at all raises :class:`~crossmodal_rag.errors.SourceError`; only regular
files are read (see :mod:`crossmodal_rag.safe_io`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SourceError
from ..safe_io import MAX_JSON_BYTES, MAX_TEXT_FILE_BYTES, open_regular, read_regular
from .images import IMAGE_EXTENSIONS

__all__ = ["ImageRecord", "Problem", "Record", "TextRecord", "read_source"]

logger = logging.getLogger(__name__)

#: A caption longer than this many characters is cut (the encoder sees far fewer tokens anyway).
MAX_TEXT_CHARS = 100_000
_MAX_LINE_BYTES = 10_000_000
#: A manifest row (or a COCO entry) nested deeper than this is skipped.
MAX_NESTING = 64
_RESERVED = {"image", "caption", "captions", "text", "id", "title"}


@dataclass(frozen=True)
class ImageRecord:
    """An image file to index, with the captions the source gave it."""

    path: Path  # absolute
    captions: tuple[str, ...] = ()
    origin: str = ""  # where the captions came from (caption file or manifest)
    extra: dict[str, Any] = field(default_factory=dict)  # other manifest columns


@dataclass(frozen=True)
class TextRecord:
    """A text passage to index as a searchable text item."""

    text: str
    title: str | None = None
    ext_id: str | None = None
    origin: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """An input that was skipped, and why (one line)."""

    item: str  # a path, or "manifest.jsonl:12" for a row
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"item": self.item, "reason": self.reason}


Record = ImageRecord | TextRecord


def _clean_text(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text[:MAX_TEXT_CHARS] if text else None


def _captions(value: Any) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [c for c in (_clean_text(v) for v in values) if c]


def _bad_text(text: str) -> bool:
    """True if ``text`` cannot be stored as UTF-8 (it holds a lone surrogate)."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _value_problem(value: Any, field: str) -> str | None:
    """Why a parsed JSON/CSV value cannot be stored (too deep, not valid Unicode), or None."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, str):
            if _bad_text(v):
                return (f"field {field!r} holds text that is not valid Unicode (a lone surrogate, "
                        "or bytes that are not UTF-8)")
        elif isinstance(v, dict | list):
            if depth > MAX_NESTING:
                return f"field {field!r} is nested more than {MAX_NESTING} levels deep"
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str) and _bad_text(k):
                    return f"field {field!r} has a key that is not valid Unicode"
                stack.append((x, depth + 1))
    return None


def _row_problem(obj: dict[Any, Any]) -> str | None:
    for key, value in obj.items():
        if key is not None and not isinstance(key, str):
            continue
        name = "" if key is None else key
        if _bad_text(name):
            return "a column name is not valid Unicode (a lone surrogate, or bytes that are not UTF-8)"
        reason = _value_problem(value, name)
        if reason:
            return reason
    return None


def _loads(raw: bytes) -> Any:
    """``json.loads`` of one line, bounded: ValueError for too-deep nesting (checked cheaply)."""
    text = raw.decode("utf-8")
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING:  # only then can it be too deep
        try:
            obj = json.loads(text)
        except RecursionError as e:
            raise ValueError(f"nested more than {MAX_NESTING} levels deep") from e
        reason = _value_problem(obj, "row")
        if reason and "nested" in reason:
            raise ValueError(f"nested more than {MAX_NESTING} levels deep")
        return obj
    return json.loads(text)


def read_source(
    source: str | Path, *, image_root: str | Path | None = None, allow_outside_root: bool = False
) -> Iterator[Record | Problem]:
    """Yield records and problems from ``source`` (its kind is detected from what it is).

    Args:
        source: a folder, a single image, a ``.jsonl``/``.csv`` manifest or passage corpus, or a
            COCO-style captions ``.json``.
        image_root: folder that manifest and COCO image paths are relative to (default: the
            manifest's own folder).
        allow_outside_root: accept manifest paths that are absolute or climb out of the root.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"source {source} does not exist")
    if path.is_dir():
        yield from _read_folder(path.resolve())
        return
    suffix = path.suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        yield ImageRecord(path.resolve(), (), "", {})
        return
    root = Path(image_root).expanduser().resolve() if image_root else path.resolve().parent
    if suffix == ".jsonl" or suffix == ".ndjson":
        yield from _group(_read_jsonl(path, root, allow_outside_root))
    elif suffix == ".csv" or suffix == ".tsv":
        yield from _group(_read_csv(path, root, allow_outside_root, "\t" if suffix == ".tsv" else ","))
    elif suffix == ".json":
        yield from _group(_read_coco(path, root, allow_outside_root))
    else:
        raise SourceError(
            f"cannot tell what {source} is: give a folder, an image, a .jsonl/.csv manifest "
            "(columns image, caption) or passage corpus (text), or a COCO captions .json"
        )


def _read_folder(root: Path) -> Iterator[Record | Problem]:
    for dirpath, dirnames, filenames in os.walk(root, onerror=None, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if _bad_text(str(p)):
                yield Problem(os.fsencode(p).decode("utf-8", "backslashreplace"),
                              "file name is not valid UTF-8 (rename the file to index it)")
                continue
            caption_file = p.with_suffix(".txt")
            captions: list[str] = []
            origin = ""
            if caption_file.exists():  # follows links; what it reaches must be a regular file
                origin = str(caption_file)
                text = ""
                try:
                    raw = read_regular(caption_file, max_bytes=MAX_TEXT_FILE_BYTES,
                                       what="caption file")[:_MAX_LINE_BYTES]
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
                    yield Problem(str(caption_file), "not UTF-8; read as Latin-1")
                except OSError as e:
                    yield Problem(str(caption_file), f"cannot read caption file: {e.strerror or e}")
                    origin = ""
                captions = _captions(text.splitlines())
            yield ImageRecord(p, tuple(dict.fromkeys(captions)), origin, {})


def _resolve(value: Any, root: Path, allow_outside_root: bool, where: str) -> Path | Problem:
    if not isinstance(value, str) or not value.strip():
        return Problem(where, "empty or non-string 'image' path")
    if "\x00" in value:
        return Problem(where, "image path holds a NUL character")
    if _bad_text(value):
        return Problem(where, "image path is not valid Unicode (a lone surrogate)")
    try:
        raw = Path(value.strip()).expanduser()
    except RuntimeError:  # "~someone/x.jpg" for a user that does not exist
        return Problem(where, f"image path {value[:200]!r} starts with '~' of an unknown user")
    p = (raw if raw.is_absolute() else root / raw).resolve()
    if not allow_outside_root and not p.is_relative_to(root):
        return Problem(
            where, f"image path {value!r} is outside {root} (pass --allow-outside-root if intended)"
        )
    return p


def _row(obj: dict[str, Any], root: Path, allow: bool, where: str, origin: str) -> Record | Problem:
    """One manifest row as a record, or the problem that keeps it out (never raises)."""
    reason = _row_problem(obj)
    if reason:
        return Problem(where, reason)
    try:
        return _row_record(obj, root, allow, where, origin)
    except (ValueError, TypeError, OverflowError, RuntimeError, OSError) as e:
        return Problem(where, f"unusable row: {type(e).__name__}: {str(e)[:200]}")


def _row_record(obj: dict[str, Any], root: Path, allow: bool, where: str, origin: str) -> Record | Problem:
    extra = {str(k): v for k, v in obj.items() if k not in _RESERVED and v not in (None, "")}
    if obj.get("image") not in (None, ""):
        p = _resolve(obj["image"], root, allow, where)
        if isinstance(p, Problem):
            return p
        caps = _captions(obj.get("caption")) + _captions(obj.get("captions") or [])
        return ImageRecord(p, tuple(dict.fromkeys(caps)), origin, extra)
    text = _clean_text(obj.get("text"))
    if text:
        title = _clean_text(obj.get("title"))
        ext_id = None if obj.get("id") in (None, "") else str(obj["id"])
        return TextRecord(text, title, ext_id, origin, extra)
    return Problem(where, "row has neither an 'image' path nor a non-empty 'text' field")


def _read_jsonl(path: Path, root: Path, allow: bool) -> Iterator[Record | Problem]:
    origin = str(path.resolve())
    try:
        f = open_regular(path, what="manifest")  # streamed: lines are bounded, not the file
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e
    with f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            if len(raw) > _MAX_LINE_BYTES:
                yield Problem(where, f"line longer than {_MAX_LINE_BYTES} bytes")
                continue
            if not raw.strip():
                continue
            try:
                obj = _loads(raw)
            except UnicodeDecodeError:
                yield Problem(where, "line is not UTF-8")
                continue
            except json.JSONDecodeError as e:
                yield Problem(where, f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            except (ValueError, RecursionError) as e:  # too deep, an integer of 5000 digits, ...
                yield Problem(where, f"invalid JSON: {str(e)[:200]}")
                continue
            if not isinstance(obj, dict):
                yield Problem(where, "line is not a JSON object")
                continue
            yield _row(obj, root, allow, where, origin)


def _read_csv(path: Path, root: Path, allow: bool, delimiter: str) -> Iterator[Record | Problem]:
    origin = str(path.resolve())
    csv.field_size_limit(_MAX_LINE_BYTES)
    try:
        # bytes that are not UTF-8 become lone surrogates, so that row alone is refused
        f = io.TextIOWrapper(open_regular(path, what="manifest"), encoding="utf-8",
                             errors="surrogateescape", newline="")
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e
    with f:
        try:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = set(reader.fieldnames or [])
        except csv.Error as e:
            raise SourceError(f"{path} is not valid CSV: {e}") from e
        if not columns & {"image", "text"}:
            raise SourceError(
                f"{path} has columns {sorted(columns)}; a manifest needs an 'image' column "
                "(with 'caption') or a passage corpus a 'text' column"
            )
        yield from _csv_rows(reader, path, root, allow, origin)


def _csv_rows(reader: csv.DictReader, path: Path, root: Path, allow: bool,
              origin: str) -> Iterator[Record | Problem]:
    while True:
        line = reader.line_num
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:  # a bad row (a field over the limit, ...): skip it, go on
            if reader.line_num == line:  # no progress: the rest cannot be read
                raise SourceError(f"{path} is not valid CSV after line {line}: {e}") from e
            yield Problem(f"{path}:{line + 1}", f"invalid CSV: {e}")
            continue
        yield _row(row, root, allow, f"{path}:{line + 1}", origin)


def _coco_id(value: Any) -> str | None:
    """Why ``value`` cannot be a COCO image id, or None."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        return f"must be a number or a string, not {type(value).__name__ if value is not None else 'null'}"
    if isinstance(value, str) and _bad_text(value):
        return "is not valid Unicode (a lone surrogate)"
    return None


def _coco_captions(annotations: Any, path: Path) -> tuple[dict[Any, list[str]], list[Problem]]:
    """image id -> captions, and the annotations skipped."""
    captions: dict[Any, list[str]] = {}
    problems: list[Problem] = []
    for k, ann in enumerate(annotations if isinstance(annotations, list) else []):
        where = f"{path}:annotations[{k}]"
        if not isinstance(ann, dict) or "image_id" not in ann:
            problems.append(Problem(where, "annotation has no 'image_id'"))
            continue
        reason = _coco_id(ann["image_id"])
        reason = f"'image_id' {reason}" if reason else _value_problem(ann.get("caption"), "caption")
        if reason:
            problems.append(Problem(where, reason))
            continue
        captions.setdefault(ann["image_id"], []).extend(_captions(ann.get("caption")))
    return captions, problems


def _read_coco(path: Path, root: Path, allow: bool) -> Iterator[Record | Problem]:
    try:
        data = json.loads(read_regular(path, max_bytes=MAX_JSON_BYTES, what="COCO file").decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError, digits
        raise SourceError(f"cannot read {path} as JSON: {e}") from e
    except RecursionError as e:
        raise SourceError(f"cannot read {path} as JSON: nested too deeply") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(
            f"{path} is not a COCO-style captions file (needs 'images' and 'annotations' lists)"
        )
    origin = str(path.resolve())
    captions, problems = _coco_captions(data.get("annotations"), path)
    yield from problems
    for n, img in enumerate(data["images"]):
        where = f"{path}:images[{n}]"
        if not isinstance(img, dict) or "file_name" not in img:
            yield Problem(where, "image entry has no 'file_name'")
            continue
        reason = _coco_id(img["id"]) if "id" in img else None
        if reason:
            yield Problem(where, f"'id' {reason}")
            continue
        p = _resolve(img["file_name"], root, allow, where)
        if isinstance(p, Problem):
            yield p
            continue
        extra = {"coco_id": img["id"]} if "id" in img else {}
        yield ImageRecord(p, tuple(dict.fromkeys(captions.get(img.get("id"), []))), origin, extra)


def _group(records: Iterator[Record | Problem]) -> Iterator[Record | Problem]:
    """Merge manifest rows that name the same image (one row per caption is common)."""
    images: dict[Path, ImageRecord] = {}
    for rec in records:
        if isinstance(rec, ImageRecord):
            prev = images.get(rec.path)
            if prev is None:
                images[rec.path] = rec
            else:
                caps = tuple(dict.fromkeys(prev.captions + rec.captions))
                images[rec.path] = ImageRecord(rec.path, caps, prev.origin, {**prev.extra, **rec.extra})
        else:
            yield rec
    yield from images.values()
