"""The sentence encoder (e.g. MiniLM) on ONNX Runtime: a torch-free backend over an export
written by :func:`crossmodal_rag.encoders.onnx_export_text.export_sentence`::

    FOLDER/model.onnx (+ model_int8.onnx), tokenizer.json, sentence_onnx.json

The graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has
them), ``(N, L)`` int64 with a dynamic batch and length, and gives ``(N, D)`` unit vectors: the
folder's pooling (mean, CLS or max over the unmasked tokens) and L2 normalisation are inside.
:class:`OnnxSentenceBackend` is what :class:`~crossmodal_rag.encoders.sentence.SentenceEncoder`
runs when the runtime picks ONNX (:mod:`crossmodal_rag.encoders.onnx_runtime`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from .onnx_prep import read_json
from .onnx_runtime import onnx_session

if TYPE_CHECKING:
    import numpy as np

__all__ = ["INFO_FILE", "TOKENIZER_FILES", "OnnxSentenceBackend"]

logger = logging.getLogger(__name__)

#: The export's description: source spec, pooling, max tokens, dimension.
INFO_FILE = "sentence_onnx.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class OnnxSentenceBackend:
    """Runs a sentence-encoder export; ``int8``: its quantised graph."""

    runtime = "onnx"

    def __init__(self, folder: Path, *, int8: bool = False) -> None:
        from tokenizers import Tokenizer

        info = read_json(folder / INFO_FILE)
        self.session = onnx_session(folder / ("model_int8.onnx" if int8 else "model.onnx"))
        self.names = [i.name for i in self.session.get_inputs()]
        self.max_tokens = int(info["max_tokens"])
        self.dim = int(info["dim"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=self.max_tokens)
        pad = self.tokenizer.padding or {}
        self.tokenizer.enable_padding(pad_id=int(pad.get("pad_id", 0)), pad_token=str(pad.get("pad_token", "[PAD]")))

    def to(self, device: str) -> None:
        """ONNX runs on the CPU."""

    def encode(self, texts: list[str], device: str) -> np.ndarray:
        """``(N, D)`` unit vectors (the graph pools and normalises)."""
        import numpy as np

        rows = self.tokenizer.encode_batch(texts)
        feed = {"input_ids": np.array([r.ids for r in rows], np.int64),
                "attention_mask": np.array([r.attention_mask for r in rows], np.int64),
                "token_type_ids": np.array([r.type_ids for r in rows], np.int64)}
        return self.session.run(None, {n: feed[n] for n in self.names})[0]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)
