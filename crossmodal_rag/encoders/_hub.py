"""Decide quickly whether the Hugging Face Hub can be reached, so offline runs fail in seconds."""

from __future__ import annotations

import functools
import logging
import os
import socket
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def hub_offline_requested() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CROSSMODAL_RAG_OFFLINE")
    )


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    if hub_offline_requested():
        _forbid_hub_network()
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError as e:
        logger.info("model hub %s not reachable (%s); using local files only", host, e)
        return False


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


def weights_hint(spec: str) -> str:
    return (
        f"could not load weights for {spec}: they are not in the local cache and the model hub "
        "cannot be reached (offline?). Point --model at local weights instead: "
        "open_clip:local-dir:FOLDER (a folder with open_clip_config.json and "
        "open_clip_model.safetensors), open_clip:ARCH/CHECKPOINT_FILE, or hf:FOLDER (a transformers "
        "save_pretrained folder); or set HF_HOME to a cache that already holds the model."
    )
