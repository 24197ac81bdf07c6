"""The ``text-only`` model spec: a collection without an image encoder, so without CLIP weights.

A text-only collection (``crossmodal-rag index DIR -c COLL --text-only``) finds everything by its
words: captions, passages and OCR text are searched in the collection's text space (the bundled
sentence encoder, :mod:`crossmodal_rag.search.text_space`) and by keyword; an image is found
through its captions and OCR text (:mod:`crossmodal_rag.search.text_only`). Images are still
kept as items (path, size, captions, OCR text), so they are shown, removed and checked as in any
collection.

The collection's store still wants one vector per item, and this backend gives one without any
weights, computed by formula:

- an image: its 8 x 8 grey thumbnail, mean-centred (a pixel layout signature; it makes
  ``duplicates`` find near-identical pictures, and means nothing for search);
- a text: its words hashed into :data:`DIM` buckets (a stable hash, the same on every install).

A constant is added to both before the L2 normalisation, so a blank picture or an empty text
still gives a unit vector. The vectors are never searched: :mod:`crossmodal_rag.search.text_only`
routes every text query to the text space and keyword index and refuses image queries.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from .spec import TEXT_ONLY, ModelSpec

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["DIM", "TextOnlyBackend"]

#: Dimension of the stand-in vectors: an 8 x 8 thumbnail.
DIM = 64
_SIDE = 8
_FLOOR = 1e-3  # added before normalising: never a zero vector
#: Words per text window of the collection's text index (about the bundled MiniLM's 256
#: word-piece context), so long passages reach the text space in pieces it reads whole.
_WINDOW_WORDS = 160
_WORD = re.compile(r"\w+")


class TextOnlyBackend:
    """A :class:`~crossmodal_rag.encoders.ClipBackend` with no weights (see the module docstring)."""

    def __init__(self, spec: ModelSpec) -> None:
        if str(spec) != TEXT_ONLY:
            raise ValueError(f"not the {TEXT_ONLY} spec: {spec}")
        self.spec = spec

    def load(self, device: str) -> None:
        """Nothing to load."""

    @property
    def dim(self) -> int:
        return DIM

    @property
    def max_text_tokens(self) -> int:
        return _WINDOW_WORDS + 2  # ClipEncoder.text_windows leaves two for start and end tokens

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> its grey thumbnail ``(DIM,)`` in [0, 1]."""
        import numpy as np
        import torch
        from PIL import Image

        grey = image.convert("L").resize((_SIDE, _SIDE), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(grey, dtype=np.float32).reshape(DIM) / 255.0)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(N, DIM)`` thumbnails -> ``(N, DIM)`` mean-centred signatures (normalised by the encoder)."""
        pixels = pixels.reshape(pixels.shape[0], DIM).float()
        return pixels - pixels.mean(dim=1, keepdim=True) + _FLOOR

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Texts -> ``(N, DIM)`` counts of their lower-cased words, hashed into buckets."""
        import torch

        out = torch.full((len(texts), DIM), _FLOOR)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                bucket = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little")
                out[row, bucket % DIM] += 1.0
        return out
