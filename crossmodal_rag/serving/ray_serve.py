"""Index shards served on Ray Serve (``serve --ray [ADDRESS] --shard DIR ... --replicas N``).

One deployment per shard (``shard-NAME``: each replica opens its collection read-only, mmap-able,
and answers :class:`~crossmodal_rag.search.shards.Shard` calls) and one ``router`` deployment
that runs the web app of ``serve`` over the shards (:class:`RouterServer`): it embeds each query
once, fans out to the shards' handles, merges (:class:`~crossmodal_rag.search.shards.ShardSet`)
and answers the same REST API, uploads and answers included, and the OpenAI endpoints::

    HTTP /api/search, /api/search/image, /api/ask, /api/ask/image, /api/items/{id}?shard=,
         /api/stats, /api/health, /v1/models, /v1/embeddings, /v1/chat/completions
      -> router (web app; ShardBackend) -> shard-a | shard-b | shard-c  (replicas each)

A shard that fails twice (Serve sends the retry to another replica when it has one) or answers
after the deadline is left out: 200 with ``"partial": true`` and the shard named in
``missing_shards``, never a 500 (no shard at all: 503 with Retry-After). Serve replaces a dead
replica; ``--replicas N`` scales each shard. The router opens the first shard's folder
read-only for its encoder (every node of the cluster sees the shard folders, as the shard
replicas, placed by Ray, need). Ray and Serve load on first use
(``pip install 'crossmodal-rag[serve-ray]'``)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CrossmodalError
from ..search.request import SearchRequest, SearchResult
from ..search.shards import ShardSet, ShardSettings
from ..store.bm25 import Bm25Stats
from ..store.items import Item
from .local import ShardMismatchError, shard_names

__all__ = ["RaySettings", "RemoteShard", "RouterServer", "ShardServer", "deploy"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RaySettings:
    """How the shards are deployed."""

    address: str | None = None  # Ray cluster ("auto", "ray://HOST:PORT"); None: a local instance
    replicas: int = 1  # replicas of each shard deployment
    shard_cpus: float = 0.5  # CPUs each shard replica reserves
    router_cpus: float = 0.5  # CPUs of the router replica (it embeds the queries)
    host: str = "127.0.0.1"  # the HTTP proxy's address
    port: int = 8000  # ... and port
    mmap: bool = True  # shard replicas memory-map their index files
    deadline_s: float = 10.0  # a shard slower than this is missing from the answer
    app_name: str = "crossmodal-rag"

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")


class ShardServer:
    """A shard replica: one collection, opened read-only."""

    def __init__(self, folder: str, name: str, mmap: bool = True) -> None:
        from ..collection import Collection
        from .local import LocalShard

        self.collection = Collection.open(folder, mmap=mmap)
        self.shard = LocalShard(self.collection, name)

    def info(self) -> dict[str, Any]:
        from ..maintenance import fingerprint

        fp = fingerprint.read(self.collection.store)
        m = self.collection.manifest
        return {"name": self.shard.name, "encoder": m.encoder, "dim": m.dim, "folder": str(self.collection.folder),
                "has_text_space": self.shard.has_text_space, "fingerprint": fp.to_dict() if fp else None}

    def search(self, request: SearchRequest) -> SearchResult:
        return self.shard.search(request)

    def keyword_stats(self, query: str, arithmetic: bool) -> Bm25Stats:
        return self.shard.keyword_stats(query, arithmetic)

    def keyword(self, request: SearchRequest, query: str, arithmetic: bool, routed: bool,
                stats: Bm25Stats | None = None) -> SearchResult:
        return self.shard.keyword(request, query, arithmetic, routed, stats)

    def doc_freqs(self, words: Sequence[str]) -> tuple[dict[str, int], int]:
        return self.shard.doc_freqs(words)

    def get(self, ids: list[int]) -> list[Item]:
        return self.shard.get(ids)

    def path_entry(self, path: str) -> tuple[int, int | None, int | None] | None:
        return self.shard.path_entry(path)

    def counts(self) -> dict[str, int]:
        return self.shard.counts()


class RemoteShard:
    """A shard deployment behind its Serve handle (the :class:`Shard` interface)."""

    def __init__(self, handle: Any, info: dict[str, Any], timeout_s: float) -> None:
        self.handle, self.info, self.timeout_s = handle, info, timeout_s
        self.name, self.has_text_space = info["name"], bool(info["has_text_space"])

    def search(self, request: SearchRequest) -> SearchResult:
        return self.handle.search.remote(request).result(timeout_s=self.timeout_s)

    def keyword_stats(self, query: str, arithmetic: bool) -> Bm25Stats:
        return self.handle.keyword_stats.remote(query, arithmetic).result(timeout_s=self.timeout_s)

    def keyword(self, request: SearchRequest, query: str, arithmetic: bool, routed: bool,
                stats: Bm25Stats | None = None) -> SearchResult:
        return self.handle.keyword.remote(request, query, arithmetic, routed, stats).result(timeout_s=self.timeout_s)

    def doc_freqs(self, words: Sequence[str]) -> tuple[dict[str, int], int]:
        return self.handle.doc_freqs.remote(list(words)).result(timeout_s=self.timeout_s)

    def get(self, ids: list[int]) -> list[Item]:
        return self.handle.get.remote(list(ids)).result(timeout_s=self.timeout_s)

    def path_entry(self, path: str) -> tuple[int, int | None, int | None] | None:
        return self.handle.path_entry.remote(path).result(timeout_s=self.timeout_s)

    def counts(self) -> dict[str, int]:
        return self.handle.counts.remote().result(timeout_s=self.timeout_s)


def _check_infos(infos: list[dict[str, Any]]) -> None:
    """Every shard made with the first one's encoder (fingerprints, else names), or a refusal naming it."""
    from ..maintenance import fingerprint

    first = infos[0]
    fp0 = fingerprint.Fingerprint.from_dict(first["fingerprint"]) if first["fingerprint"] else None
    for info in infos[1:]:
        problem = None
        if info["dim"] != first["dim"]:
            problem = f"{info['dim']}-d vectors, not {first['dim']}-d"
        elif info["fingerprint"] and fp0 is not None:
            problem = fingerprint.mismatch(fp0, fingerprint.Fingerprint.from_dict(info["fingerprint"]))
        elif info["encoder"] != first["encoder"]:
            problem = f"encoder {info['encoder']}"
        if problem:
            raise ShardMismatchError(f"shard {info['name']} ({info['folder']}) was made with another encoder than "
                                     f"shard {first['name']} ({first['encoder']}): {problem}. Leave it out, or "
                                     f"rebuild it with --model {first['encoder']}")


