"""``info`` and ``check`` for a collection's text space (``index --text-model``, see
:mod:`crossmodal_rag.text_space`), and the rules a text space must keep to be used at all.

:func:`text_space_faults` is each reason a text space cannot be used, as opening it
(:func:`crossmodal_rag.text_space.open_text_space`) refuses it and ``check`` reports it: a probe
that is not finite or not of the space's shape (it could not refuse another text model), a
missing or another collection's ``collection_id``, a vector that is not finite or not of unit
norm, duplicate ids, and ids of image items (a text space holds text rows only).
:func:`text_space_summary` reads the manifest and the ids alone (no model, no FAISS), for
``info``; :func:`check_text_space` adds what ``check`` verifies: those rules, the ids equal the
live text item ids, and the text model (when it loads here) reproduces the stored probe -- when
it does not load, the report says the probe was not verified. Both read the metadata inside the
caller's snapshot.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FORMAT", "NORM_TOLERANCE", "array_files", "check_text_space", "member_file", "probe_fault",
           "text_space_faults", "text_space_summary"]

logger = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-3  # |1 - norm| above this is a problem (float32 rows written unit-norm)
FORMAT = 1  # the text space manifest's format this version reads and writes
_MAX_MANIFEST_BYTES = 16 << 20


def array_files(space: Path, manifest: dict[str, Any]) -> tuple[Path, Path]:
    """(ids file, vectors file) the text space ``manifest`` in folder ``space`` names.

    Raises:
        ValueError: the manifest names something other than the space's own array files.
    """
    return space / member_file(manifest, "ids"), space / member_file(manifest, "vectors")


def member_file(manifest: dict[str, Any], key: str) -> str:
    """The array file ``key`` ("vectors"/"ids") the manifest names: a bare file name only."""
    name = manifest.get(key, f"{key}.npy")
    if not isinstance(name, str) or not re.fullmatch(rf"{key}(-[0-9]+)?\.npy", name):
        raise ValueError(f"manifest names {key} file {str(name)[:80]!r}")
    return name


def _read(folder: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray] | None:
    """(manifest, ids, vectors (memory-mapped)) of the text space in ``folder``; None when the
    collection has none. Raises ValueError/OSError/KeyError when the files are damaged."""
    from ..safe_io import read_regular_text

    space = folder / "text_space"
    path = space / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(read_regular_text(path, max_bytes=_MAX_MANIFEST_BYTES))
    if not isinstance(manifest, dict):
        raise ValueError("manifest.json is not an object")
    ids_file, vectors_file = array_files(space, manifest)
    ids = np.load(ids_file, allow_pickle=False)
    vectors = np.load(vectors_file, allow_pickle=False, mmap_mode="r")
    return manifest, ids, vectors


def _step(ids: np.ndarray, live: np.ndarray) -> dict[str, int]:
    return {"missing": len(np.setdiff1d(live, ids)), "extra": len(np.setdiff1d(ids, live))}


def text_space_summary(folder: str | Path, store: Any) -> dict[str, Any] | None:
    """``{"spec", "dim", "count", "in_step", "missing", "extra"}`` for ``info`` (``missing``: live
    text items without a row; ``extra``: rows of removed items), ``{"error": ...}`` when the
    files cannot be read, None without a text space. Reads no model."""
    try:
        read = _read(Path(folder))
        if read is None:
            return None
        manifest, ids, vectors = read
        step = _step(ids, store.ids("text"))
        return {"spec": str(manifest.get("spec")), "dim": int(manifest.get("dim", vectors.shape[-1])),
                "count": len(ids), "in_step": not step["missing"] and not step["extra"], **step}
    except (OSError, ValueError, KeyError, TypeError, OverflowError, EOFError) as e:
        return {"error": f"the text space is damaged ({str(e)[:200]})"}


def probe_fault(probe: Any, dim: int) -> str | None:
    """Why the stored ``probe`` cannot identify a ``dim``-d text model (None: it can)."""
    from ..maintenance.fingerprint import PROBE_TEXTS

    try:
        stored = np.asarray(probe, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        return "its probe is not a table of numbers"
    if stored.shape != (len(PROBE_TEXTS), dim):
        return f"its probe is of shape {stored.shape}, not ({len(PROBE_TEXTS)}, {dim})"
    if not np.isfinite(stored).all():
        return "its probe holds NaN or infinity, so it cannot tell its text model from another"
    norms = np.linalg.norm(stored, axis=1)
    if not (np.abs(norms - 1.0) <= 1e-3).all():
        return "its probe rows are not unit vectors, so it cannot tell its text model from another"
    return None


def text_space_faults(manifest: dict[str, Any], ids: np.ndarray, vectors: np.ndarray, *,
                      collection_id: str, image_ids: np.ndarray, store: Any = None) -> list[str]:
    """Each reason the text space (``manifest``, ``ids`` ``(N,)``, ``vectors`` ``(N, D)``) of a
    collection whose id is ``collection_id`` and whose image items are ``image_ids`` cannot be
    used; empty when it can. ``store`` names the items of bad vectors (ids alone without it)."""
    from ..store.audit import examples, name_items
    from ..store.shards import vector_faults

    faults: list[str] = []
    dim = int(manifest["dim"])
    probe = probe_fault(manifest.get("probe"), dim)
    if probe:
        faults.append(probe)
    owner = manifest.get("collection_id")
    owner = owner if isinstance(owner, str) else ""
    if collection_id and not owner.strip():
        faults.append("it names no collection id (blank or missing), so it cannot be told from "
                      "another collection's")
    elif collection_id and owner != collection_id:
        faults.append(f"it belongs to another collection (id {owner[:40]}, this one is {collection_id}): "
                      "copied from elsewhere")
    duplicates = len(ids) - len(np.unique(ids))
    if duplicates:
        faults.append(f"{duplicates} of its ids are duplicates")
    images = ids[np.isin(ids, image_ids)]
    if len(images):
        faults.append(f"{len(images)} of its ids are image items, not text (e.g. {examples(images)})")
    bad_nonfinite: list[np.ndarray] = []
    bad_norm: list[np.ndarray] = []
    for start in range(0, len(ids), 65536):
        found = vector_faults(ids[start : start + 65536], vectors[start : start + 65536], NORM_TOLERANCE)
        bad_nonfinite.append(found.nonfinite)
        bad_norm.append(found.off_norm)
    def name(x: np.ndarray) -> str:
        return f"(e.g. {examples(x)})" + (f": {name_items(store, x)}" if store is not None else "")

    nonfinite = np.concatenate(bad_nonfinite or [np.zeros(0, np.int64)])
    off_norm = np.concatenate(bad_norm or [np.zeros(0, np.int64)])
    if len(nonfinite):
        faults.append(f"{len(nonfinite)} of its vectors hold NaN or infinity {name(nonfinite)}")
    if len(off_norm):
        faults.append(f"{len(off_norm)} of its vectors are not of unit norm (|1 - norm| > {NORM_TOLERANCE}) "
                      f"{name(off_norm)}")
    return faults


def check_text_space(folder: str | Path, store: Any, *, load_model: bool = True) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` about the text space of the collection in ``folder`` (none: both
    empty). ``load_model``: try the text model to verify the probe. Call inside the caller's
    metadata snapshot, so the ids it compares are those of the rest of the check."""
    folder = Path(folder)
    fix = f"`crossmodal-rag reindex {folder}` rebuilds it"
    try:
        read = _read(folder)
        if read is None:
            return [], []
        manifest, ids, vectors = read
        if manifest.get("format") != FORMAT or not isinstance(manifest.get("spec"), str):
            raise ValueError(f"format {str(manifest.get('format'))[:40]!r} (this version reads {FORMAT}) "
                             f"and spec {str(manifest.get('spec'))[:80]!r} (text)")
        dim, count, spec = int(manifest["dim"]), int(manifest["count"]), str(manifest["spec"])
    except (OSError, ValueError, KeyError, TypeError, OverflowError, EOFError) as e:
        return [f"text space: damaged ({str(e)[:200]}); {fix}"], []
    problems: list[str] = []
    notes: list[str] = []
    if ids.shape != (count,) or vectors.shape != (count, dim) or ids.dtype != np.int64:
        return [f"text space: ids {ids.shape} and vectors {vectors.shape} do not match the manifest's "
                f"count {count} and dim {dim}; {fix}"], []
    from ..store.audit import examples
    from ..store.binding import COLLECTION_ID_KEY

    ours = str(store.get_meta(COLLECTION_ID_KEY) or "")
    for fault in text_space_faults(manifest, ids, vectors, collection_id=ours,
                                   image_ids=store.ids("image"), store=store):
        problems.append(f"text space: {fault}; {fix}")
    live = store.ids("text")
    extra, missing = np.setdiff1d(ids, live), np.setdiff1d(live, ids)
    if len(extra) or len(missing):
        problems.append(
            f"text space ({count} rows) is out of step with the metadata ({len(live)} text items): "
            f"{len(extra)} row(s) of items no longer there" + (f" (e.g. {examples(extra)})" if len(extra) else "")
            + f", {len(missing)} text item(s) without a row" + (f" (e.g. {examples(missing)})" if len(missing) else "")
            + f"; run `crossmodal-rag reindex {folder}`")
    notes.append(f"text space: compared all {count} ids with the metadata and checked all {count} "
                 f"vectors ({spec}, {dim}-d)")
    if probe_fault(manifest.get("probe"), dim) is None:
        problems_probe, note_probe = _check_probe(
            folder, spec, manifest.get("probe"), load_model,
            f"rebuild it with `crossmodal-rag reembed {folder} --text-model SPEC`")
        problems.extend(problems_probe)
        notes.append(note_probe)
    return problems, notes


def _check_probe(folder: Path, spec: str, probe: Any, load_model: bool, fix: str) -> tuple[list[str], str]:
    if not load_model:
        return [], f"text space: the text model {spec} was not loaded; its probe was not verified"
    from ..encoders.sentence import load_text_encoder, text_probe
    from ..maintenance.fingerprint import MIN_COSINE, rows_cosine

    try:
        stored = np.asarray(probe, np.float32)
        encoder = load_text_encoder(spec)
        assert encoder is not None
        cosine = rows_cosine(stored, text_probe(encoder))
    except Exception as e:  # any failure to load means "not verified", said so
        logger.debug("text model %s did not load for check: %s", spec, e)
        return [], (f"text space: the text model {spec} could not be loaded here "
                    f"({type(e).__name__}: {str(e)[:160]}); its probe was not verified")
    if not cosine >= MIN_COSINE:  # NaN: not reproduced
        return [f"text space: the text model {spec} does not reproduce the stored probe (cosine "
                f"{cosine:.3f}); {fix}"], f"text space: probe checked against {spec}"
    return [], f"text space: the text model {spec} reproduces the stored probe (cosine {cosine:.4f})"
