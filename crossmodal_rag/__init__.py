"""crossmodal-rag: cross-modal retrieval-augmented generation over image-text collections.

Quick start::

    from crossmodal_rag import Collection
    with Collection.open_or_create("photos.xmr", "open_clip:ViT-B-32/laion2b_s34b_b79k") as c:
        c.add("~/Pictures")
    hits = Collection.open("photos.xmr").search("a cat on a sofa", k=5)
"""

from __future__ import annotations

from ._version import __version__
from .collection import CheckReport, Collection
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
from .images import decode_image, load_image
from .ingest import IngestReport, IngestSettings, ingest
from .search import Hit
from .sources import ImageRecord, Problem, TextRecord, read_source

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
