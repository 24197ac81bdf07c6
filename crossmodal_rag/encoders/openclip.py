"""The open_clip backend."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import ModelSpecError, WeightsUnavailableError
from ._hub import cached_hub_file, hub_reachable, refused_pickle, unsafe_weights_error, weights_hint
from .spec import ModelSpec

logger = logging.getLogger(__name__)

_WEIGHT_NAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "model.pth",
)


def _local_dir_weights(folder: Path) -> Path | None:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt*"))
    return found[0] if found else None


class OpenClipBackend:
    """Loads and runs an open_clip model; see :mod:`crossmodal_rag.encoders.spec` for specs."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model: Any = None
        self.tokenizer: Any = None
        self.transform: Any = None

    def load(self, device: str) -> None:
        import open_clip

        spec = self.spec
        kwargs: dict[str, Any] = {"device": device}
        name, pretrained = spec.name, spec.pretrained
        if name.startswith("local-dir:"):
            folder = Path(name[len("local-dir:") :])
            if not folder.is_dir():
                raise ModelSpecError(f"open_clip local-dir folder does not exist: {folder}")
            if not (folder / "open_clip_config.json").is_file():
                raise ModelSpecError(
                    f"{folder} has no open_clip_config.json; an open_clip local-dir folder holds "
                    "open_clip_config.json ({'model_cfg': ..., 'preprocess_cfg': ...}) and weights"
                )
            if _local_dir_weights(folder) is None:
                raise WeightsUnavailableError(
                    f"{folder} has open_clip_config.json but no weights file "
                    f"(expected one of {', '.join(_WEIGHT_NAMES[:3])})"
                )
        elif name.startswith("hf-hub:"):
            if not hub_reachable():
                repo = name[len("hf-hub:") :]
                cfg = cached_hub_file(repo, ["open_clip_config.json"])
                weights = cached_hub_file(repo, list(_WEIGHT_NAMES[:3]))
                if not (cfg and weights):
                    raise WeightsUnavailableError(weights_hint(str(spec)))
                name = "local-dir:" + os.path.dirname(cfg)
        else:
            if open_clip.get_model_config(name) is None:
                raise ModelSpecError(
                    f"unknown open_clip architecture {name!r}; known ones include "
                    f"{', '.join(open_clip.list_models()[:8])}, ... (open_clip.list_models())"
                )
            assert pretrained is not None
            if os.path.isabs(pretrained):
                if not os.path.isfile(pretrained):
                    raise ModelSpecError(f"checkpoint file does not exist: {pretrained}")
            else:
                cfg = open_clip.get_pretrained_cfg(name, pretrained)
                if not cfg:
                    tags = open_clip.list_pretrained_tags_by_model(name)
                    raise ModelSpecError(
                        f"unknown pretrained tag {pretrained!r} for {name}; known tags: "
                        f"{', '.join(tags) or 'none'} (or give a checkpoint file path)"
                    )
                if not hub_reachable():
                    local = self._cached_tag_weights(cfg)
                    if local is None:
                        raise WeightsUnavailableError(weights_hint(str(spec)))
                    # Same weights and preprocessing as the tag, read from the local cache.
                    for key, arg in (("mean", "image_mean"), ("std", "image_std"),
                                     ("interpolation", "image_interpolation"),
                                     ("resize_mode", "image_resize_mode")):
                        if cfg.get(key) is not None:
                            kwargs[arg] = cfg[key]
                    if cfg.get("quick_gelu"):
                        kwargs["force_quick_gelu"] = True
                    pretrained = local
            kwargs["pretrained"] = pretrained
        try:
            model, _, transform = open_clip.create_model_and_transforms(name, **kwargs)
            tokenizer = open_clip.get_tokenizer(name)
        except (WeightsUnavailableError, ModelSpecError):
            raise
        except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            if "download" in msg.lower() or "hub" in msg.lower():
                raise WeightsUnavailableError(weights_hint(str(spec))) from e
            raise ModelSpecError(f"cannot load open_clip model {spec}: {msg}") from e
        except Exception as e:
            if refused_pickle(e):  # torch.load(weights_only=True) refused the weights file
                raise unsafe_weights_error(f"open_clip model {spec}", e) from e
            raise
        model.eval()
        self.model, self.transform, self.tokenizer = model, transform, tokenizer

    @staticmethod
    def _cached_tag_weights(cfg: dict[str, Any]) -> str | None:
        if cfg.get("file"):
            return cfg["file"] if os.path.isfile(cfg["file"]) else None
        hub = cfg.get("hf_hub", "")
        if not hub:
            return None
        if hub.endswith("/"):
            repo, filename = hub.rstrip("/"), ""
        else:
            repo, filename = os.path.split(hub)
        names = [filename] if filename else []
        names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        return cached_hub_file(repo, names)

    @property
    def dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor | torch.nn.Parameter):
            return int(proj.shape[-1])
        return int(self.model.encode_text(self.tokenizer(["a"]).to(self._device())).shape[-1])

    @property
    def max_text_tokens(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def count_tokens(self, text: str) -> int:
        tok = self.tokenizer
        if hasattr(tok, "encode") and not hasattr(tok, "tokenizer"):
            return len(tok.encode(text))  # open_clip's SimpleTokenizer (CLIP BPE)
        inner = getattr(tok, "tokenizer", None)  # open_clip's HFTokenizer wrapper
        if inner is not None:
            return len(inner(text, add_special_tokens=False)["input_ids"])
        return len(text.split())

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self._device())
        trimmed = encode_text_trimmed(self.model, tokens)
        return trimmed if trimmed is not None else self.model.encode_text(tokens)


def encode_text_trimmed(model: Any, tokens: torch.Tensor) -> torch.Tensor | None:
    """open_clip's ``CLIP.encode_text`` over the tokens up to the batch's last end-of-text
    token instead of the whole context (77): the same features, computed on 5-20 positions for
    a typical query instead of 77.

    Exact for the plain CLIP text tower: its attention is causal and the feature is read at the
    end-of-text position (``argmax``/``eos`` pooling), so nothing after that position reaches it.
    None (use ``model.encode_text``) for any other tower (HF text towers, non-causal masks,
    other pooling) or when no position can be cut.
    """
    from open_clip.model import CLIP
    from open_clip.transformer import text_global_pool

    if getattr(type(model), "encode_text", None) is not CLIP.encode_text:
        return None
    pool, mask = getattr(model, "text_pool_type", None), getattr(model, "attn_mask", None)
    if pool not in ("argmax", "eos") or mask is None or tokens.ndim != 2 or not tokens.shape[0]:
        return None
    if pool == "argmax":
        ends = tokens.argmax(dim=-1)
    else:
        eos = getattr(model, "text_eos_id", None)
        found = tokens == eos
        if eos is None or not bool(found.any(dim=-1).all()):
            return None
        ends = found.int().argmax(dim=-1)
    length = int(ends.max()) + 1
    if length >= tokens.shape[1]:
        return None
    text = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, text, pool, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) \
            else x @ model.text_projection
    return x
