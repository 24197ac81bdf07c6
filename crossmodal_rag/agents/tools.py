"""What an agent may ask of a collection, protocol-free: search, ask, an item, stats, and (with a
write root) index and remove. The MCP server (:mod:`.mcp_server`) is a thin front end over this.

Everything goes through the running server's :class:`~crossmodal_rag.web.state.AppState` and the
REST API's own checks, so an agent meets the limits a browser meets: strings bounded and
NUL-free, ``k``/``where``/``min_score`` checked (:class:`~crossmodal_rag.web.checks.Checks`),
images sniffed and decoded in the bounded decode pool, answers one at a time behind the bounded
queue. Image paths are read only inside the allowed roots (links resolved first); writes only
under the write root. A refusal raises :class:`ToolRefused`, a message naming the input and the fix.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import quote

from ..errors import CrossmodalError
from ..safe_io import read_regular
from ..search import SearchRequest
from ..web.backend import CollectionBackend
from ..web.checks import Checks
from ..web.inputs import MAX_ID, check_min_score, check_text, check_texts
from ..web.paths import PublicPaths
from ..web.results import hit_out, image_id_of, sharded
from ..web.routes.ask import run_ask
from ..web.routes.items import thumbnail
from ..web.routes.openai import BytesUpload
from ..web.state import AppState
from ..web.thumbnails import snap_size

__all__ = ["MAX_IDS", "AgentSettings", "AgentTools", "ToolRefused", "item_uri"]

logger = logging.getLogger(__name__)

MAX_IDS = 1000  # ids one remove call may name
MAX_PATH_CHARS = 4096  # a path argument


class ToolRefused(CrossmodalError):
    """An agent's request cannot be served; the message names the input and the fix."""


@dataclass(frozen=True)
class AgentSettings:
    """What an agent may touch beyond searching the collection."""

    read_roots: tuple[str, ...] = ()  # folders whose images a search may read by path
    write_root: str | None = None  # --allow-write: index/remove paths under this folder only
    thumbnail_size: int = 256  # get_item's thumbnail side (snapped to 64..1024)

    def __post_init__(self) -> None:
        roots = tuple(os.path.realpath(r) for r in self.read_roots)
        write = os.path.realpath(self.write_root) if self.write_root else None
        for root in (*roots, *([write] if write else [])):
            if not os.path.isdir(root):
                raise ToolRefused(f"allowed root {root} is not a folder; name an existing folder")
        object.__setattr__(self, "read_roots", roots + ((write,) if write and write not in roots else ()))
        object.__setattr__(self, "write_root", write)


def item_uri(item_id: int, shard: str | None = None) -> str:
    """The MCP resource URI of an item (of ``shard``, on a server of several)."""
    return f"xmr://item/{item_id}" if shard is None else f"xmr://shard/{quote(shard, safe='')}/item/{item_id}"


def _inside(path: str, roots: tuple[str, ...], flag: str) -> str:
    """``path`` resolved (links followed) if it lies inside one of ``roots``."""
    check_text(path, "path", MAX_PATH_CHARS)
    if not roots:
        raise ToolRefused(f"reading files by path is off; start the server with {flag} ROOT to allow a folder")
    real = os.path.realpath(os.path.expanduser(path))
    if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
        raise ToolRefused(f"{path} is outside the allowed roots ({', '.join(roots)}); use a path inside them")
    return real


