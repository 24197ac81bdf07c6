"""Small local answerers (issue 28): exact match, token F1, contains-gold and seconds per question
for the bundled GGUF models (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M) in all three RAG
modes on llama.cpp, with ``--answer-style auto`` (the default here) for short-answer questions:
the extractive prompt, span-constrained decoding (the answer is copied from the sources' pieces,
generation/evidence.py, or says "not in the sources"), answers that stop at a sentence end,
clean-up and a ``[n]`` citation in concat mode (``--answer-style free`` measures free answers
with the plain prompt, ``--no-copy`` the extractive prompt without the span constraint).
``CROSSMODAL_RAG_THREADS`` sets llama.cpp's threads.

Questions: a QA folder (``--set``: data/passages_qa, or data/ocr_captions_qa for the text read in
generated documents and the sample photos' captions), retrieved by all-MiniLM-L6-v2 in the
collection's text space (k = 3), as ``ask`` retrieves. Seconds are each answer's own
``timings["total"]`` (generator loaded before the first question). Citations (``[n]``) are
removed before scoring; every one is checked to name a listed source.

Run:  python benchmarks/bench_answers.py --limit 200 --models gemma3 --modes concat --out FILE
"""

from __future__ import annotations

import argparse
import json
import re
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
from crossmodal_rag.generation.extractive import citations  # noqa: E402
from crossmodal_rag.testing import make_tiny_open_clip  # noqa: E402

_CITE = re.compile(r"\s*\[\d+\]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--modes", default="concat,rag-sequence,rag-token")
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", default="data/passages_qa", help="QA folder (passages.jsonl + qa.jsonl)")
    ap.add_argument("--offset", type=int, default=0, help="skip this many questions first")
    ap.add_argument("--answer-style", default="auto", choices=("model", "auto", "extract", "free"),
                    help="model: what `ask` does by default (copied spans for base LMs, free for chat models)")
    ap.add_argument("--no-copy", action="store_true", help="extractive prompt without the span constraint")
    args = ap.parse_args(argv)
    from crossmodal_rag.search.text_space import sync_text_space

    folder = ROOT / args.set
    items = load_passage_qa(folder)[args.offset : args.offset + args.limit]
    if args.no_copy:  # the span constraint off: decoding settings keep no copy_from
        real = ragmod.replace

        def no_copy(obj, **kw):  # type: ignore[no-untyped-def]
            kw.pop("copy_from", None)
            return real(obj, **kw)

        ragmod.replace = no_copy  # type: ignore[assignment]
    report: dict = {"machine": _common.machine_info(), "set": args.set, "offset": args.offset,
                    "questions": len(items), "k": 3, "answer_style": args.answer_style,
                    "copy": not args.no_copy, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        clip = f"open_clip:local-dir:{make_tiny_open_clip(Path(tmp) / 'clip')}"
        with Collection.create(Path(tmp) / "coll", clip) as coll:
            coll.add(folder / "passages.jsonl")
            sync_text_space(coll, "minilm")
            hits = {it.id: list(coll.search(it.question, k=3, target="texts", mode="dense").hits) for it in items}
            for name in args.models.split(","):
                # model: as `ask` runs by default (the pipeline sets the sentence stop when it copies)
                stop = "sentence" if args.answer_style not in ("free", "model") else "eos"
                pipe = RagPipeline(coll, f"bundled:{name}", RagSettings(k=3, answer_style=args.answer_style),
                                   GenerationSettings(max_new_tokens=24, stop=stop), query_projection=None)
                t = time.perf_counter()
                pipe.generator.load()
                load_s = time.perf_counter() - t
                style = pipe.answer_style  # "model" resolved for this generator
                for mode in args.modes.split(","):
                    em = f1 = cg = secs = 0.0
                    answers = []
                    bad_cites = 0
                    for it in items:
                        a = pipe.ask(it.question, hits=hits[it.id], mode=mode)
                        bad_cites += sum(not 1 <= n <= len(a.sources) for n in citations(a.answer))
                        text = _CITE.sub("", a.answer).strip()
                        em += exact_match(text, [it.answer])
                        f1 += token_f1(text, [it.answer])
                        cg += contains_answer(text, it.answer)
                        secs += a.timings["total"]
                        answers.append({"id": it.id, "gold": it.answer, "answer": a.answer,
                                        "seconds": round(a.timings["total"], 3)})
                        if args.out and len(answers) % 10 == 0:  # progress of a long run, kept on disk
                            Path(args.out + ".partial").write_text(json.dumps(
                                {"model": name, "mode": mode, "answers": answers}) + "\n")
                    n = len(items)
                    row = {"model": name, "mode": mode, "answer_style": style, "n": n, "exact_match": em / n, "f1": f1 / n,
                           "contains_gold": cg / n, "seconds_per_question": secs / n, "load_s": round(load_s, 2),
                           "em_per_s": em / secs, "f1_per_s": f1 / secs, "bad_citations": bad_cites,
                           "answers": answers}
                    report["rows"].append(row)
                    print(json.dumps({k: v for k, v in row.items() if k != "answers"}), flush=True)
                    if args.out:  # written after every row: a long run keeps what it measured
                        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
