"""The encoder an open collection embeds queries and new items with: the one that built it (the
manifest names it), or another that proves to embed the same (its fingerprint, see
:mod:`crossmodal_rag.maintenance.fingerprint`). Loaded on first use, so opening a collection to read its
metadata never loads a model.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..encoders import ClipEncoder, load_encoder, parse_model_spec
from ..store.metadata import MetadataStore
from . import fingerprint

__all__ = ["BoundEncoder"]

logger = logging.getLogger(__name__)


class BoundEncoder:
    """The encoder of the collection in ``folder`` (metadata ``store``), built with the encoder
    spec ``built_with`` making ``dim``-d embeddings; ``writable``: opened for writing; ``model``:
    the spec to load (default ``built_with``)."""

    def __init__(self, folder: Path, store: MetadataStore, built_with: str, dim: int, *,
                 writable: bool, device: str | None, model: str | None = None) -> None:
        self.folder = folder
        self.store = store
        self.built_with = built_with
        self.dim = dim
        self.writable = writable
        self.device = device
        self.model = model or built_with  # the spec to load
        self.loaded: ClipEncoder | None = None

    def get(self) -> ClipEncoder:
        """The encoder (loaded and fingerprint-checked on first use)."""
        if self.loaded is None:
            encoder = load_encoder(self.model, self.device)
            self.verify(encoder, asked=self.model)
            self.loaded = encoder
        return self.loaded

    def use(self, model: str) -> None:
        """Embed with ``model`` instead: loaded now, and refused unless its embeddings match."""
        spec = str(parse_model_spec(model))
        if spec == self.built_with:
            return
        encoder = load_encoder(spec, self.device)
        self.verify(encoder, asked=spec)  # raises unless the embeddings match
        if _export_source(spec) == self.built_with:  # its ONNX export: the same weights, by design
            logger.info("encoder %s is an ONNX export of %s; embeddings match", spec, self.built_with)
        else:
            logger.warning("encoder %s differs in name from %s but gives the same embeddings",
                           spec, self.built_with)
        self.model = spec
        self.loaded = encoder

    def verify(self, encoder: ClipEncoder, asked: str) -> None:
        """Refuse (:class:`~crossmodal_rag.errors.EncoderMismatchError`) ``encoder`` (named
        ``asked``) unless it reproduces the collection's fingerprint (both towers). A collection
        made before image probes records its own encoder's when opened writable; otherwise its
        image tower goes unverified, with a warning."""
        hint = (f"{self.folder} was built with {self.built_with}; search it with that "
                "encoder (leave out --model) or index into a new collection")
        stored, fresh = fingerprint.verify_encoder(self.store, encoder, asked=asked, dim=self.dim,
                                                   where=self.folder, fix=hint)
        if stored is None or fresh is None or stored.image is not None:
            return
        if self.writable and asked == self.built_with:
            fingerprint.record_image_probe(self.store, stored, fresh)
            logger.info("%s: recorded the image-tower fingerprint of its encoder %s", self.folder, asked)
            return
        logger.warning(
            "%s was made before image fingerprints: the image tower of %s cannot be verified for "
            "this older collection (its text tower matches). Open it writable once with its own "
            "encoder (e.g. `crossmodal-rag index` into it) to record one", self.folder, asked)


def _export_source(spec: str) -> str | None:
    """The spec an ``onnx:`` folder was exported from (its crossmodal_rag_export.json), or None."""
    import json

    from ..encoders.onnx_runtime import EXPORT_INFO

    parsed = parse_model_spec(spec)
    if parsed.backend != "onnx" or parsed.local_path is None:
        return None
    try:
        return str(json.loads((parsed.local_path / EXPORT_INFO).read_text(encoding="utf-8"))["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
