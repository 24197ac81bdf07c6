"""Test helpers: a free loopback port, an ASGI app served by uvicorn in a thread, and the real
``crossmodal-rag serve`` in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(app: Any, *, log_level: str = "critical", start_timeout: float = 60.0) -> Iterator[int]:
    """Serve ``app`` on 127.0.0.1 in a daemon thread; yields the port, stops the server on exit."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + start_timeout
    while not srv.started:
        if time.time() > deadline or not thread.is_alive():
            srv.should_exit = True
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@contextmanager
def serve_cli(collection: Path, workdir: Path, *args: str, ready: Callable[[dict[str, Any]], bool] = lambda h: True,
              start_timeout: float = 60.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """``crossmodal-rag serve -c COLLECTION ARGS`` in a subprocess (offline, thumbnails and HF cache
    under ``workdir``, ``env`` over the environment); yields its base URL once ``/api/health``
    answers and ``ready(health)``."""
    import httpx

    port = free_port()
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1", "HF_HOME": str(workdir / "hf"), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "crossmodal_rag", "serve", "-c", str(collection), "--port",
                             str(port), "--thumbnail-dir", str(workdir / "t"), *args],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + start_timeout
        while True:
            try:
                r = httpx.get(base + "/api/health", timeout=2)
                if r.status_code == 200 and ready(r.json()):
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"crossmodal-rag serve did not become ready (exit code {proc.poll()})")
            time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@contextmanager
def served_app(app: Any) -> Iterator[tuple[str, Any]]:
    """``(base URL, app.state.web)`` of ``app`` served in a thread (see :func:`serve_in_thread`)."""
    with serve_in_thread(app) as port:
        yield f"http://127.0.0.1:{port}", app.state.web


def wait_generator_ready(base: str, timeout: float = 120) -> None:
    """Poll ``/api/health`` until the served app's generator has loaded (fails after ``timeout`` s)."""
    import httpx

    deadline = time.time() + timeout
    while httpx.get(base + "/api/health").json()["generator_status"] != "ready":
        assert time.time() < deadline, "the generator did not load"
        time.sleep(0.1)
