"""Thumbnails of collection images, cached on disk by content hash (never stale) and in memory."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from ..images import load_image
from ..store.manifest import atomic_write_bytes

logger = logging.getLogger(__name__)


class ThumbnailCache:
    def __init__(self, folder: Path, max_memory_items: int = 512) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[str, bytes] = OrderedDict()
        self._max = max_memory_items
        self._lock = threading.Lock()

    def get(self, image_path: str, sha256: str, size: int, max_pixels: int) -> bytes:
        """JPEG bytes of the image at ``image_path`` scaled to fit ``size`` x ``size``."""
        key = f"{sha256}-{size}"
        with self._lock:
            if key in self._memory:
                self._memory.move_to_end(key)
                return self._memory[key]
        path = self.folder / f"{key}.jpg"
        try:
            data = path.read_bytes()
        except OSError:
            img = load_image(image_path, max_pixels=max_pixels).image
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            data = buf.getvalue()
            try:
                atomic_write_bytes(path, data, fsync=False)
            except OSError as e:  # a read-only cache folder only costs speed
                logger.warning("cannot write thumbnail cache %s: %s", path, e)
        with self._lock:
            self._memory[key] = data
            if len(self._memory) > self._max:
                self._memory.popitem(last=False)
        return data


def default_cache_dir(collection_folder: Path) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crossmodal-rag" / "thumbnails"
    return cache / hashlib.sha256(str(collection_folder).encode()).hexdigest()[:12]
