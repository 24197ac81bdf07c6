"""Small local answerers (issue 28): exact match, token F1, contains-gold and seconds per question
for the bundled GGUF models (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M) in all three RAG
modes on llama.cpp, with the extractive prompt and answers that stop at a sentence end.

Questions: data/passages_qa (first ``--limit``), retrieved by all-MiniLM-L6-v2 in the collection's
text space (k = 3), as ``ask`` retrieves. Seconds are each answer's own ``timings["total"]``
(generator loaded before the first question).

Run:  python benchmarks/bench_answers.py --limit 30 --out benchmarks/answers/passages.json
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
from crossmodal_rag.eval.metrics import exact_match, token_f1  # noqa: E402
from crossmodal_rag.eval.passage_qa import contains_answer, load_passage_qa  # noqa: E402
from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings  # noqa: E402
from crossmodal_rag.generation import rag as ragmod  # noqa: E402
from crossmodal_rag.testing import make_tiny_open_clip  # noqa: E402

#: The extractive prompt measured here (plain models; chat models get the instruction and context
#: as the system message and the question as the user message).
EXTRACTIVE = ("Copy the answer to the question from the context: a few words, not a sentence. If the "
              "context does not contain it, write: not in the sources.\n\nContext:\n{context}\n\n"
              "Question: {question}\nShort answer:")
EXTRACTIVE_SYSTEM = ("Copy the answer to the question from the context: a few words, not a sentence. If "
                     "the context does not contain it, write: not in the sources.\n\nContext:\n{context}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--modes", default="concat,rag-sequence,rag-token")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from crossmodal_rag.search import routing
    from crossmodal_rag.search.text_space import sync_text_space

    items = load_passage_qa(ROOT / "data" / "passages_qa")[: args.limit]
    ragmod.DEFAULT_TEMPLATE, ragmod.CHAT_SYSTEM_TEMPLATE = EXTRACTIVE, EXTRACTIVE_SYSTEM
    report: dict = {"machine": _common.machine_info(), "questions": len(items), "k": 3, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        clip = f"open_clip:local-dir:{make_tiny_open_clip(Path(tmp) / 'clip')}"
        with Collection.create(Path(tmp) / "coll", clip) as coll:
            coll.add(ROOT / "data" / "passages_qa" / "passages.jsonl")
            sync_text_space(coll, "minilm")
            hits = {it.id: routing.search(coll, it.question, k=3, target="texts", mode="dense")[1] for it in items}
            for name in args.models.split(","):
                pipe = RagPipeline(coll, f"bundled:{name}", RagSettings(k=3, prompt_template=EXTRACTIVE),
                                   GenerationSettings(max_new_tokens=24, stop="sentence"), query_projection=None)
                t = time.perf_counter()
                pipe.generator.load()
                load_s = time.perf_counter() - t
                for mode in args.modes.split(","):
                    em = f1 = cg = secs = 0.0
                    answers = []
                    for it in items:
                        a = pipe.ask(it.question, hits=hits[it.id], mode=mode)
                        em += exact_match(a.answer, [it.answer])
                        f1 += token_f1(a.answer, [it.answer])
                        cg += contains_answer(a.answer, it.answer)
                        secs += a.timings["total"]
                        answers.append({"id": it.id, "gold": it.answer, "answer": a.answer,
                                        "seconds": round(a.timings["total"], 3)})
                    n = len(items)
                    row = {"model": name, "mode": mode, "n": n, "exact_match": em / n, "f1": f1 / n,
                           "contains_gold": cg / n, "seconds_per_question": secs / n, "load_s": round(load_s, 2),
                           "em_per_s": em / secs, "f1_per_s": f1 / secs, "answers": answers}
                    report["rows"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
