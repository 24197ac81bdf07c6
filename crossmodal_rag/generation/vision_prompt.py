"""Prompts that carry pictures: a text prompt plus the images a vision-language model looks at.

:class:`VisionPrompt` is what the RAG pipeline hands a vision-language generator
(:mod:`crossmodal_rag.generation.vlm`): the prompt (text or chat messages) and its images, each
with a label shown to the model just before the picture (``Query image``, ``[2]``). What may reach
the model is bounded by :class:`ImageLimits`, checked before any model loads: images per prompt,
the longest side each image is scaled down to, and the image tokens one prompt may hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from .._config import strict_from_dict
from ..errors import ImageDecodeError, QueryError
from .prompting import Prompt

__all__ = ["ImageLimits", "VisionPrompt", "bounded_image", "read_images", "to_messages"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageLimits:
    """What a vision-language prompt may hold (defaults sized for SmolVLM-256M on a CPU)."""

    max_images: int = 4  # images in one prompt (concat: the query image, then items in rank order)
    max_side: int = 512  # each image is scaled down so its longest side is at most this many pixels
    max_image_tokens: int = 4096  # image tokens one prompt may hold once the processor expanded them

    def __post_init__(self) -> None:
        if not 1 <= self.max_images <= 16:
            raise ValueError(f"max_images must be 1..16, got {self.max_images}")
        if not 32 <= self.max_side <= 2048:
            raise ValueError(f"max_side must be 32..2048 pixels, got {self.max_side}")
        if not 16 <= self.max_image_tokens <= 32768:
            raise ValueError(f"max_image_tokens must be 16..32768, got {self.max_image_tokens}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageLimits:
        return strict_from_dict(cls, data, "image limits")


@dataclass(frozen=True)
class VisionPrompt:
    """A prompt and the images the model sees with it (in order, each after its label)."""

    prompt: Prompt  # the text prompt, or chat messages; the images go into the last user message
    images: tuple[Image.Image, ...] = ()  # RGB, already bounded by ImageLimits.max_side
    labels: tuple[str, ...] = ()  # one per image: shown before it, and reported in the answer

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")


def bounded_image(image: Image.Image, max_side: int) -> Image.Image:
    """``image`` as RGB with its longest side at most ``max_side`` (aspect ratio kept)."""
    image = image.convert("RGB")
    if max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
    return image


def read_images(sources: list[str | Path | Image.Image], max_side: int) -> list[Image.Image | None]:
    """Each source decoded safely (:func:`~crossmodal_rag.ingestion.images.load_image`) and bounded;
    None, with a one-line warning, for one that cannot be read."""
    from ..ingestion.images import load_image

    out: list[Image.Image | None] = []
    for src in sources:
        try:
            img = src if isinstance(src, Image.Image) else load_image(src).image
            out.append(bounded_image(img, max_side))
        except (ImageDecodeError, OSError) as e:
            logger.warning("image %s cannot be read (%s); the model answers without it", src, e)
            out.append(None)
    return out


def to_messages(prompt: VisionPrompt | Prompt) -> list[dict[str, Any]]:
    """Chat messages with content lists, the images (each after its label) leading the last user
    message: the form every transformers VLM chat template reads."""
    vp = prompt if isinstance(prompt, VisionPrompt) else VisionPrompt(prompt)
    if len(vp.images) > 32:
        raise QueryError(f"{len(vp.images)} images in one prompt; at most 32")
    messages = [{"role": "user", "content": vp.prompt}] if isinstance(vp.prompt, str) else list(vp.prompt)
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    last = users[-1] if users else len(messages) - 1
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        content: list[dict[str, Any]] = []
        if i == last:
            for label in vp.labels:
                content += [{"type": "text", "text": f"{label}:"}, {"type": "image"}]
        content.append({"type": "text", "text": m["content"]})
        out.append({"role": m["role"], "content": content})
    return out
