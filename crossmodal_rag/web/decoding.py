"""Image decoding in the server: uploads and thumbnails decoded in a bounded pool of worker
processes, each decode under a deadline, apart from the threads that search.

The data's way::

    upload bytes -> sniffed (crossmodal_rag.ingestion.image_sniff: the first bytes must name an accepted
                    format, else 415 before anything decodes; see checks.py)
                 -> DecodePool: one of ``workers`` slots (more than ``max_queued`` waiting: 503 at
                    once; no slot within the deadline: 503), its worker process (decode_worker.py:
                    only the allowed formats' plugins, an address-space budget)
                 -> RGB pixels (or a JPEG thumbnail) back, or a one-line reason (413/415/422);
                    past the deadline the worker is killed (422 decode_timeout), a crashed one
                    gives 422 decode_failed, and either is replaced on the next use

Why apart: decoding once ran in the worker threads that also search, so two slow uploads (a
progressive JPEG of ~20k scans decodes for a minute) held every thread and ``/api/search``
waited minutes. Here a decode waits only on the event loop and on its own pool; the searches'
threads never see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from ..ingestion.images import DecodedImage
from .decode_worker import MAX_HEADER_BYTES, READY

__all__ = ["THUMBNAIL_QUEUE", "DecodeFailed", "DecodePool", "DecodeStats"]

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 60.0  # a worker's start (interpreter and imports) is not the image's fault
_MAX_PAYLOAD = 256 * 1024 * 1024  # decoded pixels are reduced to <= 2048 a side: ~12 MB
THUMBNAIL_QUEUE = 64  # thumbnails waiting for a worker before 503 (uploads: max_queued)
_MAX_USES = 1000  # decodes per worker before a fresh one (whatever a decoder leaked goes with it)


class DecodeFailed(Exception):
    """A decode the server could not do: ``status`` and ``code`` for the answer, ``reason`` for
    people (one line), ``retry_after`` seconds on a 503."""

    def __init__(self, status: int, code: str, name: str, reason: str, retry_after: int | None = None) -> None:
        super().__init__(f"{name}: {reason}")
        self.status, self.code, self.name, self.reason, self.retry_after = status, code, name, reason, retry_after


@dataclass
class DecodeStats:
    """What the pool did."""

    submitted: int = 0  # decodes asked for
    decoded: int = 0  # answered with pixels
    refused: int = 0  # answered with a reason (the file's fault)
    timeouts: int = 0  # killed at the deadline
    crashes: int = 0  # workers that died or broke the protocol
    busy: int = 0  # answered 503 (queue full, or no slot within the deadline)
    started: int = 0  # worker processes started
    restarts: int = 0  # workers killed or lost (a fresh one starts on the next use)
    peak_running: int = 0  # most decodes at once


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc, self.uses = proc, 0

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it exited just now
                self.proc.kill()

    async def reap(self, timeout: float = 5.0) -> None:
        """Wait for the killed process and close its pipes."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            logger.warning("decode worker %d did not exit after SIGKILL", self.proc.pid)
        transport = getattr(self.proc, "_transport", None)  # asyncio has no public close for it
        if transport is not None:
            transport.close()

    async def call(self, meta: dict, data: bytes) -> tuple[dict, bytes]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        head = json.dumps(meta).encode()
        self.proc.stdin.write(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(data)) + data)
        await self.proc.stdin.drain()
        (n,) = struct.unpack(">I", await self.proc.stdout.readexactly(4))
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"reply header of {n} bytes")
        reply = json.loads(await self.proc.stdout.readexactly(n))
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise ValueError("reply is not a decode worker's answer")
        (size,) = struct.unpack(">Q", await self.proc.stdout.readexactly(8))
        if size > _MAX_PAYLOAD:
            raise ValueError(f"reply of {size} bytes")
        return reply, await self.proc.stdout.readexactly(size)


