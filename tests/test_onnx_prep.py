"""Torch-free CLIP inputs (crossmodal_rag.encoders.onnx_prep) against open_clip's own: token ids
identical, pixel tensors within 1e-6, on the sample photos and on odd sizes and modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal_rag.encoders.onnx_prep import ClipTextTokenizer, PreprocessConfig, clip_bpe_tokenizer, preprocess_image
from crossmodal_rag.errors import ModelSpecError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

TEXTS = [
    "a photo of a dog", "A RED car's   wheel!!", "café naïve résumé 東京 🙂 emoji",
    "&amp; html &lt;b&gt; don't I'll we've", "", "12345 numbers 3.14 and 1,000", "word " * 100,
    "  tabs\tand\nnewlines  ", "Ünïcödé İstanbul straße", "itâ€™s mojibake", "e-mail: a.b@c.org #tag",
    "<start_of_text> a literal special token",
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, ClipTextTokenizer]:
    import open_clip

    ref = open_clip.get_tokenizer("ViT-B-32")
    names = {i: t for t, i in ref.encoder.items()}
    merges = sorted(ref.bpe_ranks, key=ref.bpe_ranks.get)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    clip_bpe_tokenizer(ref.encoder, merges, names[ref.sot_token_id], names[ref.eot_token_id]).save(str(path))
    return ref, ClipTextTokenizer(path, context_length=77, clean=True)


def test_token_ids_identical_to_open_clip(tokenizers: tuple[object, ClipTextTokenizer]) -> None:
    ref, mine = tokenizers
    expected = ref(TEXTS).numpy()  # (N, 77), zero-padded, truncated with eot last
    got = mine.encode(TEXTS, length=77)
    for text, a, b in zip(TEXTS, expected, got, strict=True):
        assert a.tolist() == b.tolist(), text
    # a dynamic-length batch is the same rows cut after the longest text
    short = mine.encode(TEXTS[:2])
    assert short.shape[1] < 77 and (short == expected[:2, : short.shape[1]]).all()
    assert not expected[:2, short.shape[1] :].any()
    assert mine.count("a photo of a dog") == len(ref.encode("a photo of a dog")) == 5


def _odd_images(sample_dir: Path) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    photos = [Image.open(p) for p in sorted(sample_dir.glob("*.jpg"))[:4]]
    return photos + [
        Image.fromarray(rgb).convert("L"),
        Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (37, 53), dtype=np.uint8)]), "RGBA"),
        Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE),
        Image.fromarray(rgb[:1]),  # 1 x 53
        Image.fromarray(rgb[:, :1]),  # 37 x 1
        Image.fromarray(rgb[:7, :9]),  # smaller than the crop
        Image.fromarray(rgb[:32, :32]),  # already the input size
    ]


@pytest.mark.parametrize("size", [224, 32])
def test_pixels_match_open_clip_transform(sample_dir: Path, size: int) -> None:
    import open_clip

    transform = open_clip.image_transform(size, is_train=False, mean=MEAN, std=STD,
                                          interpolation="bicubic", resize_mode="shortest")
    cfg = PreprocessConfig(size, MEAN, STD)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg  # the JSON form round-trips
    for image in _odd_images(sample_dir):
        rgb = image.convert("RGB")  # as ClipEncoder.encode_images hands images over
        expected = transform(rgb).numpy()
        got = preprocess_image(rgb, cfg)
        assert got.shape == expected.shape == (3, size, size) and got.dtype == np.float32
        assert np.abs(got - expected).max() <= 1e-6, (image.mode, image.size)


def test_preprocess_config_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ModelSpecError, match="resize_mode 'longest'"):
        PreprocessConfig.from_dict({"size": 224, "mean": MEAN, "std": STD, "resize_mode": "longest"})
    with pytest.raises(ModelSpecError, match="non-square"):
        PreprocessConfig.from_dict({"size": [224, 256], "mean": MEAN, "std": STD})
