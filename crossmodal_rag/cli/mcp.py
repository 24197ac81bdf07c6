"""``mcp``: the collection as a Model Context Protocol server (stdio or Streamable HTTP)."""

from __future__ import annotations

import argparse
import sys

from .options import UsageError, add_model, positive_int
from .shards import add_collections, shard_folders

__all__ = ["cmd_mcp", "register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``mcp`` to ``sub``."""
    mp = sub.add_parser("mcp", help="serve a collection to MCP clients (assistants, IDEs, agent runtimes)",
                        description="Serve a collection over the Model Context Protocol: tools search, ask, "
                                    "get_item, stats (and index/remove with --allow-write); items as resources "
                                    "xmr://item/{id}. Read-only by default. See docs/agents.md.")
    add_collections(mp)  # several -c: shards searched as one, read-only (cli/shards.py)
    mp.add_argument("--transport", choices=("stdio", "http"), default="stdio",
                    help="stdio (default: the client starts this command) or http (Streamable HTTP on /mcp)")
    mp.add_argument("--host", default="127.0.0.1", help="http: address to bind (default 127.0.0.1: this machine only)")
    mp.add_argument("--port", type=positive_int, default=8765, help="http: port (default 8765)")
    mp.add_argument("--allowed-host", action="append", default=[], metavar="HOST",
                    help="http: also answer requests whose Host header is HOST (repeatable; as serve's)")
    mp.add_argument("--generator", "-g", metavar="SPEC",
                    help="generator for ask (default google/flan-t5-base, else a bundled model offline)")
    add_model(mp)
    mp.add_argument("--allow-read", action="append", default=[], metavar="ROOT",
                    help="let search read query images by path inside ROOT (repeatable; default: none, "
                         "images only as base64)")
    mp.add_argument("--allow-write", metavar="ROOT",
                    help="add the index and remove tools, for paths under ROOT only (default: read-only)")
    mp.add_argument("--max-k", type=positive_int, default=100, metavar="K")
    mp.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N")
    mp.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB", help="largest query image")
    mp.add_argument("--thumbnail-dir", metavar="DIR", help="thumbnail cache (default under ~/.cache/crossmodal-rag)")
    mp.set_defaults(handler=cmd_mcp)


def cmd_mcp(args: argparse.Namespace) -> int:
    try:
        import anyio
        import mcp.server.mcpserver  # noqa: F401

        from ..agents.mcp_server import build_server, http_app, run_stdio
        from ..agents.tools import AgentSettings, ToolRefused
        from ..web import WebSettings
        from ..web.guards import allowed_hosts_for
        from ..web.state import AppState
    except ImportError as e:
        raise UsageError(f"mcp needs the MCP SDK and the web extras: pip install 'crossmodal-rag[mcp,serve]' "
                         f"({e})") from e
    if not 0 < args.max_upload_mb <= 1024:
        raise UsageError(f"--max-upload-mb must be in (0, 1024], got {args.max_upload_mb}")
    try:
        agent = AgentSettings(read_roots=tuple(args.allow_read), write_root=args.allow_write)
    except ToolRefused as e:
        raise UsageError(str(e)) from e
    hosts = allowed_hosts_for(args.host, args.allowed_host)
    folders = shard_folders(args)
    if len(folders) > 1 and agent.write_root is not None:
        raise UsageError("mcp: several -c collections are served read-only; leave out --allow-write "
                         "(or serve one collection)")
    settings = WebSettings(collection=folders[0], shards=tuple(folders[1:]), generator=args.generator,
                           model=args.model,
                           max_k=args.max_k, max_new_tokens=args.max_new_tokens, thumbnail_dir=args.thumbnail_dir,
                           max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), load_generator_at_startup=False,
                           allowed_hosts=hosts, max_batch=1)
    from ..collection import Collection

    for folder in folders:  # fail fast, with a clear message, before serving
        Collection.open(folder).close()
    st = AppState(settings)
    try:
        server = build_server(st, agent)
        writes = f"; index/remove under {agent.write_root}" if agent.write_root else " (read-only)"
        if args.transport == "stdio":
            print(f"MCP server for {', '.join(folders)} on stdio{writes}", file=sys.stderr)
            anyio.run(run_stdio, server, st)
        else:
            import uvicorn

            print(f"MCP server for {', '.join(folders)} on http://{args.host}:{args.port}/mcp{writes}",
                  file=sys.stderr)
            app = http_app(server, st, hosts, settings.max_upload_bytes * 2 + 64 * 1024)
            uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if not args.verbose else "info")
    finally:
        st.close()
    return 0
