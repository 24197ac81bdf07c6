"""Search: one request in, one result out, whatever the mode, the space or the front end.

:meth:`Collection.search <crossmodal_rag.collection.Collection.search>` takes a
:class:`SearchRequest` (or a text query and keyword options) and returns a :class:`SearchResult`
of :class:`Hit` records. The wing's modules, in the order a query meets them:

- ``request.py``: :class:`SearchRequest`, :class:`SearchResult`, :data:`MODES`, :data:`DEFAULT_MODE`;
- ``engine.py``: runs a request (routing, mode, threshold) without calling back into the collection;
- ``routing.py``: text queries for texts to the collection's text space (``text_space.py``);
- ``query.py``: query arithmetic, texts and an image into one CLIP vector;
- ``filters.py``: ``where`` expressions into the item ids a search may return;
- ``dense.py``: vector search over the FAISS indexes; ``calibration.py``: ``min_score="auto"``;
- ``hybrid.py``: the keyword ranking (BM25) and its fusion with the dense one (``fusion.py``);
- ``hits.py``: the :class:`Hit` record every mode returns.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .hits import Hit
from .request import (
    DEFAULT_MODE,
    MODES,
    TARGETS,
    Mode,
    SearchRequest,
    SearchResult,
    Target,
    check_k,
    check_mode,
    check_target,
)

if TYPE_CHECKING:
    from .dense import TargetEmptyError

#: Names whose modules load faiss: imported on first access (the CLI's --help stays light).
_LAZY = {"TargetEmptyError": ".dense"}

__all__ = ["DEFAULT_MODE", "MODES", "TARGETS", "Hit", "Mode", "SearchRequest", "SearchResult", "Target",
           "TargetEmptyError", "check_k", "check_mode", "check_target"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
