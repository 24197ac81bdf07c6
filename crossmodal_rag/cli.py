"""The ``crossmodal-rag`` command line. Results go to stdout, progress and messages to stderr.

Exit codes: 0 success, 1 failure (e.g. nothing could be indexed, an inconsistent collection, a
model that cannot be loaded), 2 bad usage or bad query input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import CrossmodalError, QueryError

logger = logging.getLogger("crossmodal_rag")

_MODEL_HELP = ("model spec: open_clip:ARCH/TAG, open_clip:ARCH/CHECKPOINT, open_clip:local-dir:FOLDER, "
               "open_clip:hf-hub:REPO, hf:REPO or hf:FOLDER")


class UsageError(CrossmodalError):
    """Bad command-line usage (exit code 2)."""


def _int_at_least(minimum: int):
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value!r}")
        return n

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


# -- the shared flags: one name and one meaning in every subcommand (README "Shared flags") ------
def _add_collection(sp: argparse.ArgumentParser, *, positional: bool = False, required: bool = False,
                    help: str = "collection folder") -> None:
    """``-c/--collection DIR`` (dest ``collection``); with ``positional``, a ``DIR`` too (dest
    ``dir``; main refuses the two naming different folders)."""
    if positional:
        sp.add_argument("dir", nargs="?", metavar="DIR", help=f"{help} (or -c DIR)")
    sp.add_argument("-c", "--collection", metavar="DIR", required=required, help=help)


def _add_top_k(sp: argparse.ArgumentParser, *, default: int | None, help: str, dest: str = "top_k",
               type: Any = _positive_int) -> None:
    """``-k/--top-k K`` (``--k`` kept as an alias): how many results or retrieved items."""
    sp.add_argument("-k", "--top-k", "--k", dest=dest, type=type, default=default, metavar="K", help=help)


def _add_model(sp: argparse.ArgumentParser, *, help: str = "encoder (default: the collection's own)",
               required: bool = False) -> None:
    sp.add_argument("-m", "--model", metavar="SPEC", required=required, help=help)


def _add_where(sp: argparse.ArgumentParser, *, help: str = "metadata filter (repeatable, ANDed)") -> None:
    sp.add_argument("-w", "--where", action="append", default=[], metavar="EXPR", help=help)


def _add_json(sp: argparse.ArgumentParser, *, help: str = "JSON output instead of text") -> None:
    sp.add_argument("--json", action="store_true", help=help)


def _add_verbosity(sp: argparse.ArgumentParser) -> None:
    """``-q/-v`` after the subcommand too. SUPPRESS: a subcommand that does not see them leaves
    the value given before it (or the top-level default) alone."""
    sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                    help="more log output (-vv: debug)")
    sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                    help="no progress bars, errors only")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _all_subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for sub in _subparsers(parser).values():
        found += [sub, *_all_subparsers(sub)]
    return found


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``args`` were parsed for (``train rag``'s, ``info``'s)."""
    for dest in ("command", "eval_command", "train_command"):
        sub = _subparsers(parser).get(getattr(args, dest, None) or "")
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

    ix = sub.add_parser("index", help="add a folder, manifest, COCO file or passage corpus to a collection")
    ix.add_argument("source", metavar="SOURCE",
                    help="folder of images (+ same-stem .txt captions), .jsonl/.csv manifest, "
                         "COCO captions .json, or .jsonl passage corpus")
    _add_collection(ix)
    ix.add_argument("-m", "--model", metavar="SPEC", help=_MODEL_HELP + " (new collections; default "
                    "open_clip:ViT-B-32/laion2b_s34b_b79k)")
    ix.add_argument("--index", "--index-type", dest="index_type", default="auto", metavar="SPEC",
                    help="index type of a new collection: 'auto' (default: exact search up to 50k "
                         "vectors, then IVF, IVF-PQ past --max-index-memory) or a FAISS factory "
                         "string such as Flat, HNSW32, IVF4096,Flat, OPQ64,IVF4096,PQ64np")
    ix.add_argument("--max-index-memory", metavar="SIZE",
                    help="memory budget 'auto' chooses the index type under, e.g. 4G, 512M")
    ix.add_argument("--batch-size", type=_positive_int, default=32, metavar="N")
    ix.add_argument("--workers", type=_nonneg_int, default=None, metavar="N",
                    help="image decoding processes (default: automatic)")
    ix.add_argument("--max-image-pixels", type=_positive_int, default=None, metavar="N",
                    help="skip images declaring more pixels than this (default 268435456; formats "
                         "other than JPEG, decoded at full size: a quarter of it)")
    ix.add_argument("--max-image-mb", type=float, default=None, metavar="MB",
                    help="skip image files larger than this (default 512)")
    ix.add_argument("--image-root", metavar="DIR", help="manifest image paths are relative to DIR")
    ix.add_argument("--allow-outside-root", action="store_true",
                    help="accept manifest image paths that are absolute or leave the root folder")
    ix.add_argument("--report", metavar="FILE", help="write a JSON report (skipped items and why) to FILE")
    ix.add_argument("--fsync", choices=("full", "normal", "off"), default="full",
                    help="durability policy (default full; see README 'Collections')")
    ix.add_argument("--no-fsync", dest="fsync", action="store_const", const="off", help="same as --fsync off")
    ix.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                    help="embed on Ray: alone, a local Ray instance started for the run; 'auto', "
                         "HOST:PORT or ray://HOST:PORT, an existing cluster (needs crossmodal-rag[distributed])")
    ix.add_argument("--ray-actors", type=_positive_int, default=None, metavar="N",
                    help="encoder actors (default: one per GPU, or 1 without GPUs)")
    ix.add_argument("--ray-batch-size", type=_positive_int, default=None, metavar="N",
                    help="images per Ray decode task and encoder call (default: --batch-size)")
    ix.add_argument("--ray-actor-cpus", type=float, default=1.0, metavar="N",
                    help="CPUs each encoder actor reserves, its torch threads on CPU (default 1)")

    se = sub.add_parser("search", help="search a collection by text or by image")
    se.add_argument("text", nargs="?", metavar="TEXT", help="text query")
    se.add_argument("--image", "-i", metavar="PATH", help="image query")
    se.add_argument("--queries", metavar="FILE",
                    help="batch: one query per line (text, or JSON {\"text\": ...} / {\"image\": ...})")
    _add_collection(se)
    _add_top_k(se, default=10, help="results per query (default 10)")
    se.add_argument("--target", "-t", choices=("images", "texts", "all"), default="images",
                    help="what to return: images, texts (captions and passages) or all")
    _add_model(se)
    se.add_argument("-w", "--where", action="append", default=[], metavar="EXPR",
                    help="metadata filter, e.g. 'width>=1000', 'path=*/2023/*', 'caption~dog' (repeatable, ANDed)")
    se.add_argument("--min-score", metavar="S|auto", help="drop hits scoring below S ('auto': calibrated)")
    se.add_argument("--plus", action="append", default=[], metavar="TEXT", help="add a text to the query (repeatable)")
    se.add_argument("--minus", action="append", default=[], metavar="TEXT", help="subtract a text from the query")
    _add_json(se, help="JSON output instead of TSV")
    se.add_argument("--no-header", action="store_true", help="TSV without the header line")
    _add_ann_flags(se)

    ri = sub.add_parser("reindex", help="rebuild a collection's indexes (another type, retuned) "
                                        "from its stored embeddings, without re-encoding")
    _add_collection(ri, positional=True)
    ri.add_argument("--index", dest="index_type", default=None, metavar="SPEC",
                    help="'auto' or a FAISS factory string (default: keep the current choice)")
    ri.add_argument("--max-index-memory", metavar="SIZE", help="memory budget for 'auto', e.g. 4G")
    ri.add_argument("--target-recall", type=float, default=0.95, metavar="R",
                    help="tune nprobe/efSearch to the fastest setting with recall@10 >= R (default 0.95)")
    ri.add_argument("--no-tune", dest="tune", action="store_false", help="keep FAISS's default search settings")
    ri.add_argument("--seed", type=int, default=0, help="seed of the training sample and tuning queries")
    ri.add_argument("--sharded", dest="sharded", action="store_true", default=None,
                    help="IVF: add shards separately and merge the lists on disk (default: over 2 GiB)")
    ri.add_argument("--no-sharded", dest="sharded", action="store_false")
    ri.add_argument("--workers", type=_positive_int, default=2, metavar="N", help="parallel shard builds")
    ri.add_argument("--fsync", choices=("full", "normal", "off"), default="full")
    _add_json(ri, help="print the build report as JSON")

    tu = sub.add_parser("tune", help="re-tune nprobe/efSearch to a target recall, or store explicit "
                                     "search defaults")
    _add_collection(tu, positional=True)
    tu.add_argument("--target-recall", type=float, default=0.95, metavar="R")
    tu.add_argument("--seed", type=int, default=0)
    tu.add_argument("--nprobe", type=_positive_int, metavar="N", help="store this nprobe instead of tuning")
    tu.add_argument("--ef-search", type=_positive_int, metavar="N", help="store this efSearch instead of tuning")
    tu.add_argument("--rerank", type=_nonneg_int, metavar="F", help="store this PQ re-rank factor")
    tu.add_argument("--index-name", choices=("image", "text"), help="only this index (explicit values)")
    _add_json(tu, help="print the search settings (and what tuning measured) as JSON")

    im = sub.add_parser("import", help="build a collection from precomputed embeddings "
                                       "(npy/parquet shards, e.g. clip-retrieval's output)")
    im.add_argument("source", metavar="FOLDER",
                    help="folder with img_emb/*.npy (+ text_emb/*.npy) and metadata/*.parquet, or "
                         "*.npy files each with a same-stem .parquet/.jsonl metadata file")
    _add_collection(im)
    _add_model(im, required=True, help="the encoder that made the embeddings (queries are embedded with it)")
    im.add_argument("--image-root", metavar="DIR",
                    help="metadata image paths are relative to DIR (default: the source folder)")
    im.add_argument("--allow-outside-root", action="store_true",
                    help="accept metadata image paths that are absolute or leave the root folder")
    im.add_argument("--index", dest="index_type", default="auto", metavar="SPEC")
    im.add_argument("--max-index-memory", metavar="SIZE")
    im.add_argument("--verify", type=_nonneg_int, default=3, metavar="N",
                    help="re-embed N readable images and refuse if they disagree (default 3; 0 = off)")
    im.add_argument("--fsync", choices=("full", "normal", "off"), default="full")

    inf = sub.add_parser("info", help="print a collection's manifest and counts")
    _add_collection(inf, positional=True)
    _add_json(inf)

    ck = sub.add_parser("check", help="verify that a collection's indexes and metadata agree")
    _add_collection(ck, positional=True)
    _add_json(ck)

    rm = sub.add_parser("remove", help="remove items by id or by source path")
    rm.add_argument("ids", nargs="*", type=int, metavar="ID")
    _add_collection(rm)
    rm.add_argument("--path", action="append", default=[], metavar="PATH", help="remove by path (repeatable)")
    _add_json(rm)

    def add_generation(sp: argparse.ArgumentParser) -> None:
        _add_collection(sp)
        sp.add_argument("--generator", "-g", metavar="SPEC",
                        help="hub id, save_pretrained folder or .gguf file (default google/flan-t5-base)")
        _add_top_k(sp, dest="k", default=5, help="retrieved items (default 5)")
        sp.add_argument("--mode", choices=("concat", "rag-sequence", "rag-token"), default="concat")
        sp.add_argument("--target", choices=("texts", "images", "all"), default="texts",
                        help="what retrieval returns to condition on (default texts: captions, passages)")
        sp.add_argument("--prior-temperature", type=float, default=0.05, metavar="T",
                        help="P(z|x) = softmax(score / T) (default 0.05)")
        sp.add_argument("--prompt-template", metavar="TEXT",
                        help="prompt with {context} and {question} placeholders")
        sp.add_argument("--max-context-tokens", type=_positive_int, metavar="N",
                        help="prompt token budget (default: the generator's context)")
        sp.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N")
        sp.add_argument("--beams", type=_positive_int, default=1, metavar="N")
        sp.add_argument("--sample", action="store_true", help="sample instead of greedy/beam decoding")
        sp.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature")
        sp.add_argument("--top-p", type=float, default=1.0, metavar="P")
        sp.add_argument("--seed", type=int, metavar="N", help="seed for reproducible sampling")
        _add_model(sp)
        _add_where(sp, help="metadata filter on retrieval (repeatable, ANDed)")
        sp.add_argument("--min-score", metavar="S|auto",
                        help="abstain ('not found in the collection') when the best score is below S")
        sp.add_argument("--knowledge", metavar="DIR",
                        help="retrieve the conditioning texts from this other collection (same encoder)")
        sp.add_argument("--image-prefix", metavar="CKPT",
                        help="image-prefix checkpoint (from `train prefix`): the generator also reads the "
                             "query image and retrieved images as prefix vectors (default generator: "
                             "the checkpoint's own)")
        _add_json(sp, help="print the whole answer record as JSON")

    ak = sub.add_parser("ask", help="answer a question grounded in the collection (RAG)")
    ak.add_argument("question", nargs="?", metavar="QUESTION")
    ak.add_argument("--image", "-i", metavar="PATH",
                    help="retrieve by this image (alone: ask what it shows)")
    add_generation(ak)

    ch = sub.add_parser("chat", help="multi-turn chat grounded in the collection")
    ch.add_argument("message", nargs="?", metavar="MESSAGE",
                    help="one message (with --session, the conversation continues); none: interactive")
    ch.add_argument("--session", "-s", metavar="FILE", help="JSON file to resume from and save to")
    ch.add_argument("--image", "-i", metavar="PATH", help="an image to go with the message")
    add_generation(ch)

    wr = sub.add_parser("write", help="continue a draft with grounded, cited content")
    wr.add_argument("draft", nargs="?", metavar="DRAFT", help="the draft text (or --draft-file)")
    wr.add_argument("--draft-file", metavar="FILE")
    add_generation(wr)

    rc = sub.add_parser("recommend", help="items like the ones you liked (not already liked)")
    _add_collection(rc)
    rc.add_argument("--liked", type=int, nargs="*", default=[], metavar="ID", help="liked item ids")
    rc.add_argument("--liked-image", action="append", default=[], metavar="PATH",
                    help="a liked image file (repeatable)")
    _add_top_k(rc, default=10, help="recommendations (default 10)")
    rc.add_argument("--diversity", type=float, default=0.3, metavar="D",
                    help="0 = most similar first, 1 = most diverse (MMR; default 0.3)")
    rc.add_argument("--target", choices=("images", "texts", "all"), default="images")
    _add_where(rc)
    _add_model(rc)
    _add_json(rc)

    du = sub.add_parser("duplicates", help="list groups of near-identical images")
    _add_collection(du, positional=True)
    du.add_argument("--threshold", type=float, default=0.95, metavar="T",
                    help="cosine similarity at or above which two images count as near-duplicates")
    _add_json(du, help="JSON instead of TSV")

    ev = sub.add_parser("eval", help="measure retrieval (recall@K) or generation quality")
    evsub = ev.add_subparsers(dest="eval_command", metavar="KIND")
    evsub.required = True
    er = evsub.add_parser("retrieval", help="recall@1/5/10 text->image and image->text")
    er.add_argument("dataset", metavar="DATASET",
                    help="Karpathy-split JSON, COCO captions JSON, folder with .txt captions, or manifest")
    _add_model(er, help=_MODEL_HELP)
    er.add_argument("--split", help="Karpathy split to use (e.g. test)")
    er.add_argument("--image-root", metavar="DIR", help="folder the dataset's image paths are relative to")
    er.add_argument("--ks", default="1,5,10", help="comma-separated K values (default 1,5,10)")
    er.add_argument("--plots", metavar="DIR", help="write recall and score-histogram PNGs here")
    _add_json(er)
    eg = evsub.add_parser("generation", help="QA exact match/F1, or captioning BLEU-4/ROUGE-L/CIDEr")
    eg.add_argument("dataset", metavar="DATASET",
                    help="QA: JSONL {question, answers, image?}; caption: any captioned dataset")
    eg.add_argument("--task", choices=("qa", "caption"), default="qa")
    eg.add_argument("--limit", type=_positive_int, metavar="N", help="evaluate the first N items")
    eg.add_argument("--plots", metavar="DIR", help="write a latency chart PNG here")
    add_generation(eg)

    sv = sub.add_parser("serve", help="start the web app and REST API for a collection")
    _add_collection(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=_positive_int, default=8000)
    sv.add_argument("--generator", "-g", metavar="SPEC", help="generator for answers (default google/flan-t5-base)")
    _add_model(sv)
    sv.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB")
    sv.add_argument("--max-image-pixels", type=_positive_int, default=50_000_000, metavar="N")
    sv.add_argument("--max-k", type=_positive_int, default=100, metavar="K")
    sv.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N")
    sv.add_argument("--thumbnail-dir", metavar="DIR", help="thumbnail cache (default under ~/.cache/crossmodal-rag)")
    sv.add_argument("--mmap", action="store_true", help="memory-map the index files (collections larger than RAM)")
    sv.add_argument("--lazy-generator", action="store_true",
                    help="load the generator on the first question instead of at start-up")
    sv.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                    help="also answer requests whose Host header is HOST (repeatable; * = any host, which "
                         "gives up DNS-rebinding protection). Default: the bound host; bound to loopback, "
                         "localhost, 127.0.0.1 and ::1")
    sv.add_argument("--show-paths", action="store_true",
                    help="absolute server paths in API responses (default: relative to the collection's "
                         "source root; models and the collection by name)")

    cp = sub.add_parser("caption", help="caption images: image prefix + retrieved neighbours' captions "
                                        "(SmallCap style)")
    cp.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s) to caption")
    cp.add_argument("--image-prefix", required=True, metavar="CKPT",
                    help="image-prefix checkpoint folder (from `train prefix`)")
    _add_collection(cp, help="retrieve the neighbours' captions from this collection (its encoder must be "
                             "the checkpoint's); without it the prompt holds no captions")
    _add_top_k(cp, dest="k", type=_nonneg_int, default=None,
               help="neighbours' captions in the prompt (default: as trained, else 4; 0: none)")
    cp.add_argument("--generator", "-g", metavar="SPEC", help="generator (default: the checkpoint's own)")
    _add_model(cp, help="encoder (default: the collection's own, else the checkpoint's; must be the one the "
                        "checkpoint was trained on)")
    cp.add_argument("--max-new-tokens", type=_positive_int, default=64, metavar="N")
    cp.add_argument("--beams", type=_positive_int, default=1, metavar="N")
    _add_json(cp, help="JSON records with the prompt and the sources")

    de = sub.add_parser("demo", help="index the bundled sample photos and run example queries")
    _add_model(de, help=_MODEL_HELP)
    _add_collection(de, help="where to build the demo collection (default: under ~/.cache/crossmodal-rag)")
    _add_top_k(de, default=3, help="results per example query (default 3)")
    de.add_argument("--generator", "-g", metavar="SPEC",
                    help="also answer a question about the photos with this generator (e.g. google/flan-t5-base)")

    re_ = sub.add_parser("reembed", help="recompute a collection's vectors with another encoder "
                                         "(e.g. one trained with train clip); item ids stay the same")
    _add_collection(re_, positional=True)
    _add_model(re_, required=True, help=_MODEL_HELP)
    re_.add_argument("--batch-size", type=_positive_int, default=32, metavar="N")
    _add_json(re_, help="the report is JSON (always; accepted for uniformity)")

    tr = sub.add_parser("train", help="fine-tune on your image-text pairs: the encoder (clip), "
                                      "the image-prefix network (prefix), generator + query side (rag)")
    trsub = tr.add_subparsers(dest="train_command", metavar="TASK")
    trsub.required = True
    tc = trsub.add_parser("clip", help="contrastive fine-tuning of the CLIP encoder (open_clip or "
                                       "transformers), then re-embed a collection with it")
    _add_train_flags(tc)
    _add_model(tc, help="encoder to start from (default: the --collection's encoder, else "
                        "open_clip:ViT-B-32/laion2b_s34b_b79k)")
    _add_collection(tc, help="after training, re-embed this collection's items with the trained encoder")
    tc.add_argument("--freeze-text", action="store_true", help="train the image tower only")
    tc.add_argument("--freeze-image", action="store_true", help="train the text tower only")
    tc.add_argument("--hard-negatives", type=_hard_negative_share, default=0.0, metavar="SHARE",
                    help="share of each training batch (0 to <1) filled with examples whose captions are "
                         "the most alike by words to the rest's, so that captions differing in one detail "
                         "meet in a batch (default 0: random batches)")
    tp = trsub.add_parser("prefix", help="train the image-prefix mapping network (CLIP image embedding -> "
                                         "generator input embeddings), generator frozen or not")
    _add_train_flags(tp)
    _add_model(tp, required=True, help="CLIP encoder (frozen): " + _MODEL_HELP)
    tp.add_argument("--generator", "-g", required=True, metavar="SPEC",
                    help="generator: hub id or save_pretrained folder")
    tp.add_argument("--prefix-length", type=_positive_int, default=10, metavar="P",
                    help="prefix vectors per image (default 10)")
    tp.add_argument("--mapper", choices=("mlp", "transformer"), default="mlp",
                    help="mapping network (default mlp)")
    tp.add_argument("--hidden-size", type=_positive_int, default=512, metavar="N",
                    help="mapper width (default 512)")
    tp.add_argument("--mapper-layers", type=_positive_int, default=2, metavar="N",
                    help="mlp hidden layers / transformer layers (default 2)")
    tp.add_argument("--mapper-heads", type=_positive_int, default=8, metavar="N",
                    help="transformer mapper attention heads (default 8)")
    tp.add_argument("--no-scale-input", action="store_true",
                    help="feed the unit-length image embedding to the mapper as it is (default: scaled "
                         "by sqrt(dimension), so each coordinate has unit RMS)")
    fz = tp.add_mutually_exclusive_group()
    fz.add_argument("--freeze-generator", dest="train_generator", action="store_false", default=False,
                    help="train the mapper only (default)")
    fz.add_argument("--train-generator", dest="train_generator", action="store_true",
                    help="fine-tune the generator with the mapper (saved inside the checkpoint)")
    tp.add_argument("-c", "--collection", "--retrieval", metavar="DIR",
                    help="collection whose nearest captions go in the prompt (SmallCap style; same encoder)")
    _add_top_k(tp, dest="k", default=4, help="neighbours' captions per prompt with --collection (default 4)")
    trg = trsub.add_parser("rag", help="fine-tune generator + query projection with the RAG marginal likelihood "
                                       "over a collection's top-k items (the index stays fixed)",
                           description="SOURCE: a QA .jsonl (question, answer or answers, optional image) or "
                                       "image-caption pairs (x = image, y = caption). The trained folder "
                                       "(OUT/best) works as --generator for ask/chat: its query projection "
                                       "is picked up from there.")
    _add_train_flags(trg)
    _add_collection(trg, required=True, help="collection to retrieve from")
    trg.add_argument("--generator", "-g", required=True, metavar="SPEC",
                     help="generator to start from: hub id or save_pretrained folder")
    _add_top_k(trg, dest="k", default=4, help="items in the marginal (default 4)")
    trg.add_argument("--candidates", type=_nonneg_int, default=0, metavar="C",
                     help="items retrieved once per example and re-scored every step (default 4k)")
    trg.add_argument("--temperature", type=float, default=0.05, metavar="T",
                     help="P(z|x) = softmax(score / T), also used by ask with the result (default 0.05)")
    trg.add_argument("--mode", choices=("rag-sequence", "rag-token"), default="rag-sequence",
                     help="form of the marginal likelihood (default rag-sequence)")
    trg.add_argument("--target", choices=("texts", "images", "all"), default="texts",
                     help="what retrieval returns (default texts)")
    trg.add_argument("--bias", action="store_true", help="give the query projection a bias")
    trg.add_argument("--projection-lr-scale", type=float, default=0.05, metavar="S",
                     help="query projection's learning rate relative to --lr (default 0.05)")
    rfz = trg.add_mutually_exclusive_group()
    rfz.add_argument("--freeze-generator", action="store_true", help="train the query projection only")
    rfz.add_argument("--freeze-projection", action="store_true", help="train the generator only")
    trg.add_argument("--question", metavar="TEXT", help="prompt question for image-caption pairs "
                     "(default 'What does this image show?')")
    trg.add_argument("--prompt-template", metavar="TEXT", help="prompt with {context} and {question} "
                     "(saved with the result; ask uses it)")
    trg.add_argument("--item-template", metavar="TEXT", help="one retrieved item, with {text} (default '[{n}] {text}')")
    for sp in _all_subparsers(p):
        _add_verbosity(sp)
    return p


