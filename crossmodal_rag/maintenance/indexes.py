"""Maintenance of a collection's indexes: rebuild (reindex), re-tune, set search settings, and
find near-duplicate images. Nothing here re-encodes: indexes are rebuilt from the float16
shards (:mod:`crossmodal_rag.store.shards`), and the metadata is never changed.

``reindex`` inspects the shards before it builds (:func:`crossmodal_rag.store.audit.audit_shards`):
a shard file it cannot use (unreadable, of another dimension, not written by this collection)
and ids missing from the shards are rebuilt from the metadata; a stored vector that is not
finite or not of unit norm is refused, naming the items, as only re-embedding can repair it
(``reindex --repair``, :mod:`crossmodal_rag.maintenance.repair`). A refused reindex changes nothing.

Each function works on an open collection's :class:`~crossmodal_rag.store.persist.IndexState`
(the :class:`~crossmodal_rag.collection.Collection` methods of the same names call them) and
persists what it changed. Re-encoding with another model is
:func:`crossmodal_rag.training.clip.reembed_collection`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import faiss

from ..errors import CollectionError, QueryError
from ..store.ann import AUTO, SearchParams, min_training_vectors, parse_memory
from ..store.audit import ShardAudit, audit_shards, name_items
from ..store.build import tune_index
from ..store.layout import INDEX_NAMES
from ..store.metadata import MetadataStore
from ..store.persist import IndexState
from ..store.vectors import VectorIndex, make_faiss_index

__all__ = ["near_duplicates", "refuse_bad_vectors", "reindex", "set_search_params", "tune"]

logger = logging.getLogger(__name__)


def _check_recall(target_recall: float) -> None:
    if not 0.0 < target_recall <= 1.0:
        raise CollectionError(f"target recall must be in (0, 1], got {target_recall}")


def reindex(
    state: IndexState, index_type: str | None = None, *, max_index_memory: int | str | None = None,
    seed: int = 0, tune: bool = True, target_recall: float = 0.95, sharded: bool | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    """Rebuild both indexes from the float16 shards, without re-encoding anything.

    ``index_type``: ``"auto"`` or a FAISS factory string (default: keep the current request);
    ``max_index_memory`` bounds ``auto``. Training samples are drawn from ``seed``; IVF and
    HNSW search settings are tuned to ``target_recall`` (recall@10 against exact search on
    held-out queries) and stored as defaults. ``sharded`` (default: automatic for IVF types
    over 2 GiB of vectors) adds shards separately and merges the inverted lists on disk.
    The shards are compacted (removed items dropped) first. Returns what was built.
    """
    _check_recall(target_recall)
    dim = state.manifest.dim
    budget = parse_memory(max_index_memory) if max_index_memory is not None \
        else state.manifest.max_index_memory
    request = index_type or state.manifest.index_type
    if request != AUTO:
        make_faiss_index(dim, request)
    if request != AUTO:
        probe = VectorIndex(dim, request)
        if sharded and probe.kind != "ivf":
            raise CollectionError(f"--sharded builds IVF index types; {request!r} is not one")
        need = min_training_vectors(probe.index)
        largest = max(len(state.store.ids(n)) for n in INDEX_NAMES)
        if largest < need:
            raise CollectionError(
                f"index type {request!r} needs at least {need:,} vectors to train; the largest "
                f"index of {state.folder} holds {largest:,}. Use --index auto, Flat, HNSW32 or "
                "fewer IVF lists"
            )
    audits = {n: audit_shards(state.store, n, state.shards[n], state.store.ids(n), dim,
                              new_from=state.shards[n].max_id) for n in INDEX_NAMES}
    refuse_bad_vectors(state, audits)
    state.manifest = replace(state.manifest, index_type=request, max_index_memory=budget)
    rebuilt: dict[str, list[dict[str, str]]] = {}
    for name in INDEX_NAMES:
        live = state.store.ids(name)
        audit = audits[name]
        if audit.unusable or len(audit.missing):  # from the metadata: its vectors are sound
            for _, why in audit.unusable:
                logger.warning("%s; rebuilding it from the metadata", why)
            rebuilt[name] = [{"file": s.path, "reason": why} for s, why in audit.unusable]
            state.shards[name].without([s for s, _ in audit.unusable])
            state.shards[name].rewrite(live, lambda ids: state.store.vectors(ids.tolist(), dim),
                                       fsync=state.fsync)
        state.sync_shards(name, live)
        if len(state.shards[name]) != len(live):
            state.shards[name].compact(live, fsync=state.fsync)
        want = state.resolve_type(len(live), name, fresh=True, target_recall=target_recall, seed=seed)
        state.build(name, want, live, seed=seed, tune=tune, target_recall=target_recall,
                    sharded=sharded, workers=workers)
    state.persist()
    state.store.rebuild_keyword_index()  # the keyword index, remade from the items too
    return {n: {"index_type": state.indexes[n].index_type, "count": len(state.indexes[n]),
                "search_params": state.indexes[n].params.to_dict(),
                "build": state.built.get(n), "tuning": state.tuning.get(n),
                **({"shards_rebuilt": rebuilt[n]} if n in rebuilt else {})}
            for n in INDEX_NAMES}


def refuse_bad_vectors(state: IndexState, audits: Mapping[str, ShardAudit]) -> None:
    """Raise :class:`CollectionError` naming the items whose stored vectors no index may be
    built from (not finite or not of unit norm, with no sound copy in the metadata)."""
    parts = []
    for name, audit in audits.items():
        bad = audit.reembed
        if len(bad):
            parts.append(f"{len(bad)} {name} vector(s) not finite or not of unit norm: "
                         f"{name_items(state.store, bad)}")
    if parts:
        raise CollectionError(
            f"cannot rebuild the indexes of {state.folder} from its stored vectors: "
            f"{'; '.join(parts)}. Re-embed those items from their sources with `crossmodal-rag "
            f"reindex --repair {state.folder}` (an item whose source is gone keeps its committed "
            "vector when that one is sound, or is removed and reported); nothing was changed")


def tune(state: IndexState, *, target_recall: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Re-tune the search settings of the approximate indexes (no rebuild); stores and
    returns what was measured per index."""
    _check_recall(target_recall)
    for name, index in state.indexes.items():
        live = state.store.ids(name)
        state.sync_shards(name, live)
        if index.kind not in ("ivf", "hnsw") or not len(live):
            continue
        queries, query_ids = state.tuning_queries(name, live, index, seed)
        index.params = SearchParams(rerank=index.params.rerank)
        state.tuning[name] = tune_index(index, state.shards[name], live, queries, target_recall=target_recall,
                                        query_ids=query_ids).to_dict()
        state.dirty.add(name)
    state.persist()
    return {n: {"index_type": ix.index_type, "search_params": ix.params.to_dict(),
                "tuning": state.tuning.get(n),
                **({"auto": auto} if (auto := (state.built.get(n) or {}).get("auto")) else {})}
            for n, ix in state.indexes.items()}


