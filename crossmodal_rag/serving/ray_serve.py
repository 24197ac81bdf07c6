"""Index shards served on Ray Serve (``serve --ray [ADDRESS] --shard DIR ... --replicas N``).

One deployment per shard (``shard-NAME``: each replica opens its collection read-only, mmap-able,
and answers :class:`~crossmodal_rag.search.shards.Shard` calls) and one ``router`` deployment
that embeds each query once, fans out to the shards' handles, merges
(:class:`~crossmodal_rag.search.shards.ShardSet`) and answers the REST API's search::

    HTTP GET /api/search?q=...&k=&target=&mode=&where=&min_score=  (as `serve`, plus partial,
      shards, missing_shards)  -> router -> shard-a | shard-b | shard-c  (replicas each)
    GET /api/health -> the shards and the encoder

A shard that fails twice (Serve sends the retry to another replica when it has one) or answers
after the deadline is left out: 200 with ``"partial": true`` and the shard named in
``missing_shards``, never a 500. Serve replaces a dead replica; ``--replicas N`` scales each shard.
Ray and Serve load on first use (``pip install 'crossmodal-rag[serve-ray]'``)."""

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

from ..errors import CrossmodalError, QueryError
from ..search.request import SearchRequest, SearchResult
from ..search.shards import ShardSet, ShardSettings, ShardsUnavailableError
from ..store.bm25 import Bm25Stats
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
    """The router replica: embeds once, fans out, merges, answers ``/api/search`` and ``/api/health``.
    It reads the shards' encoder and fingerprints on its first call (:meth:`ready`; a handle's
    blocking ``.result()`` may not run on the replica's event loop, so it runs in a thread)."""

    def __init__(self, handles: list[Any], deadline_s: float = 10.0) -> None:
        self.handles, self.deadline_s = handles, deadline_s
        self.shards: ShardSet | None = None
        self.infos: list[dict[str, Any]] = []
        self._lock = asyncio.Lock()

    def _setup(self) -> None:
        from ..encoders import load_encoder
        from ..search.query import embed_query

        infos = [h.info.remote().result(timeout_s=300) for h in self.handles]
        _check_infos(infos)
        encoder = load_encoder(infos[0]["encoder"])

        def embed(r: SearchRequest) -> np.ndarray:
            return embed_query(lambda: encoder, r.text, r.image, plus=list(r.plus), minus=list(r.minus))

        shards = [RemoteShard(h, info, self.deadline_s) for h, info in zip(self.handles, infos, strict=True)]
        self.shards = ShardSet(shards, embed, encoder=infos[0]["encoder"], dim=infos[0]["dim"],
                               settings=ShardSettings(deadline_s=self.deadline_s, retries=1))
        self.infos = infos

    async def ready(self) -> dict[str, Any]:
        """The shards read and checked (a :class:`ShardMismatchError` naming the odd one), and the encoder."""
        async with self._lock:
            if self.shards is None:
                await asyncio.get_running_loop().run_in_executor(None, self._setup)
        return {"status": "ok", "encoder": self.infos[0]["encoder"], "shards": [i["name"] for i in self.infos]}

    def _search(self, request: SearchRequest) -> dict[str, Any]:
        assert self.shards is not None
        t0 = time.perf_counter()
        result = self.shards.search(request)
        return {"query": {"text": request.text, "where": list(request.where)}, "target": request.target,
                "k": request.k, **result.to_dict(), "seconds": time.perf_counter() - t0}

    async def search(self, request: SearchRequest) -> dict[str, Any]:
        """One search, as the REST API answers it (the handle's way in, for Python callers)."""
        await self.ready()
        return await asyncio.get_running_loop().run_in_executor(None, self._search, request)

    async def __call__(self, http: Any) -> Any:
        from starlette.responses import JSONResponse

        path = http.url.path.rstrip("/")
        if path.endswith("/api/health"):
            return JSONResponse(await self.ready())
        if not path.endswith("/api/search"):
            return JSONResponse({"error": "not_found", "detail": "this router answers /api/search and /api/health"},
                                status_code=404)
        p = http.query_params
        try:
            if not p.get("q", "").strip():
                raise QueryError("give a text query: /api/search?q=...")
            request = SearchRequest(text=p["q"], k=int(p.get("k", "10")), target=p.get("target", "images"),  # type: ignore[arg-type]
                                    mode=p.get("mode", "auto"), where=tuple(p.getlist("where")),  # type: ignore[arg-type]
                                    min_score=p.get("min_score"))
            return JSONResponse(await self.search(request))
        except (QueryError, ValueError) as e:
            return JSONResponse({"error": "bad_query", "detail": str(e)}, status_code=422)
        except ShardsUnavailableError as e:
            return JSONResponse({"error": "shards_unavailable", "detail": str(e)}, status_code=503,
                                headers={"Retry-After": "5"})


def _deployment_name(name: str) -> str:
    return "shard-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def deploy(folders: Sequence[str | Path], settings: RaySettings | None = None) -> Any:
    """Deploy ``folders`` (index shards of one encoder) and the router on Ray Serve; returns the
    router's handle (``handle.search.remote(SearchRequest(...)).result()``). Starts a local Ray
    instance unless ``settings.address`` names a cluster (or Ray is already up)."""
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
    router = serve.deployment(RouterServer, name="router", ray_actor_options={"num_cpus": s.router_cpus},
                              max_ongoing_requests=64, graceful_shutdown_timeout_s=1)
    handle = serve.run(router.bind(bound, s.deadline_s), name=s.app_name, route_prefix="/")
    try:
        handle.ready.remote().result(timeout_s=600)
    except Exception:
        serve.delete(s.app_name)
        raise
    return handle