def _add_train_flags(sp: argparse.ArgumentParser) -> None:
    """SOURCE, --out and the flags every ``train`` task shares (read back by :func:`_train_settings`)."""
    sp.add_argument("source", metavar="SOURCE", help="image-caption pairs: folder of images + same-stem "
                    ".txt captions, .jsonl/.csv manifest, or COCO captions .json")
    sp.add_argument("--out", "-o", required=True, metavar="DIR",
                    help="output folder: checkpoints/, best/ (the trained model), metrics.jsonl, settings.json")
    sp.add_argument("--image-root", metavar="DIR", help="manifest image paths are relative to DIR")
    sp.add_argument("--allow-outside-root", action="store_true",
                    help="accept manifest image paths that are absolute or leave the root folder")
    g = sp.add_argument_group("training (defaults depend on the task; see README 'Training')")
    g.add_argument("--steps", type=_positive_int, metavar="N", help="optimizer steps")
    g.add_argument("--batch-size", type=_positive_int, metavar="N")
    g.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (AdamW, cosine decay)")
    g.add_argument("--weight-decay", type=float, metavar="W")
    g.add_argument("--warmup-steps", type=_nonneg_int, metavar="N")
    g.add_argument("--val-fraction", type=float, metavar="F", help="share of examples held out for validation")
    g.add_argument("--eval-every", type=_positive_int, metavar="N", help="steps between validation passes")
    g.add_argument("--checkpoint-every", type=_positive_int, metavar="N", help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=_positive_int, metavar="N")
    g.add_argument("--patience", type=_nonneg_int, metavar="N",
                   help="stop after N validation passes without improvement (0: never)")
    g.add_argument("--seed", type=int, metavar="N")
    g.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1, mps (default: cuda if present)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--metrics", metavar="FILE", help="JSONL metrics file (default OUT/metrics.jsonl)")
    _add_json(sp, help="the summary is JSON (always; accepted for uniformity)")