def set_search_params(state: IndexState, params: SearchParams, index: str | None = None) -> None:
    """Store ``params`` as the default search settings of one index (or both), persisted."""
    for name in [index] if index else list(INDEX_NAMES):
        if name not in state.indexes:
            raise CollectionError(f"unknown index {name!r}; choose image or text")
        state.indexes[name].params = state.indexes[name].params.merged(params)
        state.dirty.add(name)
    state.persist()


def near_duplicates(store: MetadataStore, indexes: Mapping[str, VectorIndex], dim: int,
                    threshold: float = 0.95) -> list[list[int]]:
    """Groups of image ids whose ``dim``-d embeddings have cosine >= ``threshold`` (linked
    transitively), largest groups first. Byte-identical files are already one item."""
    if not -1.0 <= threshold <= 1.0:
        raise QueryError(f"threshold must be between -1 and 1, got {threshold}")
    ids = store.ids("image")
    if len(ids) < 2:
        return []
    parent = {int(i): int(i) for i in ids}

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    index = indexes["image"].index
    if indexes["image"].kind != "flat":  # approximate indexes: compare exactly instead
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        for start in range(0, len(ids), 10_000):
            chunk = ids[start : start + 10_000]
            index.add_with_ids(store.vectors(chunk.tolist(), dim), chunk)
    for start in range(0, len(ids), 1024):
        chunk = ids[start : start + 1024]
        vecs = store.vectors(chunk.tolist(), dim)
        lims, _, found = index.range_search(vecs, float(threshold) - 1e-6)
        for row, item_id in enumerate(chunk):
            for other in found[lims[row] : lims[row + 1]]:
                if int(other) != int(item_id):
                    a, b = find(int(item_id)), find(int(other))
                    if a != b:
                        parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in parent:
        groups.setdefault(find(i), []).append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
