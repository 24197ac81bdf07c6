"""``train clip``: contrastive fine-tuning of the CLIP encoder on image-caption pairs, and
re-embedding a collection with the result (by :mod:`crossmodal_rag.maintenance.reembed`, whose
``reembed_collection`` and ``ReembedReport`` this module re-exports).

The loss is open_clip's :class:`~open_clip.loss.ClipLoss` (symmetric cross-entropy over the
batch's image-text similarities) with the model's own trainable ``logit_scale``. Images go
through the model's own (evaluation) preprocessing, so the trained encoder sees pictures exactly
as it will when indexing. Both backends train: an open_clip model is saved as an
``open_clip:local-dir:`` folder (``open_clip_config.json`` + ``open_clip_model.safetensors``), a
transformers CLIP model as a ``save_pretrained`` folder (``hf:FOLDER``); either loads through the
ordinary model spec.

A batch keeps one image per distinct caption: two pictures with the same caption would
otherwise count as each other's negatives.

Hard negatives (``hard_negatives``, ``train clip --hard-negatives``): with random batches a pair
whose captions differ in one detail ("a red circle" / "a red star") rarely meets in a batch, the
loss soon saturates on the easy differences and the encoder never has to see the detail. With a
share ``h`` set, each training batch keeps ``(1 - h) * batch_size`` of its randomly drawn examples
and fills the rest with their caption neighbours: training examples whose captions are the most
alike by words (hashed unigram + bigram TF-IDF, cosine, identical captions excluded), found once
per run among the training split only. This is batch composition only; the loss is unchanged.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .._config import strict_from_dict
from ..encoders import parse_model_spec
from ..encoders.spec import DEFAULT_MODEL, ModelSpec
from ..errors import CollectionError, ImageDecodeError, ModelSpecError
from ..ingestion.sources import Problem
from ..maintenance.reembed import ReembedReport, read_rgb, reembed_collection
from .loop import TrainResult, TrainSettings, train
from .pairs import CaptionedImages, read_captioned_images

__all__ = [
    "ClipTask",
    "ClipTaskSettings",
    "ReembedReport",
    "artifact_spec",
    "reembed_collection",
    "train_clip",
]

logger = logging.getLogger(__name__)

_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the temperature
_IMAGE_PREFIXES = ("visual.", "vision_model.", "visual_projection.")
_SCALE_NAMES = ("logit_scale", "logit_bias")


@dataclass(frozen=True)
class ClipTaskSettings:
    """What of the encoder trains and how images are held."""

    train_image: bool = True  # update the image tower
    train_text: bool = True  # update the text tower
    train_logit_scale: bool = True  # update the temperature
    cache_images: bool = True  # keep preprocessed images in memory (else decode each batch)
    #: share of each training batch filled with caption neighbours of the rest (0: random batches)
    hard_negatives: float = 0.0
    neighbours: int = 16  # caption neighbours kept per training example (hard_negatives > 0)

    #: TrainSettings defaults for fine-tuning a pretrained encoder (flags override them).
    TRAIN_DEFAULTS: ClassVar[dict[str, Any]] = {"lr": 1e-5, "weight_decay": 0.1, "batch_size": 32,
                                                "warmup_steps": 20, "max_steps": 500}

    def __post_init__(self) -> None:
        if not (self.train_image or self.train_text or self.train_logit_scale):
            raise ValueError("clip task: nothing to train (train_image, train_text and "
                             "train_logit_scale are all off)")
        if not 0.0 <= self.hard_negatives < 1.0:
            raise ValueError(f"clip task: hard_negatives must be in [0, 1), got {self.hard_negatives}")
        if self.neighbours < 1:
            raise ValueError(f"clip task: neighbours must be >= 1, got {self.neighbours}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClipTaskSettings:
        return strict_from_dict(cls, data, "clip task settings")


def _load_backend(spec: ModelSpec) -> Any:
    if spec.backend == "open_clip":
        from ..encoders.openclip import OpenClipBackend

        backend: Any = OpenClipBackend(spec)
    else:
        from ..encoders.hf import HFClipBackend

        backend = HFClipBackend(spec)
    backend.load("cpu")
    return backend


def _open_clip_config(spec: ModelSpec, model: Any) -> dict[str, Any]:
    """``{"model_cfg", "preprocess_cfg"}`` of a loaded open_clip model, as a local-dir folder holds."""
    import open_clip

    name = spec.name
    if name.startswith("local-dir:"):
        return json.loads((Path(name[len("local-dir:") :]) / "open_clip_config.json").read_text())
    if name.startswith("hf-hub:"):
        from ..encoders._hub import cached_hub_file

        path = cached_hub_file(name[len("hf-hub:") :], ["open_clip_config.json"])
        if path is None:
            raise ModelSpecError(f"cannot find open_clip_config.json of {spec} in the hub cache")
        return json.loads(Path(path).read_text())
    model_cfg = dict(open_clip.get_model_config(name) or {})
    if not model_cfg:
        raise ModelSpecError(f"unknown open_clip architecture {name!r}")
    pretrained_cfg = open_clip.get_pretrained_cfg(name, spec.pretrained or "") or {}
    if pretrained_cfg.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    pre = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = pre.get("size", model_cfg.get("vision_cfg", {}).get("image_size", 224))
    preprocess = {"size": list(size) if isinstance(size, tuple | list) else size,
                  "mean": list(pre.get("mean", ())), "std": list(pre.get("std", ())),
                  "interpolation": pre.get("interpolation", "bicubic"),
                  "resize_mode": pre.get("resize_mode", "shortest")}
    return {"model_cfg": model_cfg, "preprocess_cfg": {k: v for k, v in preprocess.items() if v != []}}


_HASH_DIM = 1024  # hashed bag-of-words width for caption neighbours
_MAX_NEIGHBOUR_CANDIDATES = 20_000  # neighbours are searched among at most this many examples


def _hashed_tfidf(texts: Sequence[str]) -> np.ndarray:
    """``(N, _HASH_DIM)`` float32, unit rows: lower-cased word unigrams and bigrams, hashed
    (stable across runs: crc32), weighted by smoothed inverse document frequency."""
    import zlib

    rows: list[dict[int, float]] = []
    df = np.zeros(_HASH_DIM, dtype=np.float64)
    for text in texts:
        words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
        counts: dict[int, float] = {}
        for term in words + [a + " " + b for a, b in itertools.pairwise(words)]:
            h = zlib.crc32(term.encode("utf-8")) % _HASH_DIM
            counts[h] = counts.get(h, 0.0) + 1.0
        for h in counts:
            df[h] += 1
        rows.append(counts)
    idf = np.log((1 + len(texts)) / (1 + df)) + 1
    out = np.zeros((len(texts), _HASH_DIM), dtype=np.float32)
    for r, counts in enumerate(rows):
        for h, c in counts.items():
            out[r, h] = c * idf[h]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def caption_neighbours(texts: Sequence[str], k: int = 16, seed: int = 0) -> np.ndarray:
    """For each text, up to ``k`` positions of the most alike *other* texts (``(N, k)`` int64,
    ``-1`` where there are fewer), each with a different text: cosine of hashed word TF-IDF
    vectors; identical texts are excluded.
    Over :data:`_MAX_NEIGHBOUR_CANDIDATES` texts, neighbours come from a seeded random sample."""
    import faiss

    n = len(texts)
    out = np.full((n, k), -1, dtype=np.int64)
    if n < 2:
        return out
    vecs = _hashed_tfidf(texts)
    cand = np.arange(n)
    if n > _MAX_NEIGHBOUR_CANDIDATES:
        cand = np.sort(np.random.default_rng(seed).choice(n, _MAX_NEIGHBOUR_CANDIDATES, replace=False))
    index = faiss.IndexFlatIP(_HASH_DIM)
    index.add(vecs[cand])
    # identical captions score ~1 and are skipped, so ask for more than k
    extra = min(len(cand), 8 * k + 16)
    for start in range(0, n, 4096):
        _, hits = index.search(vecs[start : start + 4096], extra)
        for row, found in enumerate(hits):
            i = start + row
            kept: list[int] = []
            seen = {texts[i]}  # one example per distinct neighbouring caption
            for j in found:
                if j < 0 or len(kept) == k:
                    continue
                text = texts[int(cand[j])]
                if text not in seen:
                    seen.add(text)
                    kept.append(int(cand[j]))
            out[i, : len(kept)] = kept
    return out


class ClipTask:
    """Contrastive fine-tuning of a CLIP model (a :class:`~crossmodal_rag.training.TrainTask`).

    Examples are the captioned images of ``data``; a training batch pairs each image with one of
    its captions drawn at random, validation with its first caption. Images that cannot be
    decoded are skipped (``skipped`` says why).
    """

    name = "clip"

    def __init__(self, model: str | ModelSpec, data: CaptionedImages,
                 settings: ClipTaskSettings | None = None) -> None:
        self.spec = parse_model_spec(model)
        self.settings = settings or ClipTaskSettings()
        self.backend = _load_backend(self.spec)
        self.model = self.backend.model
        self.config = _open_clip_config(self.spec, self.model) if self.spec.backend == "open_clip" else None
        self.skipped: list[Problem] = list(data.skipped)
        self.paths: list[Path] = []
        self.captions: list[tuple[str, ...]] = []
        self._pixels: list[torch.Tensor] = []
        for path, caps in zip(data.paths, data.captions, strict=True):
            try:
                image, _ = read_rgb(path)
            except ImageDecodeError as e:
                self.skipped.append(Problem(e.path, e.reason))
                continue
            self.paths.append(path)
            self.captions.append(caps)
            if self.settings.cache_images:
                self._pixels.append(self.backend.preprocess(image))
        if len(self.paths) < 2:
            raise CollectionError(f"clip training needs at least 2 readable captioned images, got {len(self.paths)}")
        self._fixed = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        self._groups = self._set_trainable()
        self._loss_fn: Any = None
        self._train_idx: np.ndarray | None = None
        self._neighbours: np.ndarray | None = None  # (len(train), k) example indices, -1 padded
        self._neighbour_row: np.ndarray | None = None  # example index -> row of _neighbours (-1: none)

    def _set_trainable(self) -> dict[str, list[torch.nn.Parameter]]:
        groups: dict[str, list[torch.nn.Parameter]] = {"image": [], "text": [], "scale": []}
        for pname, p in self.model.named_parameters():
            if pname in self._fixed:
                continue  # fixed by the architecture (e.g. sin-cos position embeddings)
            group = ("scale" if pname in _SCALE_NAMES else
                     "image" if pname.startswith(_IMAGE_PREFIXES) else "text")
            on = {"image": self.settings.train_image, "text": self.settings.train_text,
                  "scale": self.settings.train_logit_scale}[group]
            p.requires_grad_(on)
            if on:
                groups[group].append(p)
        return groups

    # -- TrainTask --------------------------------------------------------------------------
    def num_examples(self) -> int:
        return len(self.paths)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for ps in self._groups.values() for p in ps]

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _pixels_of(self, indices: Sequence[int]) -> torch.Tensor:
        if self.settings.cache_images:
            batch = [self._pixels[i] for i in indices]
        else:
            batch = [self.backend.preprocess(read_rgb(self.paths[i])[0]) for i in indices]
        return torch.stack(batch).to(self._device())

    def _features(self, indices: Sequence[int], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.backend.image_features(self._pixels_of(indices))
        txt = self.backend.text_features(texts)
        return (torch.nn.functional.normalize(img.float(), dim=-1),
                torch.nn.functional.normalize(txt.float(), dim=-1))

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.clamp(0, _MAX_LOGIT_SCALE).exp()

    def set_training_examples(self, indices: Sequence[int]) -> None:
        """The training split (the loop calls this before the first step): hard negatives are
        drawn from these examples only, never from validation."""
        self._train_idx = np.asarray(indices, dtype=np.int64)
        self._neighbours = self._neighbour_row = None

    def _find_neighbours(self) -> None:
        pool = self._train_idx if self._train_idx is not None else np.arange(len(self.paths))
        t = time.perf_counter()
        found = caption_neighbours([self.captions[int(i)][0] for i in pool], self.settings.neighbours)
        self._neighbours = np.where(found >= 0, pool[np.maximum(found, 0)], -1)
        self._neighbour_row = np.full(len(self.paths), -1, dtype=np.int64)
        self._neighbour_row[pool] = np.arange(len(pool))
        logger.info("caption neighbours of %d training examples in %.1f s", len(pool), time.perf_counter() - t)

    def hard_batch(self, indices: Sequence[int]) -> list[int]:
        """A training batch with hard negatives: the first ``(1 - hard_negatives)`` share of
        ``indices`` is kept, and the rest is filled with a caption neighbour of each kept example
        in turn (drawn with torch's generator, so a resumed run draws the same), topped up from
        ``indices`` where neighbours run out."""
        size = len(indices)
        if self.settings.hard_negatives <= 0 or size < 2:
            return [int(i) for i in indices]
        if self._neighbours is None:
            self._find_neighbours()
        assert self._neighbours is not None and self._neighbour_row is not None
        n_seeds = max(1, round(size * (1 - self.settings.hard_negatives)))
        batch = [int(i) for i in indices[:n_seeds]]
        have = set(batch)
        for i in batch[:n_seeds]:
            if len(batch) >= size:
                break
            row = self._neighbour_row[i]
            options = [int(j) for j in self._neighbours[row] if j >= 0 and int(j) not in have] if row >= 0 else []
            if options:
                j = options[int(torch.randint(len(options), (1,)))]
                batch.append(j)
                have.add(j)
        for i in indices[n_seeds:]:
            if len(batch) >= size:
                break
            if int(i) not in have:
                batch.append(int(i))
                have.add(int(i))
        return batch

    def loss(self, indices: Sequence[int], *, train: bool) -> torch.Tensor:
        """Mean ClipLoss of a batch (with hard negatives when training, if set); one image per
        distinct caption is kept."""
        from open_clip.loss import ClipLoss

        if self._loss_fn is None:
            self._loss_fn = ClipLoss()
        self.model.train(train)
        if train:
            indices = self.hard_batch(indices)
        seen: set[str] = set()
        keep: list[int] = []
        texts: list[str] = []
        for i in indices:
            caps = self.captions[i]
            text = caps[int(torch.randint(len(caps), (1,)))] if train and len(caps) > 1 else caps[0]
            if text not in seen:
                seen.add(text)
                keep.append(i)
                texts.append(text)
        img, txt = self._features(keep, texts)
        return self._loss_fn(img, txt, self.logit_scale())

    @torch.no_grad()
    def embed(self, indices: Sequence[int], batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Normalised image and first-caption embeddings of examples ``indices``: two ``(N, D)``."""
        self.model.eval()
        imgs, txts = [], []
        for start in range(0, len(indices), batch_size):
            chunk = list(indices[start : start + batch_size])
            img, txt = self._features(chunk, [self.captions[i][0] for i in chunk])
            imgs.append(img.cpu().numpy())
            txts.append(txt.cpu().numpy())
        return np.concatenate(imgs), np.concatenate(txts)

    def evaluate(self, indices: Sequence[int]) -> dict[str, float]:
        """Recall@1 over the validation examples, both ways: a hit is any image sharing the
        caption (text->image) or any caption of the same text (image->text)."""
        img, txt = self.embed(indices)
        texts = [self.captions[i][0] for i in indices]
        same = np.array([[a == b for b in texts] for a in texts])
        sims = txt @ img.T
        t2i = float(same[np.arange(len(texts)), sims.argmax(1)].mean())
        i2t = float(same[np.arange(len(texts)), sims.T.argmax(1)].mean())
        return {"t2i_r1": t2i, "i2t_r1": i2t, "logit_scale": float(self.logit_scale())}

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    def save_artifact(self, folder: Path) -> None:
        """An ``open_clip:local-dir:`` folder, or a transformers ``save_pretrained`` folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.spec.backend == "open_clip":
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(folder / "open_clip_model.safetensors"))
            (folder / "open_clip_config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        else:
            self.model.save_pretrained(folder)
            self.backend.tokenizer.save_pretrained(folder)
            self.backend.processor.save_pretrained(folder)
        (folder / "train_info.json").write_text(
            json.dumps({"task": "clip", "base_model": str(self.spec), "settings": self.settings.to_dict()},
                       indent=2) + "\n")

    def to(self, device: str) -> None:
        self.model.to(device)


def artifact_spec(folder: str | Path) -> str:
    """The model spec of a saved artifact folder (``open_clip:local-dir:...`` or ``hf:...``)."""
    return str(parse_model_spec(str(Path(folder).resolve())))


def train_clip(
    source: str | Path, out_dir: str | Path, *, model: str | None = None,
    settings: TrainSettings | None = None, task_settings: ClipTaskSettings | None = None,
    collection: str | Path | None = None, image_root: str | Path | None = None,
    allow_outside_root: bool = False, resume: bool = False, progress: bool = True,
    metrics_path: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tune a CLIP encoder on the captioned images of ``source``; with ``collection``,
    re-embed that collection with the best checkpoint afterwards.

    Args:
        model: the encoder to start from (default: the collection's encoder, else the default model).
        settings: loop settings (default: :attr:`ClipTaskSettings.TRAIN_DEFAULTS`).

    Returns:
        A JSON-able summary: the :class:`TrainResult` fields, ``model`` (the trained encoder's
        spec: ``out_dir/best``), ``base_model``, ``examples``, ``skipped`` and ``reembedded``.
    """
    if model is None and collection is not None:
        from ..store.manifest import Manifest

        model = Manifest.read(Path(collection).expanduser().resolve()).encoder
    settings = settings or TrainSettings(**ClipTaskSettings.TRAIN_DEFAULTS)
    data = read_captioned_images(source, image_root=image_root, allow_outside_root=allow_outside_root)
    task = ClipTask(model or DEFAULT_MODEL, data, task_settings)
    result: TrainResult = train(task, settings, out_dir, resume=resume, progress=progress,
                                metrics_path=metrics_path)
    trained = artifact_spec(result.best_dir)
    summary: dict[str, Any] = {
        "task": "clip", **result.to_dict(), "model": trained, "base_model": str(task.spec),
        "examples": task.num_examples(), "skipped": [p.to_dict() for p in task.skipped],
        "reembedded": None,
    }
    if collection is not None:
        report = reembed_collection(collection, trained, device=settings.device, progress=progress)
        summary["reembedded"] = report.to_dict()
    return summary
