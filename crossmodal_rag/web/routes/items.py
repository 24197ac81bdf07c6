"""``/api/items/{id}`` and its ``/image`` and ``/thumbnail``: files are reached by item id (the path
comes from the metadata, never from the request) and served only while they are still the indexed
file (size, and SHA-256 of the contents; see :mod:`..files`). Thumbnail sizes snap up to a few
buckets (:data:`..thumbnails.THUMBNAIL_SIZES`); a miss is rendered in the decode pool."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam
from fastapi.responses import Response, StreamingResponse

from ..backend import MAX_SHARD_CHARS
from ..decoding import DecodeFailed
from ..errors import ApiError
from ..files import FileChanged, IndexedFile, read_checked, stream
from ..inputs import MAX_ID
from ..models import ErrorOut, ItemOut
from ..results import image_id_of, urls
from ..settings import WebSettings
from ..state import AppState, get_state
from ..thumbnails import content_key, snap_size

__all__ = ["router", "thumbnail"]

logger = logging.getLogger(__name__)

MEDIA = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
         "GIF": "image/gif", "BMP": "image/bmp", "TIFF": "image/tiff", "HEIF": "image/heif",
         "AVIF": "image/avif"}  # browsers without HEIF show the thumbnail (always JPEG)


def _item(st: AppState, item_id: int, shard: str | None = None):
    item = st.backend.item(item_id, shard)
    if item is None:
        raise ApiError(404, "not_found", f"no item {item_id} in the collection" if shard is None
                       else f"no item {item_id} in shard {shard}")
    return item


def _changed(item_id: int, reason: str) -> ApiError:
    logger.warning("not serving the file of item %d: %s", item_id, reason)
    return ApiError(404, "gone", f"the file of item {item_id} changed since it was indexed ({reason}); re-index it")


def _image_item(st: AppState, item_id: int, shard: str | None = None) -> tuple[Any, IndexedFile]:
    it = _item(st, item_id, shard)
    if it.kind != "image" or not it.path:
        raise ApiError(404, "not_found", f"item {item_id} is not an image")
    if not Path(it.path).is_file():
        raise ApiError(404, "gone", f"the file of item {item_id} is no longer on disk")
    # Paths are stored resolved; a symlink put there since indexing is not served (it could
    # point anywhere on the machine); the file itself is checked when it is opened.
    if os.path.realpath(it.path) != it.path:
        raise _changed(item_id, "the path now leads through a symlink")
    entry = st.backend.path_entry(it.path, shard)
    size, mtime_ns = (entry[1], entry[2]) if entry else (it.size_bytes, None)
    return it, IndexedFile(it.path, size if size is not None else it.size_bytes, mtime_ns, it.sha256)


def _open_verified(st: AppState, item_id: int, rec: IndexedFile):
    try:
        return st.files.open(rec)
    except FileNotFoundError as e:
        raise ApiError(404, "gone", f"the file of item {item_id} is no longer on disk") from e
    except FileChanged as e:
        raise _changed(item_id, e.reason) from e


def _open_image(st: AppState, item_id: int, shard: str | None = None):
    it, rec = _image_item(st, item_id, shard)
    return it, _open_verified(st, item_id, rec)  # the bytes sent come from the descriptor that was checked


def _thumbnail_source(st: AppState, item_id: int, size: int,
                      shard: str | None = None) -> tuple[str, str, bytes | None, bytes | None]:
    """(cache key, path, the cached thumbnail or None, else the file's bytes) of a checked file."""
    it, rec = _image_item(st, item_id, shard)
    key = content_key(rec.sha256, rec.path, rec.size, rec.mtime_ns)
    with _open_verified(st, item_id, rec) as f:  # checked before any cached thumbnail is served
        cached = st.thumbnails.lookup(key, size)
        if cached is not None:
            return key, it.path, cached, None
        try:
            return key, it.path, None, read_checked(f, rec.path)
        except FileChanged as e:
            raise _changed(item_id, e.reason) from e


async def thumbnail(st: AppState, item_id: int, size: int, shard: str | None = None) -> bytes:
    """The thumbnail, rendered on a miss in the decode pool (allow-listed formats, a deadline)."""
    key, path, cached, source = await st.work(_thumbnail_source, st, item_id, size, shard)
    if cached is not None:
        return cached
    assert source is not None
    try:
        data = await st.decoder.thumbnail(source, path, size=size, max_pixels=st.settings.max_image_pixels * 10)
    except DecodeFailed as e:
        retry = {"Retry-After": str(e.retry_after)} if e.retry_after else None
        status = 503 if e.status == 503 else 422
        raise ApiError(status, e.code, f"item {item_id}: {e.reason}", headers=retry) from e
    await st.work(st.thumbnails.put, key, size, data)
    return data


def router(settings: WebSettings) -> APIRouter:
    r = APIRouter(tags=["items"])
    item_id_param = PathParam(ge=0, le=MAX_ID, description="an item id (0 to 2**63-1)")
    not_found = {404: {"model": ErrorOut}}
    shard_param = Query(None, max_length=MAX_SHARD_CHARS, description="a server of several shards: the item's "
                                                                      "shard (hits name it)")

    @r.get("/api/items/{item_id}", response_model=ItemOut, responses=not_found)
    def item(item_id: int = item_id_param, shard: str | None = shard_param,
             st: AppState = Depends(get_state)) -> ItemOut:
        it = _item(st, item_id, shard)
        d = {**it.to_dict(), "path": st.paths.path(it.path), "shard": shard}
        iid = image_id_of(it.kind, it.id, it.parent_id)
        return ItemOut(**{k: v for k, v in d.items() if k in ItemOut.model_fields}, **urls(iid, shard))

    @r.get("/api/items/{item_id}/image", responses=not_found, response_class=StreamingResponse)
    async def item_image(item_id: int = item_id_param, shard: str | None = shard_param,
                         st: AppState = Depends(get_state)) -> StreamingResponse:
        it, f = await st.work(_open_image, st, item_id, shard)
        return StreamingResponse(stream(f), media_type=MEDIA.get(it.format or "", "application/octet-stream"),
                                 headers={"Content-Length": str(os.fstat(f.fileno()).st_size),
                                          "Cache-Control": "private, max-age=3600"})

    @r.get("/api/items/{item_id}/thumbnail", responses=not_found, response_class=Response)
    async def item_thumbnail(item_id: int = item_id_param,
                             size: int = Query(0, ge=0, le=1024, description="rounded up to 64, 128, 256, 512 or "
                                                                             "1024 (0: the server's default)"),
                             shard: str | None = shard_param, st: AppState = Depends(get_state)) -> Response:
        data = await thumbnail(st, item_id, snap_size(size or st.settings.thumbnail_size), shard)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})

    return r
