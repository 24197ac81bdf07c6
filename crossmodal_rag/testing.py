"""Tiny random CLIP models for offline tests, demos and benchmarks.

They are saved in exactly the layouts users' local checkpoints have, so loading them exercises the
real loading code: :func:`make_tiny_open_clip` writes an ``open_clip:local-dir:`` folder
(``open_clip_config.json`` + ``open_clip_model.safetensors``) and :func:`make_tiny_hf_clip` a
transformers ``save_pretrained`` folder (``hf:FOLDER``). Their embeddings carry no meaning.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "TINY_GGUF_EOS",
    "TINY_GGUF_MERGES",
    "TINY_OPEN_CLIP_ARCH",
    "make_tiny_causal_lm",
    "make_tiny_gguf",
    "make_tiny_hf_clip",
    "make_tiny_open_clip",
    "make_tiny_t5",
    "tiny_gguf_llama",
    "tiny_open_clip_config",
]

TINY_OPEN_CLIP_ARCH = "xmrag-tiny"

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_open_clip_config(
    embed_dim: int = 32, image_size: int = 32, width: int = 64, layers: int = 2
) -> dict[str, Any]:
    """An open_clip ``model_cfg`` for a ViT of the given size (defaults: very small)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width,
                       "patch_size": max(image_size // 4, 1), "head_width": max(width // 2, 8)},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": width,
                     "heads": max(width // 32, 1), "layers": layers},
    }


def make_tiny_open_clip(
    folder: str | Path, *, seed: int = 0, model_cfg: dict[str, Any] | None = None
) -> Path:
    """Build a random open_clip model and save it as a ``local-dir`` folder; returns the folder.

    The config is also registered with ``open_clip.add_model_config`` under
    :data:`TINY_OPEN_CLIP_ARCH`, so ``open_clip:xmrag-tiny/FOLDER/open_clip_model.safetensors``
    works as well.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model_cfg or tiny_open_clip_config()
    image_size = cfg["vision_cfg"]["image_size"]
    (folder / f"{TINY_OPEN_CLIP_ARCH}.json").write_text(json.dumps(cfg, indent=2))
    open_clip.add_model_config(folder / f"{TINY_OPEN_CLIP_ARCH}.json")
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_OPEN_CLIP_ARCH)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    preprocess = {"size": image_size, "mean": list(_OPENAI_MEAN), "std": list(_OPENAI_STD),
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2)
    )
    (folder / f"{TINY_OPEN_CLIP_ARCH}.json").unlink()
    return folder


def _byte_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary (no merges): every byte, alone and word-final."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def make_tiny_hf_clip(folder: str | Path, *, seed: int = 0, dim: int = 32) -> Path:
    """Build a random transformers ``CLIPModel`` with its tokenizer and image processor, and
    ``save_pretrained`` all three into ``folder``; returns the folder (load it as ``hf:FOLDER``)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _byte_vocab()
    tok_dir = folder / "_tok"
    tok_dir.mkdir(exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"))
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": dim, "intermediate_size": 2 * dim,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                     "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"hidden_size": dim, "intermediate_size": 2 * dim, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return folder


def make_tiny_t5(folder: str | Path, *, seed: int = 0, d_model: int = 32, layers: int = 2) -> Path:
    """A random T5 with a byte-level tokenizer (ByT5: no vocabulary file), ``save_pretrained``
    into ``folder``; load it with ``--generator FOLDER``."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    folder = Path(folder)
    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=2 * d_model, d_kv=d_model // 2,
                      num_layers=layers, num_decoder_layers=layers, num_heads=2,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_causal_lm(folder: str | Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random Llama-architecture decoder-only LM with a byte-level tokenizer, saved into
    ``folder``."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


#: The byte-level BPE merges of :func:`make_tiny_gguf`'s vocabulary (GPT-2 spelling: Ġ is a space).
TINY_GGUF_MERGES = ("Ġ t", "h e", "Ġt he")
TINY_GGUF_EOS = "<|endoftext|>"


def tiny_gguf_llama(*, seed: int = 0, hidden: int = 64, layers: int = 2) -> tuple[Any, dict[str, Any]]:
    """The random Llama model :func:`make_tiny_gguf` writes: ``(LlamaConfig, state_dict)`` in
    transformers' names and layout, before quantisation. 4 query heads, 2 key/value heads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1 + 256 + len(TINY_GGUF_MERGES), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norm gains and sharp attention: every tensor shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0.0, 0.5)
    return config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _gguf_permute(w: Any, n_head: int) -> Any:
    """llama.cpp's reordering of a Q/K projection's rows for its rotary embedding (the inverse of
    what transformers undoes on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_tiny_gguf(path: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                   qtype: str = "Q8_0", chat_template: str | None = None, context: int | None = None) -> Path:
    """Write :func:`tiny_gguf_llama` as a llama-architecture ``.gguf`` file, the way llama.cpp's
    converter does: tensors under GGUF names, Q/K rows permuted, 2-D weights quantised to
    ``qtype`` (``Q8_0`` or ``F32``; norms stay F32), and a byte-level BPE tokenizer (256 byte
    tokens, :data:`TINY_GGUF_MERGES`, ``<|endoftext|>`` as BOS/EOS) in the metadata. Load it
    with ``--generator PATH``. ``chat_template``: a Jinja chat template stored as
    ``tokenizer.chat_template`` (an instruct model); ``context``: the training context stored
    (default the config's 256 positions). Written aside, then replaced whole
    (:func:`~crossmodal_rag.safe_io.atomic_write`)."""
    import tempfile

    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, TokenType
    from gguf.quants import quantize
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from .safe_io import atomic_write_bytes

    path = Path(path)
    config, state = tiny_gguf_llama(seed=seed, hidden=hidden, layers=layers)
    kind = GGMLQuantizationType[qtype]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=path.parent) as scratch:
        tmp = Path(scratch) / path.name  # GGUFWriter opens a path: built aside, then replaced whole
        w = GGUFWriter(str(tmp), "llama")
        w.add_name("crossmodal-rag tiny llama")
        w.add_context_length(context or config.max_position_embeddings)
        w.add_embedding_length(hidden)
        w.add_block_count(layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_rope_dimension_count(hidden // heads)
        w.add_rope_freq_base(config.rope_parameters["rope_theta"])
        w.add_head_count(heads)
        w.add_head_count_kv(kv_heads)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_vocab_size(config.vocab_size)
        tokens = [TINY_GGUF_EOS, *bytes_to_unicode().values(), *(m.replace(" ", "") for m in TINY_GGUF_MERGES)]
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokens)
        w.add_token_types([TokenType.CONTROL] + [TokenType.NORMAL] * (len(tokens) - 1))
        w.add_token_merges(list(TINY_GGUF_MERGES))
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        if chat_template is not None:
            w.add_chat_template(chat_template)
        names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
        for i in range(layers):
            for hf, gg in (("input_layernorm", "attn_norm"), ("self_attn.q_proj", "attn_q"),
                           ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                           ("self_attn.o_proj", "attn_output"), ("post_attention_layernorm", "ffn_norm"),
                           ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
                names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
        for hf, gg in names.items():
            t = state[hf].float().numpy()
            if gg.endswith("attn_q.weight"):
                t = _gguf_permute(t, heads)
            elif gg.endswith("attn_k.weight"):
                t = _gguf_permute(t, kv_heads)
            if t.ndim == 2 and kind != GGMLQuantizationType.F32:
                w.add_tensor(gg, quantize(np.ascontiguousarray(t), kind), raw_dtype=kind)
            else:
                w.add_tensor(gg, np.ascontiguousarray(t, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        atomic_write_bytes(path, tmp.read_bytes())
    return path
