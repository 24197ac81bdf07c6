"""The sentence encoder (e.g. MiniLM) on ONNX Runtime: export and a torch-free backend.

    text-model spec -> transformers AutoModel + pooling -> FOLDER/model.onnx (+ model_int8.onnx)
                                                        -> tokenizer.json, sentence_onnx.json

The graph takes ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model has
them), ``(N, L)`` int64 with a dynamic batch and length, and gives ``(N, D)`` unit vectors: the
folder's pooling (mean, CLS or max over the unmasked tokens) and L2 normalisation are inside.
:class:`OnnxSentenceBackend` is what :class:`~crossmodal_rag.encoders.sentence.SentenceEncoder`
runs when the runtime picks ONNX (:mod:`crossmodal_rag.encoders.onnx_runtime`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelSpecError
from .onnx_prep import read_json
from .onnx_runtime import onnx_session

if TYPE_CHECKING:
    import numpy as np

__all__ = ["INFO_FILE", "OnnxSentenceBackend", "export_sentence"]

logger = logging.getLogger(__name__)

#: The export's description: source spec, pooling, max tokens, dimension.
INFO_FILE = "sentence_onnx.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def export_sentence(spec: str, out: str | Path, *, int8: bool = False) -> Path:
    """Export text model ``spec`` (Transformer -> Pooling -> Normalize folders) into ``out``.

    Raises:
        ModelSpecError: a model only sentence-transformers can run, or no fast tokenizer file.
    """
    import torch
    from transformers import AutoModel

    from .onnx_export import OPSET, quantize
    from .sentence import parse_text_model_spec, text_model_layout

    parsed = parse_text_model_spec(spec)
    if parsed is None:
        raise ModelSpecError("export-onnx --text-model needs a text model, not 'none'")
    folder, pooling, max_tokens = text_model_layout(parsed)
    if pooling is None:
        raise ModelSpecError(f"text model {parsed}: only Transformer -> Pooling -> Normalize models export to ONNX")
    if not (folder / "tokenizer.json").is_file():
        raise ModelSpecError(f"text model {parsed}: {folder} has no tokenizer.json (a fast tokenizer) to export")
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if getattr(model.config, "type_vocab_size", 0) else [])

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: Any) -> Any:
            hidden = self.model(**dict(zip(names, inputs, strict=True))).last_hidden_state  # (N, L, H)
            mask = inputs[1].unsqueeze(-1).to(hidden.dtype)  # (N, L, 1)
            if pooling == "cls":
                pooled = hidden[:, 0]
            elif pooling == "max":
                pooled = (hidden + (mask - 1.0) * 1e9).amax(1)
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1)

    dest = Path(out).expanduser().resolve()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ids = torch.ones(2, 8, dtype=torch.long)
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))[: len(names)]
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"embedding": {0: "batch"}}
    with torch.no_grad():
        torch.onnx.export(Pooled().eval(), args, str(tmp / "model.onnx"), input_names=names,
                          output_names=["embedding"], dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    if int8:
        quantize(tmp / "model.onnx", tmp / "model_int8.onnx")
    for name in _TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, tmp / name)
    (tmp / INFO_FILE).write_text(json.dumps(
        {"source": str(parsed), "pooling": pooling, "max_tokens": max_tokens,
         "dim": int(model.config.hidden_size), "inputs": names, "int8": int8}, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


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
