"""Commands that rank a collection's items for a query: ``search`` (text, image, or a file of
queries; TSV or JSON) and ``recommend``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import QueryError
from ..search.request import DEFAULT_MODE, MODES, TARGETS
from .options import (
    UsageError,
    add_ann_flags,
    add_json,
    add_model,
    add_top_k,
    add_where,
    check_image_arg,
    min_score_arg,
    search_params,
)
from .output import safe, to_json, tsv_field
from .shards import add_collections, open_searchable, report_partial, shard_folders, sharded_json

if TYPE_CHECKING:
    from ..search import Hit

logger = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``search`` and ``recommend`` to ``sub``."""
    se = sub.add_parser("search", help="search a collection by text or by image")
    se.add_argument("text", nargs="?", metavar="TEXT", help="text query")
    se.add_argument("--image", "-i", metavar="PATH", help="image query")
    se.add_argument("--queries", metavar="FILE",
                    help="batch: one query per line (text, or JSON {\"text\": ...} / {\"image\": ...})")
    add_collections(se)
    add_top_k(se, default=10, help="results per query (default 10)")
    se.add_argument("--target", "-t", choices=TARGETS, default="images",
                    help="what to return: images, texts (captions and passages) or all")
    add_model(se)
    se.add_argument("-w", "--where", action="append", default=[], metavar="EXPR",
                    help="metadata filter, e.g. 'width>=1000', 'path=*/2023/*', 'caption~dog' (repeatable, ANDed)")
    se.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                    help="dense: CLIP embeddings; keyword: full-text (BM25) over captions, passages and "
                         "OCR text; hybrid: both fused by reciprocal rank (default auto: hybrid for a text "
                         "query in a collection with texts, else dense)")
    se.add_argument("--min-score", metavar="S|auto", type=min_score_arg,
                    help="drop hits scoring below S, a number from -1 to 1 ('auto': calibrated); "
                    "in every mode S is the dense (cosine) score")
    se.add_argument("--plus", action="append", default=[], metavar="TEXT", help="add a text to the query (repeatable)")
    se.add_argument("--minus", action="append", default=[], metavar="TEXT", help="subtract a text from the query")
    add_json(se, help="JSON output instead of TSV")
    se.add_argument("--no-header", action="store_true", help="TSV without the header line")
    se.add_argument("--no-parse", action="store_true",
                    help="keep dates and places in the query text as words (default: 'beach in July "
                         "2023' searches 'beach' with --where taken:2023-07 in a collection of dated photos)")
    se.add_argument("--sort", choices=("relevance", "taken", "-taken"), default="relevance", nargs="?",
                    const="relevance", help="order of the results: relevance (default), taken (oldest "
                                            "first), -taken (newest first)")
    # argparse reads "--sort -taken" as --sort and a flag -taken: that flag is the newest-first order
    se.add_argument("-taken", dest="sort_newest", action="store_true", help=argparse.SUPPRESS)
    add_ann_flags(se)
    se.set_defaults(handler=cmd_search)

    rc = sub.add_parser("recommend", help="items like the ones you liked (not already liked)")
    add_collections(rc)
    rc.add_argument("--liked", type=int, nargs="*", default=[], metavar="ID", help="liked item ids")
    rc.add_argument("--liked-in", action="append", default=[], metavar="SHARD:ID",
                    help="with several -c: a liked item of shard SHARD (repeatable; hits name their shard)")
    rc.add_argument("--liked-image", action="append", default=[], metavar="PATH",
                    help="a liked image file (repeatable)")
    add_top_k(rc, default=10, help="recommendations (default 10)")
    rc.add_argument("--diversity", type=float, default=0.3, metavar="D",
                    help="0 = most similar first, 1 = most diverse (MMR; default 0.3)")
    rc.add_argument("--target", choices=TARGETS, default="images")
    add_where(rc)
    add_model(rc)
    add_json(rc)
    rc.set_defaults(handler=cmd_recommend)


def _read_queries(path: str) -> list[dict[str, Any]]:
    from ..safe_io import read_regular_text

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


