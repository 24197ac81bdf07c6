"""Exceptions raised by crossmodal-rag.

Every error a user can cause derives from :class:`CrossmodalError`, and its message names the
input at fault and how to fix it. The CLI prints these messages without a traceback.
"""

from __future__ import annotations

__all__ = [
    "CollectionError",
    "CollectionLockedError",
    "CrossmodalError",
    "EncoderMismatchError",
    "ImageDecodeError",
    "ModelSpecError",
    "QueryError",
    "SourceError",
    "WeightsUnavailableError",
]


class CrossmodalError(Exception):
    """Base class of the errors that carry a message meant for the user."""


class ModelSpecError(CrossmodalError, ValueError):
    """A model spec string cannot be parsed or names something that does not exist."""


class WeightsUnavailableError(CrossmodalError):
    """Pretrained weights are neither on disk nor downloadable (e.g. offline)."""


class CollectionError(CrossmodalError):
    """A collection folder is missing, corrupt, or of an unsupported format version."""


class CollectionLockedError(CollectionError):
    """Another process holds the collection's write lock."""


class EncoderMismatchError(CollectionError):
    """The encoder asked for is not the one the collection was built with."""


class QueryError(CrossmodalError, ValueError):
    """A search query is empty, unreadable or otherwise unusable."""


class SourceError(CrossmodalError):
    """An ingest source (folder, manifest, COCO file) cannot be read at all."""


class ImageDecodeError(CrossmodalError):
    """One image cannot be decoded safely; ``reason`` is a one-line explanation."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
