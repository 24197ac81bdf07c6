"""Retrieval-augmented captioning in the style of SmallCap: the query image is read as an image
prefix, and the captions of its nearest neighbours in a collection are the text prompt
(:func:`~crossmodal_rag.generation.prefix.caption_prompt`, the same prompt ``train prefix`` uses).

Example::

    from crossmodal_rag import Collection
    from crossmodal_rag.generation.caption import Captioner
    from crossmodal_rag.generation.prefix import load_image_prefix
    with Collection.open("photos.xmr") as coll:
        captioner = Captioner(load_image_prefix("runs/prefix/best"), collection=coll, k=4)
        print(captioner.caption("cat.jpg").caption)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from ..encoders import load_encoder
from ..errors import ImageDecodeError, QueryError
from ..ingestion.images import DEFAULT_MAX_IMAGE_PIXELS, load_image
from ..progress import bar
from ..search import Hit
from .models import GenerationSettings, load_generator
from .prefix import ImagePrefix, caption_prompt

if TYPE_CHECKING:
    from ..collection import Collection
    from .interface import TextGenerator

__all__ = ["Caption", "Captioner"]

logger = logging.getLogger(__name__)


@dataclass
class Caption:
    """A generated caption, the prompt the generator read and the neighbours it came from."""

    image: str
    caption: str
    prompt: str  # the text after the image prefix
    sources: list[dict[str, Any]] = field(default_factory=list)  # the retrieved captions (Hit dicts)
    image_prefix: str = ""  # the checkpoint
    generator: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Captioner:
    """Captions images with an image prefix and (optionally) retrieved neighbours' captions.

    ``k`` neighbours' captions are retrieved from ``collection`` (caption items, i.e.
    ``target="texts"``); default ``k``: the number the checkpoint was trained with, or 4 when it
    was trained without retrieval. ``k=0`` or no collection: the prompt holds no captions. The
    generator defaults to the checkpoint's own; the collection's encoder and the generator must be
    the ones the checkpoint belongs to.
    """

    def __init__(
        self, image_prefix: ImagePrefix, *, collection: Collection | None = None,
        generator: str | TextGenerator | None = None, k: int | None = None,
        generation: GenerationSettings | None = None, encoder: str | None = None,
    ) -> None:
        self.prefix, self.collection = image_prefix, collection
        if generator is None:
            generator = image_prefix.generator_spec
        self.generator: TextGenerator = load_generator(generator) if isinstance(generator, str) else generator
        image_prefix.check_generator(self.generator)
        if collection is not None:
            image_prefix.check_encoder(collection.manifest.encoder, collection.manifest.dim)
            self.encoder = collection.encoder
        else:
            if encoder is not None:  # must be the checkpoint's own (the dimension is checked per image)
                image_prefix.check_encoder(encoder, image_prefix.config.encoder_dim)
            self.encoder = load_encoder(encoder or image_prefix.config.encoder)
        trained_k = image_prefix.config.retrieval_k
        self.k = 0 if collection is None else (k if k is not None else (trained_k or 4))
        if self.k < 0:
            raise QueryError(f"k must be >= 0, got {self.k}")
        if collection is not None and trained_k and self.k != trained_k:
            logger.info("captioning with %d neighbours; %s was trained with %d", self.k, image_prefix.label,
                        trained_k)
        self.generation = generation or GenerationSettings(max_new_tokens=64)

    def caption(self, image: str | Path | Image.Image, *,
                max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Caption:
        """Caption one image (a path or a PIL image).

        Raises:
            QueryError: the image cannot be read.
        """
        result = self.caption_many([image], max_image_pixels=max_image_pixels)[0]
        if isinstance(result, QueryError):
            raise result
        return result

    def caption_many(self, images: list[str | Path | Image.Image], *, batch_size: int = 32,
                     max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                     progress: bool = False) -> list[Caption | QueryError]:
        """Caption many images, ``batch_size`` per generator pass. An image that cannot be read
        gets a :class:`QueryError` (naming it) in its place and the others go on. ``progress``:
        a bar over the images on stderr."""
        results: list[Caption | QueryError | None] = [None] * len(images)
        if progress:  # the models' own status lines first, not inside the bar
            self.generator.load()
            self.encoder.load()
        with bar(total=len(images), desc="captioning", unit=" img", enabled=progress) as shown:
            for start in range(0, len(images), batch_size):
                self._caption_batch(images, range(start, min(start + batch_size, len(images))),
                                    max_image_pixels, results)
                shown.update(min(batch_size, len(images) - start))
        return [r for r in results if r is not None]

    def _caption_batch(self, images: list[str | Path | Image.Image], batch: range, max_image_pixels: int,
                       results: list[Caption | QueryError | None]) -> None:
        """Caption ``images[i]`` for each ``i`` in ``batch`` into ``results[i]``."""
        rows, pils = [], []
        for i in batch:
            try:
                pils.append(self._read(images[i], max_image_pixels))
                rows.append(i)
            except QueryError as e:
                results[i] = e
        if not rows:
            return
        vecs = self.encoder.encode_images(pils)
        neighbours: list[list[Hit]] = [[] for _ in rows]
        if self.collection is not None and self.k > 0:
            found = self.collection.search_vectors(vecs, k=self.k + 1, target="texts")
            for j, i in enumerate(rows):
                own = str(Path(images[i]).resolve()) if isinstance(images[i], str | Path) else None
                neighbours[j] = [h for h in found[j] if own is None or h.path is None or
                                 str(Path(h.path).resolve()) != own][: self.k]
        prompts = [caption_prompt([h.text or "" for h in hits]) for hits in neighbours]
        prefixes = self.prefix.prefixes(vecs)
        texts = self.generator.generate(prompts, self.generation, prefixes=list(prefixes))
        for j, i in enumerate(rows):
            label = str(images[i]) if isinstance(images[i], str | Path) else "image"
            results[i] = Caption(image=label, caption=texts[j][0], prompt=prompts[j],
                                 sources=[h.to_dict() for h in neighbours[j]],
                                 image_prefix=self.prefix.label, generator=self.generator.spec)

    @staticmethod
    def _read(image: str | Path | Image.Image, max_image_pixels: int) -> Image.Image:
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        if not Path(image).is_file():
            raise QueryError(f"image {image} does not exist or is not a file")
        try:
            return load_image(image, max_pixels=max_image_pixels).image
        except ImageDecodeError as e:
            raise QueryError(f"image {e.path}: {e.reason}") from e
