"""``train clip``, ``train prefix`` and ``train rag``: the flags every task shares, each task's own
flags beside its handler, and the checks of ``--out`` against ``--resume``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .options import (
    MODEL_HELP,
    UsageError,
    add_collection,
    add_json,
    add_model,
    add_top_k,
    flag_spelling,
    nonneg_int,
    positive_int,
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` with its tasks ``clip``, ``prefix`` and ``rag`` to ``sub``."""
    tr = sub.add_parser("train", help="fine-tune on your image-text pairs: the encoder (clip), "
                                      "the image-prefix network (prefix), generator + query side (rag)")
    trsub = tr.add_subparsers(dest="train_command", metavar="TASK")
    trsub.required = True
    tc = trsub.add_parser("clip", help="contrastive fine-tuning of the CLIP encoder (open_clip or "
                                       "transformers), then re-embed a collection with it")
    add_train_flags(tc)
    add_model(tc, help="encoder to start from (default: the --collection's encoder, else "
                        "open_clip:ViT-B-32/laion2b_s34b_b79k)")
    add_collection(tc, help="after training, re-embed this collection's items with the trained encoder")
    tc.add_argument("--freeze-text", action="store_true", help="train the image tower only")
    tc.add_argument("--freeze-image", action="store_true", help="train the text tower only")
    tc.add_argument("--hard-negatives", type=_hard_negative_share, default=0.0, metavar="SHARE",
                    help="share of each training batch (0 to <1) filled with examples whose captions are "
                         "the most alike by words to the rest's, so that captions differing in one detail "
                         "meet in a batch (default 0: random batches)")
    tp = trsub.add_parser("prefix", help="train the image-prefix mapping network (CLIP image embedding -> "
                                         "generator input embeddings), generator frozen or not")
    add_train_flags(tp)
    add_model(tp, required=True, help="CLIP encoder (frozen): " + MODEL_HELP)
    tp.add_argument("--generator", "-g", required=True, metavar="SPEC",
                    help="generator: hub id or save_pretrained folder")
    tp.add_argument("--prefix-length", type=positive_int, default=10, metavar="P",
                    help="prefix vectors per image (default 10)")
    tp.add_argument("--mapper", choices=("mlp", "transformer"), default="mlp",
                    help="mapping network (default mlp)")
    tp.add_argument("--hidden-size", type=positive_int, default=512, metavar="N",
                    help="mapper width (default 512)")
    tp.add_argument("--mapper-layers", type=positive_int, default=2, metavar="N",
                    help="mlp hidden layers / transformer layers (default 2)")
    tp.add_argument("--mapper-heads", type=positive_int, default=8, metavar="N",
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
    add_top_k(tp, dest="k", default=4, help="neighbours' captions per prompt with --collection (default 4)")
    trg = trsub.add_parser("rag", help="fine-tune generator + query projection with the RAG marginal likelihood "
                                       "over a collection's top-k items (the index stays fixed)",
                           description="SOURCE: a QA .jsonl (question, answer or answers, optional image) or "
                                       "image-caption pairs (x = image, y = caption). The trained folder "
                                       "(OUT/best) works as --generator for ask/chat: its query projection "
                                       "is picked up from there.")
    add_train_flags(trg)
    add_collection(trg, required=True, help="collection to retrieve from")
    trg.add_argument("--generator", "-g", required=True, metavar="SPEC",
                     help="generator to start from: hub id or save_pretrained folder")
    add_top_k(trg, dest="k", default=4, help="items in the marginal (default 4)")
    trg.add_argument("--candidates", type=nonneg_int, default=0, metavar="C",
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
    tr.set_defaults(handler=cmd_train)


def add_train_flags(sp: argparse.ArgumentParser) -> None:
    """SOURCE, --out and the flags every ``train`` task shares (read back by :func:`train_settings`)."""
    sp.add_argument("source", metavar="SOURCE", help="image-caption pairs: folder of images + same-stem "
                    ".txt captions, .jsonl/.csv manifest, or COCO captions .json")
    sp.add_argument("--out", "-o", required=True, metavar="DIR",
                    help="output folder: checkpoints/, best/ (the trained model), metrics.jsonl, settings.json")
    sp.add_argument("--image-root", metavar="DIR", help="manifest image paths are relative to DIR")
    sp.add_argument("--allow-outside-root", action="store_true",
                    help="accept manifest image paths that are absolute or leave the root folder")
    g = sp.add_argument_group("training (defaults depend on the task; see README 'Training')")
    g.add_argument("--steps", type=positive_int, metavar="N", help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, metavar="N")
    g.add_argument("--lr", type=float, metavar="LR", help="peak learning rate (AdamW, cosine decay)")
    g.add_argument("--weight-decay", type=float, metavar="W")
    g.add_argument("--warmup-steps", type=nonneg_int, metavar="N")
    g.add_argument("--val-fraction", type=float, metavar="F", help="share of examples held out for validation")
    g.add_argument("--eval-every", type=positive_int, metavar="N", help="steps between validation passes")
    g.add_argument("--checkpoint-every", type=positive_int, metavar="N", help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=positive_int, metavar="N")
    g.add_argument("--patience", type=nonneg_int, metavar="N",
                   help="stop after N validation passes without improvement (0: never)")
    g.add_argument("--seed", type=int, metavar="N")
    g.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1, mps (default: cuda if present)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--metrics", metavar="FILE", help="JSONL metrics file (default OUT/metrics.jsonl)")
    add_json(sp, help="the summary is JSON (always; accepted for uniformity)")


def train_settings(args: argparse.Namespace, **defaults: Any) -> Any:
    """The :class:`~crossmodal_rag.training.TrainSettings` of a ``train`` command: the flags given,
    else the task's ``defaults``, else the dataclass defaults."""
    from ..training import TrainSettings

    flags = {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
             "weight_decay": args.weight_decay, "warmup_steps": args.warmup_steps,
             "val_fraction": args.val_fraction, "eval_every": args.eval_every,
             "checkpoint_every": args.checkpoint_every, "keep_checkpoints": args.keep_checkpoints,
             "patience": args.patience, "seed": args.seed, "device": args.device}
    values = {**defaults, **{k: v for k, v in flags.items() if v is not None}}
    try:
        return TrainSettings(**values)
    except ValueError as e:
        raise UsageError(flag_spelling(e)) from e



def _hard_negative_share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1), got {text!r}")
    return value


def cmd_train_clip(args: argparse.Namespace) -> int:
    from ..training.clip import ClipTaskSettings, train_clip

    settings = train_settings(args, **ClipTaskSettings.TRAIN_DEFAULTS)
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
    from ..generation.prefix import PrefixSettings
    from ..training.prefix import TRAIN_DEFAULTS, PrefixTaskSettings, train_prefix

    settings = train_settings(args, **TRAIN_DEFAULTS)
    try:
        task_settings = PrefixTaskSettings(
            model=args.model, generator=args.generator,
            prefix=PrefixSettings(kind=args.mapper, prefix_length=args.prefix_length,
                                  hidden_size=args.hidden_size, num_layers=args.mapper_layers,
                                  num_heads=args.mapper_heads, scale_input=not args.no_scale_input),
            train_generator=args.train_generator, retrieval=args.collection, k=args.k)
    except ValueError as e:
        raise UsageError(flag_spelling(e)) from e
    summary = train_prefix(args.source, args.out, task_settings, settings, image_root=args.image_root,
                           allow_outside_root=args.allow_outside_root, resume=args.resume,
                           progress=not args.quiet, metrics_path=args.metrics)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_train_rag(args: argparse.Namespace) -> int:
    from ..training.rag import TRAIN_DEFAULTS, RagTrainSettings, train_rag

    settings = train_settings(args, **TRAIN_DEFAULTS)
    try:
        task_settings = RagTrainSettings(
            k=args.k, candidates=args.candidates, temperature=args.temperature, mode=args.mode,
            target=args.target, bias=args.bias, projection_lr_scale=args.projection_lr_scale,
            freeze_generator=args.freeze_generator, freeze_projection=args.freeze_projection,
            question=args.question, prompt_template=args.prompt_template, item_template=args.item_template)
    except ValueError as e:
        raise UsageError(flag_spelling(e)) from e
    summary = train_rag(args.collection, args.source, args.out, generator=args.generator,
                        settings=task_settings, train_settings=settings, image_root=args.image_root,
                        allow_outside_root=args.allow_outside_root, resume=args.resume,
                        progress=not args.quiet, metrics_path=args.metrics)
    print(json.dumps(summary, indent=2))
    return 0



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
