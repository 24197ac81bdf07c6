"""Importing precomputed embeddings: build a collection without running the encoder on images.

Layouts understood (the first matching one wins):

1. clip-retrieval's inference output::

       FOLDER/img_emb/img_emb_0.npy        float16/32 (n, d), L2-normalised image embeddings
       FOLDER/text_emb/text_emb_0.npy      optional caption embeddings, same rows
       FOLDER/metadata/metadata_0.parquet  image_path, caption (+ any other columns)

2. loose shards: ``FOLDER/NAME.npy`` (image embeddings) with ``FOLDER/NAME.parquet`` or
   ``FOLDER/NAME.jsonl`` metadata (``image_path`` or ``path``; optional ``caption``/``text``),
   optionally ``FOLDER/NAME.text.npy`` holding caption embeddings for the same rows.

Rows are matched to metadata by position. Captions without stored embeddings are embedded with
the encoder (texts are cheap). The encoder must be the one that made the embeddings: its
dimension is checked, and ``verify`` images that can be read are re-embedded and compared.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..errors import CollectionError, EncoderMismatchError, ImageDecodeError
from ..maintenance import fingerprint
from ..safe_io import MAX_JSON_BYTES, check_regular, open_regular, read_regular_text
from .image_sniff import SNIFF_BYTES, sniff_image_format
from .images import format_support, load_image
from .runner import IngestReport, Problem

if TYPE_CHECKING:
    from ..collection import Collection

__all__ = ["EmbeddingShard", "find_shards", "import_embeddings", "parse_slice", "slice_bounds"]

logger = logging.getLogger(__name__)

_EXIF_ORIENTATION = 0x0112
_EXIF_FORMATS = {"JPEG", "MPO", "TIFF", "PNG", "WEBP", "HEIF", "AVIF"}
_BATCH = 10_000


@dataclass(frozen=True)
class EmbeddingShard:
    """One shard of precomputed embeddings and its metadata."""

    images: Path  # (n, d) .npy
    metadata: Path | None  # .parquet or .jsonl, n rows
    texts: Path | None = None  # optional (n, d) .npy of caption embeddings


def _index_of(path: Path) -> tuple[int, str]:
    m = re.search(r"(\d+)(?=\D*$)", path.stem)
    return (int(m.group(1)) if m else -1, path.name)


def find_shards(folder: str | Path) -> list[EmbeddingShard]:
    """The embedding shards in ``folder`` (see the module docstring for the layouts)."""
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise CollectionError(f"embedding folder {folder} does not exist")
    if folder.is_file():
        if folder.suffix != ".npy":
            raise CollectionError(f"{folder} is not a .npy embedding file")
        folder, only = folder.parent, folder
    else:
        only = None
    img_dir = folder / "img_emb"
    if only is None and img_dir.is_dir():
        shards = []
        for npy in sorted(img_dir.glob("*.npy"), key=_index_of):
            suffix = npy.stem[len("img_emb"):] if npy.stem.startswith("img_emb") else f"_{_index_of(npy)[0]}"
            meta = next((p for p in (folder / "metadata" / f"metadata{suffix}.parquet",
                                     folder / "metadata" / f"metadata{suffix}.jsonl") if p.is_file()), None)
            text = folder / "text_emb" / f"text_emb{suffix}.npy"
            shards.append(EmbeddingShard(npy, meta, text if text.is_file() else None))
        if shards:
            return shards
    candidates = [only] if only else sorted(
        (p for p in folder.glob("*.npy") if not p.name.endswith(".text.npy")), key=_index_of)
    shards = []
    for npy in candidates:
        stem = npy.name[: -len(".npy")]
        meta = next((p for p in (npy.with_name(f"{stem}.parquet"), npy.with_name(f"{stem}.jsonl"))
                     if p.is_file()), None)
        text = npy.with_name(f"{stem}.text.npy")
        shards.append(EmbeddingShard(npy, meta, text if text.is_file() else None))
    if not shards:
        raise CollectionError(
            f"no embeddings in {folder}: expected img_emb/*.npy + metadata/*.parquet "
            "(clip-retrieval's layout) or NAME.npy files with NAME.parquet/NAME.jsonl metadata"
        )
    return shards


def _read_metadata(path: Path | None, n: int) -> list[dict[str, Any]]:
    if path is None:
        raise CollectionError("embedding shard has no metadata file (image paths are needed)")
    try:
        check_regular(path, what="metadata file")  # a FIFO would block the reader
    except OSError as e:
        raise CollectionError(f"metadata file {path} is unreadable: {e.strerror or e}") from e
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise CollectionError(
                f"reading {path} needs pyarrow: pip install 'crossmodal-rag[distributed]' (or "
                "write the metadata as .jsonl)"
            ) from e
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for damaged files
            raise CollectionError(f"metadata file {path} is unreadable: {e}") from e
    else:
        rows = []
        try:
            lines = read_regular_text(path, max_bytes=MAX_JSON_BYTES, what="metadata file").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CollectionError(f"metadata file {path} is unreadable: {getattr(e, 'reason', None) or e}") from e
        for k, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CollectionError(f"{path}, line {k}: invalid JSON ({e.msg})") from e
            except (ValueError, RecursionError) as e:  # nested too deeply, 5000-digit numbers
                raise CollectionError(f"{path}, line {k}: unusable JSON ({type(e).__name__})") from e
            rows.append(obj if isinstance(obj, dict) else {})
    if len(rows) != n:
        raise CollectionError(f"metadata file {path} has {len(rows)} rows but its embeddings have {n}")
    return rows


def _load_matrix(path: Path, dim: int) -> np.ndarray:
    try:
        check_regular(path, what="embedding file")  # a FIFO would block np.load
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CollectionError(f"embedding file {path} is not a readable .npy array: {e}") from e
    if x.ndim != 2:
        raise CollectionError(f"embedding file {path} holds an array of shape {x.shape}, not (n, d)")
    if x.shape[1] != dim:
        raise EncoderMismatchError(
            f"embeddings in {path} are {x.shape[1]}-d but the encoder makes {dim}-d ones; import "
            "them with the --model that produced them"
        )
    return x


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _image_path(row: dict[str, Any], root: Path, allow_outside_root: bool = True) -> Path | None:
    """The row's image path, resolved against ``root``; None if it has none. Raises ValueError
    for a path outside ``root`` unless allowed (metadata must not point the collection, and
    the web app serving it, at arbitrary files)."""
    value = row.get("image_path") or row.get("path") or row.get("image")
    if not value or not isinstance(value, str):
        return None
    p = Path(value).expanduser()
    resolved = (p if p.is_absolute() else root / p).resolve()
    if not allow_outside_root and not resolved.is_relative_to(root):
        raise ValueError(f"image path {value!r} leaves {root}; pass --allow-outside-root if the "
                         "metadata is trusted")
    return resolved


def _declared_size(row: dict[str, Any]) -> dict[str, Any]:
    """``width``/``height`` from the metadata's own columns, where they are whole numbers > 0."""
    out = {}
    for key in ("width", "height"):
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and value == int(value):
            out[key] = int(value)
    return out if len(out) == 2 else {}


