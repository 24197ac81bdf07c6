"""Vision-language specs, checked before anything loads; GGUF VLMs (model + projector) on llama.cpp.

Spec forms (``--generator``):

* ``vlm:OWNER/NAME`` -- a transformers VLM from the hub (e.g. ``vlm:HuggingFaceTB/SmolVLM-256M-Instruct``);
* ``vlm:FOLDER`` or a plain folder whose ``config.json`` names an image-text-to-text model;
* ``vlm:MODEL.gguf,mmproj=PROJ.gguf`` -- a GGUF language model and its multimodal projector.

The llama.cpp binding the project uses (``cyllama``) ships libmtmd (``cyllama.llama.mtmd``:
``MtmdContext.tokenize`` splits a prompt with media markers into text and image chunks,
``eval_chunks`` encodes and decodes them into a context, after which text tokens can be decoded
and scored as usual). Driving it is not implemented here yet: no GGUF VLM and projector could be
had to test the generation, the per-token scoring every mode's posterior needs, or lock-step
decoding over image prompts against. A GGUF VLM spec is therefore checked in full (both files
exist and are GGUF, the binding has mtmd) and then refused naming the forms that work: a
transformers VLM folder or hub id.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from ..errors import ModelSpecError

__all__ = ["GgufVlmSpec", "check_vlm_spec", "load_gguf_vlm", "parse_gguf_vlm"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class GgufVlmSpec:
    """A GGUF VLM: the language model file and its projector file."""

    def __init__(self, model: Path, mmproj: Path) -> None:
        self.model, self.mmproj = model, mmproj

    def __repr__(self) -> str:
        return f"GgufVlmSpec({str(self.model)!r}, mmproj={str(self.mmproj)!r})"


def _gguf_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise ModelSpecError(f"the {what} {path} does not exist (vlm:MODEL.gguf,mmproj=PROJ.gguf)")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelSpecError(f"the {what} {path} is not a GGUF file (it does not start with 'GGUF')")
    return path


def parse_gguf_vlm(spec: str) -> GgufVlmSpec:
    """``vlm:MODEL.gguf,mmproj=PROJ.gguf`` -> both paths, each checked to be a GGUF file."""
    body = spec.strip().removeprefix("vlm:")
    model, _, rest = body.partition(",")
    if not rest.startswith("mmproj="):
        raise ModelSpecError(f"GGUF VLM {spec!r} needs its projector: vlm:MODEL.gguf,mmproj=PROJ.gguf")
    proj = rest.removeprefix("mmproj=")
    return GgufVlmSpec(_gguf_file(Path(os.path.expanduser(model)), "GGUF model"),
                       _gguf_file(Path(os.path.expanduser(proj)), "projector"))


def check_vlm_spec(spec: str) -> str:
    """A ``vlm:`` spec checked without loading anything; returns it (``vlm:`` kept)."""
    body = spec.strip().removeprefix("vlm:").strip()
    if not body:
        raise ModelSpecError("empty VLM spec: give vlm:OWNER/NAME, vlm:FOLDER or vlm:MODEL.gguf,mmproj=PROJ.gguf")
    if body.split(",")[0].endswith(".gguf"):
        parse_gguf_vlm(body)
        return "vlm:" + body
    path = Path(os.path.expanduser(body))
    if path.exists() or body.startswith(("/", "./", "../", "~")):
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelSpecError(f"VLM folder {path} does not exist or has no config.json; give a folder written "
                                 "by save_pretrained or a hub id (vlm:HuggingFaceTB/SmolVLM-256M-Instruct)")
        return "vlm:" + body
    if len(body) > 200 or not _HUB_ID.fullmatch(body):
        raise ModelSpecError(f"VLM {body[:80]!r} is neither a hub id (owner/name), an existing folder nor "
                             "MODEL.gguf,mmproj=PROJ.gguf")
    return "vlm:" + body


def load_gguf_vlm(spec: str) -> object:
    """Check a GGUF VLM spec and the binding, then refuse naming what works (see the module docstring)."""
    gs = parse_gguf_vlm(spec)
    has_mtmd = (importlib.util.find_spec("cyllama") is not None
                and importlib.util.find_spec("cyllama.llama.mtmd") is not None)
    binding = ("the installed cyllama has libmtmd, but this release does not drive it yet (untested without a "
               "GGUF VLM to check generation and scoring against)" if has_mtmd else
               "the llama.cpp binding (cyllama) with libmtmd is not installed")
    raise ModelSpecError(
        f"GGUF vision-language models ({gs.model.name} + {gs.mmproj.name}) cannot answer here yet: {binding}. "
        "Use a transformers VLM instead: a save_pretrained folder (--generator /models/SmolVLM-256M-Instruct) "
        "or vlm:HuggingFaceTB/SmolVLM-256M-Instruct; GGUF text models (--generator model.gguf) keep working.")
