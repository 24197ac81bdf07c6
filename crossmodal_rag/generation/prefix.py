"""Image prefixes: a mapping network from CLIP image embeddings to generator input embeddings.

A :class:`PrefixMapper` turns one L2-normalised CLIP image embedding ``(D,)`` into
``prefix_length`` vectors of the generator's input-embedding size ``(P, H)`` (as in ClipCap: an
MLP, or a small transformer over learned constants). The generator reads them before the text
prompt's token embeddings (``inputs_embeds``; see :class:`~crossmodal_rag.generation.Generator`),
so it sees the image itself, not only its captions.

A checkpoint is a folder (load it with :func:`load_image_prefix`)::

    prefix_config.json     PrefixConfig: settings, the CLIP encoder spec and dimension, the
                           generator spec and embedding size, library version
    mapper.safetensors     the mapping network's weights
    generator/             the generator, when it was fine-tuned with the mapper (save_pretrained)

A checkpoint belongs to one encoder and one generator: :meth:`ImagePrefix.check_encoder` and
:meth:`ImagePrefix.check_generator` refuse others with a message naming both sides.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .._config import strict_from_dict
from .._version import __version__
from ..encoders import default_device, parse_model_spec
from ..encoders._hub import hub_reachable
from ..errors import ModelSpecError, WeightsUnavailableError
from ..safe_io import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from .interface import TextGenerator
    from .models import Generator

__all__ = [
    "CONFIG_FILE",
    "MAPPER_KINDS",
    "ImagePrefix",
    "PrefixConfig",
    "PrefixMapper",
    "PrefixMismatchError",
    "PrefixSettings",
    "canonical_generator_spec",
    "caption_prompt",
    "load_image_prefix",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "prefix_config.json"
WEIGHTS_FILE = "mapper.safetensors"
GENERATOR_DIR = "generator"
FORMAT = "crossmodal-rag-image-prefix"
FORMAT_VERSION = 1
MAPPER_KINDS = ("mlp", "transformer")


class PrefixMismatchError(ModelSpecError):
    """A prefix checkpoint is used with an encoder or generator it was not trained for."""


@dataclass(frozen=True)
class PrefixSettings:
    """The mapping network's shape."""

    kind: str = "mlp"  # mlp | transformer (ClipCap's transformer mapper)
    prefix_length: int = 10  # P: prefix vectors prepended to the prompt
    hidden_size: int = 512  # mlp: hidden width; transformer: model width
    num_layers: int = 2  # mlp: hidden layers; transformer: encoder layers
    num_heads: int = 8  # transformer only: attention heads (must divide hidden_size)
    dropout: float = 0.0  # dropout inside the mapper while training
    #: multiply the (unit-length) image embedding by sqrt(D) first, so each coordinate has unit
    #: RMS as the mapper's initialisation expects (checkpoints from before this setting: off)
    scale_input: bool = True

    def __post_init__(self) -> None:
        if self.kind not in MAPPER_KINDS:
            raise ValueError(f"unknown mapper kind {self.kind!r}; choose one of {', '.join(MAPPER_KINDS)}")
        for name in ("prefix_length", "hidden_size", "num_layers", "num_heads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"prefix setting {name} must be >= 1, got {getattr(self, name)}")
        if self.kind == "transformer" and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} must be a multiple of num_heads "
                             f"{self.num_heads} for the transformer mapper")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrefixSettings:
        return strict_from_dict(cls, data, "prefix settings")


@dataclass(frozen=True)
class PrefixConfig:
    """What ``prefix_config.json`` holds: the mapper's shape and what it belongs to."""

    settings: PrefixSettings
    encoder: str  # canonical CLIP model spec whose image embeddings the mapper reads
    encoder_dim: int  # D
    generator: str  # the generator spec it was trained with (the base model if fine-tuned)
    embed_dim: int  # H: the generator's input-embedding size
    generator_trained: bool = False  # True: generator/ holds the fine-tuned generator
    retrieval_k: int = 0  # captions of retrieved neighbours in the training prompts (0: none)
    library_version: str = __version__
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # free-form facts (training run, data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrefixConfig:
        data = dict(data)
        if data.get("format") != FORMAT:
            raise ValueError(f"not an image-prefix config (format {data.get('format')!r})")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"image-prefix format version {data['format_version']} is newer than this "
                             f"library reads ({FORMAT_VERSION}); upgrade crossmodal-rag")
        settings = dict(data.get("settings", {}))
        settings.setdefault("scale_input", False)  # written before the setting existed
        data["settings"] = PrefixSettings.from_dict(settings)
        return strict_from_dict(cls, data, "prefix config")


