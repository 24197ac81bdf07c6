"""The collection's side of ``auto``: which vectors :mod:`.autoselect` measures, and when a
recorded choice still holds.

An index of at least :data:`.autoselect.MEASURE_MIN_VECTORS` vectors under ``--index auto`` is
measured on its own float16 shards: a uniform sample of at most ``sample_max`` vectors plus the
held-out queries (never the whole collection in RAM), with up to half of the queries drawn from
the other modality's vectors (captions query images and the other way round), as users query.
The choice is recorded (the manifest's ``build.<index>.auto``) and kept while the index holds
between half and twice the vectors it was measured at, under the same memory budget; a reindex
measures again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np

from .ann import SearchParams
from .autoselect import AutoSettings, default_index_memory, measure_choice
from .build import sample_vectors
from .shards import EmbeddingShards

__all__ = ["GROWTH", "auto_index_type", "measured_floor", "still_holds"]

logger = logging.getLogger(__name__)

#: A recorded choice holds while the index size stays within this factor of the size measured.
GROWTH = 2.0

#: ``other(count, rng)``: up to ``count`` vectors of the other modality ``(m, D)`` (m may be 0).
OtherQueries = Callable[[int, np.random.Generator], np.ndarray]


def still_holds(record: dict[str, Any] | None, n: int, max_memory: int | None) -> bool:
    """Whether a recorded ``auto`` choice still applies to ``n`` vectors under ``max_memory``."""
    if not record or not record.get("index_type") or not record.get("n"):
        return False
    budget = max_memory or default_index_memory()
    return record.get("budget") == budget and record["n"] / GROWTH <= n <= record["n"] * GROWTH


def auto_index_type(
    shards: EmbeddingShards, live: np.ndarray, *, previous: dict[str, Any] | None = None,
    other: OtherQueries | None = None, max_memory: int | None = None, fresh: bool = False,
    target_recall: float | None = None, seed: int = 0, settings: AutoSettings | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """``(index type, new auto record)`` for the ``live`` ids (sorted) held in ``shards``:
    ``previous``'s type and None while it :func:`still_holds` (and not ``fresh``), else a new
    measurement (:func:`.autoselect.measure_choice`). ``target_recall`` None: the previous
    record's target, else 0.95."""
    n = len(live)
    if not fresh and still_holds(previous, n, max_memory):
        return str(previous["index_type"]), None  # type: ignore[index]
    if target_recall is None:
        target_recall = float((previous or {}).get("target_recall", 0.95))
    s = replace(settings or AutoSettings(), target_recall=target_recall, seed=seed, max_memory=max_memory)
    held = s.tune_queries + s.verify_queries
    rng = np.random.default_rng(seed + 2)
    take = min(n, s.sample_max + held)
    rows = np.arange(n) if take == n else np.sort(rng.choice(n, size=take, replace=False))
    logger.info("auto: reading %d of %d vectors of %s to measure the index families", take, n, shards.name)
    vectors = sample_vectors(shards, live, rows)
    extra = other(held // 2, rng) if other is not None else None
    choice = measure_choice(live[rows], vectors, n, s, extra_queries=extra)
    return choice.index_type, choice.to_dict()


def measured_floor(record: dict[str, Any] | None, index_type: str, params: SearchParams) -> SearchParams:
    """``params`` with the main knob and re-rank depth that ``auto`` accepted on truly held-out
    queries for the same factory string (``index_type``). When the measured index held the
    whole collection (sample + held-out queries = n), the measured setting replaces the built
    index's own leave-one-out tuning: that can be optimistic (a stored vector's graph links and
    list are its own) or, tuned to a confidence bound on fewer queries, wider than needed, while
    the measured one reached the target on two independent held-out sets. Measured on a smaller
    sample (a larger index may need a wider setting), it is a floor only: never narrower than
    ``params``. (A collection grown since the measurement, within :data:`GROWTH`, still takes
    the measured setting.)"""
    rec = record or {}
    whole = bool(rec.get("held")) and int(rec.get("sample", 0)) + int(rec["held"]) >= int(rec.get("n", 0))
    for c in rec.get("candidates", []):
        if c.get("spec") == index_type == c.get("sample_spec") and c.get("param") and c.get("value"):
            if not whole and (getattr(params, c["param"]) or 0) >= int(c["value"]):
                return params
            # the measured setting as a whole: its main knob with the re-rank depth it was
            # measured at (the built index's own tuning may pair another knob with another depth)
            return SearchParams(**{**params.to_dict(), c["param"]: int(c["value"]), "rerank": c.get("rerank")})
    return params