class RouterServer:
    """The router replica: the web app of ``serve`` (:func:`crossmodal_rag.web.create_app`: every
    route, uploads, answers, items and the OpenAI endpoints) over a
    :class:`~crossmodal_rag.web.backend.ShardBackend` of the shards' deployments. At start-up
    (the app's lifespan) it reads the shards' encoder and fingerprints (a
    :class:`ShardMismatchError` naming the odd one) and opens the first shard's folder read-only,
    memory-mapped, for the query side (its encoder embeds each query once; it searches no shard
    itself). Wrapped by ``serve.ingress`` in :func:`deploy` (Ray loads on first use)."""

    def __init__(self, handles: list[Any], web: Any, deadline_s: float = 10.0) -> None:
        self.handles, self.web, self.deadline_s = handles, web, deadline_s

    def __serve_build_asgi_app__(self) -> Any:
        from ..web import create_app

        return create_app(self.web, backend=self._backend)

    def _backend(self) -> Any:
        """The shards behind their handles, as one (runs in a thread: a handle's blocking
        ``.result()`` may not run on the replica's event loop)."""
        from ..collection import Collection
        from ..web.backend import ShardBackend

        infos = [h.info.remote().result(timeout_s=300) for h in self.handles]
        _check_infos(infos)
        main = Collection.open(self.web.collection, model=self.web.model, mmap=True)

        def embed(r: SearchRequest) -> np.ndarray:
            return main.embed_query(r.text, r.image, plus=list(r.plus), minus=list(r.minus))

        remote = [RemoteShard(h, info, self.deadline_s) for h, info in zip(self.handles, infos, strict=True)]
        shards = ShardSet(remote, embed, encoder=infos[0]["encoder"], dim=infos[0]["dim"],
                          settings=ShardSettings(deadline_s=self.deadline_s, retries=1))

        def close() -> None:
            shards.close()
            main.close()

        return ShardBackend(shards, main, close)

    def _state(self) -> Any:
        st = getattr(self.app.state, "web", None)  # type: ignore[attr-defined]  # set by the app's lifespan
        if st is None:
            raise CrossmodalError("the router is still starting; ask again")
        return st

    async def ready(self) -> dict[str, Any]:
        """The shards read and checked, and the encoder (``/api/health`` answers as ``serve``'s)."""
        st = self._state()
        return {"status": "ok", "encoder": st.collection.manifest.encoder, "shards": list(st.backend.shards)}

    def _search(self, request: SearchRequest) -> dict[str, Any]:
        st = self._state()
        t0 = time.perf_counter()
        result = st.backend.search(request)
        return {"query": {"text": request.text, "where": list(request.where)}, "target": request.target,
                "k": request.k, **result.to_dict(), "seconds": time.perf_counter() - t0}

    async def search(self, request: SearchRequest) -> dict[str, Any]:
        """One search, as ``/api/search`` answers it, with absolute paths (the handle's way in,
        for Python callers)."""
        return await asyncio.get_running_loop().run_in_executor(None, self._search, request)


