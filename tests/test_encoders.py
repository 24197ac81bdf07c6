from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from crossmodal_rag.encoders import ClipEncoder, load_encoder, parse_model_spec
from crossmodal_rag.errors import ModelSpecError, WeightsUnavailableError
from crossmodal_rag.testing import TINY_OPEN_CLIP_ARCH, make_tiny_hf_clip, make_tiny_open_clip

TEXTS = ["a photo of a cat", "a red car", "two people walking on a beach at sunset"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 56, 3), dtype=np.uint8)) for i in range(3)]


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("open_clip:ViT-B-32/laion2b_s34b_b79k", "open_clip:ViT-B-32/laion2b_s34b_b79k"),
        ("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
        ("hf:openai/clip-vit-base-patch32", "hf:openai/clip-vit-base-patch32"),
        ("  hf:openai/clip-vit-base-patch32 ", "hf:openai/clip-vit-base-patch32"),
    ],
)
def test_spec_canonical_forms(spec: str, canonical: str) -> None:
    assert str(parse_model_spec(spec)) == canonical


def test_local_specs_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_oc_dir: Path,
                                     tiny_hf_dir: Path) -> None:
    monkeypatch.chdir(tiny_oc_dir.parent)
    rel = f"open_clip:local-dir:./{tiny_oc_dir.name}"
    assert str(parse_model_spec(rel)) == f"open_clip:local-dir:{tiny_oc_dir}"
    assert str(parse_model_spec(str(tiny_oc_dir))) == f"open_clip:local-dir:{tiny_oc_dir}"
    assert str(parse_model_spec(str(tiny_hf_dir))) == f"hf:{tiny_hf_dir}"
    with pytest.raises(ModelSpecError, match="neither"):
        parse_model_spec(str(tmp_path))


@pytest.mark.parametrize("bad", ["", "   ", "open_clip:ViT-B-32", "open_clip:local-dir:", "hf:", "clip", "open_clip:/x"])
def test_bad_specs_are_clear_errors(bad: str) -> None:
    with pytest.raises(ModelSpecError):
        parse_model_spec(bad)


def test_open_clip_local_dir_matches_the_saved_model(tiny_oc_dir: Path) -> None:
    """Encoder output == the saved weights run directly through open_clip (independent path)."""
    from safetensors.torch import load_file

    cfg = json.loads((tiny_oc_dir / "open_clip_config.json").read_text())
    ref = open_clip.model.CLIP(**cfg["model_cfg"]).eval()
    ref.load_state_dict(load_file(str(tiny_oc_dir / "open_clip_model.safetensors")))
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_oc_dir}")
    transform = open_clip.image_transform(cfg["preprocess_cfg"]["size"], is_train=False,
                                          mean=cfg["preprocess_cfg"]["mean"], std=cfg["preprocess_cfg"]["std"])
    with torch.no_grad():
        t = ref.encode_text(tokenizer(TEXTS))
        i = ref.encode_image(torch.stack([transform(im) for im in _images()]))
    t = (t / t.norm(dim=-1, keepdim=True)).numpy()
    i = (i / i.norm(dim=-1, keepdim=True)).numpy()

    enc = ClipEncoder(f"open_clip:local-dir:{tiny_oc_dir}")
    got_t, got_i = enc.encode_texts(TEXTS), enc.encode_images(_images(), batch_size=2)
    assert got_t.dtype == np.float32 and got_t.shape == (3, 32) and got_i.shape == (3, 32)
    np.testing.assert_allclose(got_t, t, atol=1e-5)
    np.testing.assert_allclose(got_i, i, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got_i, axis=1), 1.0, atol=1e-5)


def test_text_forward_runs_on_the_longest_query_of_the_batch_only(tiny_oc_dir: Path) -> None:
    """The causal text tower reads its feature at the end-of-text token, so the padding after the
    batch's longest query is never computed; the features equal open_clip's full-context
    encode_text (the oracle), and a text filling the context falls back to it."""
    from crossmodal_rag.encoders.openclip import encode_text_trimmed

    enc = ClipEncoder(f"open_clip:local-dir:{tiny_oc_dir}")
    enc.encode_texts(["warm up"])
    model = enc._backend.model if hasattr(enc, "_backend") else enc.model
    seen: list[int] = []
    hook = model.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    try:
        got = enc.encode_texts(TEXTS)
        longest = max(len(open_clip.get_tokenizer(f"local-dir:{tiny_oc_dir}").encode(t)) for t in TEXTS)
        assert seen == [longest + 2]  # start and end tokens: not the 77 of the context
        tokens = open_clip.get_tokenizer(f"local-dir:{tiny_oc_dir}")(TEXTS + ["word " * 100])
        with torch.no_grad():
            full = model.encode_text(tokens[:3])
            assert encode_text_trimmed(model, tokens) is None  # the long one fills the context
        np.testing.assert_allclose(got, (full / full.norm(dim=-1, keepdim=True)).numpy(), atol=1e-5)
    finally:
        hook.remove()


