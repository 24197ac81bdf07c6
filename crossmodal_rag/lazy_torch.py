"""torch imported on first use, for the modules that the query path imports (generation, the web
app): a search or a server over an ONNX encoder and a llama.cpp generator never loads torch
(~2 s and ~300 MB), while the code that does need tensors reads as ordinary torch code.

``torch`` here is a stand-in whose first attribute access imports the real module;
:func:`inference_mode` is ``@torch.inference_mode()`` applied at call time rather than when the
class is defined. Type annotations need neither (``from __future__ import annotations``).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["inference_mode", "torch"]

F = TypeVar("F", bound=Callable[..., Any])


class _LazyTorch:
    """Forwards every attribute to ``torch``, importing it on the first access."""

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("torch"), name)

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


torch: Any = _LazyTorch()


def inference_mode(fn: F) -> F:
    """``fn`` run under ``torch.inference_mode()``, torch imported when ``fn`` is first called."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with importlib.import_module("torch").inference_mode():
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]
