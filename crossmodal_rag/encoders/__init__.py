"""CLIP encoders: images and texts into one L2-normalised embedding space.

One class, :class:`ClipEncoder`, over two backends (open_clip and transformers CLIP) chosen by
the model spec string (grammar in :mod:`crossmodal_rag.encoders.spec`). Weights load on first
use, once per process (:func:`load_encoder` caches encoders by spec and device).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .spec import DEFAULT_MODEL, TEXT_ONLY, ModelSpec, parse_model_spec

if TYPE_CHECKING:  # numpy, torch and PIL load with the first encoder that needs them
    import numpy as np
    import torch
    from PIL import Image

__all__ = [
    "DEFAULT_MODEL",
    "TEXT_ONLY",
    "ClipEncoder",
    "ModelSpec",
    "default_device",
    "load_encoder",
    "parse_model_spec",
]

logger = logging.getLogger(__name__)


class ClipBackend(Protocol):
    """What a backend provides; :class:`ClipEncoder` adds batching and normalisation."""

    spec: ModelSpec

    def load(self, device: str) -> None: ...
    @property
    def dim(self) -> int: ...
    @property
    def max_text_tokens(self) -> int: ...
    def preprocess(self, image: Image.Image) -> torch.Tensor: ...
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def text_features(self, texts: list[str]) -> torch.Tensor: ...
    def count_tokens(self, text: str) -> int: ...


def default_device() -> str:
    """``$CROSSMODAL_RAG_DEVICE`` if set, else CUDA when available, else CPU."""
    forced = os.environ.get("CROSSMODAL_RAG_DEVICE")
    if forced:
        return forced
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_for(spec: ModelSpec) -> str:
    """ONNX runs on the CPU (and must not import torch to ask about CUDA)."""
    return "cpu" if spec.backend == "onnx" else default_device()


def _make_backend(spec: ModelSpec) -> ClipBackend:
    if spec.backend == "onnx":
        from .onnx_clip import OnnxClipBackend

        return OnnxClipBackend(spec)  # type: ignore[return-value]  # numpy in and out, no torch
    if spec.backend == TEXT_ONLY:
        from .textonly import TextOnlyBackend

        return TextOnlyBackend(spec)
    if spec.backend == "open_clip":
        from .openclip import OpenClipBackend

        return OpenClipBackend(spec)
    from .hf import HFClipBackend

    return HFClipBackend(spec)


class ClipEncoder:
    """Encodes images and texts into L2-normalised float32 vectors of shape ``(N, dim)``.

    The model loads on first use (thread-safe). Inputs to :meth:`encode_images` may be PIL
    images or paths; paths are decoded with :func:`crossmodal_rag.ingestion.images.load_image`.
    """

    def __init__(self, spec: str | ModelSpec, device: str | None = None) -> None:
        self.spec = parse_model_spec(spec)
        self.device = device or _device_for(self.spec)
        self._backend = _make_backend(self.spec)
        self._numpy = self.spec.backend == "onnx"  # the backend takes and gives numpy arrays
        self._loaded = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ClipEncoder({str(self.spec)!r}, device={self.device!r})"

    # -- loading -------------------------------------------------------------------------
    def load(self) -> ClipEncoder:
        """Load the weights now (otherwise the first encode does it). Returns ``self``."""
        if not self._loaded:
            with self._lock:
                if not self._loaded and self.spec.backend == TEXT_ONLY:  # no weights: no loading line
                    self._backend.load(self.device)
                    self._loaded = True
                if not self._loaded:
                    logger.info("loading CLIP model %s on %s", self.spec, self.device)
                    from ..progress import loading

                    with loading(f"CLIP model {self.spec}"):
                        self._backend.load(self.device)
                    self._loaded = True
        return self

    @property
    def backend(self) -> ClipBackend:
        return self.load()._backend

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return self.backend.dim

    @property
    def max_text_tokens(self) -> int:
        """Token context of the text tower; longer texts are truncated."""
        return self.backend.max_text_tokens

    def text_windows(self, text: str, overlap: float = 0.25) -> list[str]:
        """Split a text longer than the model's context into overlapping word windows that each
        fit (a text that fits is returned alone). Windows overlap by about ``overlap`` of their
        words, so a phrase cut at one window's edge is whole in the next."""
        words = text.split()
        budget = self.max_text_tokens - 2  # start and end tokens
        if not words or self.backend.count_tokens(text) <= budget:
            return [text]
        # CLIP's BPE splits on whitespace first, so per-word counts add up.
        costs = [max(1, self.backend.count_tokens(w)) for w in words]
        windows: list[str] = []
        start = 0
        while start < len(words):
            end, used = start, 0
            while end < len(words) and used + costs[end] <= budget:
                used += costs[end]
                end += 1
            end = max(end, start + 1)  # a single over-long word still makes a (truncated) window
            windows.append(" ".join(words[start:end]))
            if end >= len(words):
                break
            start = max(start + 1, end - int((end - start) * overlap))
        return windows

    # -- images --------------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One RGB PIL image -> the model's input tensor ``(3, H, W)``."""
        return self.backend.preprocess(image)

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed batch ``(N, 3, H, W)`` -> normalised embeddings ``(N, D)`` float32."""
        if self._numpy:
            return _normalise(self.backend.image_features(pixels))
        import torch

        with torch.inference_mode():
            feats = self.backend.image_features(pixels.to(self.device))
            return _normalise(feats)

    def encode_images(
        self, images: Sequence[Image.Image | str | Path], batch_size: int = 32
    ) -> np.ndarray:
        """Images (PIL or paths) -> ``(N, D)`` float32, rows of unit L2 norm."""
        import numpy as np
        from PIL import Image

        from ..ingestion.images import load_image

        stack: Any = np.stack
        if not self._numpy:
            import torch

            stack = torch.stack

        out: list[np.ndarray] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pil = [im if isinstance(im, Image.Image) else load_image(im).image for im in chunk]
            pixels = stack([self.preprocess(im.convert("RGB")) for im in pil])
            out.append(self.encode_pixels(pixels))
        return _concat(out, self)

    # -- texts ---------------------------------------------------------------------------
    def encode_texts(self, texts: str | Iterable[str], batch_size: int = 64) -> np.ndarray:
        """Texts -> ``(N, D)`` float32, rows of unit L2 norm; a single string gives N=1.

        Texts longer than the model's context are truncated by its tokenizer.
        """
        items = [texts] if isinstance(texts, str) else list(texts)
        if self._numpy:
            return _concat([_normalise(self.backend.text_features(items[i : i + batch_size]))
                            for i in range(0, len(items), batch_size)], self)
        import torch

        with torch.inference_mode():
            out = [
                _normalise(self.backend.text_features(items[i : i + batch_size]))
                for i in range(0, len(items), batch_size)
            ]
        return _concat(out, self)


def _normalise(feats: torch.Tensor | np.ndarray) -> np.ndarray:
    import numpy as np

    if isinstance(feats, np.ndarray):
        feats = feats.astype(np.float32, copy=False)
        norms = np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), np.float32(1e-12))
        return np.ascontiguousarray(feats / norms, dtype=np.float32)
    feats = feats.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return np.ascontiguousarray(feats.cpu().numpy(), dtype=np.float32)


def _concat(parts: list[np.ndarray], enc: ClipEncoder) -> np.ndarray:
    import numpy as np

    if not parts:
        return np.zeros((0, enc.dim), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


_CACHE: dict[tuple[str, str], ClipEncoder] = {}
_CACHE_LOCK = threading.Lock()


def load_encoder(spec: str | ModelSpec | None = None, device: str | None = None) -> ClipEncoder:
    """The process-wide encoder for ``spec`` (default :data:`DEFAULT_MODEL`) on ``device``.

    Returns at once; weights load on first use. Raises :class:`~crossmodal_rag.errors.ModelSpecError`
    for a malformed spec.
    """
    from .onnx_runtime import resolve_clip_spec

    parsed = parse_model_spec(spec or DEFAULT_MODEL)
    if parsed.backend != TEXT_ONLY:  # no weights, so no export: the same under every runtime
        parsed = resolve_clip_spec(parsed)
    key = (str(parsed), device or _device_for(parsed))
    with _CACHE_LOCK:
        enc = _CACHE.get(key)
        if enc is None:
            enc = _CACHE[key] = ClipEncoder(parsed, device=key[1])
        return enc
