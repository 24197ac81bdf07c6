"""``caption -c DIR --caption-model SPEC`` and ``index --caption-model SPEC``: generated descriptions
for a collection's uncaptioned photos (see :mod:`crossmodal_rag.ingestion.captioning`); the
``caption`` command itself (and its SmallCap mode) is registered by :mod:`.rag`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from .options import collection_dir, positive_int

if TYPE_CHECKING:
    from ..collection import Collection
    from ..ingestion.captioning import CaptionReport

__all__ = ["add_caption_flags", "cmd_backfill", "run_captions"]


def add_caption_flags(sp: argparse.ArgumentParser, *, required: bool = False) -> None:
    """``--caption-model SPEC`` and ``--recaption`` (index and caption)."""
    sp.add_argument("--caption-model", required=required, default=None, metavar="SPEC",
                    help="a vision-language model that describes each image without a caption, stored as a "
                         "generated caption: a save_pretrained folder or vlm:OWNER/NAME "
                         "(e.g. vlm:HuggingFaceTB/SmolVLM-256M-Instruct)")
    sp.add_argument("--recaption", action="store_true",
                    help="re-make the generated captions too (human captions are never replaced)")
    sp.add_argument("--caption-tokens", type=positive_int, default=32, metavar="N",
                    help="longest generated caption, in tokens (default 32)")


def run_captions(coll: Collection, args: argparse.Namespace) -> CaptionReport:
    """Caption ``coll``'s images as the flags say (the model spec is checked before it loads)."""
    from ..generation.models import check_generator_spec
    from ..ingestion.captioning import CaptionSettings, caption_collection

    spec = check_generator_spec(args.caption_model)
    settings = CaptionSettings(model=spec, recaption=args.recaption, max_new_tokens=args.caption_tokens)
    report = caption_collection(coll, settings, progress=not getattr(args, "quiet", False))
    for p in report.skipped:
        print(f"skipped {p.item}: {p.reason}", file=sys.stderr)
    return report


def cmd_backfill(args: argparse.Namespace) -> int:
    """``caption -c DIR --caption-model SPEC``: caption every uncaptioned image of the collection."""
    from ..collection import Collection

    with Collection.open(collection_dir(args), writable=True) as coll:
        report = run_captions(coll, args)
    out: dict[str, Any] = report.to_dict()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{report.captioned} image(s) captioned by {report.model} in {report.seconds:.1f} s"
              + (f", {report.replaced} generated caption(s) re-made" if report.replaced else "")
              + (f", {len(report.skipped)} skipped" if report.skipped else ""))
    return 1 if report.skipped and not report.captioned else 0
