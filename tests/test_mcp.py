"""The MCP server driven by the official SDK's own client: in memory (every tool, resources, bad and
hostile arguments, roots, writes), over HTTP (the Streamable HTTP app served by uvicorn) and over
stdio (the real ``crossmodal-rag mcp`` in a subprocess). Oracles: the library's own search, the
stored item, the thumbnail decoded back to the image's proportions."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("mcp")
pytest.importorskip("fastapi")
from mcp import Client, StdioServerParameters
from PIL import Image

from crossmodal_rag import Collection
from crossmodal_rag.agents.mcp_server import build_server, http_app
from crossmodal_rag.agents.tools import AgentSettings
from crossmodal_rag.web import WebSettings
from crossmodal_rag.web.state import AppState
from tests.servers import serve_in_thread


@pytest.fixture(scope="module")
def coll(tmp_path_factory: pytest.TempPathFactory, sample_collection: Path) -> Path:
    dest = tmp_path_factory.mktemp("mcp") / "coll"
    shutil.copytree(sample_collection, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


@pytest.fixture(scope="module")
def state(coll: Path, t5_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    st = AppState(WebSettings(collection=str(coll), generator=str(t5_dir), max_k=20, max_query_chars=200,
                              max_new_tokens=4, max_upload_bytes=300_000, load_generator_at_startup=False,
                              decode_timeout_s=120,  # a cold decode worker on a loaded CI machine
                              thumbnail_dir=str(tmp_path_factory.mktemp("thumbs")), max_batch=1))
    yield st
    st.close()


@pytest.fixture(scope="module")
def run():
    """One event loop for the module's in-memory sessions: the served state's decode pool keeps
    its worker processes on the loop that started them, as a server's single loop does."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


def _json(result: Any) -> dict[str, Any]:
    assert not result.is_error, result.content
    return json.loads(result.content[0].text)


def _error(result: Any) -> str:
    assert result.is_error, result.content
    return result.content[0].text


def test_tools_answer_as_the_library_does(run: Any, state: AppState, coll: Path, sample_dir: Path) -> None:
    server = build_server(state, AgentSettings(read_roots=(str(sample_dir),)))

    async def go() -> dict[str, Any]:
        async with Client(server) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            out = {"names": names}
            out["text"] = _json(await c.call_tool("search", {"text": "a cat", "k": 3, "mode": "dense"}))
            out["path"] = _json(await c.call_tool("search", {"image_path": str(sample_dir / "cat.jpg"), "k": 2}))
            b64 = base64.b64encode((sample_dir / "cat.jpg").read_bytes()).decode()
            out["b64"] = _json(await c.call_tool("search", {"image_base64": b64, "k": 2}))
            out["stats"] = _json(await c.call_tool("stats", {}))
            hit = out["text"]["results"][0]["id"]
            item = await c.call_tool("get_item", {"id": out["path"]["results"][0]["id"]})
            out["item"] = item
            out["resource"] = await c.read_resource(f"xmr://item/{hit}")
            out["ask"] = _json(await c.call_tool("ask", {"question": "what is shown?", "k": 2}))
            return out

    out = run(go())
    assert out["names"] == {"search", "ask", "get_item", "stats"}  # read-only: no index/remove
    with Collection.open(coll) as c:
        want = [h.id for h in c.search("a cat", k=3, mode="dense")]
        cat = [h.id for h in c.search(image=str(sample_dir / "cat.jpg"), k=2)]
        counts = c.counts()
    assert [h["id"] for h in out["text"]["results"]] == want
    assert [h["id"] for h in out["path"]["results"]] == cat == [h["id"] for h in out["b64"]["results"]]
    assert out["text"]["results"][0]["uri"] == f"xmr://item/{want[0]}"
    assert out["stats"]["counts"] == counts and out["stats"]["writable"] is False
    # get_item: metadata as JSON, then the thumbnail as image content with the photo's proportions
    meta, image = out["item"].content
    d = json.loads(meta.text)
    assert d["id"] == cat[0] and d["kind"] == "image" and d["captions"]
    assert image.type == "image" and image.mime_type == "image/jpeg"
    thumb = Image.open(io.BytesIO(base64.b64decode(image.data)))
    with Image.open(sample_dir / "cat.jpg") as original:
        assert max(thumb.size) == 256
        assert thumb.size[0] / thumb.size[1] == pytest.approx(original.size[0] / original.size[1], rel=0.02)
    assert json.loads(out["resource"].contents[0].text)["id"] == want[0]
    assert len(out["ask"]["sources"]) == 2 and sum(s["posterior"] for s in out["ask"]["sources"]) == pytest.approx(1)
    assert all(s["uri"].startswith("xmr://item/") for s in out["ask"]["sources"])


@pytest.mark.parametrize("args, needle", [
    ({"text": "x", "k": 0}, "k"),
    ({"text": "x", "k": 10**9}, "k"),
    ({"text": "a" * 5000}, "text"),
    ({"text": "a\x00b"}, "NUL"),
    ({"text": "cat", "where": ["width>>"]}, "where"),
    ({"text": "cat", "where": ["width>1"] * 17}, "where"),
    ({"text": "cat", "min_score": "nan"}, "min_score"),
    ({"text": "cat", "target": "everything"}, "target"),
    ({"image_base64": "not base64!"}, "base64"),
    ({"image_base64": base64.b64encode(b"%PDF-1.4 hello").decode()}, "accepted upload formats"),
    ({"image_path": "/etc/passwd"}, "outside the allowed roots"),
    ({"image_path": "../../etc/passwd"}, "outside the allowed roots"),
    ({}, "give a text"),
])
def test_bad_arguments_are_tool_errors(run: Any, state: AppState, sample_dir: Path, args: dict[str, Any], needle: str) -> None:
    server = build_server(state, AgentSettings(read_roots=(str(sample_dir),)))

    async def go() -> tuple[Any, Any]:
        async with Client(server) as c:
            bad = await c.call_tool("search", args)
            still = await c.call_tool("stats", {})  # the server lives on
            return bad, still

    bad, still = run(go())
    assert needle.lower() in _error(bad).lower()
    assert not still.is_error


