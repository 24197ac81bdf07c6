"""Reproducible evaluation report for the sample collection (data/sample).

Retrieval recall@1/5/10 both ways, QA and captioning scores, with plots. Give real weights with
--model / --generator; without them it uses tiny random models (so the numbers only show that
the pipeline runs end to end: random weights retrieve at chance level).

    python benchmarks/eval_sample.py --out benchmarks/eval_sample          # tiny random models
    python benchmarks/eval_sample.py --model open_clip:local-dir:ViT-B-32 --generator ./flan-t5-base
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from crossmodal_rag import Collection
from crossmodal_rag.demo import sample_data_dir
from crossmodal_rag.eval import evaluate_captioning, evaluate_qa, evaluate_retrieval
from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings
from crossmodal_rag.testing import make_tiny_open_clip, make_tiny_t5
from crossmodal_rag.viz import latency_chart, recall_curves, score_histogram

QA = [
    {"question": "What animal is in the photo?", "answers": ["cat", "a cat", "tabby cat"]},
    {"question": "What is in the red cup?", "answers": ["espresso", "coffee"]},
    {"question": "Who is wearing the orange suit?", "answers": ["astronaut", "an astronaut", "Eileen Collins"]},
    {"question": "What kind of flower is it?", "answers": ["dahlia", "a dahlia"]},
    {"question": "What is standing on the launch pad?", "answers": ["rocket", "a rocket", "Falcon 9"]},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="CLIP spec (default: a tiny random open_clip model)")
    ap.add_argument("--generator", help="generator spec (default: a tiny random T5)")
    ap.add_argument("--out", default="benchmarks/eval_sample", help="folder for report.json and PNGs")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="xmr-eval-"))
    model = args.model or f"open_clip:local-dir:{make_tiny_open_clip(work / 'clip', seed=0)}"
    generator = args.generator or str(make_tiny_t5(work / 't5', seed=0))
    sample = sample_data_dir()

    ret = evaluate_retrieval(sample, model)
    recall_curves({"sample": {"text_to_image": ret.text_to_image, "image_to_text": ret.image_to_text}},
                  save=out / "recall_at_k.png")
    score_histogram(ret.positive_scores, ret.negative_scores, save=out / "scores.png")

    qa_path = work / "qa.jsonl"
    qa_path.write_text("\n".join(json.dumps(r) for r in QA))
    with Collection.create(work / "coll", model) as coll:
        coll.add(sample)
        reports = {}
        timings = {}
        for mode in ("concat", "rag-sequence", "rag-token"):
            pipe = RagPipeline(coll, generator, RagSettings(k=3, mode=mode), GenerationSettings(max_new_tokens=16))
            qa = evaluate_qa(pipe, qa_path)
            cap = evaluate_captioning(pipe, sample)
            reports[mode] = {"qa": qa.scores, "caption": cap.scores}
            timings[f"qa {mode}"] = qa.timings
    latency_chart(timings, save=out / "latency.png")
    report = {"model": model if args.model else "tiny random open_clip (seed 0)",
              "generator": generator if args.generator else "tiny random T5 (seed 0)",
              "retrieval": {"images": ret.images, "captions": ret.captions,
                            "text_to_image": ret.text_to_image, "image_to_text": ret.image_to_text},
              "generation": reports}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(ret.table())
    for mode, r in reports.items():
        print(mode, "QA", {k: round(v, 3) for k, v in r["qa"].items()},
              "caption", {k: round(v, 3) for k, v in r["caption"].items()})


if __name__ == "__main__":
    main()
