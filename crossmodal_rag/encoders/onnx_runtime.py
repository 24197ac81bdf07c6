"""Which runtime embeds: torch, or ONNX Runtime with an export of the same weights.

``--runtime`` (environment ``CROSSMODAL_RAG_RUNTIME``) is one of :data:`RUNTIMES`:

    auto    the ONNX export of a spec when one is in the export cache, else torch (the default)
    torch   always the spec's own torch backend
    onnx    always ONNX: an onnx: spec, or the cached export of the spec (an error names the
            export command when there is none)

The export cache (``$CROSSMODAL_RAG_ONNX_DIR``, default ``~/.cache/crossmodal-rag/onnx``) holds
``clip/<slug of the CLIP spec>/`` and ``text/<slug of the text-model spec>/``, written by
``crossmodal-rag export-onnx`` without ``--out``. A swap is safe: the collection checks the
encoder's fingerprint whatever runtime runs it (:mod:`crossmodal_rag.maintenance.fingerprint`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelSpecError

if TYPE_CHECKING:
    from .spec import ModelSpec

__all__ = [
    "CACHE_ENV",
    "EXPORT_INFO",
    "RUNTIMES",
    "RUNTIME_ENV",
    "cached_clip_export",
    "cached_text_export",
    "export_slug",
    "onnx_cache_dir",
    "onnx_session",
    "resolve_clip_spec",
    "runtime",
    "set_runtime",
    "text_export_for",
]

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")
RUNTIME_ENV = "CROSSMODAL_RAG_RUNTIME"
CACHE_ENV = "CROSSMODAL_RAG_ONNX_DIR"
#: The file an export of this project writes beside immich's layout (source spec, flavour, dim).
EXPORT_INFO = "crossmodal_rag_export.json"


def runtime() -> str:
    """The runtime in force (``$CROSSMODAL_RAG_RUNTIME``, default ``auto``)."""
    value = os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"
    if value not in RUNTIMES:
        raise ModelSpecError(f"${RUNTIME_ENV}={value!r} is not a runtime; valid: {', '.join(RUNTIMES)}")
    return value


def set_runtime(value: str) -> None:
    """Choose the runtime for this process and its children (the CLI's ``--runtime``)."""
    if value not in RUNTIMES:
        raise ModelSpecError(f"unknown runtime {value!r}; valid: {', '.join(RUNTIMES)}")
    os.environ[RUNTIME_ENV] = value


def onnx_cache_dir() -> Path:
    """The export cache folder (may not exist yet)."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "crossmodal-rag" / "onnx"


def export_slug(spec: str) -> str:
    """A folder name for ``spec``: readable part plus a short hash of the whole string."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", spec)[-60:].strip("_")
    return f"{readable}-{hashlib.sha256(spec.encode()).hexdigest()[:10]}"


def cached_clip_export(spec: str) -> Path:
    """Where the export of CLIP spec ``spec`` lives in the cache."""
    return onnx_cache_dir() / "clip" / export_slug(spec)


def cached_text_export(spec: str) -> Path:
    """Where the export of text-model spec ``spec`` lives in the cache."""
    return onnx_cache_dir() / "text" / export_slug(spec)


def resolve_clip_spec(spec: ModelSpec) -> ModelSpec:
    """The spec that will actually run under the current :func:`runtime`: ``spec`` itself, or the
    ``onnx:`` spec of its cached export.

    Raises:
        ModelSpecError: runtime ``onnx`` and no export of ``spec`` in the cache.
    """
    from .spec import ModelSpec

    if spec.backend == "onnx":
        return spec
    mode = runtime()
    if mode == "torch":
        return spec
    folder = cached_clip_export(str(spec))
    if (folder / "visual" / "model.onnx").is_file():
        logger.info("runtime %s: %s runs on its ONNX export %s", mode, spec, folder)
        return ModelSpec("onnx", str(folder))
    if mode == "onnx":
        raise ModelSpecError(
            f"runtime onnx: {spec} has no ONNX export in {onnx_cache_dir()}; run "
            f"`crossmodal-rag export-onnx --model {spec}` once, or use --runtime torch")
    return spec


def text_export_for(spec: str) -> Path | None:
    """The cached ONNX export of text-model ``spec`` to use under the current runtime, or None
    (torch). Raises :class:`ModelSpecError` for runtime ``onnx`` without an export."""
    mode = runtime()
    if mode == "torch":
        return None
    folder = cached_text_export(spec)
    if (folder / "model.onnx").is_file():
        return folder
    if mode == "onnx":
        raise ModelSpecError(
            f"runtime onnx: text model {spec} has no ONNX export in {onnx_cache_dir()}; run "
            f"`crossmodal-rag export-onnx --text-model {spec}` once, or use --runtime torch")
    return None


def onnx_session(path: Path) -> Any:
    """An ``onnxruntime.InferenceSession`` on the CPU for the model file ``path``."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ModelSpecError(f"{path} needs onnxruntime: pip install 'crossmodal-rag[onnx]'") from e
    if not path.is_file():
        raise ModelSpecError(f"ONNX model file {path} does not exist; export it with "
                             "`crossmodal-rag export-onnx`")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the optimiser's notes are not the user's business
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ModelSpecError(f"cannot load ONNX model {path}: {str(e).splitlines()[0][:200]}") from e
