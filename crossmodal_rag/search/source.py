"""What the search wing reads of an open collection, as interfaces: the wing never imports
:mod:`crossmodal_rag.collection` (which imports the wing), and no step is handed an ``Any``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .text_space import TextSpaceOwner

if TYPE_CHECKING:
    from PIL import Image

    from ..store.vectors import VectorIndex
    from .text_space import TextSpace

__all__ = ["Searchable"]


class Searchable(TextSpaceOwner, Protocol):
    """A collection as a search reads it (:class:`crossmodal_rag.Collection`)."""

    @property
    def indexes(self) -> Mapping[str, VectorIndex]: ...

    @property
    def text_space(self) -> TextSpace | None: ...

    def embed_query(self, text: str | None = None, image: str | Path | Image.Image | None = None, *,
                    plus: list[str] | None = None, minus: list[str] | None = None) -> np.ndarray: ...
