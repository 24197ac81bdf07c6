"""Retrieval recall@K, with the definitions used by CLIP benchmarks:

* text -> image: one query per caption; a hit if that caption's own image is in the top K;
* image -> text: one query per image; a hit if any of its captions is in the top K.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders import ClipEncoder, load_encoder
from ..errors import ImageDecodeError
from ..progress import bar
from .datasets import CaptionedImage, load_captioned

__all__ = ["RetrievalReport", "evaluate_retrieval", "recall_at_k"]


@dataclass
class RetrievalReport:
    model: str
    dataset: str
    images: int
    captions: int
    text_to_image: dict[str, float]  # "R@1" -> recall
    image_to_text: dict[str, float]
    positive_scores: list[float] = field(default_factory=list)  # caption vs its image
    negative_scores: list[float] = field(default_factory=list)  # caption vs other images (sample)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode images/texts, rank
    skipped: list[str] = field(default_factory=list)

    def to_dict(self, scores: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not scores:
            d.pop("positive_scores")
            d.pop("negative_scores")
        return d

    def table(self) -> str:
        ks = list(self.text_to_image)
        head = "direction      " + "  ".join(f"{k:>6}" for k in ks)
        t2i = "text -> image  " + "  ".join(f"{self.text_to_image[k]:>6.3f}" for k in ks)
        i2t = "image -> text  " + "  ".join(f"{self.image_to_text[k]:>6.3f}" for k in ks)
        return f"{self.images} images, {self.captions} captions ({self.model})\n{head}\n{t2i}\n{i2t}"


def recall_at_k(sims: np.ndarray, caption_image: np.ndarray, ks: tuple[int, ...]) -> tuple[dict[str, float], dict[str, float]]:
    """``sims`` ``(captions, images)``; ``caption_image[c]`` = index of caption c's image.

    Returns (text->image, image->text) recall@K for each K.
    """
    n_caps, n_imgs = sims.shape
    own = sims[np.arange(n_caps), caption_image]
    # rank of the own image = number of images scoring strictly higher
    t2i_rank = (sims > own[:, None]).sum(1)
    t2i = {f"R@{k}": float((t2i_rank < k).mean()) for k in ks}
    # image -> text: best rank among the image's captions
    sims_t = sims.T  # (images, captions)
    i2t_best = np.full(n_imgs, n_caps)
    for c in range(n_caps):
        i = caption_image[c]
        rank = int((sims_t[i] > sims_t[i, c]).sum())
        i2t_best[i] = min(i2t_best[i], rank)
    i2t = {f"R@{k}": float((i2t_best < k).mean()) for k in ks}
    return t2i, i2t


def evaluate_retrieval(
    dataset: str | Path, model: str | ClipEncoder | None = None, *, ks: tuple[int, ...] = (1, 5, 10),
    split: str | None = None, image_root: str | Path | None = None, batch_size: int = 32,
    negatives: int = 2000, seed: int = 0, progress: bool = False,
) -> RetrievalReport:
    """Encode a captioned dataset and measure recall@K both ways (no collection needed).
    ``progress``: bars over the images and the captions on stderr."""
    enc = model if isinstance(model, ClipEncoder) else load_encoder(model)
    items = load_captioned(dataset, split=split, image_root=image_root)
    report = RetrievalReport(model=str(enc.spec), dataset=str(dataset), images=0, captions=0,
                             text_to_image={}, image_to_text={})
    enc.load()  # before the bars: its own status line while the weights load
    img, kept = _encode_images(enc, items, batch_size, report, progress)
    if not kept:
        raise ValueError(f"{dataset}: no captioned images could be read")
    captions = [c for it in kept for c in it.captions]
    caption_image = np.array([i for i, it in enumerate(kept) for _ in it.captions])
    t = time.perf_counter()
    step = batch_size * 2
    with bar(total=len(captions), desc="eval: captions", unit=" text", enabled=progress) as shown:
        parts = []
        for start in range(0, len(captions), step):
            parts.append(enc.encode_texts(captions[start:start + step], batch_size=step))
            shown.update(len(parts[-1]))
    txt = np.concatenate(parts)
    report.timings["encode_texts"] = time.perf_counter() - t
    t = time.perf_counter()
    sims = txt @ img.T
    report.text_to_image, report.image_to_text = recall_at_k(sims, caption_image, ks)
    report.timings["rank"] = time.perf_counter() - t
    report.images, report.captions = len(kept), len(captions)
    rng = np.random.default_rng(seed)
    report.positive_scores = sims[np.arange(len(captions)), caption_image].round(5).tolist()
    if len(kept) > 1:
        c = rng.integers(0, len(captions), negatives)
        i = rng.integers(0, len(kept), negatives)
        mask = caption_image[c] != i
        report.negative_scores = sims[c[mask], i[mask]].round(5).tolist()
    return report


def _encode_images(enc: ClipEncoder, items: list[CaptionedImage], batch_size: int, report: RetrievalReport,
                   progress: bool) -> tuple[np.ndarray, list[CaptionedImage]]:
    """Decode and encode the dataset's images a batch at a time. Returns ``(vectors (N, D), the
    N items whose image could be read)``; the others are listed in ``report.skipped``."""
    from ..ingestion.images import load_image

    vecs, kept = [], []
    decode = encode = 0.0
    with bar(total=len(items), desc="eval: images", unit=" img", enabled=progress) as shown:
        for start in range(0, len(items), batch_size):
            t = time.perf_counter()
            pil = []
            for item in items[start:start + batch_size]:
                try:
                    pil.append(load_image(item.path).image)
                    kept.append(item)
                except ImageDecodeError as e:
                    report.skipped.append(f"{e.path}: {e.reason}")
            decode += time.perf_counter() - t
            t = time.perf_counter()
            if pil:
                vecs.append(enc.encode_images(pil, batch_size=batch_size))
            encode += time.perf_counter() - t
            shown.update(min(batch_size, len(items) - start))
    report.timings["decode_images"], report.timings["encode_images"] = decode, encode
    return (np.concatenate(vecs) if vecs else np.zeros((0, 0), np.float32)), kept