def test_paths_and_writes_stay_inside_their_roots(run: Any, tmp_path: Path, state: AppState, photos: Path,
                                                  sample_dir: Path) -> None:
    link = photos / "escape.jpg"
    os.symlink(sample_dir / "cat.jpg", link)  # inside the root by name, outside once resolved
    server = build_server(state, AgentSettings(read_roots=(str(photos),)))

    async def read_only() -> list[Any]:
        async with Client(server) as c:
            return [await c.call_tool("search", {"image_path": str(link)}),
                    await c.call_tool("index", {"path": str(photos)}),
                    await c.call_tool("get_item", {"id": 2**63 + 5}),
                    await c.call_tool("get_item", {"id": 987654})]

    escaped, index, huge, missing = run(read_only())
    assert "outside the allowed roots" in _error(escaped)
    assert "index" in _error(index).lower()  # no such tool on a read-only server
    assert _error(huge) and "no item 987654" in _error(missing)


def test_allow_write_indexes_and_removes_under_root_only(run: Any, tmp_path: Path, collection_copy: Path, photos: Path,
                                                         sample_dir: Path) -> None:
    st = AppState(WebSettings(collection=str(collection_copy), load_generator_at_startup=False, max_batch=1,
                              thumbnail_dir=str(tmp_path / "t")))
    new = photos / "new"
    new.mkdir()
    rng = np.random.default_rng(0)  # an image the collection does not hold yet
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(new / "camera.png")
    server = build_server(st, AgentSettings(write_root=str(photos)))

    async def go() -> list[Any]:
        async with Client(server) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            outside = await c.call_tool("index", {"path": str(sample_dir)})
            added = _json(await c.call_tool("index", {"path": str(new)}))
            found = _json(await c.call_tool("search", {"image_path": str(new / "camera.png"), "k": 1}))
            removed = _json(await c.call_tool("remove", {"paths": [str(new / "camera.png")]}))
            bad_remove = await c.call_tool("remove", {"paths": ["/etc/passwd"]})
            return [names, outside, added, found, removed, bad_remove]

    try:
        names, outside, added, found, removed, bad_remove = run(go())
    finally:
        st.close()
    assert {"index", "remove"} <= names
    assert "outside the allowed roots" in _error(outside)
    assert added["images_added"] == 1
    assert found["results"][0]["path"].endswith("camera.png") and found["results"][0]["score"] == pytest.approx(1, abs=1e-3)
    assert removed["removed"] == [found["results"][0]["id"]]
    assert "outside the allowed roots" in _error(bad_remove)
    with Collection.open(collection_copy) as c:
        assert not c.get(found["results"][0]["id"])


def test_streamable_http_and_its_host_check(coll: Path, tmp_path: Path) -> None:
    import httpx

    st = AppState(WebSettings(collection=str(coll), load_generator_at_startup=False, max_batch=1,
                              decode_timeout_s=120, thumbnail_dir=str(tmp_path / "t")))  # served on uvicorn's loop
    app = http_app(build_server(st, AgentSettings()), st, ("127.0.0.1", "localhost"), 1 << 20)
    with serve_in_thread(app) as port:
        async def go() -> tuple[set[str], dict[str, Any], Any, Any]:
            async with Client(f"http://127.0.0.1:{port}/mcp") as c:
                return ({t.name for t in (await c.list_tools()).tools}, _json(await c.call_tool("stats", {})),
                        await c.call_tool("get_item", {"id": 1}), await c.call_tool("search", {"text": "x", "k": 0}))

        names, stats, item, bad = asyncio.run(go())
        rebinding = httpx.post(f"http://127.0.0.1:{port}/mcp", headers={"Host": "evil.example"},
                               json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    st.close()
    assert names == {"search", "ask", "get_item", "stats"} and stats["counts"]
    assert rebinding.status_code in (400, 403, 421)
    assert json.loads(item.content[0].text)["id"] == 1
    if json.loads(item.content[0].text)["image_id"] is not None:  # its thumbnail, a JPEG that decodes
        assert len(item.content) == 2, item.content[0].text
        assert Image.open(io.BytesIO(base64.b64decode(item.content[1].data))).format == "JPEG"
    assert "k" in _error(bad)


def test_stdio_subprocess(coll: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    params = StdioServerParameters(command=sys.executable, env=env,
                                   args=["-m", "crossmodal_rag", "-q", "mcp", "-c", str(coll),
                                         "--thumbnail-dir", str(tmp_path / "t")])

    async def go() -> tuple[set[str], dict[str, Any], str]:
        async with Client(params, read_timeout_seconds=120) as c:
            names = {t.name for t in (await c.list_tools()).tools}
            hits = _json(await c.call_tool("search", {"text": "a cat", "k": 2, "mode": "dense"}))
            bad = _error(await c.call_tool("search", {"image_path": "/etc/passwd"}))
            return names, hits, bad

    names, hits, bad = asyncio.run(go())
    with Collection.open(coll) as c:
        want = [h.id for h in c.search("a cat", k=2, mode="dense")]
    assert names == {"search", "ask", "get_item", "stats"}
    assert [h["id"] for h in hits["results"]] == want
    assert "--allow-read" in bad