class _MlpMapper(nn.Module):
    def __init__(self, d: int, h: int, s: PrefixSettings) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = d
        for _ in range(s.num_layers):
            layers += [nn.Linear(width, s.hidden_size), nn.Tanh(), nn.Dropout(s.dropout)]
            width = s.hidden_size
        layers.append(nn.Linear(width, s.prefix_length * h))
        self.net = nn.Sequential(*layers)
        self.p, self.h = s.prefix_length, h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(x.shape[0], self.p, self.h)


class _TransformerMapper(nn.Module):
    """ClipCap's mapper: the embedding is projected to P tokens, P learned constants are appended,
    a transformer encoder mixes them and the constants' outputs become the prefix."""

    def __init__(self, d: int, h: int, s: PrefixSettings) -> None:
        super().__init__()
        w, self.p = s.hidden_size, s.prefix_length
        self.inp = nn.Linear(d, self.p * w)
        self.const = nn.Parameter(torch.randn(self.p, w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, s.num_heads, dim_feedforward=2 * w, dropout=s.dropout,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, s.num_layers, enable_nested_tensor=False)
        self.out = nn.Linear(w, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.inp(x).view(x.shape[0], self.p, -1)
        seq = torch.cat([tokens, self.const.expand(x.shape[0], -1, -1)], dim=1)
        return self.out(self.encoder(seq)[:, self.p :])


class PrefixMapper(nn.Module):
    """CLIP image embeddings ``(B, D)`` -> prefix embeddings ``(B, P, H)`` (float32)."""

    def __init__(self, settings: PrefixSettings, encoder_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.settings, self.encoder_dim, self.embed_dim = settings, int(encoder_dim), int(embed_dim)
        cls = _MlpMapper if settings.kind == "mlp" else _TransformerMapper
        self.net = cls(self.encoder_dim, self.embed_dim, settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.encoder_dim:
            raise ValueError(f"expected image embeddings of shape (B, {self.encoder_dim}), got "
                             f"{tuple(x.shape)}")
        x = x.float()
        if self.settings.scale_input:
            x = x * math.sqrt(self.encoder_dim)
        return self.net(x)


def canonical_generator_spec(spec: str) -> str:
    """A generator spec as recorded in checkpoints: local folders and files made absolute."""
    s = spec.strip()
    path = Path(os.path.expanduser(s))
    if path.exists() or s.startswith(("/", "./", "../", "~")):
        return str(path.resolve())
    return s


def caption_prompt(captions: list[str]) -> str:
    """The text prompt of retrieval-augmented captioning (SmallCap style): the retrieved
    neighbours' captions, then the cue the caption continues from. Training and ``caption`` use
    this same function."""
    cleaned = [" ".join(c.split()) for c in captions if c and c.strip()]
    if not cleaned:
        return "This image shows:"
    return "Similar images show: " + "; ".join(cleaned) + ". This image shows:"


class ImagePrefix:
    """A prefix checkpoint: the mapper plus the facts of which encoder and generator it belongs to."""

    def __init__(self, config: PrefixConfig, mapper: PrefixMapper, folder: Path | None = None) -> None:
        self.config, self.mapper, self.folder = config, mapper, folder
        self.mapper.eval()

    def __repr__(self) -> str:
        s = self.config.settings
        return (f"ImagePrefix({str(self.folder) if self.folder else '(unsaved)'!r}, {s.kind}, "
                f"P={s.prefix_length}, encoder={self.config.encoder!r})")

    @property
    def device(self) -> str:
        return str(next(self.mapper.parameters()).device)

    @property
    def label(self) -> str:
        return str(self.folder) if self.folder else "(unsaved image prefix)"

    @property
    def generator_spec(self) -> str:
        """The generator to run with: the fine-tuned copy inside the checkpoint, else the base."""
        if self.config.generator_trained:
            if self.folder is None:
                raise ModelSpecError("this image prefix has a fine-tuned generator but is not saved yet")
            return str(self.folder / GENERATOR_DIR)
        return self.config.generator

    def to(self, device: str) -> ImagePrefix:
        self.mapper.to(device)
        return self

    def prefixes(self, embeddings: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Image embeddings ``(N, D)`` (or ``(D,)``) -> prefix embeddings ``(N, P, H)``, no grad."""
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32)) if isinstance(embeddings, np.ndarray) \
            else embeddings.float()
        if x.ndim == 1:
            x = x[None]
        if x.shape[-1] != self.config.encoder_dim:
            raise PrefixMismatchError(
                f"image prefix {self.label} reads {self.config.encoder_dim}-d embeddings of "
                f"{self.config.encoder}, got {x.shape[-1]}-d ones; use the encoder it was trained for")
        with torch.no_grad():
            return self.mapper(x.to(self.device))

    # -- compatibility -----------------------------------------------------------------------
    def check_encoder(self, spec: str, dim: int) -> None:
        """Refuse image embeddings from any encoder other than the one the mapper was trained on."""
        try:
            asked = str(parse_model_spec(spec))
        except ModelSpecError:
            asked = spec
        if asked != self.config.encoder or int(dim) != self.config.encoder_dim:
            raise PrefixMismatchError(
                f"image prefix {self.label} was trained on embeddings of {self.config.encoder} "
                f"({self.config.encoder_dim}-d), but the encoder here is {asked} ({dim}-d); use a "
                f"collection built with {self.config.encoder}, or train a prefix for this encoder "
                f"(crossmodal-rag train prefix SOURCE --model {asked} ...)")

    def check_generator(self, generator: TextGenerator) -> None:
        """Refuse a generator other than the checkpoint's (or one of another embedding size, or
        one on a runtime that cannot read prefix vectors: llama.cpp)."""
        from .models import Generator

        want = canonical_generator_spec(self.generator_spec)
        got = canonical_generator_spec(generator.spec)
        if not isinstance(generator, Generator):
            raise PrefixMismatchError(
                f"image prefix {self.label} needs the transformers runtime, and generator {got} runs on "
                f"{generator.runtime}: set CROSSMODAL_RAG_GGUF_RUNTIME=transformers")
        generator.load()
        h = int(generator.model.get_input_embeddings().embedding_dim)
        if got != want or h != self.config.embed_dim:
            raise PrefixMismatchError(
                f"image prefix {self.label} belongs to generator {want} ({self.config.embed_dim}-d "
                f"input embeddings), but the generator here is {got} ({h}-d); leave --generator out "
                f"to use the checkpoint's own, or train a prefix for this generator "
                f"(crossmodal-rag train prefix SOURCE --generator {got} ...)")

    # -- saving and loading -------------------------------------------------------------------
    def save(self, folder: str | Path, generator: Generator | None = None) -> Path:
        """Write the checkpoint folder; ``generator`` is saved inside when the config says it was
        fine-tuned. Files are written to temporary names and renamed into place."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.config.generator_trained:
            if generator is None:
                raise ValueError("a fine-tuned generator must be saved with its prefix checkpoint")
            generator.model.save_pretrained(folder / GENERATOR_DIR)
            generator.tokenizer.save_pretrained(folder / GENERATOR_DIR)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.mapper.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS_FILE, save(state))
        atomic_write_text(folder / CONFIG_FILE, json.dumps(self.config.to_dict(), indent=2) + "\n")
        self.folder = folder.resolve()
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> ImagePrefix:
        """Load a checkpoint folder (see the module docstring for its layout)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(os.path.expanduser(str(folder)))
        if not folder.is_dir() or not (folder / CONFIG_FILE).is_file():
            raise ModelSpecError(
                f"image prefix {folder} does not exist or has no {CONFIG_FILE}; give a folder written "
                "by `crossmodal-rag train prefix` (its --out DIR/best or a checkpoint under it)")
        try:
            config = PrefixConfig.from_dict(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError, TypeError) as e:
            raise ModelSpecError(f"image prefix {folder}: invalid {CONFIG_FILE}: {e}") from e
        if config.generator_trained and not (folder / GENERATOR_DIR / "config.json").is_file():
            raise ModelSpecError(f"image prefix {folder} says its generator was fine-tuned, but "
                                 f"{GENERATOR_DIR}/ is missing; copy the whole checkpoint folder")
        mapper = PrefixMapper(config.settings, config.encoder_dim, config.embed_dim)
        try:
            mapper.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        except (OSError, SafetensorError, RuntimeError) as e:
            raise ModelSpecError(f"image prefix {folder}: cannot load {WEIGHTS_FILE} ({str(e).splitlines()[0]}); "
                                 "the checkpoint is incomplete or damaged") from e
        return cls(config, mapper.to(device or default_device()), folder.resolve())


def load_image_prefix(spec: str | Path, device: str | None = None) -> ImagePrefix:
    """Load an image-prefix checkpoint from a local folder or a model-hub repository id
    (``ORG/REPO``, fetched like generator weights; offline: from the local cache only)."""
    s = str(spec).strip()
    if not s:
        raise ModelSpecError("empty image-prefix spec: give a checkpoint folder")
    path = Path(os.path.expanduser(s))
    if path.exists() or s.startswith(("/", "./", "../", "~")) or s.count("/") != 1:
        return ImagePrefix.load(path, device)
    offline = not hub_reachable()
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(s, local_files_only=offline)
    except Exception as e:
        if offline:
            raise WeightsUnavailableError(
                f"could not load image prefix {s}: it is not in the local cache and the model hub cannot "
                "be reached (offline?). Point --image-prefix at a local checkpoint folder instead "
                "(one written by `crossmodal-rag train prefix`).") from e
        raise ModelSpecError(f"cannot load image prefix {s}: {str(e).splitlines()[0]}") from e
    return ImagePrefix.load(local, device)
