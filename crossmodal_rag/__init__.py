"""crossmodal-rag: cross-modal retrieval-augmented generation over image-text collections.

Quick start::

    from crossmodal_rag import Collection
    with Collection.open_or_create("photos.xmr", "open_clip:ViT-B-32/laion2b_s34b_b79k") as c:
        c.add("~/Pictures")
    hits = Collection.open("photos.xmr").search("a cat on a sofa", k=5)
"""

from __future__ import annotations

import importlib
import sys
import types
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
    from .images import decode_image, load_image
    from .ingest import IngestReport, IngestSettings, ingest
    from .search import Hit
    from .sources import ImageRecord, Problem, TextRecord, read_source

#: Public names whose modules load torch, faiss or PIL: imported on first access, so that
#: ``import crossmodal_rag`` (and the CLI's ``--help``) stays fast.
_LAZY = {
    "CheckReport": ".collection",
    "Collection": ".collection",
    "decode_image": ".images",
    "load_image": ".images",
    "IngestReport": ".ingest",
    "IngestSettings": ".ingest",
    "ingest": ".ingest",
    "Hit": ".search",
    "ImageRecord": ".sources",
    "Problem": ".sources",
    "TextRecord": ".sources",
    "read_source": ".sources",
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


class _Package(types.ModuleType):
    """Keeps ``crossmodal_rag.ingest`` the function, as the eager import made it: loading the
    submodule of the same name (from anywhere) binds the package attribute to the submodule."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "ingest" and isinstance(value, types.ModuleType):
            value = value.ingest
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
