"""What the REST API tells a client about where things live on the server.

By default no absolute server path leaves it: an item's file is given relative to the collection's
source root (the deepest folder holding every indexed file, e.g. ``space/astronaut.jpg``), the
collection by its folder's name and a model spec that names a local folder or file by that
folder's or file's name (``open_clip:local-dir:clip-b32``). The files themselves are reached by
id (``/api/items/{id}/image``). ``serve --show-paths`` (``WebSettings.show_paths``) gives the
absolute paths instead.
"""

from __future__ import annotations

import os
import posixpath
import threading
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..collection import Collection

__all__ = ["PublicPaths", "public_spec", "source_root"]


def source_root(collection: Collection) -> str | None:
    """The deepest folder that holds every file of ``collection`` (None: it holds no files).

    The lexicographically first and last stored paths share every folder all the paths share,
    so two index lookups give it, whatever the collection's size."""
    first, last = collection.store.path_range()  # under the store's lock (shared by threads)
    if first is None:
        return None
    return os.path.commonpath([os.path.dirname(first), os.path.dirname(last)])


def public_spec(spec: str) -> str:
    """A model spec with the folders of a local path left out: ``hf:/srv/models/clip`` ->
    ``hf:clip``, ``/srv/models/t5`` -> ``t5``; hub names are unchanged."""
    head, colon, tail = spec.rpartition(":")
    if tail.startswith("~") or os.path.isabs(tail):
        return f"{head}{colon}{PurePath(tail).name}"
    return spec


class PublicPaths:
    """Paths and specs as a response shows them: relative (the default) or as stored."""

    def __init__(self, collection: Collection, *, show_paths: bool = False) -> None:
        self.collection, self.show_paths = collection, show_paths
        self._root: str | None = None
        self._lock = threading.Lock()

    def path(self, path: str | None) -> str | None:
        """``path`` relative to the source root (``/``-separated), or as stored with ``show_paths``."""
        if path is None or self.show_paths:
            return path
        relative = self._relative(path, self._root)
        if relative is None:  # indexed since the root was found (or not yet found): look again
            with self._lock:
                self._root = source_root(self.collection)
            relative = self._relative(path, self._root)
        return relative if relative is not None else PurePath(path).name

    def spec(self, spec: str) -> str:
        return spec if self.show_paths else public_spec(spec)

    def folder(self, folder: str | Path) -> str:
        return str(folder) if self.show_paths else Path(folder).name

    @staticmethod
    def _relative(path: str, root: str | None) -> str | None:
        if root is None:
            return None
        try:
            relative = os.path.relpath(path, root)
        except ValueError:  # another drive (Windows)
            return None
        if relative == os.pardir or relative.startswith(os.pardir + os.sep):
            return None
        return posixpath.join(*Path(relative).parts)
