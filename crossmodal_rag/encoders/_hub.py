"""Decide quickly whether the Hugging Face Hub can be reached, so offline runs fail in seconds."""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from ..errors import ModelSpecError, WeightsUnavailableError

if TYPE_CHECKING:
    from .spec import ModelSpec

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def hub_offline_requested() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CROSSMODAL_RAG_OFFLINE")
    )


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 2.0) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds, name
    lookup included (a hanging DNS resolver counts as unreachable)."""
    if hub_offline_requested():
        _forbid_hub_network()
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    problem = _connect_problem(host, port, timeout)
    if problem is not None:
        logger.info("model hub %s not reachable (%s); using local files only", host, problem)
        return False
    return True


def _connect_problem(host: str, port: int, timeout: float) -> str | None:
    """Why a TCP connection to ``host:port`` did not open within ``timeout`` seconds, or None.
    The attempt runs in a daemon thread, so that a name lookup (which ignores socket timeouts)
    cannot hold the caller longer."""
    outcome: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as e:
            outcome.append(str(e) or type(e).__name__)

    worker = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _forbid_hub_network() -> None:
    """Make the hub libraries themselves offline too (they call the hub for more than weights,
    e.g. huggingface_hub's agent registry, unless their own offline flag is set)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return
    constants.HF_HUB_OFFLINE = True  # read once at import; set it where it is already loaded


def cached_hub_file(repo_id: str, filenames: list[str]) -> str | None:
    """The local path of the first of ``filenames`` already in the hub cache, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    for name in filenames:
        found = try_to_load_from_cache(repo_id, name)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


#: Where open_clip looks for the weights of a pretrained tag when the hub cannot be reached:
#: tag -> (hub repository, file names in the order tried), so that a missing model is reported
#: without importing open_clip and torch first (seconds). tests/e2e/test_startup.py checks the
#: entries against open_clip's own table.
OPEN_CLIP_TAG_FILES: dict[str, tuple[str, tuple[str, ...]]] = {
    "ViT-B-32/laion2b_s34b_b79k": (
        "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    ),
}


def require_weights(spec: ModelSpec) -> None:
    """Raise :class:`WeightsUnavailableError` at once when ``spec``'s weights are known to be in
    no local cache and the hub cannot be reached. Only the tags of :data:`OPEN_CLIP_TAG_FILES`
    are judged here; any other spec passes, and its backend decides when it loads."""
    known = OPEN_CLIP_TAG_FILES.get(f"{spec.name}/{spec.pretrained}") if spec.backend == "open_clip" else None
    if known is None or hub_reachable():
        return
    repo, names = known
    if cached_hub_file(repo, list(names)) is None:
        raise WeightsUnavailableError(weights_hint(str(spec)))


#: The text-only way, as the offline message shows it (``index`` names its own source and collection).
TEXT_ONLY_INDEX = "crossmodal-rag index SOURCE -c COLLECTION --text-only"


def weights_hint(spec: str, text_only: str = TEXT_ONLY_INDEX) -> str:
    """The one message for CLIP weights that cannot be had: what works offline without them
    (``text_only``: the command that indexes text-only) and the ways to local weights."""
    return (
        f"could not load weights for {spec}: they are not in the local cache and the model hub "
        "cannot be reached (offline?). Without CLIP weights, index text-only: "
        f"`{text_only}` (captions, passages and OCR text searched by the bundled sentence encoder "
        "and by keyword; images found by their words). For CLIP search, point --model at local "
        "weights: open_clip:local-dir:FOLDER (a folder with open_clip_config.json and "
        "open_clip_model.safetensors), open_clip:ARCH/CHECKPOINT_FILE, or hf:FOLDER (a transformers "
        "save_pretrained folder); or set HF_HOME to a cache that already holds the model."
    )


def refused_pickle(error: BaseException) -> bool:
    """True for the ``UnpicklingError`` that ``torch.load(weights_only=True)`` raises for a pickle
    holding anything but tensors (matched by name: this package imports no pickle module)."""
    return any(c.__name__ == "UnpicklingError" for c in type(error).__mro__)


def unsafe_weights_error(what: str, error: BaseException) -> ModelSpecError:
    """The one-line error for a weights file that ``torch.load(weights_only=True)`` refused
    (``pickle.UnpicklingError``): it holds pickled objects other than tensors, which could run
    code when loaded, so it is never loaded; the fix is a ``.safetensors`` file."""
    lines = [line.strip() for line in str(error).splitlines()]
    detail = next((line for line in lines if line.startswith("Unsupported")), "")
    return ModelSpecError(
        f"cannot load {what}: its weights file holds pickled Python objects other than tensors, and "
        "is refused unloaded (they could run code)" + (f" [{detail[:120]}]" if detail else "")
        + "; use a .safetensors weights file, or a checkpoint of plain tensors from a trusted source"
    )