def _image_header(path: Path, row: dict[str, Any]) -> dict[str, Any]:
    """``width``, ``height`` and ``format`` of the image file at ``path``, from its header (the
    pixels are not decoded; EXIF rotation is applied as indexing does); the metadata's own
    ``width``/``height`` when the file cannot be read as an image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_regular(path, what="image file") as f:
                # only an allowed format, opened by its own plugin (as decoding does)
                fmt = sniff_image_format(f.read(SNIFF_BYTES), str(path))
                format_support()  # registers the HEIF/AVIF openers
                with Image.open(f, formats=[fmt]) as im:
                    width, height = im.size
                    fmt = im.format
                    orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if fmt in _EXIF_FORMATS else 1
    except Exception:  # Pillow raises many types for files that are not images
        return _declared_size(row)
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees one way or the other
        width, height = height, width
    return {"width": width, "height": height, "format": fmt}


def _caption(row: dict[str, Any]) -> str | None:
    value = row.get("caption") if row.get("caption") is not None else row.get("text")
    if isinstance(value, str) and value.strip():
        return " ".join(value.split())
    return None


def parse_slice(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``: the I-th of N equal runs of the source's rows (1 <= I <= N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"slice {text!r} is not I/N with 1 <= I <= N (e.g. 2/4: the second quarter of the rows)")
    return int(m.group(1)), int(m.group(2))


def slice_bounds(total: int, part: tuple[int, int] | None) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of slice ``part`` (I, N) of ``total`` rows (None: all): the N slices
    cover every row once, their sizes differ by at most one."""
    if part is None:
        return 0, total
    i, n = part
    return total * (i - 1) // n, total * i // n


