"""What the web app, its OpenAI front end and the MCP tools search and read: one collection
(:class:`CollectionBackend`) or several index shards searched as one (:class:`ShardBackend`: the
shards opened in this process by ``serve -c A -c B``, or their Ray Serve deployments behind the
router of ``serve --ray``). The routes call the backend and never ask which it is::

    route --> backend.search(request) --> Collection.search | ShardSet.search (merged; partial)
          --> backend.item(id, shard), backend.path_entry(path, shard) --> the item's collection
    RAG   --> RagPipeline(backend.main, knowledge=backend.knowledge)

``main`` is the collection that embeds queries and whose encoder ``/v1/embeddings`` serves
(with shards: the first one, opened read-only). An item of a shard is named by the shard and
its id (``/api/items/{id}?shard=NAME``; hits and sources carry ``shard``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from .errors import ApiError

if TYPE_CHECKING:
    from ..collection import Collection
    from ..search.request import SearchRequest, SearchResult
    from ..search.shards import ShardSet
    from ..store.items import Item

__all__ = ["Backend", "CollectionBackend", "ShardBackend", "open_backend"]

MAX_SHARD_CHARS = 200  # a shard name in a request


class Backend(Protocol):
    """One collection, or several searched as one, as the web app reads them."""

    name: str  # what the API calls it (a collection's folder name; shards' names joined by '+')
    main: Collection  # embeds queries (its encoder is the served one)
    knowledge: ShardSet | None  # what answers retrieve from (None: ``main``)
    shards: tuple[str, ...]  # the shards' names (empty for one collection)

    def search(self, request: SearchRequest) -> SearchResult: ...

    def item(self, item_id: int, shard: str | None) -> Item | None: ...

    def path_entry(self, path: str, shard: str | None) -> tuple[int, int | None, int | None] | None: ...

    def counts(self) -> tuple[dict[str, int], dict[str, str]]: ...

    def close(self) -> None: ...


class CollectionBackend:
    """One open collection."""

    knowledge = None
    shards: tuple[str, ...] = ()

    def __init__(self, collection: Collection) -> None:
        self.main, self.name = collection, collection.folder.name

    def search(self, request: SearchRequest) -> SearchResult:
        return self.main.search(request)

    def item(self, item_id: int, shard: str | None) -> Item | None:
        _no_shard(shard)
        found = self.main.get(item_id)
        return found[0] if found else None

    def path_entry(self, path: str, shard: str | None) -> tuple[int, int | None, int | None] | None:
        return self.main.store.path_entry(path)

    def counts(self) -> tuple[dict[str, int], dict[str, str]]:
        """(items by kind, shards missing: none)."""
        return self.main.counts(), {}

    def close(self) -> None:
        self.main.close()


def _no_shard(shard: str | None) -> None:
    if shard is not None:
        raise ApiError(422, "bad_shard", "this server holds one collection, not shards: leave shard out")


class ShardBackend:
    """Several shards as one: ``shards`` searched and merged, ``main`` embeds the queries;
    ``close`` closes what was opened for it."""

    def __init__(self, shards: ShardSet, main: Collection, close: Callable[[], None]) -> None:
        self.knowledge, self.main, self._close = shards, main, close
        self.shards = tuple(s.name for s in shards.shards)
        self.name = "+".join(self.shards)

    def search(self, request: SearchRequest) -> SearchResult:
        return self.knowledge.search(request)

    def _shard(self, name: str | None) -> Any:
        shown = ", ".join(self.shards)
        if name is None:
            raise ApiError(422, "shard_required", f"this server searches {len(self.shards)} shards whose item ids "
                                                  f"overlap: name the item's shard (shard=NAME, one of {shown}; "
                                                  "hits carry it)")
        if len(name) > MAX_SHARD_CHARS or "\x00" in name:
            raise ApiError(422, "bad_shard", f"shard names are at most {MAX_SHARD_CHARS} characters, without NUL")
        for shard in self.knowledge.shards:
            if shard.name == name:
                return shard
        raise ApiError(404, "not_found", f"no shard {name[:60]!r} here; the shards are {shown}")

    def _ask(self, name: str | None, call: Callable[[Any], Any]) -> Any:
        shard = self._shard(name)
        try:
            return call(shard)
        except ApiError:
            raise
        except Exception as e:  # a replica down or late: the client may try again
            raise ApiError(503, "shard_unavailable", f"shard {name} did not answer ({type(e).__name__}: {e}); "
                                                     "try again", headers={"Retry-After": "5"}) from e

    def item(self, item_id: int, shard: str | None) -> Item | None:
        found = self._ask(shard, lambda s: s.get([item_id]))
        return found[0] if found else None

    def path_entry(self, path: str, shard: str | None) -> tuple[int, int | None, int | None] | None:
        return self._ask(shard, lambda s: s.path_entry(path))

    def counts(self) -> tuple[dict[str, int], dict[str, str]]:
        """(items by kind summed over the shards that answer, the shards missing and why)."""
        answers, missing = self.knowledge.each(lambda s: s.counts())
        total: dict[str, int] = {}
        for _, counts in answers:
            for kind, n in counts.items():
                total[kind] = total.get(kind, 0) + n
        return total, missing

    def close(self) -> None:
        self._close()


def open_backend(collection: str, shards: tuple[str, ...], *, model: str | None, mmap: bool) -> Backend:
    """``collection`` alone, or with ``shards`` (more collection folders) searched as one."""
    from ..collection import Collection

    if not shards:
        return CollectionBackend(Collection.open(collection, model=model, mmap=mmap))
    from ..serving.local import open_shards

    opened = open_shards([collection, *shards], model=model, mmap=mmap)
    return ShardBackend(opened, opened.first, opened.close)
