"""Score calibration: which cosine scores mean "this matches" in this collection.

From the collection's own captioned images: matching pairs (a caption and its image; a caption
and a sibling caption of the same image) against random pairs (a caption and another image or
another image's caption). The threshold is the score that best separates the two (maximum of
Youden's J = TPR - FPR). Stored in the collection's metadata and refreshed after every ingest;
``--min-score auto`` and ``ask``'s abstention use it.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import QueryError

if TYPE_CHECKING:
    from .collection import Collection

__all__ = ["auto_threshold", "calibrate", "load_calibration"]

logger = logging.getLogger(__name__)
META_KEY = "calibration"
_MIN_PAIRS = 5


def _threshold(pos: np.ndarray, neg: np.ndarray) -> dict[str, Any]:
    cand = np.unique(np.concatenate([pos, neg]))
    tpr = (pos[None, :] >= cand[:, None]).mean(1)
    fpr = (neg[None, :] >= cand[:, None]).mean(1)
    best = int(np.argmax(tpr - fpr))
    return {"threshold": float(cand[best]), "tpr": float(tpr[best]), "fpr": float(fpr[best]),
            "positives": len(pos), "negatives": len(neg), "positive_mean": float(pos.mean()),
            "negative_mean": float(neg.mean())}


def calibrate(collection: Collection, max_pairs: int = 5000, seed: int = 0) -> dict[str, Any]:
    """Compute thresholds from stored vectors (no encoder needed). Keys: ``text-image`` and
    ``text-text`` (each present when the collection has enough captioned images)."""
    store, dim = collection.store, collection.manifest.dim
    rows = store.conn.execute("SELECT id, parent_id FROM items WHERE kind = 'caption'").fetchall()
    result: dict[str, Any] = {"generation": store.generation}
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


def store_calibration(collection: Collection) -> dict[str, Any]:
    calib = calibrate(collection)
    with collection.store.transaction():
        collection.store.set_meta(META_KEY, json.dumps(calib))
    return calib


def load_calibration(collection: Collection) -> dict[str, Any] | None:
    raw = collection.store.get_meta(META_KEY)
    return json.loads(raw) if raw else None


def auto_threshold(collection: Collection, query_is_image: bool, target: str) -> float:
    """The calibrated threshold for a query kind and search target.

    Raises:
        QueryError: the collection has no calibration for that direction.
    """
    calib = load_calibration(collection) or {}
    key = "text-text" if (target == "texts" and not query_is_image) else "text-image"
    if query_is_image and target == "images":
        key = ""  # image-to-image scores have no matching pairs to learn from
    entry = calib.get(key) if key else None
    if entry is None:
        raise QueryError(
            f"--min-score auto: {collection.folder} has no calibration for "
            f"{'image' if query_is_image else 'text'} -> {target} (it needs captioned images, "
            "two or more captions per image for text -> texts); give a number instead, e.g. --min-score 0.25"
        )
    return float(entry["threshold"])