def _train_settings(args: argparse.Namespace, **defaults: Any) -> Any:
    """The :class:`~crossmodal_rag.training.TrainSettings` of a ``train`` command: the flags given,
    else the task's ``defaults``, else the dataclass defaults."""
    from .training import TrainSettings

    flags = {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
             "val_fraction": args.val_fraction, "eval_every": args.eval_every,
             "checkpoint_every": args.checkpoint_every, "keep_checkpoints": args.keep_checkpoints,
             "patience": args.patience, "seed": args.seed, "device": args.device}
    values = {**defaults, **{k: v for k, v in flags.items() if v is not None}}
    try:
        return TrainSettings(**values)
    except ValueError as e:
        raise UsageError(_flag_spelling(e)) from e


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


def _flag_spelling(error: Exception) -> str:
    """A settings error as the command line says it: ``top_p must ...`` -> ``--top-p must ...``."""
    text = re.sub(r"^(train|prefix) setting ", "", str(error))
    return _FIELD_NAME.sub(lambda m: _FLAGS_OF_FIELDS[m.group(1)], text)


def _collection_dir(args: argparse.Namespace) -> str:
    folder = getattr(args, "collection", None) or getattr(args, "dir", None)
    if not folder:
        how = "DIR or -c DIR" if hasattr(args, "dir") else "-c/--collection DIR"
        raise UsageError(f"{args.command}: name the collection folder with {how}")
    return folder


