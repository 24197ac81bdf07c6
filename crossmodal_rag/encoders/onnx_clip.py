"""The ONNX backend of :class:`~crossmodal_rag.encoders.ClipEncoder`: both towers on onnxruntime,
inputs made by :mod:`~crossmodal_rag.encoders.onnx_prep`; torch is never imported.

It reads immich's layout (the one ``crossmodal-rag export-onnx`` writes)::

    FOLDER/config.json                      open_clip model config (embed_dim, text_cfg.context_length)
    FOLDER/visual/model.onnx                input "image" (N, 3, S, S) float32 -> (N, D)
    FOLDER/visual/preprocess_cfg.json       size, mean, std, interpolation, resize_mode
    FOLDER/textual/model.onnx               input "text" (N, L) int32/int64 ids -> (N, D)
    FOLDER/textual/tokenizer.json (+ tokenizer_config.json: pad_token)
    FOLDER/{visual,textual}/model_int8.onnx dynamically quantised towers (``onnx:int8:`` specs)

A textual model with a dynamic sequence axis gets each batch padded to its longest text only;
a fixed one (immich's exports) gets ``context_length``. Outputs are L2-normalised by the encoder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelSpecError, WeightsUnavailableError
from .onnx_prep import ClipTextTokenizer, PreprocessConfig, preprocess_image, read_json
from .onnx_runtime import EXPORT_INFO, onnx_session

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from .spec import ModelSpec

__all__ = ["OnnxClipBackend", "onnx_folder"]

logger = logging.getLogger(__name__)

_HUB_FILES = ["config.json", "visual/*", "textual/*", EXPORT_INFO]


def onnx_folder(spec: ModelSpec) -> Path:
    """The local folder of an ``onnx:`` spec (a hub repo is fetched into the hub cache).

    Raises:
        ModelSpecError: the folder lacks the layout; WeightsUnavailableError: the hub repo is in
            no cache and the hub cannot be reached.
    """
    if spec.name.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download

        from ._hub import hub_reachable, weights_hint

        repo = spec.name[len("hf-hub:") :]
        online = hub_reachable()
        try:
            folder = Path(snapshot_download(repo, allow_patterns=_HUB_FILES, local_files_only=not online))
        except Exception as e:  # not found, gated, not cached while offline
            if not online:
                raise WeightsUnavailableError(weights_hint(str(spec))) from e
            raise ModelSpecError(f"cannot fetch ONNX export {repo}: {str(e).splitlines()[0][:200]}") from e
    else:
        folder = Path(spec.name)
    missing = [p for p in ("visual/model.onnx", "textual/model.onnx", "visual/preprocess_cfg.json")
               if not (folder / p).is_file()]
    if missing:
        raise ModelSpecError(
            f"{folder} is not an ONNX CLIP export: it lacks {', '.join(missing)}; write one with "
            "`crossmodal-rag export-onnx --model SPEC --out FOLDER`")
    return folder


class OnnxClipBackend:
    """Runs an exported CLIP on onnxruntime (see the module docstring for the layout)."""

    runtime = "onnx"

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.visual: Any = None
        self.textual: Any = None
        self.tokenizer: ClipTextTokenizer | None = None
        self.prep: PreprocessConfig | None = None
        self._dim = 0
        self._text_len: int | None = None  # fixed sequence length of the textual input, if any
        self._visual_path = Path()

    def load(self, device: str) -> None:
        if device not in ("cpu", ""):
            logger.info("ONNX encoder %s runs on the CPU (device %s ignored)", self.spec, device)
        folder = onnx_folder(self.spec)
        name = "model_int8.onnx" if self.spec.pretrained == "int8" else "model.onnx"
        if name != "model.onnx" and not (folder / "visual" / name).is_file():
            raise ModelSpecError(f"{folder} has no int8 towers ({name}); export with "
                                 "`crossmodal-rag export-onnx --int8`")
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        info = read_json(folder / EXPORT_INFO) if (folder / EXPORT_INFO).is_file() else {}
        text_cfg = config.get("text_cfg", {})
        context = int(text_cfg.get("context_length", 77))
        tok_cfg_path = folder / "textual" / "tokenizer_config.json"
        tok_cfg = read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
        self._visual_path = folder / "visual" / name  # opened on the first image: a text query never needs it
        self.textual = onnx_session(folder / "textual" / name)
        # open_clip exports (ours and immich's) clean texts as open_clip does; transformers'
        # tokenizers normalise by themselves
        clean = info.get("flavour", "open_clip") == "open_clip"
        tok = ClipTextTokenizer(folder / "textual" / "tokenizer.json", context_length=context, clean=clean)
        pad = tok_cfg.get("pad_token")
        pad_id = tok.tokenizer.token_to_id(pad["content"] if isinstance(pad, dict) else pad) if pad else None
        tok.pad_id = int(pad_id) if pad_id is not None else 0
        self.tokenizer = tok
        self.prep = PreprocessConfig.from_dict(read_json(folder / "visual" / "preprocess_cfg.json"),
                                               str(folder / "visual" / "preprocess_cfg.json"))
        seq = self.textual.get_inputs()[0].shape
        self._text_len = seq[1] if len(seq) > 1 and isinstance(seq[1], int) else None
        out_dim = self.textual.get_outputs()[0].shape[-1]
        self._dim = int(out_dim if isinstance(out_dim, int) else config.get("embed_dim")
                        or info.get("dim") or self.text_features([""]).shape[-1])

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def max_text_tokens(self) -> int:
        assert self.tokenizer is not None
        return self.tokenizer.context_length

    def count_tokens(self, text: str) -> int:
        assert self.tokenizer is not None
        return self.tokenizer.count(text)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        assert self.prep is not None
        return preprocess_image(image, self.prep)

    def image_features(self, pixels: Any) -> np.ndarray:
        """``(N, 3, S, S)`` pixels (numpy, or anything with ``.numpy()``) -> ``(N, D)``."""
        import numpy as np

        if not isinstance(pixels, np.ndarray):
            pixels = pixels.detach().cpu().numpy()
        if self.visual is None:
            self.visual = onnx_session(self._visual_path)
        feed = {self.visual.get_inputs()[0].name: np.ascontiguousarray(pixels, dtype=np.float32)}
        return self.visual.run(None, feed)[0]

    def text_features(self, texts: list[str]) -> np.ndarray:
        import numpy as np

        assert self.tokenizer is not None
        ids = self.tokenizer.encode(texts, self._text_len)
        first = self.textual.get_inputs()[0]
        dtype = np.int32 if "int32" in first.type else np.int64
        return self.textual.run(None, {first.name: ids.astype(dtype)})[0]