class DecodePool:
    """Decodes in at most ``workers`` worker processes at once, each call within ``timeout_s``.

    Args:
        workers: decodes at once (one process each; started on first use, kept for the next).
        timeout_s: the deadline of one decode, after which its worker is killed.
        memory_mb: address space a worker may use beyond its own start-up (``RLIMIT_AS``).
        max_queued: decodes waiting for a slot beyond which a new one gets 503 at once.
        argv: the worker's command line (default: this interpreter running
            :mod:`crossmodal_rag.web.decode_worker`); ``env`` is added to the environment.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 10.0, memory_mb: int = 1024, max_queued: int = 8,
                 argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> None:
        if workers < 1 or not timeout_s > 0 or memory_mb < 16 or max_queued < 0:
            raise ValueError(f"a decode pool needs workers >= 1, timeout_s > 0, memory_mb >= 16 and "
                             f"max_queued >= 0; got {workers}, {timeout_s}, {memory_mb} and {max_queued}")
        self.workers, self.timeout_s, self.memory_mb, self.max_queued = workers, timeout_s, memory_mb, max_queued
        self.argv = list(argv) if argv else [sys.executable, "-m", "crossmodal_rag.web.decode_worker",
                                             "--memory-mb", str(memory_mb)]
        # one thread for numerical libraries in the worker: it decodes one image at a time
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                    **(env or {})}
        self.stats = DecodeStats()
        self.running = 0
        self.waiting = 0
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()
        self._slots: asyncio.Semaphore | None = None  # made on first use, on the serving loop
        self._reaping: set[asyncio.Task] = set()
        self._closed = False

    async def decode(self, data: bytes, name: str, *, max_pixels: int) -> DecodedImage:
        """``data`` decoded as :func:`crossmodal_rag.ingestion.images.decode_image` would (RGB, reduced).

        Raises:
            DecodeFailed: 413/415/422 for the file (with the decoder's reason), 422 past the
                deadline (``decode_timeout``) or when the worker died (``decode_failed``), 503 when
                the pool is full (``decoder_busy``, with ``retry_after``).
        """
        reply, payload = await self._run({"op": "decode", "name": name, "max_pixels": max_pixels}, data, name)
        try:
            image = Image.frombytes("RGB", (int(reply["size"][0]), int(reply["size"][1])), payload)
            return DecodedImage(image=image, width=int(reply["width"]), height=int(reply["height"]),
                                format=str(reply["format"]))
        except (KeyError, IndexError, TypeError, ValueError) as e:
            logger.warning("the decode worker's answer for %s does not hold an image: %s", name, e)
            raise DecodeFailed(422, "decode_failed", name, "the decoder process gave no usable image") from None

    async def thumbnail(self, data: bytes, name: str, *, size: int, max_pixels: int) -> bytes:
        """JPEG bytes of ``data`` scaled to fit ``size`` x ``size`` (errors as :meth:`decode`).

        Thumbnails of indexed files may queue deeper than uploads (:data:`THUMBNAIL_QUEUE` waiting):
        a page of results asks for dozens at once, and each is rendered once, then cached."""
        _, payload = await self._run({"op": "thumbnail", "name": name, "max_pixels": max_pixels, "size": size},
                                     data, name, max(self.max_queued, THUMBNAIL_QUEUE))
        return payload

    async def _run(self, meta: dict, data: bytes, name: str, max_queued: int | None = None) -> tuple[dict, bytes]:
        if self._closed:
            raise DecodeFailed(503, "decoder_busy", name, "the server is shutting down", retry_after=1)
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        self.stats.submitted += 1
        if self.running >= self.workers and self.waiting >= (self.max_queued if max_queued is None else max_queued):
            raise self._busy(name, f"{self.running} decodes are running and {self.waiting} waiting")
        self.waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.timeout_s)
        except asyncio.TimeoutError:
            raise self._busy(name, f"no decoder was free within {self.timeout_s:g} s") from None
        finally:
            self.waiting -= 1
        self.running += 1
        self.stats.peak_running = max(self.stats.peak_running, self.running)
        try:
            return await self._on_a_worker(meta, data, name)
        finally:
            self.running -= 1
            self._slots.release()

    async def _on_a_worker(self, meta: dict, data: bytes, name: str) -> tuple[dict, bytes]:
        worker = self._idle.pop() if self._idle else await self._start(name)
        healthy = False
        try:
            reply, payload = await asyncio.wait_for(worker.call(meta, data), self.timeout_s)
            healthy = True
        except asyncio.TimeoutError:
            self.stats.timeouts += 1
            logger.warning("decoding %s passed the %g s deadline: worker killed", name, self.timeout_s)
            raise DecodeFailed(422, "decode_timeout", name,
                               f"decoding took longer than the {self.timeout_s:g} s limit (a progressive JPEG "
                               "with thousands of scans?); re-save the image as a baseline JPEG or PNG") from None
        except (OSError, EOFError, asyncio.IncompleteReadError, ValueError) as e:
            self.stats.crashes += 1
            code = worker.proc.returncode
            logger.warning("the decode worker failed on %s (exit code %s): %s", name, code, e)
            raise DecodeFailed(422, "decode_failed", name,
                               f"the decoder process failed on this image (exit code {code})") from None
        finally:
            if healthy and worker.uses < _MAX_USES:
                worker.uses += 1
                self._idle.append(worker)
            else:  # killed at the deadline, crashed, worn, or the request was cancelled mid-decode
                self._discard(worker)
        if not reply["ok"]:
            self.stats.refused += 1
            status = reply["status"] if reply.get("status") in (413, 415, 422) else 422
            code = "unsupported_type" if status == 415 else "bad_image"
            raise DecodeFailed(status, code, name, str(reply.get("reason", "cannot decode image"))[:1000])
        self.stats.decoded += 1
        return reply, payload

    async def _start(self, name: str) -> _Worker:
        """A fresh worker, once it says it is ready (503 ``decoder_unavailable`` if it cannot start)."""
        try:
            proc = await asyncio.create_subprocess_exec(*self.argv, stdin=asyncio.subprocess.PIPE,
                                                        stdout=asyncio.subprocess.PIPE, env=self.env)
        except OSError as e:
            logger.error("cannot start a decode worker (%s): %s", " ".join(self.argv), e)
            raise DecodeFailed(503, "decoder_unavailable", name, "no image decoder could be started; see the "
                               "server log", retry_after=10) from e
        worker = _Worker(proc)
        self._live.add(worker)
        self.stats.started += 1
        try:
            assert proc.stdout is not None
            ready = await asyncio.wait_for(proc.stdout.readexactly(len(READY)), _START_TIMEOUT_S)
            if ready != READY:
                raise ValueError(f"it said {ready!r}")
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            self._discard(worker)
            logger.error("a decode worker did not start (%s; exit code %s)", e, proc.returncode)
            raise DecodeFailed(503, "decoder_unavailable", name, "no image decoder could be started; see the "
                               "server log", retry_after=10) from None
        except BaseException:
            self._discard(worker)
            raise
        return worker

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        self._live.discard(worker)
        self.stats.restarts += 1
        try:
            task = asyncio.get_running_loop().create_task(worker.reap())
        except RuntimeError:
            return
        self._reaping.add(task)
        task.add_done_callback(self._reaping.discard)

    def _busy(self, name: str, why: str) -> DecodeFailed:
        self.stats.busy += 1
        retry = max(1, math.ceil(self.timeout_s * (1 + self.waiting // self.workers)))
        return DecodeFailed(503, "decoder_busy", name, f"the image decoders are busy ({why}); retry in {retry} s",
                            retry_after=retry)

    async def aclose(self) -> None:
        """Stop every worker (running decodes end with ``decode_failed``)."""
        self._closed = True
        workers = list(self._live)
        self._live.clear()
        self._idle.clear()
        for worker in workers:
            worker.kill()
        for worker in workers:
            await worker.reap()
        for task in list(self._reaping):
            await task
