"""``train prefix``: learn a mapping network from CLIP image embeddings to generator prefixes.

The task reads image-caption pairs from any ingest source, embeds every image once with the
frozen CLIP encoder (cached in ``cache_dir``), and trains the :class:`PrefixMapper` (and, when
``train_generator`` is set, the generator too) to maximise ``log P(caption | prefix, prompt)``
(teacher forcing, mean over caption tokens). The prompt is :func:`caption_prompt` of the captions
of the image's ``k`` nearest neighbours in a ``retrieval`` collection (SmallCap style; the image
itself is left out), or of none. The artifact is an image-prefix checkpoint folder
(:mod:`crossmodal_rag.generation.prefix`) that ``ask --image-prefix`` and ``caption`` load.

Example::

    from crossmodal_rag.training import TrainSettings, train
    from crossmodal_rag.training.prefix import PrefixTask, PrefixTaskSettings
    task = PrefixTask("shapes/", PrefixTaskSettings(model="open_clip:local-dir:clip",
                                                    generator="t5-small-folder"))
    result = train(task, TrainSettings(max_steps=2000), "runs/prefix")   # result.best_dir
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._config import strict_from_dict
from ..encoders import ClipEncoder, parse_model_spec
from ..errors import ImageDecodeError, SourceError
from ..generation.models import GenerationSettings, Generator
from ..generation.prefix import (
    ImagePrefix,
    PrefixConfig,
    PrefixMapper,
    PrefixMismatchError,
    PrefixSettings,
    canonical_generator_spec,
    caption_prompt,
)
from ..ingestion.images import load_image
from ..ingestion.sources import Problem
from .loop import TrainSettings, resolve_device, train
from .pairs import read_captioned_images

__all__ = ["TRAIN_DEFAULTS", "PrefixTask", "PrefixTaskSettings", "normalise_caption", "train_prefix"]

logger = logging.getLogger(__name__)

#: The loop settings ``train prefix`` uses unless told otherwise (flags override each).
TRAIN_DEFAULTS: dict[str, Any] = {"max_steps": 2000, "batch_size": 32, "lr": 2e-4, "warmup_steps": 100,
                                  "eval_every": 200, "checkpoint_every": 500}


@dataclass(frozen=True)
class PrefixTaskSettings:
    """What ``train prefix`` trains, on top of the loop's :class:`TrainSettings`."""

    model: str  # CLIP model spec whose (frozen) image embeddings the mapper reads
    generator: str  # generator spec (hub id, save_pretrained folder)
    prefix: PrefixSettings = field(default_factory=PrefixSettings)  # the mapper's shape
    train_generator: bool = False  # fine-tune the generator with the mapper (else frozen)
    retrieval: str | None = None  # collection whose neighbours' captions go in the prompt
    k: int = 4  # neighbours' captions per prompt (with retrieval)
    max_caption_tokens: int = 64  # longest caption generated at evaluation
    eval_examples: int = 64  # held-out images captioned for exact match per validation pass
    image_batch_size: int = 64  # images per CLIP forward pass when embedding

    def __post_init__(self) -> None:
        if not self.model.strip() or not self.generator.strip():
            raise ValueError("prefix training needs a CLIP model spec and a generator spec")
        for name in ("k", "max_caption_tokens", "image_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_examples < 0:
            raise ValueError(f"eval_examples must be >= 0, got {self.eval_examples}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrefixTaskSettings:
        data = dict(data)
        if isinstance(data.get("prefix"), dict):
            data["prefix"] = PrefixSettings.from_dict(data["prefix"])
        return strict_from_dict(cls, data, "prefix task settings")


def normalise_caption(text: str) -> str:
    """Lower case, single spaces, no trailing full stop: what exact match compares."""
    return " ".join(text.lower().split()).rstrip(" .")


class PrefixTask:
    """The ``prefix`` :class:`~crossmodal_rag.training.TrainTask`: one example per (image, caption)
    pair; images that cannot be decoded are skipped (``self.skipped``)."""

    name = "prefix"

    def __init__(
        self, source: str | Path, settings: PrefixTaskSettings, *, image_root: str | Path | None = None,
        allow_outside_root: bool = False, cache_dir: str | Path | None = None, device: str = "cpu",
        seed: int = 0,
    ) -> None:
        self.settings, self.source, self.device = settings, str(source), device
        data = read_captioned_images(source, image_root=image_root, allow_outside_root=allow_outside_root)
        self.skipped: list[Problem] = list(data.skipped)
        self.encoder = ClipEncoder(settings.model, device=device)
        emb, ok = self._embed(data.paths, Path(cache_dir) if cache_dir else None)
        keep = [i for i in range(len(data.paths)) if ok[i]]
        if len(keep) < 2:
            raise SourceError(f"{source}: fewer than 2 readable captioned images to train on")
        self.paths = [data.paths[i] for i in keep]
        self.captions = [data.captions[i] for i in keep]
        self.embeddings = torch.from_numpy(emb[keep])  # (N_images, D)
        #: one example per (image, caption) pair: (image index, caption)
        self.examples = [(i, c) for i, caps in enumerate(self.captions) for c in caps]
        self.prompts = [caption_prompt(n) for n in self._neighbour_captions()]

        self.generator = Generator(settings.generator, device=device).load()
        self.generator.model.requires_grad_(settings.train_generator)
        h = int(self.generator.model.get_input_embeddings().embedding_dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.mapper = PrefixMapper(settings.prefix, self.embeddings.shape[1], h).to(device)
        self.config = PrefixConfig(
            settings=settings.prefix, encoder=str(parse_model_spec(settings.model)),
            encoder_dim=int(self.embeddings.shape[1]), generator=canonical_generator_spec(settings.generator),
            embed_dim=h, generator_trained=settings.train_generator,
            retrieval_k=settings.k if settings.retrieval else 0,
            extra={"source": self.source, "images": len(self.paths), "pairs": len(self.examples),
                   "retrieval": settings.retrieval})
        logger.info("prefix task: %d images, %d pairs, %d skipped, prefix %dx%d", len(self.paths),
                    len(self.examples), len(self.skipped), settings.prefix.prefix_length, h)

    # -- data ----------------------------------------------------------------------------------
    def _embed(self, paths: list[Path], cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
        """``(N, D)`` float32 image embeddings and an ``(N,)`` readable mask, cached on disk."""
        cache = None
        if cache_dir is not None:
            h = hashlib.sha256(str(self.encoder.spec).encode())
            for p in paths:
                st = p.stat() if p.exists() else None
                h.update(f"{p}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\n".encode())
            cache = cache_dir / f"image_embeddings-{h.hexdigest()[:16]}.npz"
            if cache.is_file():
                with np.load(cache) as f:
                    logger.info("image embeddings from cache %s", cache)
                    return f["embeddings"], f["ok"]
        dim = self.encoder.dim
        emb = np.zeros((len(paths), dim), dtype=np.float32)
        ok = np.zeros(len(paths), dtype=bool)
        bs = self.settings.image_batch_size
        for start in range(0, len(paths), bs):
            pils, rows = [], []
            for i in range(start, min(start + bs, len(paths))):
                try:
                    pils.append(load_image(paths[i]).image)
                    rows.append(i)
                except ImageDecodeError as e:
                    self.skipped.append(Problem(str(paths[i]), e.reason))
                    logger.warning("skipping %s: %s", paths[i], e.reason)
            if pils:
                emb[rows] = self.encoder.encode_images(pils, batch_size=bs)
                ok[rows] = True
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, embeddings=emb, ok=ok)
            tmp.replace(cache)
        return emb, ok

    def _neighbour_captions(self) -> list[list[str]]:
        """Per image: the captions of its ``k`` nearest caption items in the retrieval collection
        (captions of the image itself left out); empty lists without retrieval."""
        s = self.settings
        if not s.retrieval:
            return [[] for _ in self.paths]
        from ..collection import Collection

        with Collection.open(s.retrieval) as coll:
            if coll.manifest.encoder != str(self.encoder.spec):
                raise PrefixMismatchError(
                    f"retrieval collection {s.retrieval} was built with {coll.manifest.encoder}, but the "
                    f"prefix is trained on {self.encoder.spec}; use a collection built with the same "
                    "--model")
            hits = coll.search_vectors(self.embeddings.numpy(), k=s.k + 8, target="texts")
        out = []
        for path, row in zip(self.paths, hits, strict=True):
            own = str(Path(path).resolve())
            out.append([h.text or "" for h in row if h.path is None or str(Path(h.path).resolve()) != own][: s.k])
        return out

    # -- TrainTask -----------------------------------------------------------------------------
    def num_examples(self) -> int:
        return len(self.examples)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.mapper.parameters())
        if self.settings.train_generator:
            params += list(self.generator.model.parameters())
        return params

    def loss(self, indices: Sequence[int], *, train: bool) -> torch.Tensor:
        """Mean negative log-likelihood per caption token of the batch's captions."""
        self.mapper.train(train)
        self.generator.model.train(train and self.settings.train_generator)
        images = [self.examples[i][0] for i in indices]
        prefixes = self.mapper(self.embeddings[images].to(self.device))
        tok, sel = self.generator.token_logprobs([self.prompts[j] for j in images],
                                                 [self.examples[i][1] for i in indices], list(prefixes))
        return -(tok * sel).sum() / sel.sum().clamp_min(1)

    def captions_for(self, images: Sequence[int], batch_size: int = 64) -> list[str]:
        """Greedy captions of training images (by image index), with the current weights."""
        self.mapper.eval()
        self.generator.model.eval()
        gs = GenerationSettings(max_new_tokens=self.settings.max_caption_tokens)
        out: list[str] = []
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = list(images[start : start + batch_size])
                prefixes = self.mapper(self.embeddings[chunk].to(self.device))
                texts = self.generator.generate([self.prompts[j] for j in chunk], gs, prefixes=list(prefixes))
                out += [t[0] for t in texts]
        return out

    def evaluate(self, indices: Sequence[int]) -> dict[str, float]:
        """Exact match of greedy captions on up to ``eval_examples`` held-out images: the
        generated caption equals one of the image's captions (after :func:`normalise_caption`)."""
        images = list(dict.fromkeys(self.examples[i][0] for i in indices))[: self.settings.eval_examples]
        if not images:
            return {}
        generated = self.captions_for(images)
        hits = [normalise_caption(g) in {normalise_caption(c) for c in self.captions[j]}
                for g, j in zip(generated, images, strict=True)]
        return {"exact_match": float(np.mean(hits)), "eval_images": float(len(images))}

    def state_dict(self) -> dict[str, Any]:
        state = {f"mapper.{k}": v for k, v in self.mapper.state_dict().items()}
        if self.settings.train_generator:
            state.update({f"generator.{k}": v for k, v in self.generator.model.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mapper.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("mapper.")})
        if self.settings.train_generator:
            self.generator.model.load_state_dict(
                {k[10:]: v for k, v in state.items() if k.startswith("generator.")})

    def save_artifact(self, folder: Path) -> None:
        """The usable checkpoint: ``prefix_config.json`` + ``mapper.safetensors`` (+ ``generator/``)."""
        prefix = ImagePrefix(self.config, self.mapper)
        prefix.save(folder, generator=self.generator)
        (Path(folder) / "prefix_task.json").write_text(
            json.dumps({"task": "prefix", "settings": self.settings.to_dict()}, indent=2) + "\n")

    def to(self, device: str) -> None:
        self.device = device
        self.mapper.to(device)
        self.generator.model.to(device)
        self.generator.device = device


def train_prefix(
    source: str | Path, out_dir: str | Path, task_settings: PrefixTaskSettings,
    settings: TrainSettings | None = None, *, image_root: str | Path | None = None,
    allow_outside_root: bool = False, resume: bool = False, progress: bool = True,
    metrics_path: str | Path | None = None,
) -> dict[str, Any]:
    """Train an image prefix on ``source``'s image-caption pairs into ``out_dir`` (layout of
    :func:`~crossmodal_rag.training.train`; image embeddings cached in ``out_dir/cache``).
    Returns a JSON-able summary; ``summary["image_prefix"]`` is the checkpoint to use (``best/``)."""
    settings = settings or TrainSettings(**TRAIN_DEFAULTS)
    device = resolve_device(settings.device)
    task = PrefixTask(source, task_settings, image_root=image_root, allow_outside_root=allow_outside_root,
                      cache_dir=Path(out_dir) / "cache", device=device, seed=settings.seed)
    result = train(task, settings, out_dir, resume=resume, progress=progress, metrics_path=metrics_path)
    last_val: dict[str, Any] = {}
    with open(result.metrics_path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if record.get("split") == "val":
                last_val = record
    return {"task": "prefix", **result.to_dict(), "image_prefix": str(result.best_dir),
            "images": len(task.paths), "pairs": len(task.examples), "skipped": len(task.skipped),
            "last_validation": last_val, "device": device}
