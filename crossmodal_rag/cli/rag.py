"""Commands that generate from retrieved items: ``ask``, ``chat``, ``write`` and ``caption``, and
the generation flags they share with ``eval generation``."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..errors import QueryError
from ..search.request import DEFAULT_MODE, MODES
from .options import (
    UsageError,
    add_collection,
    add_json,
    add_model,
    add_top_k,
    add_where,
    check_image_arg,
    flag_spelling,
    min_score_arg,
    nonneg_int,
    positive_int,
)
from .output import safe, to_json, tsv_field
from .shards import add_collections, open_main

if TYPE_CHECKING:
    from ..collection import Collection
    from ..generation import RagPipeline


def add_generation_flags(sp: argparse.ArgumentParser) -> None:
    """The retrieval and generation flags of ``ask``, ``chat``, ``write`` and ``eval generation``
    (read back by :func:`pipeline_from_args`)."""
    add_collections(sp)  # several -c: retrieval searches them as one (cli/shards.py)
    sp.add_argument("--generator", "-g", metavar="SPEC",
                    help="hub id, save_pretrained folder or .gguf file (default google/flan-t5-base)")
    add_top_k(sp, dest="k", default=5, help="retrieved items (default 5)")
    sp.add_argument("--mode", choices=("concat", "rag-sequence", "rag-token"), default="concat")
    sp.add_argument("--target", choices=("texts", "images", "all"), default="texts",
                    help="what retrieval returns to condition on (default texts: captions, passages)")
    sp.add_argument("--prior-temperature", type=float, default=0.05, metavar="T",
                    help="P(z|x) = softmax(score / T) (default 0.05)")
    sp.add_argument("--prompt-template", metavar="TEXT",
                    help="prompt with {context} and {question} placeholders")
    sp.add_argument("--max-context-tokens", type=positive_int, metavar="N",
                    help="prompt token budget (default: the generator's context)")
    sp.add_argument("--answer-style", choices=("model", "auto", "extract", "free"), default="model",
                    help="model (default): auto for base LMs (Gemma 3), free for chat and seq2seq models (SmolLM2, "
                         "flan-t5), as measured; auto: a short-answer question (who, when, how many ...) gets a span "
                         "copied from the sources, or 'not in the sources'; extract: every question; free: the "
                         "model writes freely")
    sp.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N")
    sp.add_argument("--beams", type=positive_int, default=1, metavar="N")
    sp.add_argument("--sample", action="store_true", help="sample instead of greedy/beam decoding")
    sp.add_argument("--temperature", type=float, default=1.0, metavar="T", help="sampling temperature")
    sp.add_argument("--top-p", type=float, default=1.0, metavar="P")
    sp.add_argument("--seed", type=int, metavar="N", help="seed for reproducible sampling")
    add_model(sp)
    add_where(sp, help="metadata filter on retrieval (repeatable, ANDed)")
    sp.add_argument("--min-score", metavar="S|auto", type=min_score_arg,
                    help="abstain ('not found in the collection') when the best score is below S, a "
                         "number from -1 to 1 ('auto': calibrated)")
    sp.add_argument("--knowledge", metavar="DIR",
                    help="retrieve the conditioning texts from this other collection (same encoder)")
    sp.add_argument("--image-prefix", metavar="CKPT",
                    help="image-prefix checkpoint (from `train prefix`): the generator also reads the "
                         "query image and retrieved images as prefix vectors (default generator: "
                         "the checkpoint's own)")
    add_json(sp, help="print the whole answer record as JSON")


def add_search_mode(sp: argparse.ArgumentParser, what: str) -> None:
    """``--search-mode`` of ``ask``, ``chat`` and ``write`` (RagSettings.search_mode)."""
    sp.add_argument("--search-mode", choices=MODES, default=DEFAULT_MODE,
                    help=f"how the {what} retrieves (see search --mode; default auto: hybrid in a collection "
                         "with texts); priors and --min-score use the dense (cosine) score in every mode")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``ask``, ``chat``, ``write`` and ``caption`` to ``sub``."""
    ak = sub.add_parser("ask", help="answer a question grounded in the collection (RAG)")
    ak.add_argument("question", nargs="?", metavar="QUESTION")
    ak.add_argument("--image", "-i", metavar="PATH",
                    help="retrieve by this image (alone: ask what it shows)")
    add_search_mode(ak, "question")
    add_generation_flags(ak)
    ak.set_defaults(handler=cmd_ask)

    ch = sub.add_parser("chat", help="multi-turn chat grounded in the collection")
    ch.add_argument("message", nargs="?", metavar="MESSAGE",
                    help="one message (with --session, the conversation continues); none: interactive")
    ch.add_argument("--session", "-s", metavar="FILE", help="JSON file to resume from and save to")
    ch.add_argument("--image", "-i", metavar="PATH", help="an image to go with the message")
    add_search_mode(ch, "message (with the earlier ones)")
    add_generation_flags(ch)
    ch.set_defaults(handler=cmd_chat)

    wr = sub.add_parser("write", help="continue a draft with grounded, cited content")
    wr.add_argument("draft", nargs="?", metavar="DRAFT", help="the draft text (or --draft-file)")
    wr.add_argument("--draft-file", metavar="FILE")
    add_search_mode(wr, "draft")
    add_generation_flags(wr)
    wr.set_defaults(handler=cmd_write)

    cp = sub.add_parser("caption", help="caption images: image prefix + retrieved neighbours' captions "
                                        "(SmallCap style); with --caption-model, a collection's uncaptioned photos")
    cp.add_argument("images", nargs="*", metavar="IMAGE", help="image file(s) to caption")
    cp.add_argument("--image-prefix", metavar="CKPT",
                    help="image-prefix checkpoint folder (from `train prefix`)")
    from .caption import add_caption_flags

    add_caption_flags(cp)
    add_collection(cp, help="retrieve the neighbours' captions from this collection (its encoder must be "
                             "the checkpoint's); without it the prompt holds no captions")
    add_top_k(cp, dest="k", type=nonneg_int, default=None,
               help="neighbours' captions in the prompt (default: as trained, else 4; 0: none)")
    cp.add_argument("--generator", "-g", metavar="SPEC", help="generator (default: the checkpoint's own)")
    add_model(cp, help="encoder (default: the collection's own, else the checkpoint's; must be the one the "
                        "checkpoint was trained on)")
    cp.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N")
    cp.add_argument("--beams", type=positive_int, default=1, metavar="N")
    add_json(cp, help="JSON records with the prompt and the sources")
    cp.set_defaults(handler=cmd_caption)