def _deployment_name(name: str) -> str:
    return "shard-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def deploy(folders: Sequence[str | Path], settings: RaySettings | None = None, web: Any = None) -> Any:
    """Deploy ``folders`` (index shards of one encoder) and the router on Ray Serve; returns the
    router's handle (``handle.search.remote(SearchRequest(...)).result()``). ``web``: the router's
    :class:`~crossmodal_rag.web.WebSettings` (generator, limits, hosts; its ``collection`` is
    the first shard). Starts a local Ray instance unless ``settings.address`` names a cluster
    (or Ray is already up)."""
    from dataclasses import replace

    from ..web.settings import WebSettings

    s = settings or RaySettings()
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise CrossmodalError(f"serving on Ray needs Ray Serve: pip install 'crossmodal-rag[serve-ray]' ({e})") from e
    names = shard_names(folders)
    for folder in folders:
        if not (Path(folder) / "manifest.json").is_file():
            raise CrossmodalError(f"shard {folder} is not a collection (no manifest.json): give collection folders")
    if not ray.is_initialized():
        if s.address:
            ray.init(address=s.address, logging_level="ERROR")
        else:
            ray.init(include_dashboard=False, logging_level="ERROR")
    serve.start(http_options={"host": s.host, "port": s.port})
    bound = []
    for folder, name in zip(folders, names, strict=True):
        dep = serve.deployment(ShardServer, name=_deployment_name(name), num_replicas=s.replicas,
                               ray_actor_options={"num_cpus": s.shard_cpus}, max_ongoing_requests=32,
                               health_check_period_s=2, graceful_shutdown_timeout_s=1)
        bound.append(dep.bind(str(Path(folder).expanduser().resolve()), name, s.mmap))
    first = str(Path(folders[0]).expanduser().resolve())
    web = replace(web, collection=first, shards=()) if web is not None else WebSettings(collection=first)
    router = serve.deployment(serve.ingress()(RouterServer), name="router",
                              ray_actor_options={"num_cpus": s.router_cpus}, max_ongoing_requests=64,
                              graceful_shutdown_timeout_s=1)
    handle = serve.run(router.bind(bound, web, s.deadline_s), name=s.app_name, route_prefix="/")
    try:
        handle.ready.remote().result(timeout_s=600)
    except Exception:
        serve.delete(s.app_name)
        raise
    return handle
