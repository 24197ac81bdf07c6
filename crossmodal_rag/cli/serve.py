"""``serve``: the web app and REST API for a collection."""

from __future__ import annotations

import argparse
import sys

from .options import UsageError, add_collection, add_model, collection_dir, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to ``sub``."""
    sv = sub.add_parser("serve", help="start the web app and REST API for a collection")
    add_collection(sv)
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
    sv.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..web import WebSettings, create_app
        from ..web.guards import allowed_hosts_for
    except ImportError as e:
        raise UsageError(f"serve needs the web extras: pip install 'crossmodal-rag[serve]' ({e})") from e

    settings = WebSettings(
        collection=collection_dir(args), generator=args.generator, model=args.model,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), max_image_pixels=args.max_image_pixels,
        max_k=args.max_k, max_new_tokens=args.max_new_tokens, thumbnail_dir=args.thumbnail_dir,
        load_generator_at_startup=not args.lazy_generator, mmap=args.mmap,
        allowed_hosts=allowed_hosts_for(args.host, args.allowed_host), show_paths=args.show_paths,
    )
    from ..collection import Collection

    Collection.open(settings.collection).close()  # fail fast, with a clear message, before binding
    print(f"serving {settings.collection} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
    print(f"answering Host: {', '.join(settings.allowed_hosts)} (more with --allowed-host)", file=sys.stderr)
    uvicorn.run(create_app(settings), host=args.host, port=args.port,
                log_level="warning" if not args.verbose else "info", timeout_keep_alive=5)
    return 0
