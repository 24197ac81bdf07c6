"""``serve``: the web app and REST API for a collection, or for several index shards as one (in
this process with repeated ``-c``, or on Ray Serve with ``--ray``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .options import UsageError, add_model, nonneg_int, positive_int
from .shards import add_collections, shard_folders


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to ``sub``."""
    sv = sub.add_parser("serve", help="start the web app and REST API for a collection")
    add_collections(sv)  # several -c: shards searched as one in this process (cli/shards.py)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=positive_int, default=8000)
    sv.add_argument("--generator", "-g", metavar="SPEC", help="generator for answers (default google/flan-t5-base)")
    add_model(sv)
    sv.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB")
    sv.add_argument("--max-image-pixels", type=positive_int, default=50_000_000, metavar="N")
    sv.add_argument("--max-k", type=positive_int, default=100, metavar="K")
    sv.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N")
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
    sv.add_argument("--max-batch", type=positive_int, default=32, metavar="N",
                    help="concurrent searches embedded in one encoder forward (default 32; 1 = no batching)")
    sv.add_argument("--batch-ms", type=_batch_ms, default=2.0, metavar="MS",
                    help="longest wait for more searches to join a batch (default 2 ms)")
    sv.add_argument("--max-queued-answers", type=nonneg_int, default=8, metavar="N",
                    help="questions waiting behind the one being answered; more get 503 with Retry-After "
                         "(default 8)")
    sv.add_argument("--allow-origin", action="append", default=[], type=_origin, metavar="ORIGIN",
                    help="let pages of ORIGIN (scheme://host[:port], e.g. https://photos.example) make POST and API "
                         "requests (repeatable). Default: only the server's own pages; requests from other sites' "
                         "pages get 403, plain clients such as curl are not affected")
    sv.add_argument("--decode-workers", type=_decode_workers, default=2, metavar="N",
                    help="uploads and thumbnails decoded at once, each in a worker process (1 to 64, default 2)")
    sv.add_argument("--decode-timeout", type=_seconds, default=10.0, metavar="S",
                    help="deadline of one image decode; past it the worker is killed and the request gets 422 "
                         "(default 10 s)")
    sv.add_argument("--decode-memory-mb", type=_memory_mb, default=1024, metavar="MB",
                    help="memory a decode worker may use beyond its start-up (64 to 65536, default 1024)")
    sv.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                    help="serve index shards on Ray Serve (one deployment per --shard, a router that merges): "
                         "alone, a local Ray instance; 'auto' or ray://HOST:PORT, an existing cluster "
                         "(needs crossmodal-rag[serve-ray]; see docs/scaling.md)")
    sv.add_argument("--shard", action="append", default=[], metavar="DIR",
                    help="with --ray: a shard collection folder (repeatable; -c DIR counts as one too)")
    sv.add_argument("--replicas", type=positive_int, default=1, metavar="N",
                    help="with --ray: replicas of each shard deployment (default 1)")
    sv.add_argument("--shard-deadline", type=_seconds, default=10.0, metavar="S",
                    help="with --ray: a shard slower than S seconds is left out and the answer marked "
                         "partial (default 10)")
    sv.set_defaults(handler=cmd_serve)


def _bounded_float(text: str, low: float, high: float, unit: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {unit}, got {text!r}") from None
    if not low <= value <= high:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected {low:g} to {high:g} {unit}, got {text!r}")
    return value


def _batch_ms(text: str) -> float:
    return _bounded_float(text, 0.0, 1000.0, "milliseconds")


def _origin(text: str) -> str:
    try:
        from ..web.origins import normalize_origin
    except ImportError:  # no web extras: cmd_serve says what to install
        return text
    try:
        return normalize_origin(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _seconds(text: str) -> float:
    return _bounded_float(text, 0.1, 3600.0, "seconds")


def _decode_workers(text: str) -> int:
    value = positive_int(text)
    if value > 64:
        raise argparse.ArgumentTypeError(f"expected 1 to 64 decode workers, got {text!r}")
    return value


def _memory_mb(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected megabytes (a whole number), got {text!r}") from None
    if not 64 <= value <= 65536:
        raise argparse.ArgumentTypeError(f"expected 64 to 65536 MB, got {text!r}")
    return value


def web_settings(args: argparse.Namespace, folders: list[str]) -> Any:
    """The server's :class:`~crossmodal_rag.web.WebSettings` from the flags (``folders``: the
    collection, or the shards, the first of which embeds the queries)."""
    try:
        from ..web import WebSettings
        from ..web.guards import allowed_hosts_for
    except ImportError as e:
        raise UsageError(f"serve needs the web extras: pip install 'crossmodal-rag[serve]' ({e})") from e
    return WebSettings(
        collection=folders[0], shards=tuple(folders[1:]), generator=args.generator, model=args.model,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_image_pixels=args.max_image_pixels,
        max_k=args.max_k, max_new_tokens=args.max_new_tokens, thumbnail_dir=args.thumbnail_dir,
        load_generator_at_startup=not args.lazy_generator, mmap=args.mmap,
        allowed_hosts=allowed_hosts_for(args.host, args.allowed_host), show_paths=args.show_paths,
        max_batch=args.max_batch, batch_ms=args.batch_ms, max_queued_generations=args.max_queued_answers,
        allowed_origins=tuple(args.allow_origin), decode_workers=args.decode_workers,
        decode_timeout_s=args.decode_timeout, decode_memory_mb=args.decode_memory_mb,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    if args.ray is not None or args.shard:
        return _serve_ray(args)
    settings = web_settings(args, shard_folders(args))
    try:
        import uvicorn

        from ..web import create_app
    except ImportError as e:
        raise UsageError(f"serve needs the web extras: pip install 'crossmodal-rag[serve]' ({e})") from e
    from ..collection import Collection

    folders = [settings.collection, *settings.shards]
    for folder in folders:  # fail fast, with a clear message, before binding
        Collection.open(folder).close()
    what = folders[0] if len(folders) == 1 else f"{len(folders)} shards as one ({', '.join(folders)})"
    print(f"serving {what} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
    print(f"answering Host: {', '.join(settings.allowed_hosts)} (more with --allowed-host)", file=sys.stderr)
    if settings.allowed_origins:
        print(f"pages of {', '.join(settings.allowed_origins)} may use the API too", file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port,
                log_level="warning" if not args.verbose else "info", timeout_keep_alive=5)
    return 0


def _serve_ray(args: argparse.Namespace) -> int:
    """``serve --ray``: the shards and the router (the web app over them) on Ray Serve, until Ctrl-C."""
    import time

    from ..serving.ray_serve import RaySettings, deploy

    folders = list(args.collection or []) + list(args.shard)
    if args.ray is None or not folders:
        raise UsageError("serve on Ray Serve takes --ray [ADDRESS] and one or more --shard DIR")
    web = web_settings(args, folders)
    settings = RaySettings(address=None if args.ray == "local" else args.ray, replicas=args.replicas,
                           host=args.host, port=args.port, mmap=True, deadline_s=args.shard_deadline)
    deploy(folders, settings, web)
    print(f"serving {len(folders)} shard(s), {args.replicas} replica(s) each, on "
          f"http://{args.host}:{args.port}/ (the REST API, /v1; Ctrl-C to stop)", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    finally:
        from ray import serve

        serve.shutdown()