class AgentTools:
    """The tools of one running server (``st``), with ``settings``' roots."""

    def __init__(self, st: AppState, settings: AgentSettings) -> None:
        self.st, self.settings, self.check = st, settings, Checks(st.settings)
        self._write_lock = asyncio.Lock()

    # -- reading -----------------------------------------------------------------------------
    async def image(self, path: str | None, data_base64: str | None) -> Any:
        """A query image from a path inside the allowed roots or from base64, decoded as uploads are."""
        limit = self.st.settings.max_upload_bytes
        if path is not None and data_base64 is not None:
            raise ToolRefused("give image_path or image_base64, not both")
        if path is not None:
            real = _inside(path, self.settings.read_roots, "--allow-read")
            try:
                data = await self.st.work(read_regular, real, max_bytes=limit, what="image")
            except OSError as e:
                raise ToolRefused(f"cannot read image {path}: {e}") from e
            return await self.check.upload(self.st, BytesUpload(os.path.basename(real), data))  # type: ignore[arg-type]
        assert data_base64 is not None
        if len(data_base64) > (limit + 2) // 3 * 4 + 4:
            raise ToolRefused(f"image_base64 holds more than the {limit} byte image limit")
        if data_base64.startswith("data:"):
            data_base64 = data_base64.split(",", 1)[-1]
        try:
            data = base64.b64decode(data_base64, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ToolRefused(f"image_base64 is not valid base64 ({e}); send the file's bytes base64-encoded") from e
        return await self.check.upload(self.st, BytesUpload("image_base64", data))  # type: ignore[arg-type]

    async def search(self, text: str | None = None, image_path: str | None = None,
                     image_base64: str | None = None, target: str = "images", mode: str = "auto", k: int = 10,
                     where: list[str] | None = None, min_score: str | float | None = None) -> dict[str, Any]:
        """Hits for a text or an image query, as ``/api/search`` gives them (URIs for URLs)."""
        where = self.check.where(list(where or []))
        self.check.k(k)
        check_min_score(min_score)
        if text is not None:
            self.check.query(text, "text")
        image = None
        if image_path is not None or image_base64 is not None:
            image = await self.image(image_path, image_base64)
        elif text is None:
            raise ToolRefused("give a text, an image_path or an image_base64 to search for")
        request = SearchRequest(text=text if image is None else None, image=image,
                                plus=(text,) if image is not None and text else (), k=k, target=target,  # type: ignore[arg-type]
                                where=tuple(where), min_score=min_score, mode=mode)  # type: ignore[arg-type]
        result = await self.st.work(self.st.backend.search, request)  # several shards: merged
        return {"mode": result.mode, "mode_reason": result.reason, **sharded(result),
                "results": [_agent_view(hit_out(h, self.st.paths).model_dump()) for h in result.hits]}

    async def ask(self, question: str, mode: str = "concat", k: int = 5, target: str = "texts",
                  where: list[str] | None = None, min_score: str | float | None = None,
                  search_mode: str = "auto") -> dict[str, Any]:
        """An answer with its sources (priors, posteriors), queued as ``/api/ask`` queues it."""
        self.check.query(question, "question")
        where = self.check.where(list(where or []))
        self.check.k(k)
        check_min_score(min_score)
        ticket = self.st.queue.admit()
        try:
            out = await self.st.queue.run(ticket, partial(run_ask, self.st, question, None, k, mode, target, where,
                                                          min_score, ticket, search_mode))
        finally:
            ticket.release()
        d = out.model_dump()
        d["sources"] = [_agent_view(s) for s in d["sources"]]
        return d

    async def item(self, item_id: int, with_thumbnail: bool = True,
                   shard: str | None = None) -> tuple[dict[str, Any], bytes | None]:
        """An item's metadata, captions and OCR text, and the JPEG thumbnail of its image (or None);
        ``shard``: the item's shard, on a server of several (hits name it)."""
        if not 0 <= item_id <= MAX_ID:
            raise ToolRefused(f"item id {item_id} is out of range (0 to 2**63-1)")
        it = await self.st.work(self.st.backend.item, item_id, shard)
        if it is None:
            where = "the collection" if shard is None else f"shard {shard}"
            raise ToolRefused(f"no item {item_id} in {where}; search first to find item ids")
        d = {k: v for k, v in it.to_dict().items() if k not in ("sha256", "ext_id")}
        d["path"] = self.st.paths.path(it.path)
        iid = image_id_of(it.kind, it.id, it.parent_id)
        d["image_id"], d["uri"] = iid, item_uri(it.id, shard)
        if shard is not None:
            d["shard"] = shard
        jpeg = None
        if with_thumbnail and iid is not None:
            try:
                jpeg = await thumbnail(self.st, iid, snap_size(self.settings.thumbnail_size), shard)
            except Exception as e:  # the metadata is still worth having
                d["thumbnail"] = f"unavailable: {getattr(e, 'message', e)}"
        return d, jpeg

    async def stats(self) -> dict[str, Any]:
        c, paths, backend = self.st.collection, self.st.paths, self.st.backend
        m = c.manifest
        counts, missing = await self.st.work(backend.counts)  # several shards: summed
        shards = {"shards": list(backend.shards), "missing_shards": [{"shard": s, "reason": why}
                                                                     for s, why in missing.items()]}
        return {"collection": backend.name if backend.shards else paths.folder(c.folder),
                "encoder": paths.spec(m.encoder), "dim": m.dim,
                "index_type": m.index_type, "counts": counts, "generation": m.generation,
                "updated_at": m.updated_at, "text_model": c.text_model,
                "writable": self.settings.write_root is not None, **(shards if backend.shards else {})}

    # -- writing (--allow-write ROOT) -----------------------------------------------------------
    def _write_root(self) -> str:
        if self.settings.write_root is None:
            raise ToolRefused("this server is read-only; start it with --allow-write ROOT to index or remove")
        if self.st.backend.shards:
            raise ToolRefused("this server searches several shards, read-only; index into one collection "
                              "(crossmodal-rag mcp -c DIR --allow-write ROOT)")
        return self.settings.write_root

    async def index(self, path: str) -> dict[str, Any]:
        """Ingest a folder or file under the write root; later searches see it."""
        real = _inside(path, (self._write_root(),), "--allow-write")
        report = await self._write(lambda c: c.add(real, image_root=self.settings.write_root))
        d = report.to_dict()
        d["source"] = self.st.paths.path(real)
        d["skipped"] = [str(p) for p in report.skipped][:50]
        return d

    async def remove(self, ids: list[int] | None = None, paths: list[str] | None = None) -> dict[str, Any]:
        """Remove items by id, or by source path under the write root."""
        root = self._write_root()
        ids, paths = list(ids or []), list(paths or [])
        if not ids and not paths:
            raise ToolRefused("give ids or paths to remove")
        if len(ids) + len(paths) > MAX_IDS:
            raise ToolRefused(f"at most {MAX_IDS} ids and paths per call; split the removal")
        if any(not 0 <= i <= MAX_ID for i in ids):
            raise ToolRefused("an item id is out of range (0 to 2**63-1)")
        check_texts(paths, "paths", MAX_IDS, MAX_PATH_CHARS)
        real = [_inside(p, (root,), "--allow-write") for p in paths]
        return await self._write(lambda c: c.remove(ids or None, real or None))

    async def _write(self, fn: Any) -> Any:
        """``fn(collection)`` on the collection opened for writing, then the served one reopened."""
        async with self._write_lock:
            return await self.st.work(self._write_sync, fn)

    def _write_sync(self, fn: Any) -> Any:
        from ..collection import Collection

        s = self.st.settings
        with Collection.open(s.collection, model=s.model, writable=True) as c:
            result = fn(c)
        fresh = Collection.open(s.collection, model=s.model, mmap=s.mmap)
        fresh.encoder.load()
        old, self.st.collection = self.st.collection, fresh
        self.st.backend = CollectionBackend(fresh)
        self.st.paths = PublicPaths(fresh, show_paths=s.show_paths)
        old.close()
        logger.info("collection %s changed by an agent; reopened", s.collection)
        return result


def _agent_view(d: dict[str, Any]) -> dict[str, Any]:
    """A hit or source as an agent gets it: the item's resource URI instead of the web URLs."""
    out = {k: v for k, v in d.items() if k not in ("image_url", "thumbnail_url")}
    out["uri"] = item_uri(d["id"], d.get("shard"))
    return out
