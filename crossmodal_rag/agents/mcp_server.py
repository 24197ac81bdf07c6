"""The Model Context Protocol server (``crossmodal-rag mcp``) on the official MCP Python SDK.

Tools: ``search``, ``ask``, ``get_item`` (with the thumbnail as image content), ``stats``; with a
write root also ``index`` and ``remove``. Items are resources ``xmr://item/{id}`` (over several
shards, ``mcp -c A -c B``: ``xmr://shard/{shard}/item/{id}``, and ``get_item`` takes the shard). Each tool is a
thin call of :class:`~.tools.AgentTools` (the REST API's checks and bounds); every refusal or
failure is an MCP tool error (``isError``) whose text names the input and the fix, never a crash
of the server. Arguments are typed, so the SDK validates them against the tool's JSON schema first.

Transports: ``stdio`` (a desktop assistant starts the server as a subprocess) and Streamable HTTP
(``/mcp`` on a loopback port by default, Host and Origin checked against DNS rebinding).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field

from .._version import __version__
from ..errors import CrossmodalError
from ..web.errors import ApiError
from ..web.inputs import MAX_ID
from ..web.state import AppState
from .tools import AgentSettings, AgentTools

__all__ = ["INSTRUCTIONS", "build_server", "http_app", "run_stdio"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

INSTRUCTIONS = ("Search a private collection of images and texts (captions, passages, OCR text) by text or "
                "by image, ask questions answered from it with sources, and fetch items with thumbnails. "
                "Item ids from search results are resources xmr://item/{id}.")

SearchTarget = Literal["images", "texts", "all"]
SearchMode = Literal["auto", "dense", "keyword", "hybrid"]
AskMode = Literal["concat", "rag-sequence", "rag-token"]
ItemId = Annotated[int, Field(ge=0, le=MAX_ID, description="an item id from a search result")]
Where = Annotated[list[Annotated[str, Field(max_length=500)]] | None,
                  Field(max_length=16, description="metadata filters, ANDed, e.g. width>=1000, caption~dog")]
MinScore = Annotated[str | float | None, Field(description="a cosine score, or 'auto' (calibrated)")]
# bounds beyond these (the server's --max-k, its query length) are checked by the tools themselves
K = Annotated[int, Field(ge=1, description="how many items (at most the server's --max-k)")]
Text = Annotated[str | None, Field(description="a text query")]
Question = Annotated[str, Field(min_length=1, description="the question")]
ImagePath = Annotated[str | None, Field(max_length=4096, description="an image file inside the server's allowed "
                                                                      "roots (--allow-read)")]
ImageB64 = Annotated[str | None, Field(description="an image's bytes, base64 (or a data: URL)")]
Paths = Annotated[list[Annotated[str, Field(max_length=4096)]] | None, Field(max_length=1000)]
Ids = Annotated[list[ItemId] | None, Field(max_length=1000)]
ShardName = Annotated[str | None, Field(max_length=200, description="a server of several shards: the item's "
                                                                     "shard (search results name it)")]
IndexPath = Annotated[str, Field(min_length=1, max_length=4096, description="a folder or file under the write root")]


async def _guarded(work: Awaitable[T]) -> T:
    """``work``'s result; a refusal or failure as a tool error with the library's message."""
    from mcp.server.mcpserver.exceptions import ToolError

    try:
        return await work
    except ApiError as e:
        raise ToolError(f"{e.code}: {e.message}") from e
    except (CrossmodalError, ValueError) as e:  # InputError, QueryError, ToolRefused, ...
        raise ToolError(str(e)) from e
    except OSError as e:
        raise ToolError(f"cannot read: {e}") from e


def build_server(st: AppState, settings: AgentSettings) -> Any:
    """An ``MCPServer`` over the running server state ``st``."""
    from mcp.server.mcpserver import MCPServer
    from mcp_types import ImageContent, TextContent, ToolAnnotations

    tools = AgentTools(st, settings)
    server = MCPServer("crossmodal-rag", version=__version__, instructions=INSTRUCTIONS, log_level="WARNING")
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(annotations=read_only)
    async def search(text: Text = None, image_path: ImagePath = None, image_base64: ImageB64 = None,
                     target: SearchTarget = "images", mode: SearchMode = "auto", k: K = 10, where: Where = None,
                     min_score: MinScore = None) -> dict[str, Any]:
        """Search the collection by text and/or image; ranked hits with scores, captions, OCR text
        and each hit's resource URI (read it, or call get_item, for the thumbnail)."""
        return await _guarded(tools.search(text, image_path, image_base64, target, mode, k, where, min_score))

    @server.tool(annotations=read_only)
    async def ask(question: Question, mode: AskMode = "concat", k: K = 5, target: SearchTarget = "texts",
                  where: Where = None, min_score: MinScore = None,
                  search_mode: SearchMode = "auto") -> dict[str, Any]:
        """Answer a question from the collection: the answer, and its sources with their priors
        P(z|x) and posteriors P(z|x,y) (how much each retrieved item supports the answer)."""
        return await _guarded(tools.ask(question, mode, k, target, where, min_score, search_mode))

    @server.tool(annotations=read_only)
    async def get_item(id: ItemId, shard: ShardName = None) -> list[Any]:
        """An item's metadata, captions and OCR text (JSON), and its image's thumbnail (JPEG)."""
        d, jpeg = await _guarded(tools.item(id, shard=shard))
        blocks: list[Any] = [TextContent(type="text", text=json.dumps(d, ensure_ascii=False))]
        if jpeg is not None:
            blocks.append(ImageContent(type="image", data=base64.b64encode(jpeg).decode(), mime_type="image/jpeg"))
        return blocks

    @server.tool(annotations=read_only)
    async def stats() -> dict[str, Any]:
        """The collection: its encoder, item counts by kind, index type, last update."""
        return await _guarded(tools.stats())

    @server.resource("xmr://item/{item_id}", mime_type="application/json",
                     description="an item's metadata, captions and OCR text")
    async def item_resource(item_id: str) -> str:
        from mcp.server.mcpserver.exceptions import ResourceError

        if not item_id.isdigit() or len(item_id) > 19:
            raise ResourceError(f"xmr://item/{item_id[:40]}: an item id is a number (0 to 2**63-1)")
        try:
            d, _ = await tools.item(int(item_id), with_thumbnail=False)
        except CrossmodalError as e:
            raise ResourceError(str(e)) from e
        except ApiError as e:
            raise ResourceError(e.message) from e
        return json.dumps(d, ensure_ascii=False)

    @server.resource("xmr://shard/{shard}/item/{item_id}", mime_type="application/json",
                     description="an item of a shard (a server of several): metadata, captions and OCR text")
    async def shard_item_resource(shard: str, item_id: str) -> str:
        from urllib.parse import unquote

        from mcp.server.mcpserver.exceptions import ResourceError

        if not item_id.isdigit() or len(item_id) > 19:
            raise ResourceError(f"xmr://shard/.../item/{item_id[:40]}: an item id is a number (0 to 2**63-1)")
        try:
            d, _ = await tools.item(int(item_id), with_thumbnail=False, shard=unquote(shard))
        except CrossmodalError as e:
            raise ResourceError(str(e)) from e
        except ApiError as e:
            raise ResourceError(e.message) from e
        return json.dumps(d, ensure_ascii=False)

    if settings.write_root is not None:
        write = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)

        @server.tool(annotations=write)
        async def index(path: IndexPath) -> dict[str, Any]:
            """Index a folder or file under the server's write root (images with same-stem .txt
            captions, manifests, passages); unchanged files are skipped."""
            return await _guarded(tools.index(path))

        @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, open_world_hint=False))
        async def remove(ids: Ids = None, paths: Paths = None) -> dict[str, Any]:
            """Remove items by id, or every item of a source file under the write root."""
            return await _guarded(tools.remove(ids, paths))

    return server


async def run_stdio(server: Any, st: AppState) -> None:
    """Serve on stdin/stdout until the client closes them; the decode workers stopped after."""
    try:
        await server.run_stdio_async()
    finally:
        await st.decoder.aclose()


def http_app(server: Any, st: AppState, allowed_hosts: tuple[str, ...], max_body_bytes: int) -> Any:
    """The Streamable HTTP app (``/mcp``): Host (and Origin) checked against DNS rebinding; the
    decode workers stopped when it shuts down."""
    from mcp.server.transport_security import TransportSecuritySettings

    hosts = [h for name in allowed_hosts for h in (name, f"{name}:*", f"[{name}]:*")]
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection="*" not in allowed_hosts, allowed_hosts=hosts,
        allowed_origins=[f"http://{h}" for h in hosts])
    app = server.streamable_http_app(transport_security=security, max_request_body_size=max_body_bytes)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state:
            try:
                yield state
            finally:
                await st.decoder.aclose()

    app.router.lifespan_context = lifespan
    return app
