"""The Hugging Face transformers CLIP backend."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import ModelSpecError, WeightsUnavailableError
from ._hub import hub_reachable, refused_pickle, unsafe_weights_error, weights_hint
from .spec import ModelSpec

logger = logging.getLogger(__name__)


def _features(out: Any) -> torch.Tensor:
    """transformers returns a tensor (v4) or a model output holding the pooled embeds (v5)."""
    if isinstance(out, torch.Tensor):
        return out
    for attr in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected feature output type {type(out).__name__}")


class HFClipBackend:
    """Loads and runs a transformers CLIP-style model (anything with get_image/text_features)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: Any = None
        self.tokenizer: Any = None
        self.processor: Any = None

    def load(self, device: str) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        name = self.spec.name
        local = Path(name).is_absolute()
        if local:
            folder = Path(name)
            if not folder.is_dir():
                raise ModelSpecError(f"transformers model folder does not exist: {folder}")
            if not (folder / "config.json").is_file():
                raise ModelSpecError(
                    f"{folder} has no config.json; hf:FOLDER must be a folder written by "
                    "save_pretrained (config.json, weights, tokenizer and preprocessor files)"
                )
        offline = not local and not hub_reachable()
        try:
            model = AutoModel.from_pretrained(name, local_files_only=local or offline)
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local or offline)
            processor = AutoImageProcessor.from_pretrained(name, local_files_only=local or offline)
        except OSError as e:
            if offline:
                raise WeightsUnavailableError(weights_hint(str(self.spec))) from e
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelSpecError(f"cannot load transformers model {self.spec}: {msg}") from e
        except (ValueError, KeyError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelSpecError(f"cannot load transformers model {self.spec}: {msg}") from e
        except Exception as e:
            if refused_pickle(e):  # torch.load(weights_only=True) refused the weights file
                raise unsafe_weights_error(f"transformers model {self.spec}", e) from e
            raise
        if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
            raise ModelSpecError(
                f"{self.spec} is a {type(model).__name__}, not a dual image/text encoder "
                "(it needs get_image_features and get_text_features, as CLIPModel has)"
            )
        model.to(device).eval()
        self.model, self.tokenizer, self.processor = model, tokenizer, processor

    @property
    def dim(self) -> int:
        cfg = self.model.config
        dim = getattr(cfg, "projection_dim", None)
        if dim:
            return int(dim)
        return int(self.text_features(["a"]).shape[-1])

    @property
    def max_text_tokens(self) -> int:
        text_cfg = getattr(self.model.config, "text_config", None)
        n = getattr(text_cfg, "max_position_embeddings", None) or getattr(
            self.tokenizer, "model_max_length", 77
        )
        return int(min(n, 4096))

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def text_features(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        ).to(device)
        kwargs = {"input_ids": batch["input_ids"]}
        if "attention_mask" in batch:
            kwargs["attention_mask"] = batch["attention_mask"]
        return _features(self.model.get_text_features(**kwargs))
