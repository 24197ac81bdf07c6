"""Torch-free CLIP inputs: image preprocessing (PIL + numpy) and tokenisation (``tokenizers``).

Both reproduce open_clip's own transforms, so an ONNX tower sees the inputs its torch original saw:

    image -> resize (shorter side, bicubic) -> center crop -> RGB -> /255 -> (x - mean) / std
    text  -> ftfy + html unescape + whitespace clean + lower -> CLIP BPE -> [sot] ids [eot]

The preprocessing config is immich's ``visual/preprocess_cfg.json`` (``size``, ``mean``, ``std``,
``interpolation``, ``resize_mode``); the tokenizer is a ``tokenizer.json`` of the Hugging Face
``tokenizers`` library. :func:`clip_bpe_tokenizer` writes one from open_clip's BPE tables.
Nothing here imports torch (tests/test_onnx_prep.py checks pixels within 1e-6 and identical ids).
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelSpecError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image
    from tokenizers import Tokenizer

__all__ = [
    "CLIP_SPLIT_PATTERN",
    "ClipTextTokenizer",
    "PreprocessConfig",
    "clean_clip_text",
    "clip_bpe_tokenizer",
    "preprocess_image",
    "read_json",
]

logger = logging.getLogger(__name__)

#: open_clip's word split (after lowercasing): contractions, letter runs, single digits, symbols.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the image tower's input (immich's ``preprocess_cfg.json``)."""

    size: int  # side of the square input, pixels
    mean: tuple[float, float, float]  # per-channel mean subtracted after scaling to [0, 1]
    std: tuple[float, float, float]  # per-channel divisor after the mean
    interpolation: str = "bicubic"  # PIL resampling filter of the resize
    resize_mode: str = "shortest"  # "shortest": shorter side to size, then center crop; "squash"

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "preprocess_cfg.json") -> PreprocessConfig:
        size = data.get("size", 224)
        if isinstance(size, list | tuple):
            if len(set(size)) != 1:
                raise ModelSpecError(f"{where}: non-square input size {size} is not supported")
            size = size[0]
        mode = data.get("resize_mode", "shortest")
        if mode not in _RESIZE_MODES:
            raise ModelSpecError(f"{where}: resize_mode {mode!r} is not supported; valid: {', '.join(_RESIZE_MODES)}")
        return cls(int(size), tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
                   tuple(float(v) for v in data["std"]), str(data.get("interpolation", "bicubic")), mode)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"size": [self.size, self.size], "mode": "RGB", "fill_color": 0}


def _resample(name: str) -> int:
    from PIL import Image

    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
    if name not in filters:
        raise ModelSpecError(f"interpolation {name!r} is not supported; valid: {', '.join(filters)}")
    return int(filters[name])


def preprocess_image(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One PIL image -> the tower's input ``(3, size, size)`` float32, as open_clip's transform
    (torchvision Resize + CenterCrop on PIL, ToTensor, Normalize) computes it."""
    import numpy as np

    s = cfg.size
    resample = _resample(cfg.interpolation)
    if cfg.resize_mode == "squash":
        image = image.resize((s, s), resample)
    else:
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(s * long / short)
        size = (s, new_long) if w <= h else (new_long, s)
        if size != image.size:
            image = image.resize(size, resample)
        w, h = image.size
        left, top = int(round((w - s) / 2.0)), int(round((h - s) / 2.0))
        image = image.crop((left, top, left + s, top + s))
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)  # (H, W, 3)
    mean, std = np.asarray(cfg.mean, np.float32), np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(((rgb - mean) / std).transpose(2, 0, 1))


def clean_clip_text(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy (when installed), HTML unescaped twice, runs of
    whitespace to one space, lower case."""
    try:
        import ftfy
    except ImportError:  # the search-only install may lack it; only mojibake repair is lost
        fixed = text
    else:
        fixed = ftfy.fix_text(text)
    fixed = html.unescape(html.unescape(fixed)).strip()
    return " ".join(fixed.split()).lower()


class ClipTextTokenizer:
    """Texts -> CLIP token ids with a ``tokenizer.json``; ``clean``: apply :func:`clean_clip_text`
    first (open_clip exports; a transformers tokenizer normalises by itself)."""

    def __init__(self, path: str | Path, *, context_length: int, clean: bool, pad_id: int = 0) -> None:
        from tokenizers import Tokenizer

        self.tokenizer: Tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=context_length)
        self.context_length = context_length
        self.clean = clean
        self.pad_id = pad_id

    def encode(self, texts: list[str], length: int | None = None) -> np.ndarray:
        """``(N, L)`` int64 ids, each row ``[sot] ... [eot]`` then ``pad_id``; ``L`` is
        ``length`` if given (a fixed-length tower), else the longest row."""
        import numpy as np

        rows = [e.ids for e in self.tokenizer.encode_batch([self._clean(t) for t in texts])]
        width = length or max((len(r) for r in rows), default=1)
        out = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = ids[:width]
        return out

    def count(self, text: str) -> int:
        """Tokens of ``text`` without the start and end tokens."""
        return len(self.tokenizer.encode(self._clean(text), add_special_tokens=False).ids)

    def _clean(self, text: str) -> str:
        return clean_clip_text(text) if self.clean else text


def clip_bpe_tokenizer(encoder: dict[str, int], merges: list[tuple[str, str]], sot: str, eot: str) -> Tokenizer:
    """A ``tokenizers`` CLIP BPE from open_clip's tables (``SimpleTokenizer.encoder`` and the
    merge pairs in rank order): byte-level, ``</w>`` ends a word, ``sot``/``eot`` around each
    text. Used at export time; the result is saved as ``textual/tokenizer.json``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.BPE(vocab=dict(encoder), merges=list(merges), end_of_word_suffix="</w>",
                               continuing_subword_prefix="", unk_token=None))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(sot, special=True), AddedToken(eot, special=True)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, encoder[sot]), (eot, encoder[eot])])
    return tok


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or a :class:`ModelSpecError` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelSpecError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ModelSpecError(f"{path} does not hold a JSON object")
    return data