def _check_collection_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A positional DIR and --collection may both be given only when they name one folder."""
    folder, option = getattr(args, "dir", None), getattr(args, "collection", None)
    if folder and option and os.path.abspath(folder) != os.path.abspath(option):
        parser.error(f"the collection is named twice: DIR {folder} and --collection {option}; give one")


# -- output: what is printed is escaped -----------------------------------------------------
# C0 controls, DEL, C1 controls and the bidirectional overrides and isolates: a caption, a file
# name or a generated answer holding them could move the cursor, recolour or rewrite the
# terminal, or reorder what is shown. Text output shows them as \x1b, \r, \u202e, ...
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_ESCAPES = {c: _NAMED.get(c, f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS}
_ESCAPES_BUT_NEWLINE = {c: e for c, e in _ESCAPES.items() if c != 0x0A}
# JSON escapes C0 itself; these others are written as \uXXXX escapes (the same JSON string).
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _CONTROLS if c >= 0x7F}


def _safe(value: Any, *, newlines: bool = False) -> str:
    """``value`` as text for a terminal: every control character escaped (but newlines, if asked)."""
    text = "" if value is None else str(value)
    return text.translate(_ESCAPES_BUT_NEWLINE if newlines else _ESCAPES)


def _json(value: Any) -> str:
    """Indented JSON, non-ASCII text kept, C1 and bidi controls escaped."""
    return json.dumps(value, indent=2, ensure_ascii=False).translate(_JSON_ESCAPES)


class _EscapingFormatter(logging.Formatter):
    """Log lines (which name files and rows) with control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return _safe(super().format(record), newlines=True)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.DEBUG if verbose > 1 else
                                          logging.INFO if verbose else logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EscapingFormatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if verbose < 2:
        for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "faiss"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        # open_clip logs to the root logger; keep it to errors unless asked.
        logging.getLogger().setLevel(max(level, logging.ERROR) if not verbose else level)
        logging.getLogger("crossmodal_rag").setLevel(level)
    _quiet_hub_libraries(verbose)
    from . import progress

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


# -- commands ----------------------------------------------------------------------------
def _add_ann_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nprobe", type=_positive_int, metavar="N",
                        help="IVF indexes: lists to visit (default: the tuned value)")
    parser.add_argument("--ef-search", type=_positive_int, metavar="N",
                        help="HNSW indexes: candidate list size (default: the tuned value)")
    parser.add_argument("--rerank", type=_nonneg_int, metavar="F",
                        help="PQ indexes: re-rank k x F candidates exactly (default 8; 0 = off)")
    parser.add_argument("--mmap", action="store_true",
                        help="memory-map the index files (collections larger than RAM)")


