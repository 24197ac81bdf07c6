"""The decode worker: a process of its own that turns uploaded or indexed image bytes into pixels
for the server (:mod:`.decoding` starts, feeds, times and kills it).

Why a process: a hostile file can make a decoder run for minutes or allocate gigabytes, and a
thread cannot be stopped; a process can be killed at its deadline and held to a memory budget
(``RLIMIT_AS``), and whatever a decoder library does wrong stays in it. What it can decode: only
the allowed formats (:data:`crossmodal_rag.ingestion.image_sniff.ALLOWED_IMAGE_FORMATS`): every other Pillow
plugin is unregistered at start, so EPS/PostScript can never reach Ghostscript from here, and
Ghostscript is marked missing besides.

Protocol (stdin -> stdout, one request at a time): the worker writes ``b"R"`` once it is ready;
a request is ``u32`` header length, a JSON header (``op``: ``decode`` or ``thumbnail``, ``name``,
``max_pixels``, ``size``), ``u64`` data length and the data; the reply has the same shape: a JSON
header (``ok``; on success ``size``, ``width``, ``height``, ``format``; else ``status`` and a
one-line ``reason``) and a payload (RGB pixels, or the JPEG thumbnail). Integers big-endian.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import struct
import sys
import warnings
from collections.abc import Callable
from typing import Any, BinaryIO

__all__ = ["READY", "main", "read_message", "status_of", "write_message"]

READY = b"R"
MAX_HEADER_BYTES = 64 * 1024  # a JSON header is a few hundred bytes


def read_message(stream: BinaryIO) -> tuple[dict[str, Any], bytes] | None:
    """One (header, data) from ``stream``; None at end of input."""
    head = stream.read(4)
    if len(head) < 4:
        return None
    (n,) = struct.unpack(">I", head)
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"message header of {n} bytes")
    meta = json.loads(stream.read(n))
    (size,) = struct.unpack(">Q", stream.read(8))
    data = stream.read(size)
    if len(data) != size:
        raise EOFError("message data cut short")
    return meta, data


def write_message(stream: BinaryIO, meta: dict[str, Any], data: bytes = b"") -> None:
    head = json.dumps(meta).encode()
    stream.write(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(data)))
    stream.write(data)
    stream.flush()


def status_of(error: Exception) -> int:
    """The HTTP status of a decoding refusal: 415 another format, 413 over a budget, else 422."""
    from ..ingestion.image_sniff import ImageFormatError

    reason = getattr(error, "reason", "")
    if isinstance(error, ImageFormatError) or "not a recognised image" in reason:
        return 415
    if isinstance(error, MemoryError) or "exceeds" in reason:
        return 413
    return 422


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _limit_memory(budget_mb: int) -> None:
    """Hold the address space to what the process uses now plus ``budget_mb``."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = used + budget_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, OSError, ValueError):  # not Linux: the deadline still holds
        pass


def _allowed_formats_only() -> None:
    """Unregister every Pillow plugin but the allowed formats' (after the optional ones load)."""
    from PIL import EpsImagePlugin, Image

    from ..ingestion.image_sniff import ALLOWED_IMAGE_FORMATS
    from ..ingestion.images import format_support

    Image.init()
    format_support()  # registers HEIF/AVIF when installed
    keep = set(ALLOWED_IMAGE_FORMATS)
    for fmt in list(Image.OPEN):
        if fmt not in keep:
            del Image.OPEN[fmt]
    Image.ID[:] = [fmt for fmt in Image.ID if fmt in keep]
    EpsImagePlugin.gs_binary = False  # and should EPS come back, it finds no Ghostscript


def _over_budget(budget_mb: int) -> tuple[dict, bytes]:
    return {"ok": False, "status": 413, "reason": f"decoding needs more memory than the decoder's budget of "
                                                  f"{budget_mb} MB (serve --decode-memory-mb)"}, b""


def _handle(meta: dict[str, Any], data: bytes, decode: Callable[..., Any], budget_mb: int) -> tuple[dict, bytes]:
    from ..errors import ImageDecodeError

    name = str(meta.get("name", "upload"))
    try:
        decoded = decode(data, name, max_pixels=int(meta["max_pixels"]))
        img = decoded.image
        if meta.get("op") == "thumbnail":
            from .thumbnails import thumbnail_jpeg

            payload = thumbnail_jpeg(img, int(meta["size"]))
        else:
            payload = img.tobytes()
        return {"ok": True, "size": list(img.size), "width": decoded.width, "height": decoded.height,
                "format": decoded.format}, payload
    except ImageDecodeError as e:
        if isinstance(e.__cause__, MemoryError):
            return _over_budget(budget_mb)
        return {"ok": False, "status": status_of(e), "reason": e.reason}, b""
    except MemoryError:
        return _over_budget(budget_mb)
    except Exception as e:  # a decoder's own failure on a hostile file: this file's problem only
        return {"ok": False, "status": 422, "reason": f"cannot decode image: {_one_line(e)}"}, b""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crossmodal_rag.web.decode_worker")
    ap.add_argument("--memory-mb", type=int, default=1024, help="address space allowed beyond start-up")
    ap.add_argument("--decoder", default="crossmodal_rag.ingestion.images:decode_image",
                    help="MODULE:FUNCTION with decode_image's signature (tests inject slow ones)")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")  # a hostile file's warnings are not the server log's business
    module, _, func = args.decoder.partition(":")
    decode = getattr(importlib.import_module(module), func)
    _allowed_formats_only()
    _limit_memory(args.memory_mb)
    inp = sys.stdin.buffer
    out = os.fdopen(os.dup(1), "wb")  # the protocol's own descriptor; fd 1 (print, C libraries) -> stderr
    os.dup2(2, 1)
    out.write(READY)
    out.flush()
    while True:
        message = read_message(inp)
        if message is None:
            return 0
        reply, payload = _handle(*message, decode, args.memory_mb)
        write_message(out, reply, payload)


if __name__ == "__main__":
    sys.exit(main())
