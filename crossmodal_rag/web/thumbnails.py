"""Thumbnails of collection images, cached on disk and in memory under a key of the content.

The key is the image's SHA-256 (or, for items without one, a hash of path, size and mtime_ns), so
a cached thumbnail always shows the contents it was made from. The caller checks that the file is
still the indexed one before asking (see :mod:`.files`); the source bytes are read only on a miss.
Sizes are snapped up to one of :data:`THUMBNAIL_SIZES` (:func:`snap_size`), so an image has at
most that many thumbnails on disk whatever sizes are asked for. The server renders them in its
decode pool (:mod:`.decoding`), through the same allow-listed decoder as uploads.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ..ingestion.images import decode_image
from ..safe_io import atomic_write_bytes

__all__ = ["THUMBNAIL_SIZES", "ThumbnailCache", "content_key", "default_cache_dir", "render_thumbnail", "snap_size",
           "thumbnail_jpeg"]

logger = logging.getLogger(__name__)

#: The thumbnail sizes rendered and cached; a request is served the smallest one >= its size.
THUMBNAIL_SIZES = (64, 128, 256, 512, 1024)


def snap_size(size: int) -> int:
    """The smallest of :data:`THUMBNAIL_SIZES` at least ``size`` (the largest for anything above it)."""
    return next((s for s in THUMBNAIL_SIZES if s >= size), THUMBNAIL_SIZES[-1])


def render_thumbnail(data: bytes, name: str, size: int, max_pixels: int) -> bytes:
    """JPEG bytes of the encoded image ``data`` scaled to fit ``size`` x ``size``."""
    return thumbnail_jpeg(decode_image(data, name, max_pixels=max_pixels).image, size)


def thumbnail_jpeg(img: Image.Image, size: int) -> bytes:
    """JPEG bytes of the decoded ``img`` scaled to fit ``size`` x ``size`` (``img`` is changed)."""
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


class ThumbnailCache:
    """Thumbnails on disk (one JPEG per image and size) and the most recent ones in memory.

    The memory part is bounded both in entries and in bytes (least recently used out first): a
    thumbnail can be asked for at any size up to 1024, so a count alone does not bound memory.
    """

    def __init__(self, folder: Path, max_memory_items: int = 512, max_memory_bytes: int = 32 * 1024 * 1024) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._max = max_memory_items
        self._max_bytes = max_memory_bytes
        self.memory_bytes = 0  # bytes of the thumbnails held in memory
        self._lock = threading.Lock()

    def get(self, content_key: str, name: str, size: int, max_pixels: int,
            load: Callable[[], bytes], render: Callable[[bytes, str, int, int], bytes] | None = None) -> bytes:
        """The thumbnail of the image identified by ``content_key``; ``load`` gives its bytes on a miss
        and ``render`` (default :func:`render_thumbnail`) makes the thumbnail of them.

        Raises:
            ImageDecodeError: the image cannot be decoded (``name`` is used in the message).
        """
        data = self.lookup(content_key, size)
        if data is None:
            data = (render or render_thumbnail)(load(), name, size, max_pixels)
            self.put(content_key, size, data)
        return data

    def lookup(self, content_key: str, size: int) -> bytes | None:
        """The cached thumbnail (memory, then disk), or None."""
        key = f"{content_key}-{size}"
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        try:
            data = (self.folder / f"{key}.jpg").read_bytes()
        except OSError:
            return None
        self._remember(key, data)
        return data

    def put(self, content_key: str, size: int, data: bytes) -> None:
        """Keep a rendered thumbnail (on disk, and in memory)."""
        key = f"{content_key}-{size}"
        path = self.folder / f"{key}.jpg"
        try:
            atomic_write_bytes(path, data, fsync=False)
        except OSError as e:  # a read-only cache folder only costs speed
            logger.warning("cannot write thumbnail cache %s: %s", path, e)
        self._remember(key, data)

    def _remember(self, key: str, data: bytes) -> None:
        if len(data) > self._max_bytes:
            return
        with self._lock:
            old = self._memory.pop(key, None)
            self.memory_bytes -= len(old) if old is not None else 0
            self._memory[key] = data
            self.memory_bytes += len(data)
            while len(self._memory) > self._max or self.memory_bytes > self._max_bytes:
                self.memory_bytes -= len(self._memory.popitem(last=False)[1])


def content_key(sha256: str | None, path: str, size: int | None, mtime_ns: int | None) -> str:
    """Cache key of an image's contents: its SHA-256, else a hash of what identifies the file."""
    if sha256:
        return sha256
    return "f" + hashlib.sha256(f"{path}\0{size}\0{mtime_ns}".encode()).hexdigest()[:40]


def default_cache_dir(collection_folder: Path) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crossmodal-rag" / "thumbnails"
    return cache / hashlib.sha256(str(collection_folder).encode()).hexdigest()[:12]
