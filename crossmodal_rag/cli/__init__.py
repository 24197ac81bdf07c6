"""The ``crossmodal-rag`` command line: the entry point :func:`main`, logging, exit codes and the
translation of library errors into one-line messages. Results go to stdout, progress and messages
to stderr.

Exit codes: 0 success, 1 failure (e.g. nothing could be indexed, an inconsistent collection, a
model that cannot be loaded), 2 bad usage or bad query input, 130 interrupted.

Each command family lives in its own module, its arguments beside its handler, and adds its
subcommands through ``register(sub)``: :mod:`.collection` (index, import, info, check, remove,
duplicates), :mod:`.maintenance` (reindex, tune, reembed), :mod:`.search` (search, recommend),
:mod:`.rag` (ask, chat, write, caption), :mod:`.eval`, :mod:`.serve`, :mod:`.mcp`, :mod:`.demo`,
:mod:`.train`.
The options every command shares are defined once in :mod:`.options`; output escaping in
:mod:`.output`. Command modules import the heavy libraries inside their handlers only, so that
``--help`` and ``info`` start fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import CrossmodalError, QueryError
from . import collection, demo, eval, maintenance, mcp, onnx, rag, search, serve, train
from .options import UsageError, add_verbosity, check_collection_args
from .output import EscapingFormatter, safe

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "main",
           "setup_logging"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: The command families in the order their subcommands are listed by ``--help``.
FAMILIES = (collection, maintenance, search, rag, eval, serve, mcp, demo, train, onnx)


def _subparsers_of(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _all_subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for sub in _subparsers_of(parser).values():
        found += [sub, *_all_subparsers(sub)]
    return found


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``args`` were parsed for (``train rag``'s, ``info``'s)."""
    for dest in ("command", "eval_command", "train_command"):
        sub = _subparsers_of(parser).get(getattr(args, dest, None) or "")
        if sub is not None:
            parser = sub
    return parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crossmodal-rag",
        description="Cross-modal search and retrieval-augmented generation over image-text collections.",
    )
    p.add_argument("--version", action="version", version=f"crossmodal-rag {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, errors only")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for family in FAMILIES:
        family.register(sub)
    for sp in _all_subparsers(p):
        add_verbosity(sp)
    onnx.add_runtime_flags(p, _subparsers_of(p))
    return p


def setup_logging(verbose: int, quiet: bool) -> None:
    """The CLI's logging: one escaped line per record on stderr at the level ``-q/-v`` ask for,
    the hub libraries quiet, and the progress bars on or off to match."""
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else
                                          logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if verbose < 2:
        for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "faiss"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        # open_clip logs to the root logger; keep it to errors unless asked.
        logging.getLogger().setLevel(max(level, logging.ERROR) if not verbose else level)
        logging.getLogger("crossmodal_rag").setLevel(level)
    _quiet_hub_libraries(verbose)
    from .. import progress

    progress.configure(quiet=quiet, verbose=verbose)


def _quiet_hub_libraries(verbose: int) -> None:
    """No transformers/hub progress bars, and transformers' warnings only with -v. Set through
    their environment variables, read when they are imported, so that commands which never load
    a model never import them; a library already imported is set directly."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if not verbose:
        os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if not verbose:
            hf_logging.set_verbosity_error()


def _in_cli_words(error: Exception) -> str:
    """A library error as the command line says it: the search target by its flag."""
    alternative = getattr(error, "alternative", None)  # search.TargetEmptyError (not imported: faiss)
    if alternative:
        return f"the collection holds no {error.target}, only {alternative}: use --target {alternative}"
    return str(error)


def _did_you_mean(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """`` (did you mean --generator?)`` for the unknown flags that are close to one of the command's."""
    import difflib

    flags = [f for action in parser._actions for f in action.option_strings if f.startswith("--")]
    hints = []
    for arg in extra:
        if arg.startswith("-"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], flags, n=1, cutoff=0.6)
            hints += [f"{close[0]} for {arg.split('=', 1)[0]}"] if close else []
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    chosen = _chosen_parser(parser, args)
    if extra:  # the subcommand's usage, not the top-level one
        chosen.error(f"unrecognized arguments: {' '.join(extra)}{_did_you_mean(chosen, extra)}")
    check_collection_args(chosen, args)
    setup_logging(args.verbose, args.quiet)
    try:
        onnx.apply_runtime(args)
        return args.handler(args)
    except (QueryError, UsageError) as e:
        print(f"error: {safe(_in_cli_words(e), newlines=True)}", file=sys.stderr)
        return EXIT_USAGE
    except CrossmodalError as e:
        print(f"error: {safe(e, newlines=True)}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `crossmodal-rag search ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
