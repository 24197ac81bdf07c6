"""Tiny random vision-language models for tests and benchmarks, built from the real configuration
classes and saved the way a user's checkpoint is (``save_pretrained`` model + processor with its
chat template), so they load back through ``AutoModelForImageTextToText`` / ``AutoProcessor``.

Families: ``idefics3`` (SmolVLM's architecture), ``llava`` (CLIP vision tower + Llama) and
``qwen2-vl``. The tokenizer is byte-level BPE without merges (every byte one token) plus the
family's special tokens; nothing is downloaded.

:func:`make_tiny_gguf_vlm` writes a GGUF VLM for llama.cpp instead: the tiny Llama of
:func:`~crossmodal_rag.testing.make_tiny_gguf` with a chat template, and a LLaVA-style projector
(``clip.projector_type = "mlp"``: a CLIP vision tower and a two-layer MLP into the model's width)
under the tensor names and metadata keys llama.cpp's converter writes, which libmtmd loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["GGUF_VLM_TEMPLATE", "VLM_FAMILIES", "make_tiny_gguf_vlm", "make_tiny_vlm"]

VLM_FAMILIES = ("idefics3", "llava", "qwen2-vl")

# A generic chat template over content lists; each family's image placeholder goes where the
# message has {"type": "image"} (the real checkpoints' templates do the same).
_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_PLACEHOLDER = {"idefics3": "<image>", "llava": "<image>",
                "qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>"}
_SPECIAL = {
    "idefics3": ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                 *[f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]],
    "llava": ["<image>", "<end_of_utterance>"],
    "qwen2-vl": ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<end_of_utterance>"],
}


def _tokenizer(family: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")
    tok.add_special_tokens({"additional_special_tokens": _SPECIAL[family]})
    return tok


def _text_config(cls: Any, tok: Any, hidden: int, layers: int, **extra: Any) -> Any:
    return cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
               **extra)


def make_tiny_vlm(folder: str | Path, family: str = "idefics3", *, seed: int = 0, hidden: int = 32,
                  layers: int = 2, vision_hidden: int = 32, vision_layers: int = 2, image_size: int = 32,
                  patch: int = 8, scale_factor: int = 1) -> Path:
    """A random ``family`` VLM (one of :data:`VLM_FAMILIES`) with its processor, saved into
    ``folder``; returns the folder. The defaults load in well under a second; the benchmark passes
    SmolVLM-256M's shape to the ``idefics3`` family (``hidden=576, layers=30, vision_hidden=768,
    vision_layers=12, image_size=512, patch=16, scale_factor=4``: 64 tokens per image)."""
    import torch
    import transformers as tf

    if family not in VLM_FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}; choose one of {', '.join(VLM_FAMILIES)}")
    folder = Path(folder)
    tok = _tokenizer(family)
    template = _TEMPLATE.replace("IMAGE", _PLACEHOLDER[family])
    heads = max(vision_hidden // 16, 1)
    torch.manual_seed(seed)
    if family == "idefics3":
        seq = (image_size // patch) ** 2 // scale_factor ** 2
        proc = tf.Idefics3Processor(
            image_processor=tf.Idefics3ImageProcessor(size={"longest_edge": image_size},
                                                      max_image_size={"longest_edge": image_size},
                                                      do_image_splitting=False),
            tokenizer=tok, image_seq_len=seq, chat_template=template)
        config = tf.Idefics3Config(
            text_config=_text_config(tf.LlamaConfig, tok, hidden, layers).to_dict(),
            vision_config={"hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
                           "num_hidden_layers": vision_layers, "num_attention_heads": heads,
                           "image_size": image_size, "patch_size": patch},
            image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale_factor, tie_word_embeddings=False)
        model = tf.Idefics3ForConditionalGeneration(config)
    elif family == "llava":
        proc = tf.LlavaProcessor(
            image_processor=tf.CLIPImageProcessor(size={"shortest_edge": image_size},
                                                  crop_size={"height": image_size, "width": image_size}),
            tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=template)
        config = tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                              num_hidden_layers=vision_layers, num_attention_heads=heads,
                                              image_size=image_size, patch_size=patch).to_dict(),
            text_config=_text_config(tf.LlamaConfig, tok, hidden, layers).to_dict(),
            image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
            vision_feature_layer=-1, tie_word_embeddings=False)
        model = tf.LlavaForConditionalGeneration(config)
    else:
        merge = 2
        proc = tf.Qwen2VLProcessor(
            image_processor=tf.Qwen2VLImageProcessor(min_pixels=(patch * merge) ** 2,
                                                     max_pixels=(image_size * 2) ** 2, patch_size=patch,
                                                     merge_size=merge),
            tokenizer=tok, video_processor=tf.Qwen2VLVideoProcessor(patch_size=patch, merge_size=merge),
            chat_template=template)
        head_dim = hidden // 4
        text = _text_config(tf.Qwen2VLTextConfig, tok, hidden, layers,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "mrope_section": [head_dim // 4, head_dim // 8, head_dim // 8]})
        config = tf.Qwen2VLConfig(
            text_config=text.to_dict(),
            vision_config={"depth": vision_layers, "embed_dim": vision_hidden, "hidden_size": hidden,
                           "num_heads": heads, "patch_size": patch, "spatial_merge_size": merge,
                           "temporal_patch_size": 2, "in_channels": 3, "mlp_ratio": 2},
            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"), tie_word_embeddings=False)
        model = tf.Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.eval().save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


#: The chat template of :func:`make_tiny_gguf_vlm`'s model (messages with string content).
GGUF_VLM_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}:{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}Assistant:{% endif %}")


def make_tiny_gguf_vlm(folder: str | Path, *, seed: int = 0, hidden: int = 64, layers: int = 2,
                       qtype: str = "F32", vision_hidden: int = 32, vision_layers: int = 2, image_size: int = 32,
                       patch: int = 8) -> tuple[Path, Path]:
    """A random GGUF VLM in ``folder``: ``(model.gguf, mmproj.gguf)``, for
    ``--generator vlm:MODEL.gguf,mmproj=PROJ.gguf``. The language model is ``hidden`` wide,
    ``layers`` deep, its matrices in ``qtype`` (``F32`` or ``Q8_0``). The projector's vision tower
    sees ``image_size`` pixels square in ``patch``-pixel patches (16 image tokens by default) and
    projects them to ``hidden``; its weights are F32 but the patch embedding (F16, as converted
    checkpoints have it)."""
    import numpy as np
    from gguf import GGUFWriter

    from .testing import make_tiny_gguf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = make_tiny_gguf(folder / "model.gguf", seed=seed, hidden=hidden, layers=layers, qtype=qtype,
                           chat_template=GGUF_VLM_TEMPLATE, context=8192)  # room for pictures, as real VLMs have
    rng = np.random.default_rng(seed)
    e, ff, n_pos = vision_hidden, 2 * vision_hidden, (image_size // patch) ** 2 + 1  # + the class token

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    tensors: dict[str, np.ndarray] = {
        "v.patch_embd.weight": rand(e, 3, patch, patch).astype(np.float16),
        "v.class_embd": rand(e), "v.position_embd.weight": rand(n_pos, e),
        "v.pre_ln.weight": 1 + rand(e), "v.pre_ln.bias": rand(e),
        "mm.0.weight": rand(hidden, e, scale=1.0), "mm.0.bias": rand(hidden),
        "mm.2.weight": rand(hidden, hidden, scale=1.0), "mm.2.bias": rand(hidden),
    }
    for i in range(vision_layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            tensors[f"v.blk.{i}.{name}.weight"], tensors[f"v.blk.{i}.{name}.bias"] = rand(e, e), rand(e)
        for name in ("ln1", "ln2"):
            tensors[f"v.blk.{i}.{name}.weight"], tensors[f"v.blk.{i}.{name}.bias"] = 1 + rand(e), rand(e)
        tensors[f"v.blk.{i}.ffn_up.weight"], tensors[f"v.blk.{i}.ffn_up.bias"] = rand(ff, e), rand(ff)
        tensors[f"v.blk.{i}.ffn_down.weight"], tensors[f"v.blk.{i}.ffn_down.bias"] = rand(e, ff), rand(e)
    proj = folder / "mmproj.gguf"
    w = GGUFWriter(str(proj), "clip")
    w.add_name("crossmodal-rag tiny llava projector")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", True)
    for key, value in (("embedding_length", e), ("feed_forward_length", ff), ("block_count", vision_layers),
                       ("projection_dim", hidden), ("attention.head_count", max(e // 16, 1)),
                       ("image_size", image_size), ("patch_size", patch)):
        w.add_uint32(f"clip.vision.{key}", value)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, proj