def test_open_clip_arch_plus_checkpoint_file(tmp_path: Path, tiny_oc_dir: Path) -> None:
    make_tiny_open_clip(tmp_path / "m", seed=0)  # registers the tiny architecture
    a = ClipEncoder(f"open_clip:{TINY_OPEN_CLIP_ARCH}/{tmp_path / 'm' / 'open_clip_model.safetensors'}")
    b = ClipEncoder(f"open_clip:local-dir:{tiny_oc_dir}")
    np.testing.assert_allclose(a.encode_texts(TEXTS), b.encode_texts(TEXTS), atol=1e-5)


def test_hf_folder_matches_the_model_that_was_saved(tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    folder = make_tiny_hf_clip(tmp_path / "hf", seed=3)
    torch.manual_seed(3)
    ref = CLIPModel(CLIPConfig.from_pretrained(folder)).eval()
    enc = ClipEncoder(f"hf:{folder}")
    tok = enc.backend.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = ref.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    ref_t = (out / out.norm(dim=-1, keepdim=True)).numpy()
    np.testing.assert_allclose(enc.encode_texts(TEXTS), ref_t, atol=1e-5)
    got = enc.encode_images(_images())
    pixels = enc.backend.processor(images=_images(), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = ref.get_image_features(pixel_values=pixels)
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    np.testing.assert_allclose(got, (out / out.norm(dim=-1, keepdim=True)).numpy(), atol=1e-5)


def test_texts_longer_than_the_context_are_truncated(tiny_oc_spec: str, tiny_hf_dir: Path) -> None:
    """Past the context only the start counts: two texts that differ after it embed the same, two
    that differ at the start do not (an encoder that failed, or kept the end, would fail this)."""
    long = "word " * 500
    for spec in (tiny_oc_spec, f"hf:{tiny_hf_dir}"):
        enc = load_encoder(spec)
        got = enc.encode_texts([long, "", "ü ☃ \x00 \t", long + "cat", long + "dog", "cat " + long, "dog " + long])
        assert got.shape == (7, enc.dim)
        np.testing.assert_allclose(got[3], got[4], atol=1e-6)  # the tails were cut
        np.testing.assert_allclose(got[0], got[3], atol=1e-6)
        assert not np.allclose(got[5], got[6], atol=1e-3)  # the heads were kept
        assert enc.encode_texts("single string").shape == (1, enc.dim)
        assert enc.encode_texts([]).shape == (0, enc.dim)


def test_load_encoder_is_cached_and_lazy(tiny_oc_spec: str) -> None:
    a = load_encoder(tiny_oc_spec)
    assert load_encoder(tiny_oc_spec) is a
    fresh = ClipEncoder(tiny_oc_spec)
    assert not fresh._loaded
    fresh.encode_texts("x")
    assert fresh._loaded


def test_missing_local_weights_are_clear_errors(tmp_path: Path, tiny_oc_dir: Path) -> None:
    with pytest.raises(ModelSpecError, match="does not exist"):
        ClipEncoder(f"open_clip:local-dir:{tmp_path / 'nope'}").load()
    (tmp_path / "cfg-only").mkdir()
    (tmp_path / "cfg-only" / "open_clip_config.json").write_text((tiny_oc_dir / "open_clip_config.json").read_text())
    with pytest.raises(WeightsUnavailableError, match="no weights file"):
        ClipEncoder(f"open_clip:local-dir:{tmp_path / 'cfg-only'}").load()
    with pytest.raises(ModelSpecError, match="config.json"):
        (tmp_path / "empty").mkdir()
        ClipEncoder(f"hf:{tmp_path / 'empty'}").load()
    with pytest.raises(ModelSpecError, match="unknown pretrained tag"):
        ClipEncoder("open_clip:ViT-B-32/no-such-tag").load()
    with pytest.raises(ModelSpecError, match="unknown open_clip architecture"):
        ClipEncoder("open_clip:NoSuchArch/laion2b").load()


@pytest.mark.parametrize("spec", ["open_clip:ViT-B-32/laion2b_s34b_b79k", "hf:openai/clip-vit-base-patch32",
                                  "open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"])
def test_offline_without_weights_fails_fast_with_a_hint(spec: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as info:
        ClipEncoder(spec).load()
    assert time.perf_counter() - t0 < 20
    assert "local-dir" in str(info.value) and "hf:FOLDER" in str(info.value)
