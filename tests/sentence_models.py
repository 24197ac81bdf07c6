"""Tiny random sentence-transformers folders for tests (a 2-layer BERT with a letter-level
WordPiece vocabulary, written in the layout sentence-transformers saves: modules.json,
1_Pooling/config.json, sentence_bert_config.json)."""

from __future__ import annotations

import json
import string
from pathlib import Path

_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def make_tiny_sentence_model(folder: str | Path, *, seed: int = 0, hidden: int = 32,
                             pooling: str = "mean", max_seq_length: int = 24,
                             modules: list[dict] | None = None) -> Path:
    """Write a random tiny sentence model to ``folder`` (pooling: mean, cls or max)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = _SPECIAL + list(chars) + [f"##{c}" for c in chars]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=2 * hidden,
                     max_position_embeddings=64)
    BertModel(cfg).eval().save_pretrained(folder)
    (folder / "modules.json").write_text(json.dumps(modules or _MODULES, indent=2))
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    return folder


def make_text_space_collection(root: Path, clip_spec: str, sample_dir: Path, passages: list[str],
                               *, seed: int) -> Path:
    """A collection under ``root`` with three captioned sample photos and ``passages``, its text
    items also in a text space embedded by a tiny sentence model (``seed``); returns its folder."""
    from crossmodal_rag import Collection

    corpus = root / "p.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in passages))
    photos = root / "photos"
    photos.mkdir()
    for name in ("cat", "coffee", "pagoda"):
        (photos / f"{name}.jpg").write_bytes((sample_dir / f"{name}.jpg").read_bytes())
        (photos / f"{name}.txt").write_text((sample_dir / f"{name}.txt").read_text())
    with Collection.create(root / "coll", clip_spec) as coll:
        coll.add(photos)
        coll.add(corpus)
        coll.set_text_model(str(make_tiny_sentence_model(root / "st", seed=seed)))
    return root / "coll"
