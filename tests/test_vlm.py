"""Vision-language generators: tiny random VLMs of three real families, loaded through the user's
path, checked against direct transformers calls; RAG with images against a hand computation."""

from __future__ import annotations

import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crossmodal_rag import Collection
from crossmodal_rag.errors import ModelSpecError, QueryError, WeightsUnavailableError
from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings
from crossmodal_rag.generation.models import check_generator_spec, load_generator
from crossmodal_rag.generation.vision_prompt import ImageLimits, VisionPrompt, bounded_image
from crossmodal_rag.generation.vlm import VisionGenerator
from crossmodal_rag.testing_vlm import VLM_FAMILIES, make_tiny_vlm

RED = Image.new("RGB", (50, 40), (200, 10, 10))
BLUE = Image.new("RGB", (40, 50), (10, 20, 220))


@pytest.fixture(scope="module")
def vlm_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    return {f: make_tiny_vlm(root / f, f, seed=1) for f in VLM_FAMILIES}


def direct(folder: Path) -> tuple[torch.nn.Module, object]:
    """The same checkpoint loaded by transformers alone."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


def direct_logprobs(model, proc, text: str, images: list[Image.Image], answer_ids: list[int]) -> np.ndarray:
    """log p(y_t | prompt, y_<t) by transformers alone: the processor's inputs plus the answer,
    one teacher-forced forward pass."""
    f = dict(proc(text=[text], images=[images] if images else None, return_tensors="pt"))
    n = f["input_ids"].shape[1]
    more = torch.tensor([answer_ids], dtype=torch.long)
    f["input_ids"] = torch.cat([f["input_ids"], more], 1)
    f["attention_mask"] = torch.cat([f["attention_mask"], torch.ones_like(more)], 1)
    if "mm_token_type_ids" in f:
        f["mm_token_type_ids"] = torch.cat([f["mm_token_type_ids"], torch.zeros_like(more)], 1)
    with torch.no_grad():
        logp = torch.log_softmax(model(**f).logits[0, n - 1 : -1].double(), -1)
    return logp[torch.arange(len(answer_ids)), answer_ids].numpy()


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_logits_equal_a_direct_transformers_call(vlm_dirs: dict[str, Path], family: str) -> None:
    folder = vlm_dirs[family]
    gen = load_generator(str(folder))  # a plain folder: recognised as a VLM by its config
    assert isinstance(gen, VisionGenerator) and gen.sees_images
    model, proc = direct(folder)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Query image:"}, {"type": "image"},
                                             {"type": "text", "text": "What is this?"}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    vp = VisionPrompt("What is this?", (RED,), ("Query image",))
    assert gen.render(vp) == text
    ours = gen.logits(gen.inputs(vp))
    with torch.no_grad():
        theirs = model(**proc(text=[text], images=[[RED]], return_tensors="pt")).logits[0].float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # the image reaches the model: another picture, other logits
    other = gen.logits(gen.inputs(VisionPrompt("What is this?", (BLUE,), ("Query image",))))
    assert (other - ours).abs().max() > 1e-3
    # scoring and greedy generation agree with transformers alone
    answer = "a red box"
    a_ids = gen.answer_ids(answer)
    got = gen.answer_token_logprobs([vp], [answer])[0]
    np.testing.assert_allclose(got, direct_logprobs(model, proc, text, [RED], a_ids), rtol=1e-4, atol=1e-4)
    # RAG-token's lock-step rows (cached, one token a step) equal the uncached forward pass
    state = gen.start([vp, VisionPrompt("Which colour?", (BLUE,), ("Query image",))])
    for tok in a_ids[:3]:
        state.feed(tok)
    ref = torch.stack([gen.logits(gen.inputs(p), a_ids[:3])[-1] for p in
                       (vp, VisionPrompt("Which colour?", (BLUE,), ("Query image",)))])
    torch.testing.assert_close(state.logprobs(), torch.log_softmax(ref, -1), rtol=1e-4, atol=1e-4)
    if family != "idefics3":
        return
    s = GenerationSettings(max_new_tokens=6)
    feats = proc(text=[text], images=[[RED]], return_tensors="pt")
    ref = model.generate(**feats, max_new_tokens=6, do_sample=False)[0, feats["input_ids"].shape[1]:]
    assert gen.generate([vp], s)[0][0] == proc.tokenizer.decode(ref, skip_special_tokens=True).strip()
    assert gen.stream(vp, s).text() == gen.generate([vp], s)[0][0]


def test_limits_are_checked_before_and_at_the_model(vlm_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="max_images"):
        ImageLimits(max_images=0)
    with pytest.raises(ValueError, match="unknown"):
        ImageLimits.from_dict({"max_pictures": 3})
    assert bounded_image(Image.new("RGB", (1000, 250)), 100).size == (100, 25)
    gen = VisionGenerator(str(vlm_dirs["idefics3"]), limits=ImageLimits(max_images=1, max_image_tokens=20))
    with pytest.raises(QueryError, match="limit is 1"):
        gen.inputs(VisionPrompt("q", (RED, BLUE), ("a", "b")))
    gen16 = VisionGenerator(str(vlm_dirs["idefics3"]), limits=ImageLimits(max_image_tokens=16))
    gen16.inputs(VisionPrompt("q", (RED,), ("a",)))  # 16 image tokens: at the limit
    with pytest.raises(QueryError, match="take 32 tokens"):
        gen16.inputs(VisionPrompt("q", (RED, BLUE), ("a", "b")))


def test_specs_fail_fast_offline_and_name_what_works(tmp_path: Path) -> None:
    assert check_generator_spec("vlm:HuggingFaceTB/SmolVLM-256M-Instruct") == "vlm:HuggingFaceTB/SmolVLM-256M-Instruct"
    gen = load_generator("vlm:HuggingFaceTB/SmolVLM-256M-Instruct")
    with pytest.raises(WeightsUnavailableError, match="local folder"):
        gen.load()
    with pytest.raises(ModelSpecError, match="no config.json"):
        check_generator_spec(f"vlm:{tmp_path / 'missing'}")
    with pytest.raises(ModelSpecError, match="needs its projector"):
        (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 8)
        check_generator_spec(f"vlm:{tmp_path / 'm.gguf'}")
    (tmp_path / "p.gguf").write_bytes(b"NOPE")
    with pytest.raises(ModelSpecError, match="not a GGUF file"):
        check_generator_spec(f"vlm:{tmp_path / 'm.gguf'},mmproj={tmp_path / 'p.gguf'}")
    (tmp_path / "p.gguf").write_bytes(b"GGUF" + b"\0" * 8)
    spec = check_generator_spec(f"vlm:{tmp_path / 'm.gguf'},mmproj={tmp_path / 'p.gguf'}")
    with pytest.raises(ModelSpecError, match="p.gguf cannot be read as GGUF"):  # tests/test_vlm_llamacpp.py
        load_generator(spec).load()


@pytest.fixture(scope="module")
def vlm_pipe(vlm_dirs: dict[str, Path], sample_collection: Path, tmp_path_factory: pytest.TempPathFactory):
    dest = tmp_path_factory.mktemp("vlmcoll") / "c"
    shutil.copytree(sample_collection, dest, ignore=shutil.ignore_patterns(".lock"))
    coll = Collection.open(dest)
    gen = VisionGenerator(str(vlm_dirs["idefics3"]), limits=ImageLimits(max_images=4, max_side=2048, max_image_tokens=256))
    model, proc = direct(vlm_dirs["idefics3"])

    def make(mode: str) -> RagPipeline:
        return RagPipeline(coll, gen, RagSettings(
            k=2, mode=mode, target="images", prior_temperature=0.5, max_context_tokens=200,
            prompt_template="Context: {context}\nQuestion: {question}\nAnswer:"), GenerationSettings(max_new_tokens=2))
    yield make, model, proc
    coll.close()


def test_rag_modes_with_images_match_a_hand_computation(vlm_pipe, sample_dir: Path) -> None:
    """Each item's prompt shows its own picture; P(y|x,z) from transformers alone; the mixtures by hand."""
    make, model, proc = vlm_pipe
    query = sample_dir / "cat.jpg"
    for mode in ("rag-sequence", "rag-token", "concat"):
        pipe = make(mode)
        ans = pipe.ask("what is shown?", image=query)
        assert ans.answer is not None and len(ans.sources) == 2
        imgs = [Image.open(s.path).convert("RGB") for s in ans.sources]
        q = Image.open(query).convert("RGB")
        # concat answers may carry a citation appended after scoring (generation.extractive.cite)
        a_ids = pipe.generator.answer_ids(re.sub(r"\s*\[\d+\]$", "", ans.answer) if mode == "concat"
                                                else ans.answer)
        item_prompts = [pipe.generator.render(VisionPrompt(
            pipe.item_prompt(ans.question, s.text), (q, im), ("Query image", "[1]")))
            for s, im in zip(ans.sources, imgs, strict=True)]
        per_token = [direct_logprobs(model, proc, t, [q, im], a_ids) for t, im in zip(item_prompts, imgs, strict=True)]
        lp = np.array([t.sum() for t in per_token])
        log_prior = np.log([s.prior for s in ans.sources])
        post = np.exp(log_prior + lp - np.logaddexp.reduce(log_prior + lp))
        np.testing.assert_allclose([s.logprob for s in ans.sources], lp, rtol=1e-4, atol=1e-4, err_msg=mode)
        np.testing.assert_allclose([s.posterior for s in ans.sources], post, rtol=1e-4, atol=1e-5)
        shown = [s.path if s.included or mode != "concat" else None for s in ans.sources]
        assert [s.image for s in ans.sources] == shown, (mode, ans.prompt_images)
        if mode == "rag-sequence":
            assert ans.logprob == pytest.approx(float(np.logaddexp.reduce(log_prior + lp)), abs=1e-4)
            assert ans.prompt_images == [[str(query), s.path] for s in ans.sources]
        elif mode == "rag-token":
            mix = np.logaddexp.reduce(log_prior[:, None] + np.stack(per_token), axis=0).sum()
            assert ans.logprob == pytest.approx(float(mix), abs=1e-4)
        else:  # one prompt holding the query image and the two retrieved ones
            assert ans.sources[0].included
            assert ans.prompt_images == [[str(query), *(p for p in shown if p)]]
            shown_imgs = [im for im, p in zip(imgs, shown, strict=True) if p]
            concat = direct_logprobs(model, proc, ans.prompts[0], [q, *shown_imgs], a_ids).sum()
            assert ans.logprob == pytest.approx(float(concat), abs=1e-4)
        assert math.isfinite(ans.logprob), mode


