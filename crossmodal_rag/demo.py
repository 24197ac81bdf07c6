"""The demo: index the bundled sample photos and run example text and image queries."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEMO_QUERIES", "default_demo_collection", "sample_data_dir"]


@dataclass(frozen=True)
class DemoQuery:
    text: str | None = None
    image: str | None = None  # relative to the sample folder
    target: str = "images"


DEMO_QUERIES = (
    DemoQuery(text="an astronaut in a space suit"),
    DemoQuery(text="a cat looking at the camera"),
    DemoQuery(text="a cup of coffee"),
    DemoQuery(text="a rocket"),
    DemoQuery(image="cat.jpg"),
    DemoQuery(image="space/astronaut.jpg", target="texts"),
)


def sample_data_dir() -> Path:
    """The sample photos: installed inside the package, or ``data/sample`` in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_sample", here.parent / "data" / "sample"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        "the sample photos are not installed; run from a source checkout (data/sample) or "
        "reinstall crossmodal-rag"
    )


def default_demo_collection(model: str) -> Path:
    """A per-model collection folder under the user's cache directory."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crossmodal-rag"
    tag = hashlib.sha256(model.encode()).hexdigest()[:10]
    return cache / f"demo-{tag}"
