"""The shared command-line options, defined once: one name and one meaning in every subcommand
(README "Shared flags"): the collection, ``-k``, the model, ``--where``, ``--json``, ``-q/-v`` and
the ANN search settings; the argument types; and the checks of what they name."""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any

from ..errors import CrossmodalError, QueryError

MODEL_HELP = ("model spec: open_clip:ARCH/TAG, open_clip:ARCH/CHECKPOINT, open_clip:local-dir:FOLDER, "
               "open_clip:hf-hub:REPO, hf:REPO or hf:FOLDER")


class UsageError(CrossmodalError):
    """Bad command-line usage (exit code 2)."""


def int_at_least(minimum: int):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return n

    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)

#: Most characters a --min-score value may have (REST's limit too).
_MAX_SCORE_CHARS = 64


def min_score_arg(value: str) -> str:
    """``--min-score``: ``auto`` or a finite number, kept as given (REST's rule: scores are
    cosines, -1 to 1; a value just past 1 abstains always). ``nan``, ``inf``, ``-inf``, numbers
    that overflow to them and text are refused (exit 2), naming the range."""
    text = value.strip()
    if text.lower() == "auto":
        return value
    try:
        number = float(text) if len(text) <= _MAX_SCORE_CHARS else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        shown = value if len(value) <= _MAX_SCORE_CHARS else value[:_MAX_SCORE_CHARS] + "..."
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or a finite number (scores are cosines, from -1 to 1), got {shown!r}")
    return value


def text_model_arg(value: str) -> str:
    """``--text-model``: a spec that parses (none, minilm, a hub id ORG/REPO or a model folder),
    kept as given; anything else is refused (exit 2) with one line naming the valid forms."""
    from ..encoders.sentence import parse_text_model_spec
    from ..errors import ModelSpecError

    try:
        parse_text_model_spec(value)
    except ModelSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


# -- the shared flags: one name and one meaning in every subcommand (README "Shared flags") ------
def add_collection(sp: argparse.ArgumentParser, *, positional: bool = False, required: bool = False,
                    help: str = "collection folder") -> None:
    """``-c/--collection DIR`` (dest ``collection``); with ``positional``, a ``DIR`` too (dest
    ``dir``; main refuses the two naming different folders)."""
    if positional:
        sp.add_argument("dir", nargs="?", metavar="DIR", help=f"{help} (or -c DIR)")
    sp.add_argument("-c", "--collection", metavar="DIR", required=required, help=help)


def add_top_k(sp: argparse.ArgumentParser, *, default: int | None, help: str, dest: str = "top_k",
               type: Any = positive_int) -> None:
    """``-k/--top-k K`` (``--k`` kept as an alias): how many results or retrieved items."""
    sp.add_argument("-k", "--top-k", "--k", dest=dest, type=type, default=default, metavar="K", help=help)


def add_model(sp: argparse.ArgumentParser, *, help: str = "encoder (default: the collection's own)",
               required: bool = False) -> None:
    sp.add_argument("-m", "--model", metavar="SPEC", required=required, help=help)


def add_where(sp: argparse.ArgumentParser, *, help: str = "metadata filter (repeatable, ANDed)") -> None:
    sp.add_argument("-w", "--where", action="append", default=[], metavar="EXPR", help=help)


def add_json(sp: argparse.ArgumentParser, *, help: str = "JSON output instead of text") -> None:
    sp.add_argument("--json", action="store_true", help=help)


def add_verbosity(sp: argparse.ArgumentParser) -> None:
    """``-q/-v`` after the subcommand too. SUPPRESS: a subcommand that does not see them leaves
    the value given before it (or the top-level default) alone."""
    sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                    help="more log output (-vv: debug)")
    sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                    help="no progress bars, errors only")


def add_ann_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nprobe", type=positive_int, metavar="N",
                        help="IVF indexes: lists to visit (default: the tuned value)")
    parser.add_argument("--ef-search", type=positive_int, metavar="N",
                        help="HNSW indexes: candidate list size (default: the tuned value)")
    parser.add_argument("--rerank", type=nonneg_int, metavar="F",
                        help="PQ indexes: re-rank k x F candidates exactly (default 8; 0 = off)")
    parser.add_argument("--mmap", action="store_true",
                        help="memory-map the index files (collections larger than RAM)")


def search_params(args: argparse.Namespace):  # -> SearchParams | None
    from ..store.ann import SearchParams

    values = {k: getattr(args, k, None) for k in ("nprobe", "ef_search", "rerank")}
    return SearchParams(**values) if any(v is not None for v in values.values()) else None


def collection_dir(args: argparse.Namespace) -> str:
    folder = getattr(args, "collection", None) or getattr(args, "dir", None)
    if not folder:
        how = "DIR or -c DIR" if hasattr(args, "dir") else "-c/--collection DIR"
        raise UsageError(f"{args.command}: name the collection folder with {how}")
    return folder


def check_collection_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A positional DIR and --collection may both be given only when they name one folder."""
    folder, option = getattr(args, "dir", None), getattr(args, "collection", None)
    if folder and option and os.path.abspath(folder) != os.path.abspath(option):
        parser.error(f"the collection is named twice: DIR {folder} and --collection {option}; give one")


def check_image_arg(image: str | None, what: str = "image") -> None:
    """Refuse an --image that is missing or not a regular file (a FIFO, a device, a folder)."""
    if image is None:
        return
    from ..safe_io import check_regular

    try:
        check_regular(image, what="image file")
    except FileNotFoundError as e:
        raise QueryError(f"{what} {image} does not exist") from e
    except OSError as e:
        raise QueryError(f"{what} {image}: {getattr(e, 'reason', None) or e.strerror or e}") from e


#: Settings fields (named in the library's ValueErrors) and the flags that set them.
_FLAGS_OF_FIELDS = {
    "k": "--top-k", "prior_temperature": "--prior-temperature", "prompt_template": "--prompt-template",
    "item_template": "--item-template", "max_context_tokens": "--max-context-tokens", "min_score": "--min-score",
    "max_new_tokens": "--max-new-tokens", "num_beams": "--beams", "top_p": "--top-p",
    "max_steps": "--steps", "batch_size": "--batch-size", "weight_decay": "--weight-decay",
    "warmup_steps": "--warmup-steps", "val_fraction": "--val-fraction", "eval_every": "--eval-every",
    "checkpoint_every": "--checkpoint-every", "keep_checkpoints": "--keep-checkpoints", "lr": "--lr",
    "patience": "--patience", "projection_lr_scale": "--projection-lr-scale", "candidates": "--candidates",
    "freeze_generator": "--freeze-generator", "freeze_projection": "--freeze-projection",
    "hidden_size": "--hidden-size", "num_heads": "--mapper-heads", "num_layers": "--mapper-layers",
    "prefix_length": "--prefix-length", "temperature": "--temperature",
}
_FIELD_NAME = re.compile(r"(?<![\w-])(" + "|".join(sorted(_FLAGS_OF_FIELDS, key=len, reverse=True)) + r")(?![\w-])")


def flag_spelling(error: Exception) -> str:
    """A settings error as the command line says it: ``top_p must ...`` -> ``--top-p must ...``."""
    text = re.sub(r"^(train|prefix) setting ", "", str(error))
    return _FIELD_NAME.sub(lambda m: _FLAGS_OF_FIELDS[m.group(1)], text)
