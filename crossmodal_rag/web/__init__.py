"""The web app and REST API (FastAPI): ``crossmodal-rag serve --collection DIR``.

``create_app`` and ``WebSettings`` load on first access, so the decode worker process
(:mod:`.decode_worker`, which imports only the image decoder) does not import FastAPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .settings import WebSettings

__all__ = ["WebSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".app", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
