"""``demo``: index the bundled sample photos and run example queries (and a question)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import MODEL_HELP, add_collection, add_model, add_top_k
from .rag import print_answer


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` to ``sub``."""
    de = sub.add_parser("demo", help="index the bundled sample photos and run example queries")
    add_model(de, help=MODEL_HELP)
    add_collection(de, help="where to build the demo collection (default: under ~/.cache/crossmodal-rag)")
    add_top_k(de, default=3, help="results per example query (default 3)")
    de.add_argument("--generator", "-g", metavar="SPEC",
                    help="also answer a question about the photos with this generator (e.g. google/flan-t5-base)")
    de.add_argument("--offline", action="store_true",
                    help="the demo without CLIP weights or network: captions searched with the "
                         "bundled sentence encoder, a question answered by SmolLM2 when installed "
                         "(also chosen when the default CLIP weights cannot be had)")
    de.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import (
        DEMO_QUERIES,
        DEMO_QUESTION,
        default_demo_collection,
        next_commands,
        sample_data_dir,
    )
    from ..encoders import DEFAULT_MODEL, parse_model_spec
    from ..encoders._hub import require_weights
    from ..errors import WeightsUnavailableError

    if args.offline:
        return _offline(args)
    spec = parse_model_spec(args.model or DEFAULT_MODEL)
    try:
        require_weights(spec)  # offline without the weights: say so before torch loads (seconds)
    except WeightsUnavailableError:
        if args.model:  # weights the user named: their error stands
            raise
        print(f"the default CLIP weights ({spec}) cannot be had (offline, not cached): running "
              "the offline demo (demo --offline)", file=sys.stderr)
        return _offline(args)
    from ..collection import Collection
    from ..ingestion.runner import IngestSettings, ingest

    model = str(spec)
    sample = sample_data_dir()
    folder = Path(args.collection) if args.collection else default_demo_collection(model)
    print(f"indexing the sample photos in {sample} with {model}", file=sys.stderr)
    with Collection.open_or_create(folder, model) as coll:
        report = ingest(coll, sample, IngestSettings(progress=not args.quiet))
        print(f"collection {coll.folder}: {report.summary()}")
        for q in DEMO_QUERIES:
            image = str(sample / q.image) if q.image else None
            hits = coll.search(q.text, image=image, k=args.top_k, target=q.target)
            label = f'"{q.text}"' if q.text else f"image {q.image}"
            print(f"\n{label} -> {q.target}")
            for h in hits:
                what = h.text if h.text is not None else (Path(h.path).name if h.path else "")
                print(f"  {h.rank}. {h.score:.3f}  {what}")
        if args.generator:
            from ..generation import GenerationSettings, RagPipeline, RagSettings

            pipeline = RagPipeline(coll, args.generator, RagSettings(k=3), GenerationSettings(max_new_tokens=32))
            print(f"\nQ: {DEMO_QUESTION}")
            print_answer(pipeline.ask(DEMO_QUESTION), False)
    print("\nnext, on your own photos (a folder of images, with same-stem .txt captions if you have them):")
    for line in next_commands(args.model, args.generator):
        print(f"  {line}")
    return 0


def _offline(args: argparse.Namespace) -> int:
    from ..demo_offline import run_offline_demo

    return run_offline_demo(Path(args.collection) if args.collection else None, k=args.top_k,
                            generator=args.generator, progress=not args.quiet)