def _search_params(args: argparse.Namespace):  # -> SearchParams | None
    from .store.ann import SearchParams

    values = {k: getattr(args, k, None) for k in ("nprobe", "ef_search", "rerank")}
    return SearchParams(**values) if any(v is not None for v in values.values()) else None


def cmd_reindex(args: argparse.Namespace) -> int:
    from .collection import Collection

    folder = _collection_dir(args)
    with Collection.open(folder, writable=True, fsync=args.fsync) as coll:
        report = coll.reindex(args.index_type, max_index_memory=args.max_index_memory,
                              seed=args.seed, tune=args.tune, target_recall=args.target_recall,
                              sharded=args.sharded, workers=args.workers)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, r in report.items():
        build = r.get("build") or {}
        print(f"{name}: {r['index_type']}, {r['count']} vectors, built in {build.get('seconds', 0):.1f} s"
              f"{' (sharded)' if build.get('sharded') else ''}{_tuning_text(r.get('tuning'))}")
    return 0


def _tuning_text(tuning: dict[str, Any] | None) -> str:
    """What tuning chose and measured, as ``reindex`` and ``tune`` print it ('' if untuned)."""
    tuning = tuning or {}
    if not tuning.get("param"):
        return ""
    last = tuning["measured"][-1] if tuning.get("measured") else {}
    return (f", {tuning['param']}={tuning['value']} (recall@10 {last.get('recall', 0):.3f}, "
            f"p50 {last.get('p50_ms', 0):.2f} ms{'' if tuning.get('reached') else ', target missed'})")


#: Explicit search settings of ``tune``: flag, the index kind it applies to, what it is called there.
_KNOBS = {"nprobe": ("--nprobe", "ivf"), "ef_search": ("--ef-search", "hnsw")}
_KNOB_OF_KIND = {"ivf": "--nprobe", "hnsw": "--ef-search"}


def _check_knobs(coll: Any, params: Any, only: str | None) -> None:
    """Refuse ``--nprobe`` where no chosen index is IVF and ``--ef-search`` where none is HNSW,
    naming the setting that index does take."""
    indexes = {n: ix for n, ix in coll.indexes.items() if only in (None, n)}
    for field, (flag, kind) in _KNOBS.items():
        if getattr(params, field) is None or any(ix.kind == kind for ix in indexes.values()):
            continue
        name, ix = next(iter(indexes.items()))
        other = _KNOB_OF_KIND.get(ix.kind)
        fix = f"set its search depth with {other}" if other else "exact search takes no search settings"
        raise UsageError(f"tune: {flag} applies to {kind.upper()} indexes; the {name} index is "
                         f"{ix.index_type} ({ix.kind.upper()}): {fix}")


