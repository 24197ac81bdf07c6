"""Re-embedding a collection: every stored vector recomputed with another encoder, which then
becomes the collection's encoder (``crossmodal-rag reembed``; ``train clip --collection`` runs it
with the trained encoder). Collection surgery, not training: the new collection is built beside
the old one and swapped in by renaming (see :func:`reembed_collection`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import fingerprint
from .calibration import write_calibration
from .collection import Collection
from .encoders import ClipEncoder, parse_model_spec
from .encoders.spec import ModelSpec
from .errors import CollectionError, ImageDecodeError
from .images import decode_image, read_image_file
from .progress import tqdm
from .store.metadata import MetadataStore

__all__ = ["ReembedReport", "read_rgb", "reembed_collection"]

logger = logging.getLogger(__name__)


def read_rgb(path: Path) -> tuple[Any, str]:
    """(RGB PIL image, sha256 of the file's bytes); raises ImageDecodeError."""
    data = read_image_file(path)  # a regular file only, at most 512 MiB
    return decode_image(data, str(path)).image, hashlib.sha256(data).hexdigest()



@dataclass(frozen=True)
class ReembedReport:
    """What :func:`reembed_collection` did."""

    collection: str
    previous_encoder: str
    encoder: str
    images: int  # image vectors recomputed
    texts: int  # caption, passage and window vectors recomputed
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _image_vectors(coll: Any, encoder: ClipEncoder, ids: np.ndarray, batch_size: int,
                   progress: bool) -> tuple[np.ndarray, list[str]]:

    out = np.zeros((len(ids), encoder.dim), dtype=np.float32)
    problems: list[str] = []
    bar = tqdm(total=len(ids), desc="re-embed images", unit=" img", file=sys.stderr,
               disable=not progress or not len(ids), dynamic_ncols=True)
    for start in range(0, len(ids), batch_size):
        chunk = [int(i) for i in ids[start : start + batch_size]]
        items = coll.get(chunk)
        pixels, rows = [], []
        for row, item in enumerate(items, start=start):
            reasons = []
            for p in coll.store.paths_of(item.id):
                try:
                    image, sha = read_rgb(Path(p))
                except ImageDecodeError as e:
                    reasons.append(f"{p}: {e.reason}")
                    continue
                if item.sha256 and sha != item.sha256:
                    reasons.append(f"{p}: changed since it was indexed")
                    continue
                pixels.append(encoder.preprocess(image))
                rows.append(row)
                break
            else:
                problems.append(f"image item {item.id}: " + ("; ".join(reasons) or "no source path"))
        if pixels:
            out[rows] = encoder.encode_pixels(torch.stack(pixels))
        bar.update(len(chunk))
    bar.close()
    return out, problems


def _text_of(item: Any) -> str:
    if item.kind == "passage" and item.title:
        return f"{item.title}. {item.text}"
    return item.text or ""


def _staging_paths(folder: Path) -> tuple[Path, Path]:
    return folder.parent / f".{folder.name}.reembed", folder.parent / f".{folder.name}.pre-reembed"


def _finish_swap(folder: Path) -> None:
    """Complete a re-embedding whose process died between the two folder renames."""
    staging, backup = _staging_paths(folder)
    if not folder.exists() and (staging / _READY).is_file() and backup.is_dir():
        logger.warning("completing an interrupted re-embedding of %s", folder)
        os.replace(staging, folder)
    if folder.exists() and backup.is_dir():
        shutil.rmtree(backup, ignore_errors=True)


_READY = ".reembed-ready"


def _fresh_manifest(old: Any, spec: str, dim: int) -> Any:
    """``old`` for a new encoder: no index files, shards or tuning (rebuilt on open)."""
    from dataclasses import fields as dc_fields

    names = {f.name for f in dc_fields(old)}
    reset = {k: {} for k in ("files", "embeddings", "index_types", "tuning", "build") if k in names}
    return replace(old, encoder=spec, dim=dim, generation=0, **reset)


def reembed_collection(
    folder: str | Path, model: str | ModelSpec, *, batch_size: int = 32, device: str | None = None,
    progress: bool = True, fsync: str = "full",
) -> ReembedReport:
    """Recompute every vector of the collection in ``folder`` with encoder ``model`` and make it
    the collection's encoder (its manifest names it; searches use it). Item ids stay the same.

    Images are re-read from their source files (a file that is gone or changed since indexing
    makes the call fail before anything is changed: remove the item or restore the file).
    Captions and passages are re-encoded from their stored text. The new collection is built
    beside the old one (a copy of the metadata with the new vectors; its indexes are rebuilt
    from them), then swapped in by renaming, holding the old one's write lock throughout. A
    process that dies before the swap leaves the old collection untouched; one that dies
    between the two renames is completed by the next call.

    Raises:
        CollectionError: the collection cannot be opened for writing, or an image is unreadable.
    """
    started = time.perf_counter()
    folder = Path(folder).expanduser().resolve()
    _finish_swap(folder)
    staging, backup = _staging_paths(folder)
    spec = str(parse_model_spec(model))
    with Collection.open(folder, writable=True, device=device, fsync=fsync) as coll:  # type: ignore[arg-type]
        encoder = ClipEncoder(spec, device=device).load()  # not the process cache: the folder may be new
        previous = coll.manifest
        image_ids = coll.store.ids("image")
        text_ids = coll.store.ids("text")
        image_vecs, problems = _image_vectors(coll, encoder, image_ids, batch_size, progress)
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CollectionError(
                f"cannot re-embed {folder}: {len(problems)} image(s) unreadable, e.g. "
                f"{'; '.join(problems[:5])}{more}. Restore the files, or remove the items "
                "(crossmodal-rag remove --path ...) and run again; nothing was changed"
            )
        text_vecs = np.zeros((len(text_ids), encoder.dim), dtype=np.float32)
        for start in range(0, len(text_ids), 256):
            chunk = [int(i) for i in text_ids[start : start + 256]]
            texts = []
            for item in coll.get(chunk):
                text = _text_of(item)
                texts.append(text if item.kind == "window" else encoder.text_windows(text)[0])
            text_vecs[start : start + len(chunk)] = encoder.encode_texts(texts)
        probe = fingerprint.compute(encoder)

        # Build the new collection beside the old one.
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        coll.store.copy_to(staging)
        store = MetadataStore(staging, fsync=fsync)
        try:
            with store.transaction():
                for ids, vecs in ((image_ids, image_vecs), (text_ids, text_vecs)):
                    store.replace_vectors(ids, vecs)
                fingerprint.write(store, probe)
            write_calibration(store, encoder.dim)  # thresholds of the new vectors, not the old encoder's
        finally:
            store.close()
        _fresh_manifest(previous, spec, encoder.dim).write(staging, fsync=fsync != "off")
        with Collection.open(staging, writable=True, device=device, fsync=fsync) as new:  # type: ignore[arg-type]
            counts = new.counts()  # opening rebuilt the indexes from the new vectors
        if counts != coll.counts():
            raise CollectionError(f"re-embedding {folder}: the new collection holds {counts}, the old "
                                  f"{coll.counts()}; nothing was changed (remove {staging})")
        (staging / _READY).write_text(spec + "\n")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(folder, backup)
        os.replace(staging, folder)
    (folder / _READY).unlink(missing_ok=True)
    shutil.rmtree(backup, ignore_errors=True)
    logger.info("re-embedded %s: %d images, %d texts with %s (was %s)", folder, len(image_ids),
                len(text_ids), spec, previous.encoder)
    return ReembedReport(str(folder), previous.encoder, spec, len(image_ids), len(text_ids),
                         round(time.perf_counter() - started, 3))
