"""Ingest sources: read a folder, a JSONL/CSV manifest, a COCO captions file or a passage corpus
into records (an image with its captions, or a text passage), plus problems for bad rows.

Every reader streams records and never raises for one bad row: the row becomes a
:class:`Problem` and reading goes on. A source that cannot be read at all raises
:class:`~crossmodal_rag.errors.SourceError`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SourceError
from .images import IMAGE_EXTENSIONS

__all__ = ["ImageRecord", "Problem", "Record", "TextRecord", "read_source"]

logger = logging.getLogger(__name__)

#: A caption longer than this many characters is cut (the encoder sees far fewer tokens anyway).
MAX_TEXT_CHARS = 100_000
_MAX_LINE_BYTES = 10_000_000
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
            caption_file = p.with_suffix(".txt")
            captions: list[str] = []
            origin = ""
            if caption_file.is_file():
                origin = str(caption_file)
                try:
                    raw = caption_file.read_bytes()[: _MAX_LINE_BYTES]
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    text = raw.decode("latin-1")
                    yield Problem(str(caption_file), "not UTF-8; read as Latin-1")
                except OSError as e:
                    yield Problem(str(caption_file), f"cannot read caption file: {e.strerror or e}")
                    text = ""
                captions = _captions(text.splitlines())
            yield ImageRecord(p, tuple(dict.fromkeys(captions)), origin, {})


def _resolve(value: Any, root: Path, allow_outside_root: bool, where: str) -> Path | Problem:
    if not isinstance(value, str) or not value.strip():
        return Problem(where, "empty or non-string 'image' path")
    raw = Path(value.strip()).expanduser()
    p = (raw if raw.is_absolute() else root / raw).resolve()
    if not allow_outside_root and not p.is_relative_to(root):
        return Problem(
            where, f"image path {value!r} is outside {root} (pass --allow-outside-root if intended)"
        )
    return p


def _row(obj: dict[str, Any], root: Path, allow: bool, where: str, origin: str) -> Record | Problem:
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
        f = open(path, "rb")  # noqa: SIM115 - closed below
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
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield Problem(where, "line is not UTF-8")
                continue
            except json.JSONDecodeError as e:
                yield Problem(where, f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            if not isinstance(obj, dict):
                yield Problem(where, "line is not a JSON object")
                continue
            yield _row(obj, root, allow, where, origin)


def _read_csv(path: Path, root: Path, allow: bool, delimiter: str) -> Iterator[Record | Problem]:
    origin = str(path.resolve())
    csv.field_size_limit(_MAX_LINE_BYTES)
    try:
        f = open(path, encoding="utf-8", newline="", errors="strict")  # noqa: SIM115
    except OSError as e:
        raise SourceError(f"cannot read {path}: {e.strerror or e}") from e
    with f:
        try:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = set(reader.fieldnames or [])
            if not columns & {"image", "text"}:
                raise SourceError(
                    f"{path} has columns {sorted(columns)}; a manifest needs an 'image' column "
                    "(with 'caption') or a passage corpus a 'text' column"
                )
            for n, row in enumerate(reader, start=2):
                yield _row(row, root, allow, f"{path}:{n}", origin)
        except UnicodeDecodeError as e:
            raise SourceError(f"{path} is not UTF-8 text: {e}") from e
        except csv.Error as e:
            raise SourceError(f"{path} is not valid CSV: {e}") from e


def _read_coco(path: Path, root: Path, allow: bool) -> Iterator[Record | Problem]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot read {path} as JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(
            f"{path} is not a COCO-style captions file (needs 'images' and 'annotations' lists)"
        )
    origin = str(path.resolve())
    captions: dict[Any, list[str]] = {}
    for ann in data.get("annotations") or []:
        if isinstance(ann, dict) and "image_id" in ann:
            captions.setdefault(ann["image_id"], []).extend(_captions(ann.get("caption")))
    for n, img in enumerate(data["images"]):
        where = f"{path}:images[{n}]"
        if not isinstance(img, dict) or "file_name" not in img:
            yield Problem(where, "image entry has no 'file_name'")
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
