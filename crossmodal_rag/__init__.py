"""crossmodal-rag: cross-modal retrieval-augmented generation over image-text collections.

Quick start::

    from crossmodal_rag import Collection
    with Collection.open_or_create("photos.xmr", "open_clip:ViT-B-32/laion2b_s34b_b79k") as c:
        c.add("~/Pictures")
    for hit in Collection.open("photos.xmr").search("a cat on a sofa", k=5):
        print(hit.rank, hit.score, hit.path)

Every search goes through ``Collection.search``: a text and keyword options, or a
:class:`SearchRequest`; it returns a :class:`SearchResult` (a sequence of :class:`Hit`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .encoders import DEFAULT_MODEL, ClipEncoder, ModelSpec, load_encoder, parse_model_spec
from .errors import (
    CollectionError,
    CollectionLockedError,
    CrossmodalError,
    EncoderMismatchError,
    ImageDecodeError,
    ModelSpecError,
    QueryError,
    SourceError,
    WeightsUnavailableError,
)

if TYPE_CHECKING:
    from .collection import CheckReport, Collection
    from .ingestion.images import decode_image, load_image
    from .ingestion.runner import IngestReport, IngestSettings, ingest
    from .ingestion.sources import ImageRecord, Problem, TextRecord, read_source
    from .search import Hit, SearchRequest, SearchResult

#: Public names whose modules load torch, faiss or PIL: imported on first access, so that
#: ``import crossmodal_rag`` (and the CLI's ``--help``) stays fast.
_LAZY = {
    "CheckReport": ".collection",
    "Collection": ".collection",
    "decode_image": ".ingestion.images",
    "load_image": ".ingestion.images",
    "IngestReport": ".ingestion.runner",
    "IngestSettings": ".ingestion.runner",
    "ingest": ".ingestion.runner",
    "Hit": ".search",
    "SearchRequest": ".search",
    "SearchResult": ".search",
    "ImageRecord": ".ingestion.sources",
    "Problem": ".ingestion.sources",
    "TextRecord": ".ingestion.sources",
    "read_source": ".ingestion.sources",
}

__all__ = [
    "DEFAULT_MODEL",
    "CheckReport",
    "ClipEncoder",
    "Collection",
    "CollectionError",
    "CollectionLockedError",
    "CrossmodalError",
    "EncoderMismatchError",
    "Hit",
    "ImageDecodeError",
    "ImageRecord",
    "IngestReport",
    "IngestSettings",
    "ModelSpec",
    "ModelSpecError",
    "Problem",
    "QueryError",
    "SearchRequest",
    "SearchResult",
    "SourceError",
    "TextRecord",
    "WeightsUnavailableError",
    "__version__",
    "decode_image",
    "ingest",
    "load_encoder",
    "load_image",
    "parse_model_spec",
    "read_source",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