def cmd_search(args: argparse.Namespace) -> int:
    from ..search import SearchRequest, TargetEmptyError
    from ..search.moments import moments_in, sort_hits

    folders = shard_folders(args)
    folder = folders[0] if len(folders) == 1 else f"none of the {len(folders)} shards"
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
        check_image_arg(args.image, "query image")
        queries = [{"line": None, "text": args.text, "image": args.image}]

    failures = 0
    records = []
    params = search_params(args)
    with open_searchable(args, model=args.model, mmap=args.mmap) as coll:
        for q in queries:
            label = q.get("text") if q.get("text") is not None else q.get("image")
            try:
                if q.get("error"):
                    raise QueryError(q["error"])
                found = None if args.no_parse else moments_in(coll, q.get("text"))  # issue 30
                result = coll.search(SearchRequest(
                    text=found.text if found else q.get("text"), image=q.get("image"), k=args.top_k,
                    target=args.target, where=[*args.where, *(found.where if found else ())],
                    min_score=args.min_score, plus=args.plus, minus=args.minus, params=params, mode=args.mode))
                order = "-taken" if getattr(args, "sort_newest", False) else args.sort
                mode, hits = result.mode, sort_hits(list(result.hits), order)
                if found is not None and found.where:
                    q["parsed"] = found.to_dict()
                    logger.info("query %s: read as %r with %s", _shown(label), found.text, " ".join(found.where))
                report_partial(result, f"query on line {q['line']}: " if q["line"] is not None else "")
                if result.reason:
                    logger.info("query %s: %s", _shown(label), result.reason)
            except TargetEmptyError as e:
                raise QueryError(f"{folder} holds no {e.target}, only {e.alternative}: search them "
                                 f"with --target {e.alternative}") from e
            except QueryError as e:
                if len(queries) == 1:
                    raise
                failures += 1
                print(f"error: query on line {q['line']}: {safe(e)}", file=sys.stderr)
                continue
            note = _keyword_note(q.get("text"), mode)
            if note and not getattr(args, "quiet", False):
                where = f"query on line {q['line']}: " if q["line"] is not None else ""
                print(f"note: {where}{safe(note)}", file=sys.stderr)
            records.append({"query": {"text": q.get("text"), "image": q.get("image"),
                                      **({"parsed": q["parsed"]} if q.get("parsed") else {})},
                            "label": label, "hits": hits, "mode": mode, "note": note,
                            "reason": result.reason, "shards": sharded_json(result)})
    if args.json:
        out = [{"query": r["query"], "target": args.target, "k": args.top_k, "mode": r["mode"],
                "mode_reason": r["reason"], **({"note": r["note"]} if r["note"] else {}),
                "results": [h.to_dict() for h in r["hits"]], **r["shards"]} for r in records]
        print(to_json(out[0] if not args.queries else out))
    else:
        if not args.no_header:
            print("query\trank\tscore\tid\tkind\tpath\ttext")
        for r in records:
            for h in r["hits"]:
                text = shown_text(h)
                print(f"{tsv_field(r['label'])}\t{h.rank}\t{_tsv_score(h):.4f}\t{h.id}\t{h.kind}\t"
                      f"{tsv_field(h.path)}\t{tsv_field(text)}")
    return 2 if failures else 0


def shown_text(hit: Hit) -> str:
    """A hit's text for TSV: its own text, or an image's captions joined; a caption a VLM wrote is
    shown as ``(generated) TEXT``."""
    def mark(text: str) -> str:
        return f"(generated) {text}" if text in hit.generated else text

    return mark(hit.text) if hit.text is not None else " | ".join(mark(c) for c in hit.captions)


def _tsv_score(hit: Hit) -> float:
    """TSV's score: the cosine of a fused hit (its fused score, a rank-based number that ties
    and reads as nothing, is in --json), BM25 in keyword mode, the cosine in dense mode."""
    if hit.mode == "hybrid" and hit.dense_score is not None:
        return hit.dense_score
    return hit.score


def _shown(label: object) -> str:
    text = str(label)
    return repr(text if len(text) <= 60 else text[:57] + "...")


def _keyword_note(text: str | None, mode: str) -> str | None:
    """The note for a keyword or hybrid search whose query holds no words to match."""
    from ..search.hybrid import keyword_note

    if mode not in ("keyword", "hybrid"):
        return None
    note = keyword_note(text)
    if note is None:
        return None
    return note + ("; --mode dense (or auto) searches it by meaning" if mode == "keyword"
                   else "; the dense ranking alone answers")


def cmd_recommend(args: argparse.Namespace) -> int:
    from ..apps import recommend

    for image in args.liked_image:
        check_image_arg(image)
    several = len(shard_folders(args)) > 1
    if several and args.liked:
        raise UsageError("recommend over several -c: name liked items as --liked-in SHARD:ID")
    if args.liked_in and not several:
        raise UsageError("--liked-in SHARD:ID is for several -c collections; with one, give --liked ID")
    with open_searchable(args, model=args.model) as coll:
        if several:
            from ..serving.recommend import parse_liked, recommend_shards

            liked = parse_liked(args.liked_in, [s.name for s in coll.shards])
            recs = recommend_shards(coll, liked, args.liked_image, k=args.top_k, diversity=args.diversity,
                                    target=args.target, where=args.where)
        else:
            recs = recommend(coll, args.liked, args.liked_image, k=args.top_k, diversity=args.diversity,
                             target=args.target, where=args.where)
    if args.json:
        print(to_json([r.to_dict() for r in recs]))
    else:
        print("rank\tscore\tmmr\tid\tkind\tpath\ttext")
        for r in recs:
            h = r.hit
            text = shown_text(h)
            print(f"{h.rank}\t{h.score:.4f}\t{r.mmr:.4f}\t{h.id}\t{h.kind}\t{tsv_field(h.path)}\t{tsv_field(text)}")
    return 0
