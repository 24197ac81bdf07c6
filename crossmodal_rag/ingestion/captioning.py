"""Words for uncaptioned photos: a vision-language model describes each image without a caption.

``index --caption-model SPEC`` runs this stage after an ingest's commit, and ``caption DIR
--caption-model SPEC`` back-fills an existing collection; both are incremental (only images with
no caption yet are described; ``--recaption`` re-makes the generated ones, never a human
caption). Each description is committed as a ``caption`` item of its image whose origin is
``generated:<model>`` (:mod:`crossmodal_rag.store.generated`): embedded by the collection's
text tower, in the keyword index and the text space like any caption, and marked generated.

    images without a caption -> bounded RGB -> VLM (one prompt per image) -> caption items
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .._config import strict_from_dict
from ..store.generated import GENERATED_ORIGIN, generated_caption_ids, images_to_caption
from .sources import Problem

if TYPE_CHECKING:
    from ..collection import Collection
    from ..generation.interface import TextGenerator

__all__ = ["CAPTION_PROMPT", "CaptionReport", "CaptionSettings", "caption_collection"]

logger = logging.getLogger(__name__)

CAPTION_PROMPT = "Describe this image in one short sentence."


@dataclass(frozen=True)
class CaptionSettings:
    """How generated captions are written."""

    model: str = "vlm:HuggingFaceTB/SmolVLM-256M-Instruct"  # a VLM spec (generation.vlm)
    prompt: str = CAPTION_PROMPT  # what the model is asked about each image
    max_new_tokens: int = 32  # longest caption, in tokens
    recaption: bool = False  # re-make generated captions (human captions are never touched)
    commit_every: int = 8  # images described per commit

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ValueError("empty caption model: give a VLM folder or vlm:OWNER/NAME")
        if not self.prompt.strip():
            raise ValueError("empty caption prompt")
        if not 1 <= self.max_new_tokens <= 256:
            raise ValueError(f"max_new_tokens must be 1..256, got {self.max_new_tokens}")
        if self.commit_every < 1:
            raise ValueError(f"commit_every must be >= 1, got {self.commit_every}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CaptionSettings:
        return strict_from_dict(cls, data, "caption settings")


@dataclass
class CaptionReport:
    """What a captioning run did."""

    model: str
    captioned: int = 0  # images that got a generated caption
    replaced: int = 0  # generated captions removed to be re-made (--recaption)
    seconds: float = 0.0
    skipped: list[Problem] = field(default_factory=list)  # images that could not be read or described

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped"] = [{"item": p.item, "reason": p.reason} for p in self.skipped]
        return out


def caption_collection(collection: Collection, settings: CaptionSettings,
                       generator: TextGenerator | None = None, progress: bool | None = None) -> CaptionReport:
    """Describe every image of ``collection`` (open writable) that has no caption (see the module
    docstring); ``generator``: a loaded VLM (default: ``settings.model``)."""
    from ..generation.models import GenerationSettings, load_generator
    from ..generation.vision_prompt import VisionPrompt, read_images
    from ..progress import bar

    collection.require_writable()
    gen = generator or load_generator(settings.model)
    if not getattr(gen, "sees_images", False):
        raise ValueError(f"caption model {settings.model} is not a vision-language model; give a VLM folder or "
                         "vlm:OWNER/NAME (e.g. vlm:HuggingFaceTB/SmolVLM-256M-Instruct)")
    t0 = time.perf_counter()
    report = CaptionReport(model=gen.spec)
    todo = images_to_caption(collection.store, settings.recaption)
    if settings.recaption and todo:
        old = generated_caption_ids(collection.store, [i for i, _ in todo])
        if old:
            collection.remove(ids=old)
            report.replaced = len(old)
    gs = GenerationSettings(max_new_tokens=settings.max_new_tokens)
    limits = gen.limits  # type: ignore[attr-defined]
    with bar(total=len(todo), desc="captioning images", unit="img", enabled=progress or None) as pbar:
        for start in range(0, len(todo), settings.commit_every):
            chunk = todo[start:start + settings.commit_every]
            images = read_images([p for _, p in chunk], limits.max_side)
            done: list[tuple[int, str]] = []
            for (item_id, path), img in zip(chunk, images, strict=True):
                if img is None:
                    report.skipped.append(Problem(path, "cannot be read; no caption generated"))
                    continue
                text = gen.generate([VisionPrompt(settings.prompt, (img,), ("Image",))], gs)[0][0].strip()
                if text:
                    done.append((item_id, text))
                else:
                    report.skipped.append(Problem(path, f"{gen.spec} wrote an empty caption"))
            _commit(collection, done, GENERATED_ORIGIN + gen.spec)
            report.captioned += len(done)
            pbar.update(len(chunk))
    report.seconds = time.perf_counter() - t0
    for p in report.skipped:
        logger.warning("no caption for %s: %s", p.item, p.reason)
    return report


def _commit(collection: Collection, done: list[tuple[int, str]], origin: str) -> None:
    """Insert the captions (and the windows of long ones) and mirror them in the indexes."""
    if not done:
        return
    enc, store = collection.encoder, collection.store
    windows = [enc.text_windows(t) for _, t in done]
    flat = [w for ws in windows for w in ws]
    vecs = enc.encode_texts(flat)
    added: list[tuple[int, np.ndarray]] = []
    n = 0
    with store.transaction():
        for (item_id, text), ws in zip(done, windows, strict=True):
            cid = store.insert_item("caption", vecs[n], parent_id=item_id, text=text, origin=origin)
            added.append((cid, vecs[n]))
            for j, w in enumerate(ws[1:], start=1):
                wid = store.insert_item("window", vecs[n + j], parent_id=cid, text=w)
                added.append((wid, vecs[n + j]))
            n += len(ws)
    collection.apply({"text": (np.asarray([i for i, _ in added], np.int64), np.stack([v for _, v in added]))}, [])
    collection.persist()