def cmd_tune(args: argparse.Namespace) -> int:
    from .collection import Collection

    params = _search_params(args)
    with Collection.open(_collection_dir(args), writable=True) as coll:
        if params is not None:
            _check_knobs(coll, params, args.index_name)
            coll.set_search_params(params, args.index_name)
            out = {n: {"index_type": ix.index_type, "search_params": ix.params.to_dict()}
                   for n, ix in coll.indexes.items()}
        else:
            out = coll.tune(target_recall=args.target_recall, seed=args.seed)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for name, r in out.items():
        if r.get("tuning"):
            line = _tuning_text(r["tuning"])
        else:
            shown = ", ".join(f"{k}={v}" for k, v in r["search_params"].items() if v is not None)
            line = f", {shown} (set)" if shown else " (exact: nothing to tune)"
        print(f"{name}: {r['index_type']}{line}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .importer import import_embeddings

    folder = _collection_dir(args)
    report = import_embeddings(args.source, folder, args.model, image_root=args.image_root,
                               index_type=args.index_type, max_index_memory=args.max_index_memory,
                               verify=args.verify, fsync=args.fsync, progress=not args.quiet,
                               allow_outside_root=args.allow_outside_root)
    for p in report.skipped[:50]:
        print(f"  {_safe(p.item)}: {_safe(p.reason)}", file=sys.stderr)
    print(report.summary())
    if not report.indexed_anything:
        print(f"error: nothing could be imported from {args.source}", file=sys.stderr)
        return 1
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .collection import Collection
    from .ingest import IngestSettings, ingest

    folder = _collection_dir(args)
    settings_kwargs: dict[str, Any] = {
        "batch_size": args.batch_size, "workers": args.workers, "image_root": args.image_root,
        "allow_outside_root": args.allow_outside_root, "progress": not args.quiet,
    }
    if args.max_image_pixels:
        settings_kwargs["max_image_pixels"] = args.max_image_pixels
    if args.max_image_mb is not None:
        if not args.max_image_mb > 0:
            raise UsageError(f"--max-image-mb must be > 0, got {args.max_image_mb}")
        settings_kwargs["max_image_bytes"] = int(args.max_image_mb * 1024 * 1024)
    settings = IngestSettings(**settings_kwargs)
    ray_settings = _ray_settings(args)
    # "existed" means held a collection: a folder that was empty (or held only an interrupted
    # creation, which create clears) is the user's, kept as an empty folder after a failure
    existed = (Path(folder) / "manifest.json").is_file()
    folder_existed = Path(folder).is_dir()
    remove_created = False
    try:
        with Collection.open_or_create(folder, args.model, index_type=args.index_type,
                                       max_index_memory=args.max_index_memory,
                                       fsync=args.fsync) as coll:
            requested = args.index_type
            if requested != coll.manifest.index_type and requested != "auto":
                print(f"note: {folder} keeps its index type {coll.manifest.index_type!r}; change it with "
                      f"`crossmodal-rag reindex {folder} --index {requested}`", file=sys.stderr)
            if ray_settings is not None:
                from .distributed import DistributedError, ingest_ray

                try:
                    with _skips_listed_by_cli():
                        report = ingest_ray(coll, args.source, settings, ray_settings)
                except DistributedError:
                    # Ray could not start or be reached: a collection this command created and
                    # that holds nothing is not left behind (anything committed is kept)
                    remove_created = not existed and not any(coll.counts().values())
                    raise
            else:
                with _skips_listed_by_cli():
                    report = ingest(coll, args.source, settings)
            counts = coll.counts()
    except CrossmodalError:
        if remove_created:
            shutil.rmtree(folder, ignore_errors=True)
            if folder_existed:
                Path(folder).mkdir(exist_ok=True)
        raise
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    if report.skipped:
        print(f"skipped {len(report.skipped)} item(s):", file=sys.stderr)
        for p in report.skipped[:50]:
            print(f"  {_safe(p.item)}: {_safe(p.reason)}", file=sys.stderr)
        if len(report.skipped) > 50:
            print(f"  ... and {len(report.skipped) - 50} more (see --report FILE)", file=sys.stderr)
    print(f"{report.summary()}")
    print(f"collection {_safe(Path(folder).resolve())}: {counts['images']} images, {counts['captions']} "
          f"captions, {counts['passages']} passages")
    if not report.indexed_anything:
        if not report.skipped:
            print(f"error: found no images ({', '.join(sorted(_exts()))}) or texts in {args.source}",
                  file=sys.stderr)
        else:
            print("error: nothing could be indexed", file=sys.stderr)
        return 1
    return 0


class _NoSkipRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "skipped %s: %s"


@contextlib.contextmanager
def _skips_listed_by_cli() -> Iterator[None]:
    """Leave out the ingest's per-item "skipped" log lines: ``index`` lists the skipped items itself
    (once each, the first 50, the rest in --report)."""
    ingest_logger, no_skips = logging.getLogger("crossmodal_rag.ingest"), _NoSkipRecords()
    ingest_logger.addFilter(no_skips)
    try:
        yield
    finally:
        ingest_logger.removeFilter(no_skips)


def _ray_settings(args: argparse.Namespace) -> Any:
    """RaySettings for ``index --ray``, or None (refusing --ray-* options without --ray)."""
    if args.ray is None:
        given = [f for f, v in (("--ray-actors", args.ray_actors), ("--ray-batch-size", args.ray_batch_size),
                                ("--ray-actor-cpus", args.ray_actor_cpus != 1.0)) if v]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --ray")
        return None
    from .distributed import RaySettings, check_ray

    try:
        ray_settings = RaySettings(address=None if args.ray == "local" else args.ray, actors=args.ray_actors,
                                   batch_size=args.ray_batch_size, actor_cpus=args.ray_actor_cpus)
    except ValueError as e:
        raise UsageError(f"index: {e}") from e
    check_ray(ray_settings)  # Ray installed, ADDRESS answering: before a collection is created
    return ray_settings


def _exts() -> set[str]:
    from .images import IMAGE_EXTENSIONS

    return set(IMAGE_EXTENSIONS)


def _read_queries(path: str) -> list[dict[str, Any]]:
    from .safe_io import read_regular_text

    try:
        lines = read_regular_text(path, what="queries file").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise QueryError(f"cannot read queries file {path}: {getattr(e, 'reason', None) or e}") from e
    queries: list[dict[str, Any]] = []
    for n, line in enumerate(lines, start=1):
        s = line.strip()
        if not s:
            continue
        q: dict[str, Any] = {"line": n}
        if s.startswith("{"):
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                q["error"] = f"invalid JSON: {e.msg}"
                queries.append(q)
                continue
            q["text"], q["image"] = obj.get("text"), obj.get("image")
            if q["image"]:
                q["image"] = str((Path(path).resolve().parent / q["image"]).resolve()) \
                    if not Path(q["image"]).is_absolute() else q["image"]
        else:
            q["text"], q["image"] = s, None
        queries.append(q)
    return queries


def _tsv_field(value: Any) -> str:
    """One TSV field: control characters (tabs and newlines too) escaped, other runs of
    whitespace as one space."""
    return " ".join(_safe(value).split())


def cmd_search(args: argparse.Namespace) -> int:
    from .collection import Collection
    from .search import TargetEmptyError

    folder = _collection_dir(args)
    if args.queries and (args.text or args.image):
        raise UsageError("search: give TEXT/--image or --queries FILE, not both")
    if args.queries:
        queries = _read_queries(args.queries)
        if not queries:
            raise QueryError(f"queries file {args.queries} holds no queries")
    else:
        if args.text is None and args.image is None:
            raise QueryError("search: give a TEXT query, --image PATH, or --queries FILE")
        if args.text is not None and not args.text.strip():
            raise QueryError("empty query: give a text to search for, or an image with --image")
        _check_image_arg(args.image, "query image")
        queries = [{"line": None, "text": args.text, "image": args.image}]

    failures = 0
    records = []
    params = _search_params(args)
    with Collection.open(folder, model=args.model, mmap=args.mmap) as coll:
        for q in queries:
            label = q.get("text") if q.get("text") is not None else q.get("image")
            try:
                if q.get("error"):
                    raise QueryError(q["error"])
                hits = coll.search(q.get("text"), image=q.get("image"), k=args.top_k, target=args.target,
                                   where=args.where, min_score=args.min_score, plus=args.plus,
                                   minus=args.minus, params=params)
            except TargetEmptyError as e:
                raise QueryError(f"{folder} holds no {e.target}, only {e.alternative}: search them "
                                 f"with --target {e.alternative}") from e
            except QueryError as e:
                if len(queries) == 1:
                    raise
                failures += 1
                print(f"error: query on line {q['line']}: {_safe(e)}", file=sys.stderr)
                continue
            records.append({"query": {"text": q.get("text"), "image": q.get("image")},
                            "label": label, "hits": hits})
    if args.json:
        out = [{"query": r["query"], "target": args.target, "k": args.top_k,
                "results": [h.to_dict() for h in r["hits"]]} for r in records]
        print(_json(out[0] if not args.queries else out))
    else:
        if not args.no_header:
            print("query\trank\tscore\tid\tkind\tpath\ttext")
        for r in records:
            for h in r["hits"]:
                text = h.text if h.text is not None else " | ".join(h.captions)
                print(f"{_tsv_field(r['label'])}\t{h.rank}\t{h.score:.4f}\t{h.id}\t{h.kind}\t"
                      f"{_tsv_field(h.path)}\t{_tsv_field(text)}")
    return 2 if failures else 0


def cmd_info(args: argparse.Namespace) -> int:
    from .store.summary import read_summary  # manifest + SQLite only: no FAISS, no model

    info = read_summary(_collection_dir(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    counts = info["counts"]
    print(f"collection:     {info['path']}")
    print(f"format:         {info['format']} v{info['format_version']} (written by crossmodal-rag "
          f"{info['library_version']})")
    print(f"encoder:        {info['encoder']} ({info['dim']}-d, {info['metric']})")
    budget = f", budget {info['max_index_memory']:,} bytes" if info.get("max_index_memory") else ""
    print(f"index type:     {info['index_type']}{budget}")
    print(f"items:          {counts['images']} images, {counts['captions']} captions, "
          f"{counts['passages']} passages")
    print(f"created:        {info['created_at']}")
    print(f"updated:        {info['updated_at']}")
    print(f"generation:     {info['generation']}" + (
        f" ({info['pending_generations']} newer commit(s) replayed on open)" if info["pending_generations"] else ""))
    for name, f in info["files"].items():
        kind = info.get("index_types", {}).get(name, info["index_type"])
        params = ", ".join(f"{k}={v}" for k, v in info.get("search_params", {}).get(name, {}).items())
        print(f"{name} index:{' ' * (8 - len(name))}{f['path']} ({kind}, {f['count']} vectors, "
              f"{f['bytes']} bytes{', ' + params if params else ''})")
        tuning = info.get("tuning", {}).get(name)
        if tuning and tuning.get("measured"):
            last = tuning["measured"][-1]
            print(f"  tuned:        {tuning['param']}={tuning['value']} -> recall@{tuning['k']} "
                  f"{last.get('recall', 0):.3f}, p50 {last.get('p50_ms', 0):.2f} ms (target "
                  f"{tuning['target_recall']}{'' if tuning.get('reached') else ', missed'})")
    shards = info.get("embeddings", {})
    if shards:
        print("embeddings:     " + ", ".join(f"{n} {sum(s['count'] for s in v)} in {len(v)} float16 shard(s)"
                                           for n, v in shards.items()))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from .collection import Collection

    with Collection.open(_collection_dir(args)) as coll:
        report = coll.check()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for note in report.notes:
            print(f"note: {_safe(note)}")
        for problem in report.problems:
            print(f"problem: {_safe(problem)}")
        c = report.counts
        status = "ok" if report.ok else "FAILED"
        print(f"{status}: {c.get('images', 0)} images, {c.get('captions', 0)} captions, "
              f"{c.get('passages', 0)} passages")
    return 0 if report.ok else 1


def cmd_remove(args: argparse.Namespace) -> int:
    from .collection import Collection

    if not args.ids and not args.path:
        raise UsageError("remove: give item ids and/or --path PATH")
    with Collection.open(_collection_dir(args), writable=True) as coll:
        result = coll.remove(ids=args.ids, paths=args.path)
    for u in result["unknown"]:
        print(f"warning: no item {u!r} in the collection", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"removed {len(result['removed'])} item(s)" + (
            f": {' '.join(map(str, result['removed']))}" if result["removed"] else ""))
    return 1 if result["unknown"] and not result["removed"] else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import (
        DEMO_QUERIES,
        DEMO_QUESTION,
        default_demo_collection,
        next_commands,
        sample_data_dir,
    )
    from .encoders import DEFAULT_MODEL, parse_model_spec
    from .encoders._hub import require_weights

    spec = parse_model_spec(args.model or DEFAULT_MODEL)
    require_weights(spec)  # offline without the weights: say so before torch loads (seconds)
    from .collection import Collection
    from .ingest import IngestSettings, ingest

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
            from .generation import GenerationSettings, RagPipeline, RagSettings

            pipeline = RagPipeline(coll, args.generator, RagSettings(k=3), GenerationSettings(max_new_tokens=32))
            print(f"\nQ: {DEMO_QUESTION}")
            _print_answer(pipeline.ask(DEMO_QUESTION), False)
    print("\nnext, on your own photos (a folder of images, with same-stem .txt captions if you have them):")
    for line in next_commands(args.model, args.generator):
        print(f"  {line}")
    return 0


def _pipeline(args: argparse.Namespace, coll: Any) -> Any:
    from .generation import GenerationSettings, RagPipeline, RagSettings

    try:
        rs: dict[str, Any] = {"k": args.k, "mode": args.mode, "target": args.target,
                              "prior_temperature": args.prior_temperature,
                              "max_context_tokens": args.max_context_tokens,
                              "min_score": args.min_score, "where": tuple(args.where)}
        if args.prompt_template:
            rs["prompt_template"] = args.prompt_template
        settings = RagSettings(**rs)
        gen = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.beams,
                                 do_sample=args.sample, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed)
    except ValueError as e:
        raise UsageError(_flag_spelling(e)) from e
    knowledge = None
    if args.knowledge:
        from .collection import Collection

        knowledge = Collection.open(args.knowledge)
    image_prefix = None
    if getattr(args, "image_prefix", None):
        from .generation.prefix import load_image_prefix

        image_prefix = load_image_prefix(args.image_prefix)
    return RagPipeline(coll, args.generator, settings, gen, knowledge=knowledge, image_prefix=image_prefix)


def _print_answer(answer: Any, as_json: bool) -> None:
    if as_json:
        print(_json(answer.to_dict()))
        return
    if answer.answer:
        print(_safe(answer.answer, newlines=True))
    else:
        print("(the generator gave an empty answer)" if answer.sources else "(no answer: nothing was retrieved)")
    if answer.sources:
        print("\nnearest sources (below the --min-score threshold):" if answer.abstained else "\nsources:")
        for s in answer.sources:
            flag = "" if s.included else "  (not in prompt)"
            flag += "  (truncated)" if s.truncated else ""
            print(f"  [{s.rank}] posterior {s.posterior:.3f}  prior {s.prior:.3f}  score {s.score:.3f}  "
                  f"#{s.id} {_tsv_field(s.path)}  {_tsv_field(s.text)[:120]}{flag}")


def cmd_caption(args: argparse.Namespace) -> int:
    from .collection import Collection
    from .generation import GenerationSettings
    from .generation.caption import Captioner
    from .generation.prefix import load_image_prefix

    prefix = load_image_prefix(args.image_prefix)
    generation = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.beams)
    coll = Collection.open(args.collection, model=args.model) if args.collection else None
    failures, records = 0, []
    try:
        captioner = Captioner(prefix, collection=coll, generator=args.generator, k=args.k,
                              generation=generation, encoder=None if coll is not None else args.model)
        for image, result in zip(args.images, captioner.caption_many(args.images, progress=not args.quiet), strict=True):
            if isinstance(result, QueryError):
                if len(args.images) == 1:
                    raise result
                failures += 1
                print(f"error: {_safe(result)}", file=sys.stderr)
                continue
            records.append(result)
            if not args.json:
                print(_safe(result.caption) if len(args.images) == 1 else f"{_tsv_field(image)}\t{_tsv_field(result.caption)}")
    finally:
        if coll is not None:
            coll.close()
    if args.json:
        out = [r.to_dict() for r in records]
        print(_json(out[0] if len(args.images) == 1 else out))
    return 2 if failures else 0


def _check_image_arg(image: str | None, what: str = "image") -> None:
    """Refuse an --image that is missing or not a regular file (a FIFO, a device, a folder)."""
    if image is None:
        return
    from .safe_io import check_regular

    try:
        check_regular(image, what="image file")
    except FileNotFoundError as e:
        raise QueryError(f"{what} {image} does not exist") from e
    except OSError as e:
        raise QueryError(f"{what} {image}: {getattr(e, 'reason', None) or e.strerror or e}") from e


def cmd_ask(args: argparse.Namespace) -> int:
    from .collection import Collection

    if (args.question is None or not args.question.strip()) and args.image is None:
        raise QueryError("ask: give a QUESTION, an --image, or both")
    _check_image_arg(args.image)
    with Collection.open(_collection_dir(args), model=args.model) as coll:
        answer = _pipeline(args, coll).ask(args.question, image=args.image)
    _print_answer(answer, args.json)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .apps import ChatSession
    from .collection import Collection

    _check_image_arg(args.image)
    session = ChatSession.load_or_new(args.session)
    with Collection.open(_collection_dir(args), model=args.model) as coll:
        pipeline = _pipeline(args, coll)
        if args.message is not None:
            answer = session.send(pipeline, args.message, image=args.image)
            _print_answer(answer, args.json)
        else:
            print("chat: type a message, an empty line or Ctrl-D to stop", file=sys.stderr)
            for line in sys.stdin:
                if not line.strip():
                    break
                answer = session.send(pipeline, line)
                _print_answer(answer, args.json)
                if args.session:
                    session.save(args.session)
    if args.session:
        session.save(args.session)
    return 0


def cmd_write(args: argparse.Namespace) -> int:
    from .apps import write
    from .collection import Collection

    draft = args.draft
    if args.draft_file:
        try:
            from .safe_io import read_regular_text

            draft = read_regular_text(args.draft_file, what="draft file")
        except (OSError, UnicodeDecodeError) as e:
            raise QueryError(f"cannot read draft file {args.draft_file}: {e}") from e
    if draft is None or not draft.strip():
        raise QueryError("write: give the DRAFT text or --draft-file FILE")
    with Collection.open(_collection_dir(args), model=args.model) as coll:
        answer = write(_pipeline(args, coll), draft)
    _print_answer(answer, args.json)
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    from .apps import recommend
    from .collection import Collection

    for image in args.liked_image:
        _check_image_arg(image)
    with Collection.open(_collection_dir(args), model=args.model) as coll:
        recs = recommend(coll, args.liked, args.liked_image, k=args.top_k, diversity=args.diversity,
                         target=args.target, where=args.where)
    if args.json:
        print(_json([r.to_dict() for r in recs]))
    else:
        print("rank\tscore\tmmr\tid\tkind\tpath\ttext")
        for r in recs:
            h = r.hit
            text = h.text if h.text is not None else " | ".join(h.captions)
            print(f"{h.rank}\t{h.score:.4f}\t{r.mmr:.4f}\t{h.id}\t{h.kind}\t{_tsv_field(h.path)}\t{_tsv_field(text)}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command == "retrieval":
        from .eval import evaluate_retrieval

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
            from .viz import recall_curves, score_histogram

            out = Path(args.plots)
            recall_curves({report.model: {"text_to_image": report.text_to_image,
                                          "image_to_text": report.image_to_text}}, save=out / "recall_at_k.png")
            if report.negative_scores:
                score_histogram(report.positive_scores, report.negative_scores, save=out / "scores.png")
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
        for s in report.skipped:
            print(f"skipped {s}", file=sys.stderr)
        return 0

    from .collection import Collection
    from .eval import evaluate_captioning, evaluate_qa

    with Collection.open(_collection_dir(args), model=args.model) as coll:
        pipe = _pipeline(args, coll)
        if args.task == "qa":
            report = evaluate_qa(pipe, args.dataset, limit=args.limit, progress=not args.quiet)
        else:
            report = evaluate_captioning(pipe, args.dataset, limit=args.limit, progress=not args.quiet)
    if args.plots:
        from .viz import latency_chart

        latency_chart({f"{report.task} ({report.mode})": report.timings}, save=Path(args.plots) / "latency.png")
    print(_json(report.to_dict()) if args.json else report.table())
    for s in report.skipped:
        print(f"skipped {s}", file=sys.stderr)
    return 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    from .collection import Collection

    with Collection.open(_collection_dir(args)) as coll:
        groups = coll.near_duplicates(args.threshold)
        out = []
        for n, group in enumerate(groups, start=1):
            items = coll.get(group)
            out.append({"group": n, "items": [{"id": it.id, "path": it.path} for it in items]})
    if args.json:
        print(_json(out))
    else:
        print("group\tid\tpath")
        for g in out:
            for it in g["items"]:
                print(f"{g['group']}\t{it['id']}\t{_tsv_field(it['path'])}")
    print(f"{len(groups)} group(s) of near-duplicates at threshold {args.threshold}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .web import WebSettings, create_app
        from .web.guards import allowed_hosts_for
    except ImportError as e:
        raise UsageError(f"serve needs the web extras: pip install 'crossmodal-rag[serve]' ({e})") from e

    settings = WebSettings(
        collection=_collection_dir(args), generator=args.generator, model=args.model,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_image_pixels=args.max_image_pixels,
        max_k=args.max_k, max_new_tokens=args.max_new_tokens, thumbnail_dir=args.thumbnail_dir,
        load_generator_at_startup=not args.lazy_generator, mmap=args.mmap,
        allowed_hosts=allowed_hosts_for(args.host, args.allowed_host), show_paths=args.show_paths,
    )
    from .collection import Collection

    Collection.open(settings.collection).close()  # fail fast, with a clear message, before binding
    print(f"serving {settings.collection} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
    print(f"answering Host: {', '.join(settings.allowed_hosts)} (more with --allowed-host)", file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port,
                log_level="warning" if not args.verbose else "info", timeout_keep_alive=5)
    return 0


def _hard_negative_share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1), got {text!r}")
    return value


def cmd_train_clip(args: argparse.Namespace) -> int:
    from .training.clip import ClipTaskSettings, train_clip

    settings = _train_settings(args, **ClipTaskSettings.TRAIN_DEFAULTS)
    summary = train_clip(
        args.source, args.out, model=args.model, settings=settings,
        task_settings=ClipTaskSettings(train_image=not args.freeze_image, train_text=not args.freeze_text,
                                       hard_negatives=args.hard_negatives),
        collection=args.collection, image_root=args.image_root, allow_outside_root=args.allow_outside_root,
        resume=args.resume, progress=not args.quiet, metrics_path=args.metrics,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train_prefix(args: argparse.Namespace) -> int:
    from .generation.prefix import PrefixSettings
    from .training.prefix import TRAIN_DEFAULTS, PrefixTaskSettings, train_prefix

    settings = _train_settings(args, **TRAIN_DEFAULTS)
    try:
        task_settings = PrefixTaskSettings(
            model=args.model, generator=args.generator,
            prefix=PrefixSettings(kind=args.mapper, prefix_length=args.prefix_length,
                                  hidden_size=args.hidden_size, num_layers=args.mapper_layers,
                                  num_heads=args.mapper_heads, scale_input=not args.no_scale_input),
            train_generator=args.train_generator, retrieval=args.collection, k=args.k)
    except ValueError as e:
        raise UsageError(_flag_spelling(e)) from e
    summary = train_prefix(args.source, args.out, task_settings, settings, image_root=args.image_root,
                           allow_outside_root=args.allow_outside_root, resume=args.resume,
                           progress=not args.quiet, metrics_path=args.metrics)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train_rag(args: argparse.Namespace) -> int:
    from .training.rag import TRAIN_DEFAULTS, RagTrainSettings, train_rag

    settings = _train_settings(args, **TRAIN_DEFAULTS)
    try:
        task_settings = RagTrainSettings(
            k=args.k, candidates=args.candidates, temperature=args.temperature, mode=args.mode,
            target=args.target, bias=args.bias, projection_lr_scale=args.projection_lr_scale,
            freeze_generator=args.freeze_generator, freeze_projection=args.freeze_projection,
            question=args.question, prompt_template=args.prompt_template, item_template=args.item_template)
    except ValueError as e:
        raise UsageError(_flag_spelling(e)) from e
    summary = train_rag(args.collection, args.source, args.out, generator=args.generator,
                        settings=task_settings, train_settings=settings, image_root=args.image_root,
                        allow_outside_root=args.allow_outside_root, resume=args.resume,
                        progress=not args.quiet, metrics_path=args.metrics)
    print(json.dumps(summary, indent=2))
    return 0


#: ``train`` tasks by name (each parser is added in build_parser next to ``train clip``).
TRAIN_COMMANDS = {"clip": cmd_train_clip, "prefix": cmd_train_prefix, "rag": cmd_train_rag}


def cmd_train(args: argparse.Namespace) -> int:
    _check_train_out(Path(args.out).expanduser(), args.train_command, args.resume)
    # every task reports its checkpoints' paths (out_dir, best_dir, metrics_path, ...) absolute
    args.out = str(Path(args.out).expanduser().resolve())
    if args.metrics:
        args.metrics = str(Path(args.metrics).expanduser().resolve())
    return TRAIN_COMMANDS[args.train_command](args)


def _check_train_out(out: Path, task: str, resume: bool) -> None:
    """--out against --resume, before any model or data is loaded: a run already there needs
    --resume, and --resume needs a run of the same task (the training loop checks both again)."""
    last = out / "last"
    if last.is_file() and not resume:
        try:
            name = f" (checkpoint {last.read_text(encoding='utf-8').strip()})"
        except (OSError, UnicodeDecodeError):
            name = ""
        raise UsageError(f"{out} already holds a training run{name}; add --resume to continue it, "
                         "or choose another --out folder")
    if resume and (out / "settings.json").is_file():
        try:
            previous = json.loads((out / "settings.json").read_text(encoding="utf-8")).get("task")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            return  # unreadable: the training loop says so
        if previous != task:
            raise UsageError(f"{out} holds a {previous!r} run, not {task!r}; choose another --out folder")


def cmd_reembed(args: argparse.Namespace) -> int:
    from .training.clip import reembed_collection

    report = reembed_collection(_collection_dir(args), args.model, batch_size=args.batch_size,
                                progress=not args.quiet)
    print(json.dumps(report.to_dict(), indent=2))
    return 0


COMMANDS = {"index": cmd_index, "search": cmd_search, "info": cmd_info, "check": cmd_check,
            "remove": cmd_remove, "demo": cmd_demo, "ask": cmd_ask, "chat": cmd_chat,
            "write": cmd_write, "recommend": cmd_recommend, "serve": cmd_serve,
            "duplicates": cmd_duplicates, "eval": cmd_eval, "reindex": cmd_reindex, "tune": cmd_tune,
            "import": cmd_import, "train": cmd_train, "caption": cmd_caption}

COMMANDS["reembed"] = cmd_reembed


def _in_cli_words(error: Exception) -> str:
    """A library error as the command line says it: the search target by its flag."""
    alternative = getattr(error, "alternative", None)  # search.TargetEmptyError (not imported: faiss)
    if alternative:
        return f"the collection holds no {error.target}, only {alternative}: use --target {alternative}"
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    chosen = _chosen_parser(parser, args)
    if extra:  # the subcommand's usage, not the top-level one
        chosen.error(f"unrecognized arguments: {' '.join(extra)}")
    _check_collection_args(chosen, args)
    _setup_logging(args.verbose, args.quiet)
    try:
        return COMMANDS[args.command](args)
    except (QueryError, UsageError) as e:
        print(f"error: {_safe(_in_cli_words(e), newlines=True)}", file=sys.stderr)
        return 2
    except CrossmodalError as e:
        print(f"error: {_safe(e, newlines=True)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `crossmodal-rag search ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
