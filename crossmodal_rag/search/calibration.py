"""Score calibration: which cosine scores mean "this matches" in this collection.

From the collection's own captioned images: matching pairs (a caption and its image; a caption
and a sibling caption of the same image) against random pairs (a caption and another image or
another image's caption). The threshold is the score that best separates the two (maximum of
Youden's J = TPR - FPR). Stored in the collection's metadata with the generation it describes,
and refreshed by every path that changes vectors (ingest, import, remove, reembed); a stored
calibration older than the collection is never used (see :func:`current_calibration`).
``--min-score auto`` and ``ask``'s abstention use it.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import QueryError

if TYPE_CHECKING:
    from ..store.metadata import MetadataStore

__all__ = ["auto_threshold", "calibrate", "current_calibration", "load_calibration", "write_calibration"]

logger = logging.getLogger(__name__)
META_KEY = "calibration"
_MIN_PAIRS = 5
# calibrations computed on use for stores whose stored one is stale (never written)
_computed: weakref.WeakKeyDictionary[MetadataStore, dict[str, Any]] = weakref.WeakKeyDictionary()


def _threshold(pos: np.ndarray, neg: np.ndarray) -> dict[str, Any]:
    cand = np.unique(np.concatenate([pos, neg]))
    tpr = (pos[None, :] >= cand[:, None]).mean(1)
    fpr = (neg[None, :] >= cand[:, None]).mean(1)
    best = int(np.argmax(tpr - fpr))
    return {"threshold": float(cand[best]), "tpr": float(tpr[best]), "fpr": float(fpr[best]),
            "positives": len(pos), "negatives": len(neg), "positive_mean": float(pos.mean()),
            "negative_mean": float(neg.mean())}


def calibrate(store: MetadataStore, dim: int, max_pairs: int = 5000, seed: int = 0) -> dict[str, Any]:
    """Compute thresholds from the ``dim``-d vectors in ``store`` (no encoder needed). Keys:
    ``generation`` (the metadata generation they describe), ``text-image`` and ``text-text``
    (each present when the collection has enough captioned images). Reads one consistent
    snapshot; stores nothing."""
    with store.snapshot():
        return {"generation": store.generation, **_compute(store, dim, max_pairs, seed)}


def _compute(store: MetadataStore, dim: int, max_pairs: int = 5000, seed: int = 0) -> dict[str, Any]:
    rows = store.caption_parents()
    rows = [r for r in rows if type(r[1]) is int]  # a damaged row's parent (any SQLite type) is left out
    result: dict[str, Any] = {}
    if not rows:
        return result
    rng = np.random.default_rng(seed)
    if len(rows) > max_pairs:
        rows = [rows[i] for i in rng.choice(len(rows), max_pairs, replace=False)]
    cap_ids = np.array([r[0] for r in rows])
    parents = np.array([r[1] for r in rows])
    image_ids = np.unique(parents)
    cap = store.vectors(cap_ids.tolist(), dim)
    img_index = {int(i): n for n, i in enumerate(image_ids)}
    img = store.vectors(image_ids.tolist(), dim)
    own = np.array([img_index[int(p)] for p in parents])
    if len(image_ids) >= 2:
        pos = (cap * img[own]).sum(1)
        other = (own + rng.integers(1, len(image_ids), len(own))) % len(image_ids)
        neg = (cap * img[other]).sum(1)
        if len(pos) >= _MIN_PAIRS:
            result["text-image"] = _threshold(pos, neg)
        # sibling captions (same image) vs captions of other images
        by_parent: dict[int, list[int]] = {}
        for n, p in enumerate(parents):
            by_parent.setdefault(int(p), []).append(n)
        pairs = [(g[i], g[i + 1]) for g in by_parent.values() for i in range(len(g) - 1)]
        if len(pairs) >= _MIN_PAIRS:
            a, b = np.array(pairs).T
            pos_t = (cap[a] * cap[b]).sum(1)
            shuffled = rng.permutation(len(cap))
            diff = parents[shuffled[: len(a)]] != parents[a]
            neg_t = (cap[a][diff] * cap[shuffled[: len(a)]][diff]).sum(1)
            if len(neg_t) >= _MIN_PAIRS:
                result["text-text"] = _threshold(pos_t, neg_t)
    return result


def write_calibration(store: MetadataStore, dim: int) -> dict[str, Any]:
    """Recompute the calibration from the vectors in ``store`` and store it, in one commit.

    The stored ``generation`` is that commit's own number (a transaction bumps the counter by
    one), so any later commit, whatever it changed, makes the calibration stale (see
    :func:`current_calibration`). Every path that changes vectors calls this when it is done.
    """
    with store.transaction():
        calib = {"generation": store.generation + 1, **_compute(store, dim)}
        store.set_meta(META_KEY, json.dumps(calib))
    return calib


def load_calibration(store: MetadataStore) -> dict[str, Any] | None:
    """The calibration stored in ``store`` as it is (possibly stale), or None (also when what is
    stored is damaged: then it is computed again from the vectors, with a warning)."""
    raw = store.get_meta(META_KEY)
    if not raw:
        return None
    try:
        calib = json.loads(raw) if len(raw) <= _MAX_STORED_CHARS else None
    except (ValueError, RecursionError):
        calib = None
    if _well_formed(calib):
        return calib
    logger.warning("the stored calibration of %s is damaged; computing it from the vectors",
                   store.path.parent)
    return None


_MAX_STORED_CHARS = 1 << 16


def _well_formed(calib: Any) -> bool:
    """A dict with an integer generation, whose directions each hold a finite threshold."""
    if not isinstance(calib, dict) or type(calib.get("generation")) is not int:
        return False
    for key in ("text-image", "text-text"):
        entry = calib.get(key)
        if entry is None:
            continue
        value = entry.get("threshold") if isinstance(entry, dict) else None
        if type(value) not in (int, float) or not np.isfinite(value):
            return False
    return True


def current_calibration(store: MetadataStore, dim: int) -> dict[str, Any]:
    """The calibration of the collection whose metadata is ``store`` as it is now.

    The stored one when it is current; otherwise (vectors committed since, e.g. by a process
    killed before it refreshed the calibration, or a collection made by an older version) one
    computed from the ``dim``-d vectors now and kept in memory for this store and generation. It
    is not stored: a search never writes.
    """
    stored = load_calibration(store)
    generation = store.generation
    if stored is not None and stored.get("generation") == generation:
        return stored
    cached = _computed.get(store)
    if cached is not None and cached["generation"] == generation:
        return cached
    logger.info("the stored calibration of %s is stale (generation %s, the collection is at %d); "
                "computing it from the vectors", store.path.parent,
                None if stored is None else stored.get("generation"), generation)
    fresh = calibrate(store, dim)
    _computed[store] = fresh
    return fresh


def auto_threshold(store: MetadataStore, dim: int, query_is_image: bool, target: str) -> float:
    """The calibrated threshold for a query kind and search target.

    Raises:
        QueryError: the collection has no calibration for that direction.
    """
    calib = current_calibration(store, dim)
    key = "text-text" if (target == "texts" and not query_is_image) else "text-image"
    if query_is_image and target == "images":
        key = ""  # image-to-image scores have no matching pairs to learn from
    entry = calib.get(key) if key else None
    if entry is None:
        raise QueryError(
            f"--min-score auto: {store.path.parent} has no calibration for "
            f"{'image' if query_is_image else 'text'} -> {target} (it needs captioned images, "
            "two or more captions per image for text -> texts); give a number instead, e.g. --min-score 0.25"
        )
    return float(entry["threshold"])