def check_generation_args(args: argparse.Namespace) -> None:
    """Every retrieval and generation flag checked before anything loads (a bad filter, a missing
    .gguf file, an impossible setting: an error in milliseconds, not after the model): the settings
    are built and kept on ``args`` for :func:`pipeline_from_args`, the generator spec resolved
    (no ``--generator``: the default, or the bundled model that stands in for it offline)."""
    from ..generation.models import check_generator_spec

    args.settings_checked = _settings(args)
    if args.generator is not None:
        args.generator = check_generator_spec(args.generator)


def pipeline_from_args(args: argparse.Namespace, coll: Collection) -> RagPipeline:
    from ..generation import RagPipeline

    settings, gen = getattr(args, "settings_checked", None) or _settings(args)
    knowledge = getattr(args, "shard_set", None)  # several -c: the shards searched as one
    if args.knowledge:
        from ..collection import Collection

        knowledge = Collection.open(args.knowledge)
    image_prefix = None
    if getattr(args, "image_prefix", None):
        from ..generation.prefix import load_image_prefix

        image_prefix = load_image_prefix(args.image_prefix)
    return RagPipeline(coll, args.generator, settings, gen, knowledge=knowledge, image_prefix=image_prefix)


def _settings(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..generation import GenerationSettings, RagSettings

    try:
        rs: dict[str, Any] = {"k": args.k, "mode": args.mode, "target": args.target,
                              "prior_temperature": args.prior_temperature,
                              "max_context_tokens": args.max_context_tokens,
                              "min_score": args.min_score, "where": tuple(args.where),
                              "search_mode": getattr(args, "search_mode", DEFAULT_MODE),
                              "answer_style": getattr(args, "answer_style", "model")}
        if args.prompt_template:
            rs["prompt_template"] = args.prompt_template
        settings = RagSettings(**rs)
        gen = GenerationSettings(max_new_tokens=args.max_new_tokens, num_beams=args.beams,
                                 do_sample=args.sample, temperature=args.temperature,
                                 top_p=args.top_p, seed=args.seed)
    except QueryError:
        raise  # a bad --where: its own message names the position
    except ValueError as e:
        raise UsageError(flag_spelling(e)) from e
    return settings, gen


def print_answer(answer: Any, as_json: bool) -> None:
    if as_json:
        print(to_json(answer.to_dict()))
        return
    if answer.answer:
        print(safe(answer.answer, newlines=True))
    else:
        print("(the generator gave an empty answer)" if answer.sources else "(no answer: nothing was retrieved)")
    print_sources(answer)


def print_sources(answer: Any) -> None:
    """The sources with their posteriors (after the answer)."""
    if answer.sources:
        print("\nnearest sources (below the --min-score threshold):" if answer.abstained else "\nsources:")
        for s in answer.sources:
            flag = "" if s.included else "  (not in prompt)"
            flag += "  (truncated)" if s.truncated else ""
            print(f"  [{s.rank}] posterior {s.posterior:.3f}  prior {s.prior:.3f}  score {s.score:.3f}  "
                  f"#{s.id} {tsv_field(s.path)}  {tsv_field(s.text)[:120]}{flag}")


class StreamPrinter:
    """``on_event`` for ask/chat/write without ``--json``: the sources and their priors first, the
    answer's text as it is generated (flushed per token), then the sources with their posteriors."""

    def __init__(self) -> None:
        self.streamed = False

    def __call__(self, event: Any) -> None:
        from ..generation.stream import Final, Sources, Token

        if isinstance(event, Sources):
            self.streamed = False
            if event.sources and not event.abstained:
                print("retrieved (prior = P(z|x)):")
                for s in event.sources:
                    flag = "" if s.included else "  (not in prompt)"
                    print(f"  [{s.rank}] prior {s.prior:.3f}  score {s.score:.3f}  #{s.id} {tsv_field(s.path)}  "
                          f"{tsv_field(s.text)[:120]}{flag}")
                print(flush=True)
                if not event.streaming:
                    print(f"{event.mode}: scoring the candidates; the answer follows once scored",
                          file=sys.stderr, flush=True)
        elif isinstance(event, Token):
            text = event.text if self.streamed else event.text.lstrip()
            if text:
                sys.stdout.write(safe(text, newlines=True))
                sys.stdout.flush()
                self.streamed = True
        elif isinstance(event, Final):
            if self.streamed:
                print()
                print_sources(event.answer)
            else:
                print_answer(event.answer, False)


def answer_events(args: argparse.Namespace) -> dict[str, Any]:
    """``ask`` keyword arguments for the output: a streaming printer, or nothing with ``--json``."""
    return {} if args.json else {"on_event": StreamPrinter()}


def cmd_ask(args: argparse.Namespace) -> int:
    if (args.question is None or not args.question.strip()) and args.image is None:
        raise QueryError("ask: give a QUESTION, an --image, or both")
    check_image_arg(args.image)
    check_generation_args(args)
    with open_main(args, model=args.model) as coll:
        pipeline = pipeline_from_args(args, coll)
        answer = pipeline.ask(args.question, image=args.image, **answer_events(args))  # retrieves (--search-mode)
    if args.json:
        print_answer(answer, args.json)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ..apps import ChatSession

    check_image_arg(args.image)
    check_generation_args(args)
    session = ChatSession.load_or_new(args.session)
    with open_main(args, model=args.model) as coll:
        pipeline = pipeline_from_args(args, coll)
        if args.message is not None:
            answer = session.send(pipeline, args.message, image=args.image, **answer_events(args))
            if args.json:
                print_answer(answer, args.json)
        else:
            print("chat: type a message, an empty line or Ctrl-D to stop", file=sys.stderr)
            for line in sys.stdin:
                if not line.strip():
                    break
                answer = session.send(pipeline, line, **answer_events(args))
                if args.json:
                    print_answer(answer, args.json)
                if args.session:
                    session.save(args.session)
    if args.session:
        session.save(args.session)
    return 0


def cmd_write(args: argparse.Namespace) -> int:
    from ..apps import write

    draft = args.draft
    if args.draft_file:
        try:
            from ..safe_io import read_regular_text

            draft = read_regular_text(args.draft_file, what="draft file")
        except (OSError, UnicodeDecodeError) as e:
            raise QueryError(f"cannot read draft file {args.draft_file}: {e}") from e
    if draft is None or not draft.strip():
        raise QueryError("write: give the DRAFT text or --draft-file FILE")
    check_generation_args(args)
    with open_main(args, model=args.model) as coll:
        answer = write(pipeline_from_args(args, coll), draft, **answer_events(args))
    if args.json:
        print_answer(answer, args.json)
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from ..collection import Collection

    if args.caption_model:  # words for the collection's uncaptioned photos (issue 33)
        from .caption import cmd_backfill

        if not args.collection or args.images or args.image_prefix:
            raise UsageError("caption --caption-model SPEC describes a collection's uncaptioned images: give "
                             "-c DIR, and no IMAGE or --image-prefix")
        return cmd_backfill(args)
    if not args.images or not args.image_prefix:
        raise UsageError("caption: give IMAGE... and --image-prefix CKPT (or -c DIR --caption-model SPEC to "
                         "describe a collection's uncaptioned photos)")
    from ..generation import GenerationSettings
    from ..generation.caption import Captioner
    from ..generation.prefix import load_image_prefix

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
                print(f"error: {safe(result)}", file=sys.stderr)
                continue
            records.append(result)
            if not args.json:
                print(safe(result.caption) if len(args.images) == 1 else f"{tsv_field(image)}\t{tsv_field(result.caption)}")
    finally:
        if coll is not None:
            coll.close()
    if args.json:
        out = [r.to_dict() for r in records]
        print(to_json(out[0] if len(args.images) == 1 else out))
    return 2 if failures else 0
