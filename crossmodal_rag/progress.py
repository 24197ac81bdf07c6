"""Progress where people wait: bars for loops over many items and a status line while a model
loads, all on stderr.

The library shows them only when asked (``progress=True`` on the function doing the work, or
:func:`set_default` for model loading); the command line turns them on unless ``-q``. In a Jupyter
kernel the bars are notebook widgets when ``ipywidgets`` is installed and plain text otherwise
(never tqdm's "IProgress not found" warning).

Example::

    from crossmodal_rag.progress import bar, loading
    with loading("CLIP model ViT-B-32", enabled=True):
        model = ...
    for item in bar(items, desc="encoding", unit=" img", enabled=True):
        ...
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

__all__ = ["bar", "configure", "default_enabled", "loading", "set_default", "tqdm"]

_DEFAULT = False  # what ``enabled=None`` means; the CLI sets it to ``not --quiet``

# Warnings third-party libraries print on every run that a user can do nothing about:
# (message regex, category). Filtered by :func:`configure` (the CLI), shown with ``-vv``.
NOISY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"QuickGELU mismatch between final model config", UserWarning),  # open_clip, openai tags
    (r"IProgress not found", Warning),  # tqdm.auto in a kernel without ipywidgets
    (r"TypedStorage is deprecated", UserWarning),  # torch, via older transformers
    (r"`resume_download` is deprecated", FutureWarning),  # huggingface_hub via transformers
)


def set_default(enabled: bool) -> None:
    """Show progress by default (``enabled=None``) from now on, or not."""
    global _DEFAULT
    _DEFAULT = bool(enabled)


def configure(*, quiet: bool, verbose: int = 0) -> None:
    """The command line's stderr: progress by default unless ``quiet``, which also silences
    third-party tqdm bars (``TQDM_DISABLE``, read when tqdm is imported: call this first); the known noisy warnings filtered unless ``-vv``;
    no "tokenizers: the current process just got forked" notice from decoding workers."""
    set_default(not quiet)
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose < 2:
        for message, category in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)


def default_enabled() -> bool:
    """Whether ``enabled=None`` shows progress (off while ``TQDM_DISABLE`` is set)."""
    return _DEFAULT and not os.environ.get("TQDM_DISABLE")


def _is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except (OSError, ValueError):  # closed or detached
        return False


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
    except Exception:  # an IPython too old or half-imported: not a kernel we can draw widgets in
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _tqdm_class() -> type:
    """tqdm's notebook widget in a Jupyter kernel that has ipywidgets, its plain text bar otherwise
    (``tqdm.auto`` warns "IProgress not found" in a kernel without ipywidgets)."""
    if _in_notebook() and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.notebook import tqdm as notebook_tqdm

        return notebook_tqdm
    from tqdm.std import tqdm as text_tqdm

    return text_tqdm


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """A tqdm bar of the right kind for where we run (a drop-in for ``tqdm.auto.tqdm``)."""
    return _tqdm_class()(*args, **kwargs)


def bar(iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str | None = None,
        unit: str = "it", enabled: bool | None = None, file: IO[str] | None = None) -> Any:
    """A progress bar on stderr (or ``file``), hidden when ``enabled`` is false (``None``: the
    default, see :func:`set_default`) or when there is nothing to count."""
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    show = default_enabled() if enabled is None else enabled
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=file or sys.stderr,
                disable=not show or total == 0, dynamic_ncols=True, smoothing=0.1)


@contextmanager
def loading(what: str, *, enabled: bool | None = None, file: IO[str] | None = None,
            interval: float = 0.25) -> Iterator[None]:
    """A status line ``loading WHAT ... 3s`` on stderr (or ``file``) while the block runs, ticking
    every ``interval`` seconds on a terminal; it stays with the time taken, or says ``failed``.
    Written to a file or a pipe, it is one line, finished when the block ends (a ticking line
    would be repeated on every tick there)."""
    show = default_enabled() if enabled is None else enabled
    if not show:
        yield
        return
    out = file or sys.stderr
    if not _is_terminal(out):
        out.write(f"loading {what} ... ")
        out.flush()
        started, ok = time.perf_counter(), False
        try:
            yield
            ok = True
        finally:
            out.write(f"{time.perf_counter() - started:.1f}s\n" if ok else "failed\n")
            out.flush()
        return
    status = tqdm(total=None, desc=f"loading {what}", file=file or sys.stderr,
                  bar_format="{desc} ... {elapsed}", leave=True, dynamic_ncols=True)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(interval):
            status.refresh()

    ticker = threading.Thread(target=tick, name="crossmodal-rag-loading", daemon=True)
    ticker.start()
    started, ok = time.perf_counter(), False
    try:
        yield
        ok = True
    finally:
        done.set()
        ticker.join()
        took = time.perf_counter() - started
        status.bar_format = "{desc} ... " + (f"{took:.1f}s" if ok else "failed")
        status.close()
