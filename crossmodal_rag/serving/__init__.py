"""Serving several index shards as one collection: in this process (:mod:`.local`) or on a Ray
Serve cluster (:mod:`.ray_serve`). The merge itself is :mod:`crossmodal_rag.search.shards`."""

from __future__ import annotations

from .local import LocalShard, ShardMismatchError, open_shards, read_shard_list, shard_names

__all__ = ["LocalShard", "ShardMismatchError", "open_shards", "read_shard_list", "shard_names"]