def test_captions_for_uncaptioned_photos(vlm_dirs: dict[str, Path], tiny_oc_spec: str, photos: Path,
                                          tmp_path: Path) -> None:
    """Only images without a human caption are described; the captions are marked generated,
    found by keyword search, kept on a second run, and re-made (not duplicated) by recaption."""
    from crossmodal_rag.ingestion.captioning import CaptionSettings, caption_collection
    from crossmodal_rag.search import SearchRequest
    from crossmodal_rag.store.generated import GENERATED_ORIGIN

    (photos / "cat.txt").unlink()
    (photos / "coffee.txt").unlink()
    gen = VisionGenerator(str(vlm_dirs["idefics3"]))
    settings = CaptionSettings(model=str(vlm_dirs["idefics3"]), max_new_tokens=6,
                               prompt="Describe this image.")
    with Collection.create(tmp_path / "c", tiny_oc_spec) as coll:
        coll.add(photos)
        report = caption_collection(coll, settings, gen)
        assert report.captioned == 2 and not report.skipped
        ids = {coll.store.path_entry(str(photos / n))[0] for n in ("cat.jpg", "coffee.jpg")}
        caps = {i: coll.store.captions_of(i) for i in ids}
        for i, got in caps.items():
            assert len(got) == 1
            ((text, (_cid, origin)),) = got.items()
            assert origin == GENERATED_ORIGIN + gen.spec
            # the description is what the model writes for that picture
            img = Image.open(coll.store.paths_of(i)[0]).convert("RGB")
            assert text == gen.generate([VisionPrompt(settings.prompt, (img,), ("Image",))],
                                        GenerationSettings(max_new_tokens=6))[0][0]
        dahlia = coll.store.path_entry(str(photos / "dahlia.jpg"))[0]
        assert all(o is None or not o.startswith(GENERATED_ORIGIN) for _, o in coll.store.captions_of(dahlia).values())
        text = next(iter(caps[min(ids)]))
        top = coll.search(SearchRequest(text=text, mode="dense", target="texts", k=1)).hits[0]
        assert (top.kind, top.parent_id, top.text) == ("caption", min(ids), text)  # embedded as a caption
        from crossmodal_rag.cli.search import shown_text

        assert top.generated == (text,) and top.to_dict()["generated"] == [text]  # shown as generated
        assert shown_text(top) == f"(generated) {text}"
        items = coll.store.get_items([min(ids), dahlia])
        assert items[min(ids)].generated == (text,) and items[dahlia].generated == ()
        assert "generated" not in items[dahlia].to_dict()
        words = [w for w in text.split() if w.isalnum() and len(w) > 2]
        if words:  # and in the keyword index
            hits = coll.search(SearchRequest(text=words[0], mode="keyword", target="texts", k=20)).hits
            assert any(h.id == caps[min(ids)][text][0] for h in hits)
        assert caption_collection(coll, settings, gen).captioned == 0  # incremental
        again = caption_collection(coll, CaptionSettings(model=settings.model, max_new_tokens=6,
                                                         prompt=settings.prompt, recaption=True), gen)
        assert again.replaced == 2 and again.captioned == 2
        assert all(len(coll.store.captions_of(i)) == 1 for i in ids)


