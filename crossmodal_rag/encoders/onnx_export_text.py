"""Export the sentence encoder (e.g. MiniLM) to ONNX for
:class:`~crossmodal_rag.encoders.onnx_sentence.OnnxSentenceBackend`::

    text-model spec -> transformers AutoModel + pooling -> FOLDER/model.onnx (+ model_int8.onnx)
                                                        -> tokenizer files, sentence_onnx.json

Only Transformer -> Pooling [-> Normalize] folders (what the transformers backend of
:mod:`crossmodal_rag.encoders.sentence` runs): pooling and normalisation go into the graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import ModelSpecError
from .onnx_sentence import INFO_FILE, TOKENIZER_FILES

__all__ = ["export_sentence"]


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
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, tmp / name)
    (tmp / INFO_FILE).write_text(json.dumps(
        {"source": str(parsed), "pooling": pooling, "max_tokens": max_tokens,
         "dim": int(model.config.hidden_size), "inputs": names, "int8": int8}, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
