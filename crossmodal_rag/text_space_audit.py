"""``info`` and ``check`` for a collection's text space (``index --text-model``, see
:mod:`crossmodal_rag.text_space`).

:func:`text_space_summary` reads the manifest and the ids alone (no model, no FAISS), for
``info``; :func:`check_text_space` adds what ``check`` verifies: the ids equal the live text item
ids, every vector is finite and of unit norm, and the text model (when it loads here) reproduces
the stored probe -- when it does not load, the report says the probe was not verified.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["NORM_TOLERANCE", "array_files", "check_text_space", "member_file", "text_space_summary"]

logger = logging.getLogger(__name__)

NORM_TOLERANCE = 1e-3  # |1 - norm| above this is a problem (float32 rows written unit-norm)
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
    from .safe_io import read_regular_text

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
    except (OSError, ValueError, KeyError, TypeError) as e:
        return {"error": f"the text space is damaged ({str(e)[:200]})"}


def check_text_space(folder: str | Path, store: Any, *, load_model: bool = True) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` about the text space of the collection in ``folder`` (none: both
    empty). ``load_model``: try the text model to verify the probe."""
    folder = Path(folder)
    fix = f"rebuild it with `crossmodal-rag reembed {folder} --text-model SPEC`"
    try:
        read = _read(folder)
        if read is None:
            return [], []
        manifest, ids, vectors = read
        dim, count, spec = int(manifest["dim"]), int(manifest["count"]), str(manifest["spec"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"text space: damaged ({str(e)[:200]}); {fix}"], []
    problems: list[str] = []
    notes: list[str] = []
    if ids.shape != (count,) or vectors.shape != (count, dim) or ids.dtype != np.int64:
        return [f"text space: ids {ids.shape} and vectors {vectors.shape} do not match the manifest's "
                f"count {count} and dim {dim}; {fix}"], []
    from .store.audit import examples
    from .store.binding import COLLECTION_ID_KEY

    owner, ours = str(manifest.get("collection_id") or ""), str(store.get_meta(COLLECTION_ID_KEY) or "")
    if owner and ours and owner != ours:
        problems.append(f"text space: written for another collection (id {owner}, this one is {ours}): "
                        f"copied from elsewhere; {fix}")
    live = store.ids("text")
    extra, missing = np.setdiff1d(ids, live), np.setdiff1d(live, ids)
    if len(extra) or len(missing) or len(np.unique(ids)) != len(ids):
        problems.append(
            f"text space ({count} rows) is out of step with the metadata ({len(live)} text items): "
            f"{len(extra)} row(s) of items no longer there" + (f" (e.g. {examples(extra)})" if len(extra) else "")
            + f", {len(missing)} text item(s) without a row" + (f" (e.g. {examples(missing)})" if len(missing) else "")
            + (f", {len(ids) - len(np.unique(ids))} duplicate id(s)" if len(np.unique(ids)) != len(ids) else "")
            + f"; run `crossmodal-rag reindex {folder}`")
    bad_norm: list[int] = []
    nonfinite: list[int] = []
    for start in range(0, count, 65536):
        chunk = np.asarray(vectors[start:start + 65536], np.float64)
        finite = np.isfinite(chunk).all(1)
        nonfinite.extend(ids[start:start + 65536][~finite].tolist())
        norms = np.linalg.norm(np.where(np.isfinite(chunk), chunk, 0.0), axis=1)
        bad_norm.extend(ids[start:start + 65536][finite & (np.abs(norms - 1.0) > NORM_TOLERANCE)].tolist())
    if nonfinite:
        problems.append(f"text space: {len(nonfinite)} vector(s) hold NaN or infinity "
                        f"(e.g. {examples(np.array(nonfinite))}); {fix}")
    if bad_norm:
        problems.append(f"text space: {len(bad_norm)} vector(s) are not of unit norm "
                        f"(e.g. {examples(np.array(bad_norm))}); {fix}")
    notes.append(f"text space: compared all {count} ids with the metadata and checked all {count} "
                 f"vectors ({spec}, {dim}-d)")
    problems_probe, note_probe = _check_probe(folder, spec, manifest.get("probe"), load_model, fix)
    problems.extend(problems_probe)
    notes.append(note_probe)
    return problems, notes


def _check_probe(folder: Path, spec: str, probe: Any, load_model: bool, fix: str) -> tuple[list[str], str]:
    if not load_model:
        return [], f"text space: the text model {spec} was not loaded; its probe was not verified"
    from .encoders.sentence import load_text_encoder, text_probe
    from .fingerprint import MIN_COSINE, rows_cosine

    try:
        stored = np.asarray(probe, np.float32)
        encoder = load_text_encoder(spec)
        assert encoder is not None
        cosine = rows_cosine(stored, text_probe(encoder))
    except Exception as e:  # any failure to load means "not verified", said so
        logger.debug("text model %s did not load for check: %s", spec, e)
        return [], (f"text space: the text model {spec} could not be loaded here "
                    f"({type(e).__name__}: {str(e)[:160]}); its probe was not verified")
    if cosine < MIN_COSINE:
        return [f"text space: the text model {spec} does not reproduce the stored probe (cosine "
                f"{cosine:.3f}); {fix}"], f"text space: probe checked against {spec}"
    return [], f"text space: the text model {spec} reproduces the stored probe (cosine {cosine:.4f})"
