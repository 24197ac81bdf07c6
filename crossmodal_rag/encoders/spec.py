"""Model spec strings: one string names a CLIP model and where its weights come from.

Grammar (``BACKEND:IDENTIFIER``)::

    open_clip:ARCH/TAG                open_clip architecture + pretrained tag, fetched from the hub
                                      e.g. open_clip:ViT-B-32/laion2b_s34b_b79k (the default)
    open_clip:ARCH/PATH               architecture + a local checkpoint file (.safetensors/.bin/.pt)
    open_clip:local-dir:PATH          a folder with open_clip_config.json and weights
                                      (open_clip_model.safetensors or open_clip_pytorch_model.bin)
    open_clip:hf-hub:ORG/REPO         an open_clip model repo on the Hugging Face Hub
    hf:ORG/REPO                       a transformers CLIP model on the hub, e.g. hf:openai/clip-vit-base-patch32
    hf:PATH                           a folder written by transformers' save_pretrained
    onnx:FOLDER                       an ONNX export (immich's layout: visual/, textual/, config.json),
                                      run by onnxruntime without torch (crossmodal-rag export-onnx)
    onnx:hf-hub:ORG/REPO              an ONNX export on the hub, e.g. onnx:hf-hub:immich-app/ViT-B-32__openai
    onnx:int8:FOLDER                  the export's dynamically quantised towers (model_int8.onnx)
    PATH                              a folder: open_clip if it holds open_clip_config.json,
                                      transformers if it holds config.json, onnx if it holds
                                      visual/model.onnx
    text-only                         no image encoder and no weights: a collection found by its
                                      words (see crossmodal_rag.encoders.textonly)

Local paths are made absolute, so the canonical string stored in a collection stays valid
whatever the working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ModelSpecError

__all__ = ["DEFAULT_MODEL", "TEXT_ONLY", "ModelSpec", "parse_model_spec"]

DEFAULT_MODEL = "open_clip:ViT-B-32/laion2b_s34b_b79k"
#: The spec of a collection without an image encoder (``index --text-only``).
TEXT_ONLY = "text-only"

Backend = Literal["open_clip", "hf", "onnx", "text-only"]

_GRAMMAR_HINT = (
    "use open_clip:ARCH/TAG (e.g. open_clip:ViT-B-32/laion2b_s34b_b79k), open_clip:ARCH/CHECKPOINT_FILE, "
    "open_clip:local-dir:FOLDER, open_clip:hf-hub:ORG/REPO, hf:ORG/REPO, hf:FOLDER, onnx:FOLDER, "
    "onnx:hf-hub:ORG/REPO "
    f"(or {TEXT_ONLY}: no image encoder)"
)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec; ``str(spec)`` is its canonical form."""

    backend: Backend  # "open_clip" or "hf"
    name: str  # open_clip: ARCH, "local-dir:/abs" or "hf-hub:ID"; hf: repo id or absolute folder
    pretrained: str | None = None  # open_clip: tag or absolute checkpoint path; onnx: "int8" or None

    def __str__(self) -> str:
        if self.backend == TEXT_ONLY:
            return TEXT_ONLY
        if self.backend == "open_clip" and self.pretrained:
            return f"open_clip:{self.name}/{self.pretrained}"
        if self.backend == "onnx" and self.pretrained:
            return f"onnx:{self.pretrained}:{self.name}"
        return f"{self.backend}:{self.name}"

    @property
    def local_path(self) -> Path | None:
        """The local folder or file holding the weights, if the spec names one."""
        if self.backend == "open_clip":
            if self.name.startswith("local-dir:"):
                return Path(self.name[len("local-dir:") :])
            if self.pretrained and os.path.isabs(self.pretrained):
                return Path(self.pretrained)
            return None
        return Path(self.name) if os.path.isabs(self.name) else None


def _parse_onnx(s: str) -> ModelSpec:
    rest = s[len("onnx:") :].strip()
    precision = None
    if rest.startswith("int8:"):
        precision, rest = "int8", rest[len("int8:") :].strip()
    if rest.startswith("hf-hub:"):
        repo = rest[len("hf-hub:") :].strip()
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelSpecError(f"model spec {s!r} names no hub repo ORG/REPO after 'hf-hub:'")
        return ModelSpec("onnx", "hf-hub:" + repo, precision)
    if not rest:
        raise ModelSpecError(f"model spec {s!r} names no folder after 'onnx:'")
    return ModelSpec("onnx", _abs(rest), precision)


def _looks_like_path(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(s))


def _abs(s: str) -> str:
    return str(Path(os.path.expanduser(s)).resolve())


def parse_model_spec(spec: str | ModelSpec) -> ModelSpec:
    """Parse a model spec string (see the module docstring for the grammar).

    Raises:
        ModelSpecError: the string does not follow the grammar.
    """
    if isinstance(spec, ModelSpec):
        return spec
    s = (spec or "").strip()
    if not s:
        raise ModelSpecError(f"empty model spec: {_GRAMMAR_HINT}")
    if s == TEXT_ONLY:
        return ModelSpec(TEXT_ONLY, TEXT_ONLY)

    if s.startswith("open_clip:"):
        rest = s[len("open_clip:") :].strip()
        if rest.startswith("local-dir:"):
            path = rest[len("local-dir:") :].strip()
            if not path:
                raise ModelSpecError(f"model spec {s!r} names no folder after 'local-dir:'")
            return ModelSpec("open_clip", "local-dir:" + _abs(path))
        if rest.startswith("hf-hub:"):
            repo = rest[len("hf-hub:") :].strip()
            if not repo:
                raise ModelSpecError(f"model spec {s!r} names no repo after 'hf-hub:'")
            return ModelSpec("open_clip", "hf-hub:" + repo)
        arch, sep, pretrained = rest.partition("/")
        if not arch or not sep or not pretrained:
            raise ModelSpecError(
                f"model spec {s!r} names no pretrained weights: write open_clip:ARCH/TAG or "
                f"open_clip:ARCH/CHECKPOINT_FILE (e.g. {DEFAULT_MODEL})"
            )
        if _looks_like_path(pretrained):
            pretrained = _abs(pretrained)
        return ModelSpec("open_clip", arch, pretrained)

    if s.startswith("onnx:"):
        return _parse_onnx(s)

    if s.startswith("hf:"):
        rest = s[len("hf:") :].strip()
        if not rest:
            raise ModelSpecError(f"model spec {s!r} names no model after 'hf:'")
        return ModelSpec("hf", _abs(rest) if _looks_like_path(rest) else rest)

    # A bare folder: tell the backends apart by the config file they write.
    path = Path(os.path.expanduser(s))
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return ModelSpec("open_clip", "local-dir:" + _abs(s))
        if (path / "visual" / "model.onnx").is_file():
            return ModelSpec("onnx", _abs(s))
        if (path / "config.json").is_file():
            return ModelSpec("hf", _abs(s))
        raise ModelSpecError(
            f"folder {s!r} holds neither open_clip_config.json (open_clip), visual/model.onnx (onnx) "
            f"nor config.json (transformers): {_GRAMMAR_HINT}"
        )
    raise ModelSpecError(f"cannot parse model spec {s!r}: {_GRAMMAR_HINT}")
