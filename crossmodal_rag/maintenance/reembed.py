"""Re-embedding a collection: every stored vector recomputed with another encoder, which then
becomes the collection's encoder (``crossmodal-rag reembed``; ``train clip --collection`` runs it
with the trained encoder). Collection surgery, not training: the new collection is built beside
the old one and swapped in by renaming (see :func:`reembed_collection`).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..collection import Collection
from ..encoders import ClipEncoder, parse_model_spec
from ..encoders.spec import ModelSpec
from ..errors import CollectionError
from ..search.calibration import write_calibration
from ..store.metadata import MetadataStore
from . import fingerprint
from .reembed_items import image_vectors, read_rgb, text_vectors

__all__ = ["ReembedReport", "image_vectors", "read_rgb", "reembed_collection", "text_vectors"]

logger = logging.getLogger(__name__)


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
        image_vecs, failures = image_vectors(coll, encoder, image_ids, batch_size, progress)
        problems = [f"image item {i}: {why}" for i, why in failures.items()]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CollectionError(
                f"cannot re-embed {folder}: {len(problems)} image(s) unreadable, e.g. "
                f"{'; '.join(problems[:5])}{more}. Restore the files, or remove the items "
                "(crossmodal-rag remove --path ...) and run again; nothing was changed"
            )
        text_vecs = text_vectors(coll, encoder, text_ids)
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