def _rows(shards: list[EmbeddingShard], dim: int, lo: int = 0, hi: int | None = None
          ) -> Iterator[tuple[EmbeddingShard, int, np.ndarray, np.ndarray | None, list[dict]]]:
    """Batches of the rows ``[lo, hi)`` counted across the shards in order (files wholly
    outside are not read)."""
    offset = 0
    for shard in shards:
        images = _load_matrix(shard.images, dim)
        first, offset = offset, offset + len(images)
        a, b = max(lo - first, 0), len(images) if hi is None else min(hi - first, len(images))
        if a >= b:
            continue
        texts = _load_matrix(shard.texts, dim) if shard.texts else None
        if texts is not None and len(texts) != len(images):
            raise CollectionError(f"{shard.texts} has {len(texts)} rows, {shard.images} {len(images)}")
        meta = _read_metadata(shard.metadata, len(images))
        for start in range(a, b, _BATCH):
            stop = min(start + _BATCH, b)
            yield (shard, start, images[start:stop], None if texts is None else texts[start:stop],
                   meta[start:stop])


def import_embeddings(
    source: str | Path, collection: str | Path, model: str, *, image_root: str | Path | None = None,
    index_type: str = "auto", max_index_memory: int | str | None = None, verify: int = 3,
    fsync: str = "full", progress: bool = True, allow_outside_root: bool = False,
    slice: tuple[int, int] | None = None,
) -> IngestReport:
    """Add precomputed image (and caption) embeddings from ``source`` to ``collection``.

    Creates the collection for ``model`` if needed. Rows whose image path is already in the
    collection are skipped (re-running an import is safe); rows without an image path are
    skipped with a reason, and so are image paths leaving the source folder (or ``image_root``)
    unless ``allow_outside_root``. A collection this call created is removed again when the
    import is refused or imports nothing. ``slice`` ``(I, N)`` imports only the I-th of N
    contiguous runs of the source's rows (:func:`slice_bounds`): N imports cut one embedding
    folder into N index-shard collections. Returns the same report as an ingest.
    """
    source = Path(source).expanduser()
    shards = find_shards(source)
    root = Path(image_root).expanduser().resolve() if image_root else (
        source if source.is_dir() else source.parent).resolve()
    folder = Path(collection).expanduser()
    was_empty_dir = folder.is_dir() and not any(folder.iterdir())
    created = was_empty_dir or not folder.exists()  # by this call, if it makes a collection there
    report = IngestReport(source=str(source))
    try:
        _import(shards, root, folder, model, report, verify=verify, progress=progress,
                allow_outside_root=allow_outside_root, part=slice,
                open_kwargs={"index_type": index_type, "max_index_memory": max_index_memory, "fsync": fsync})
    except BaseException:
        if created:
            _remove_created(folder, "the import failed", was_empty_dir)
        raise
    if created and not report.images_added:
        _remove_created(folder, "nothing was imported", was_empty_dir)
    return report


def _import(shards: list[EmbeddingShard], root: Path, folder: Path, model: str, report: IngestReport, *,
            verify: int, progress: bool, allow_outside_root: bool, open_kwargs: dict[str, Any],
            part: tuple[int, int] | None = None) -> None:
    from tqdm import tqdm

    from ..collection import Collection
    from ..search.calibration import write_calibration

    t0 = time.perf_counter()
    with Collection.open_or_create(folder, model, **open_kwargs) as coll:
        dim = coll.manifest.dim
        lo, hi = slice_bounds(sum(int(_load_matrix(s.images, dim).shape[0]) for s in shards), part)
        total = hi - lo
        if verify:
            _verify(coll, shards, root, verify, allow_outside_root)
        bar = tqdm(total=total, unit="rows", desc="importing", disable=not progress, leave=False)
        try:
            for shard, start, img, txt, meta in _rows(shards, dim, lo, hi):
                _import_batch(coll, shard, start, _normalise(img), None if txt is None else _normalise(txt),
                              meta, root, report, allow_outside_root)
                bar.update(len(meta))
        finally:
            bar.close()
            if report.images_added:
                write_calibration(coll.store, dim)  # score thresholds follow the collection's contents
                coll.persist()
    report.seconds = time.perf_counter() - t0


def _remove_created(folder: Path, why: str, keep_empty_dir: bool) -> None:
    """Remove the collection that this import created in ``folder`` when it holds no item (an
    interrupted import keeps what it committed); a folder that was there empty stays, empty."""
    from ..collection import Collection
    from ..errors import CrossmodalError
    from ..store.manifest import MANIFEST_NAME

    if not folder.is_dir():
        return
    if (folder / MANIFEST_NAME).is_file():
        try:
            with Collection.open(folder) as coll:
                if any(coll.counts().values()):
                    return
        except CrossmodalError as e:
            logger.warning("left %s as it is: %s", folder, e)
            return
    shutil.rmtree(folder, ignore_errors=True)
    if keep_empty_dir:
        folder.mkdir(exist_ok=True)
    logger.warning("%s: removed the empty collection %s that it had created", why, folder)


