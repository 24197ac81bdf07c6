"""``eval retrieval`` (recall@K of an encoder on a dataset) and ``eval generation`` (QA or
captioning quality of the RAG pipeline over a collection)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .options import MODEL_HELP, UsageError, add_json, add_model, positive_int
from .output import to_json
from .rag import add_generation_flags, add_search_mode, pipeline_from_args
from .shards import open_main


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``eval`` with its kinds ``retrieval`` and ``generation`` to ``sub``."""
    ev = sub.add_parser("eval", help="measure retrieval (recall@K) or generation quality")
    evsub = ev.add_subparsers(dest="eval_command", metavar="KIND")
    evsub.required = True
    er = evsub.add_parser("retrieval", help="recall@1/5/10 text->image and image->text")
    er.add_argument("dataset", metavar="DATASET",
                    help="Karpathy-split JSON, COCO captions JSON, folder with .txt captions, or manifest")
    add_model(er, help=MODEL_HELP)
    er.add_argument("--split", help="Karpathy split to use (e.g. test)")
    er.add_argument("--image-root", metavar="DIR", help="folder the dataset's image paths are relative to")
    er.add_argument("--ks", default="1,5,10", help="comma-separated K values (default 1,5,10)")
    er.add_argument("--plots", metavar="DIR", help="write recall and score-histogram PNGs here")
    add_json(er)
    eg = evsub.add_parser("generation", help="QA exact match/F1, or captioning BLEU-4/ROUGE-L/CIDEr")
    eg.add_argument("dataset", metavar="DATASET",
                    help="QA: JSONL {question, answers, image?}; caption: any captioned dataset")
    eg.add_argument("--task", choices=("qa", "caption"), default="qa")
    eg.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N items")
    eg.add_argument("--plots", metavar="DIR", help="write a latency chart PNG here")
    add_generation_flags(eg)
    add_search_mode(eg, "question")
    ev.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command == "retrieval":
        from ..eval import evaluate_retrieval

        try:
            ks = tuple(int(k) for k in args.ks.split(",") if k.strip())
            assert ks and all(k >= 1 for k in ks)
        except (ValueError, AssertionError):
            raise UsageError(f"--ks must be positive integers like 1,5,10, got {args.ks!r}") from None
        try:
            report = evaluate_retrieval(args.dataset, args.model, ks=ks, split=args.split,
                                        image_root=args.image_root, progress=not args.quiet)
        except ValueError as e:
            raise UsageError(str(e)) from e
        if args.plots:
            from ..viz import recall_curves, score_histogram

            out = Path(args.plots)
            recall_curves({report.model: {"text_to_image": report.text_to_image,
                                          "image_to_text": report.image_to_text}}, save=out / "recall_at_k.png")
            if report.negative_scores:
                score_histogram(report.positive_scores, report.negative_scores, save=out / "scores.png")
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
        for s in report.skipped:
            print(f"skipped {s}", file=sys.stderr)
        return 0

    from ..eval import evaluate_captioning, evaluate_qa

    with open_main(args, model=args.model) as coll:
        pipe = pipeline_from_args(args, coll)
        if args.task == "qa":
            report = evaluate_qa(pipe, args.dataset, limit=args.limit, progress=not args.quiet)
        else:
            report = evaluate_captioning(pipe, args.dataset, limit=args.limit, progress=not args.quiet)
    if args.plots:
        from ..viz import latency_chart

        latency_chart({f"{report.task} ({report.mode})": report.timings}, save=Path(args.plots) / "latency.png")
    print(to_json(report.to_dict()) if args.json else report.table())
    for s in report.skipped:
        print(f"skipped {s}", file=sys.stderr)
    return 0