def test_rest_answers_show_the_pictures(vlm_dirs: dict[str, Path], sample_collection: Path, sample_dir: Path,
                                        tmp_path: Path) -> None:
    """/api/ask/image with a VLM folder as the generator: each source names the picture it was
    shown with, and the prompt's pictures are listed (as public paths)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from crossmodal_rag.web import WebSettings, create_app

    dest = tmp_path / "c"
    shutil.copytree(sample_collection, dest, ignore=shutil.ignore_patterns(".lock"))
    settings = WebSettings(collection=str(dest), generator=str(vlm_dirs["idefics3"]), max_new_tokens=2,
                           thumbnail_dir=str(tmp_path / "thumbs"))
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as c:
        for _ in range(200):
            if c.get("/api/health").json()["generator_status"] == "ready":
                break
            time.sleep(0.1)
        r = c.post("/api/ask/image", data={"question": "what is this photo?", "k": "2", "mode": "rag-sequence",
                                           "target": "images"},
                   files={"image": ("cat.jpg", (sample_dir / "cat.jpg").read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    out = r.json()
    assert [s["image"] for s in out["sources"]] == [s["path"] for s in out["sources"]]
    assert all(s["image"] and not s["image"].startswith("/") for s in out["sources"])  # public paths
    assert out["prompt_images"] == [["Query image", s["path"]] for s in out["sources"]]
