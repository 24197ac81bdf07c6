"""The demo: index the bundled sample photos and run example text and image queries."""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEMO_QUERIES", "DEMO_QUESTION", "default_demo_collection", "next_commands", "sample_data_dir"]


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

DEMO_QUESTION = "What is the astronaut wearing?"  # answered with ``demo --generator``


def next_commands(model: str | None = None, generator: str | None = None,
                  folder: str = "~/Pictures", collection: str = "~/pictures.xmr") -> list[str]:
    """The three commands to run next on one's own photos: index, search, serve (with the model
    and generator the demo ran with, when they are not the defaults)."""
    coll = f"-c {collection}"
    model_flag = f" --model {shlex.quote(model)}" if model else ""
    gen_flag = f" --generator {shlex.quote(generator)}" if generator else ""
    return [f"crossmodal-rag index {folder} {coll}{model_flag}",
            f"crossmodal-rag search {shlex.quote(DEMO_QUERIES[1].text or '')} {coll}",
            f"crossmodal-rag serve {coll}{gen_flag}"]


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