def _import_batch(coll: Collection, shard: EmbeddingShard, start: int, img: np.ndarray,
                  txt: np.ndarray | None, meta: list[dict[str, Any]], root: Path,
                  report: IngestReport, allow_outside_root: bool) -> None:
    store = coll.store
    rows: list[tuple[int, Path, os.stat_result | None, dict[str, Any]]] = []
    for k, row in enumerate(meta):
        where = f"{shard.images.name} row {start + k}"
        try:
            path = _image_path(row, root, allow_outside_root)
        except ValueError as e:
            report.skipped.append(Problem(where, str(e)))
            continue
        if path is None:
            report.skipped.append(Problem(where, "no image_path in the metadata"))
            continue
        if store.path_entry(str(path)) is not None:
            report.unchanged += 1
            continue
        try:
            st = path.stat()
        except OSError:
            st = None  # imported all the same: the embedding is what matters for search
        # open_regular (in _image_header) never opens a FIFO or a device: the declared size then
        rows.append((k, path, st, _image_header(path, row) if st is not None else _declared_size(row)))
    # captions without stored embeddings are embedded here
    need_text = [k for k, *_ in rows if txt is None and _caption(meta[k])]
    text_vecs: dict[int, np.ndarray] = {}
    if need_text:
        encoded = coll.encoder.encode_texts([_caption(meta[k]) for k in need_text])
        text_vecs = dict(zip(need_text, encoded, strict=True))
    elif txt is not None:
        text_vecs = {k: txt[k] for k, *_ in rows if _caption(meta[k])}
    added_img: list[tuple[int, np.ndarray]] = []
    added_txt: list[tuple[int, np.ndarray]] = []
    with store.transaction():
        for k, path, st, header in rows:
            extra = {key: value for key, value in meta[k].items()
                     if key not in ("image_path", "path", "image", "caption", "text")
                     and isinstance(value, (str, int, float, bool))}
            item_id = store.insert_item("image", img[k], origin=f"import:{shard.images.name}",
                                        size_bytes=st.st_size if st else None, extra=extra or None,
                                        **header)
            store.set_path(str(path), item_id, st.st_size if st else None, st.st_mtime_ns if st else None)
            added_img.append((item_id, img[k]))
            caption = _caption(meta[k])
            if caption is not None:
                cid = store.insert_item("caption", text_vecs[k], parent_id=item_id, text=caption,
                                        origin=f"import:{shard.images.name}")
                added_txt.append((cid, text_vecs[k]))
    update = {}
    if added_img:
        update["image"] = (np.asarray([i for i, _ in added_img], np.int64), np.stack([v for _, v in added_img]))
    if added_txt:
        update["text"] = (np.asarray([i for i, _ in added_txt], np.int64), np.stack([v for _, v in added_txt]))
    coll.apply(update, [])
    report.images_added += len(added_img)
    report.captions_added += len(added_txt)


def _verify(coll: Collection, shards: list[EmbeddingShard], root: Path, n: int, allow_outside_root: bool) -> None:
    """Re-embed up to ``n`` readable images and compare with their imported embeddings. Reads
    wherever the import may (outside ``root`` too when ``allow_outside_root``)."""
    checked = tried = 0
    for shard in shards:
        images = _load_matrix(shard.images, coll.manifest.dim)
        meta = _read_metadata(shard.metadata, len(images))
        for k, row in enumerate(meta):
            try:
                path = _image_path(row, root, allow_outside_root)
            except ValueError:
                continue  # not imported either
            if path is None:
                continue
            tried += 1
            if not path.is_file():
                continue
            try:
                pil = load_image(path).image
            except ImageDecodeError:
                continue
            mine = coll.encoder.encode_images([pil])[0]
            theirs = _normalise(np.asarray(images[k : k + 1]))[0]
            cosine = fingerprint.rows_cosine(mine[None], theirs[None])
            if cosine < fingerprint.REEMBED_MIN_COSINE:
                raise fingerprint.mismatch_error(
                    coll.manifest.encoder, f"the embedding of {path} in {shard.images}",
                    f"cosine {cosine:.3f}", "The embeddings were made by another model: import with "
                    "the --model that made them (or --verify 0 if the image files changed since)")
            checked += 1
            if checked >= n:
                return
    if checked == 0:
        logger.warning("none of the %d image files the import names could be read, so the embeddings "
                       "were not checked against %s", tried, coll.manifest.encoder)
