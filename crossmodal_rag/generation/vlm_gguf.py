"""Vision-language specs, checked before anything loads; GGUF VLM projectors checked before llama.cpp reads them.

Spec forms (``--generator``):

* ``vlm:OWNER/NAME`` -- a transformers VLM from the hub (e.g. ``vlm:HuggingFaceTB/SmolVLM-256M-Instruct``);
* ``vlm:FOLDER`` or a plain folder whose ``config.json`` names an image-text-to-text model;
* ``vlm:MODEL.gguf,mmproj=PROJ.gguf`` -- a GGUF language model and its multimodal projector, run
  on llama.cpp's libmtmd (:class:`~crossmodal_rag.generation.vlm_llamacpp.LlamaCppVisionGenerator`).

A projector is read by libmtmd, which aborts the process (not an exception) on some malformed
files, e.g. one without ``clip.vision.image_mean``; :func:`check_projector` reads the file's
metadata first and refuses such a file naming it and what is missing.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ModelSpecError

__all__ = ["GgufVlmSpec", "check_projector", "check_vlm_spec", "gguf_metadata", "parse_gguf_vlm"]

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


# GGUF value types: struct formats of the scalars; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _read(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize("<" + fmt)
    data = f.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its metadata")
    return struct.unpack("<" + fmt, data)[0]


def _string(f: BinaryIO) -> str:
    n = _read(f, "Q")
    if n > 1 << 24:
        raise ValueError(f"a metadata string of {n} bytes")
    return f.read(n).decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int) -> Any:
    if kind == 8:
        return _string(f)
    if kind == 9:
        item, n = _read(f, "I"), _read(f, "Q")
        if n > 1 << 24:
            raise ValueError(f"a metadata array of {n} items")
        return [_value(f, item) for _ in range(n)]
    if kind not in _SCALARS:
        raise ValueError(f"unknown metadata type {kind}")
    return _read(f, _SCALARS[kind])


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value metadata of a GGUF file (version 2 or 3, little-endian), tensors not read."""
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("it does not start with 'GGUF'")
        version = _read(f, "I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (2 or 3 are read; a big-endian file?)")
        _read(f, "Q")  # tensors
        n_kv = _read(f, "Q")
        if n_kv > 1 << 16:
            raise ValueError(f"{n_kv} metadata keys")
        out: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f)
            out[key] = _value(f, _read(f, "I"))
        return out


#: What libmtmd asserts (aborting the process when absent) or needs for a picture.
_VISION_KEYS = ("clip.vision.image_mean", "clip.vision.image_std", "clip.vision.image_size",
                "clip.vision.patch_size", "clip.vision.embedding_length", "clip.vision.block_count")


def check_projector(path: Path, n_embd: int | None = None) -> dict[str, Any]:
    """The projector's metadata, checked: a CLIP-architecture GGUF with a vision encoder, the keys
    libmtmd needs, and (given the language model's ``n_embd``) embeddings of the model's width.
    Raises :class:`ModelSpecError` naming the file and what is wrong."""
    try:
        meta = gguf_metadata(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ModelSpecError(f"the projector {path} cannot be read as GGUF: {e}") from e
    if meta.get("general.architecture") != "clip":
        raise ModelSpecError(f"the projector {path} is not a multimodal projector (its architecture is "
                             f"{meta.get('general.architecture')!r}, not 'clip'): give the mmproj file made "
                             "for the model")
    if not meta.get("clip.has_vision_encoder"):
        raise ModelSpecError(f"the projector {path} has no vision encoder (an audio projector?)")
    missing = [k for k in _VISION_KEYS if k not in meta]
    if missing:
        raise ModelSpecError(f"the projector {path} lacks {', '.join(missing)}: not a complete vision projector")
    if any(len(meta[k]) != 3 for k in ("clip.vision.image_mean", "clip.vision.image_std")):
        raise ModelSpecError(f"the projector {path} does not give 3 image_mean and image_std values")
    width = meta.get("clip.vision.projection_dim")
    if n_embd is not None and width is not None and int(width) != n_embd:
        raise ModelSpecError(f"the projector {path} makes {width}-wide embeddings but the language model reads "
                             f"{n_embd}-wide ones: it is not this model's projector")
    return meta
