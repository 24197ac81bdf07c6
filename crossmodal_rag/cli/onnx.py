"""``export-onnx`` (CLIP towers and the sentence encoder as ONNX) and the ``--runtime`` flag of
the commands that embed (``auto|torch|onnx``, see :mod:`crossmodal_rag.encoders.onnx_runtime`)."""

from __future__ import annotations

import argparse
import json
import sys

from ..encoders.onnx_runtime import RUNTIMES, set_runtime
from .options import UsageError

__all__ = ["RUNTIME_COMMANDS", "add_runtime_flags", "apply_runtime", "cmd_export_onnx", "register"]

#: The subcommands that embed queries or items, and so take ``--runtime``.
RUNTIME_COMMANDS = ("index", "import", "search", "recommend", "ask", "chat", "serve", "reembed")
_RUNTIME_HELP = ("encoder runtime: auto (ONNX when `export-onnx` has cached an export of the model, else torch; "
                 "the default), torch, or onnx (ONNX Runtime, no torch)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export-onnx`` to ``sub``."""
    ex = sub.add_parser("export-onnx", help="export the CLIP towers (and the text model) as ONNX for torch-free queries")
    ex.add_argument("-m", "--model", metavar="SPEC",
                    help="CLIP model to export (open_clip:... or hf:...; default: the collection's with -c)")
    ex.add_argument("-c", "--collection", metavar="DIR", help="export the encoder (and text model) of this collection")
    ex.add_argument("--text-model", metavar="SPEC", help="also (or only) export this sentence encoder, e.g. minilm")
    ex.add_argument("--out", metavar="DIR",
                    help="write the CLIP export here (the text model's into DIR/sentence); default: the "
                         "export cache, where --runtime auto finds them")
    ex.add_argument("--int8", action="store_true", help="also write dynamically quantised towers (model_int8.onnx)")
    ex.add_argument("--json", action="store_true", help="print what was written as JSON")
    ex.set_defaults(handler=cmd_export_onnx)


def add_runtime_flags(parser: argparse.ArgumentParser, subparsers: dict[str, argparse.ArgumentParser]) -> None:
    """``--runtime`` on the top level and on each of :data:`RUNTIME_COMMANDS`."""
    parser.add_argument("--runtime", choices=RUNTIMES, default=None, help=_RUNTIME_HELP)
    for name in RUNTIME_COMMANDS:
        if name in subparsers:
            subparsers[name].add_argument("--runtime", choices=RUNTIMES, default=argparse.SUPPRESS,
                                          help=_RUNTIME_HELP)


def apply_runtime(args: argparse.Namespace) -> None:
    """Make the chosen runtime this process's (and its workers')."""
    if getattr(args, "runtime", None):
        set_runtime(args.runtime)


def _collection_models(folder: str) -> tuple[str, str | None]:
    from ..collection import Collection

    with Collection.open(folder) as coll:
        text = coll.text_space.spec if coll.text_space is not None else None
        return coll.manifest.encoder, text


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from ..encoders.onnx_runtime import cached_clip_export, cached_text_export
    from ..encoders.spec import parse_model_spec
    from ..progress import loading

    model, text = args.model, args.text_model
    if args.collection:
        own_model, own_text = _collection_models(args.collection)
        model, text = model or own_model, text or own_text
    if not model and not text:
        raise UsageError("export-onnx needs --model SPEC, --text-model SPEC or -c COLLECTION")
    written: dict[str, object] = {}
    if model:
        from ..encoders.onnx_export import export_clip

        spec = str(parse_model_spec(model))
        out = args.out or cached_clip_export(spec)
        with loading(f"ONNX export of {spec}"):
            report = export_clip(spec, out, int8=args.int8)
        written["clip"] = {"folder": str(report.folder), "source": report.source, "dim": report.dim,
                           "files": report.files, "spec": f"onnx:{report.folder}"}
        print(f"exported {spec} -> {report.folder} (use --model onnx:{report.folder})", file=sys.stderr)
    if text:
        from ..encoders.onnx_export_text import export_sentence
        from ..encoders.sentence import parse_text_model_spec

        parsed = parse_text_model_spec(text)
        if parsed is None:
            raise UsageError("--text-model none has nothing to export")
        out = f"{args.out}/sentence" if args.out else cached_text_export(str(parsed))
        with loading(f"ONNX export of text model {parsed}"):
            folder = export_sentence(str(parsed), out, int8=args.int8)
        written["text"] = {"folder": str(folder), "source": str(parsed)}
        print(f"exported text model {parsed} -> {folder}", file=sys.stderr)
    if args.json:
        print(json.dumps(written, indent=2))
    else:
        for part in written.values():
            print(part["folder"])  # type: ignore[index]
    return 0
