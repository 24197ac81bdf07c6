"""What a search asks for and what it answers: :class:`SearchRequest` in, :class:`SearchResult` out.

One request carries everything a front end can ask (the query: a text with arithmetic, an
image, a precomputed vector, ``plus``/``minus`` texts; the target; the mode; ``k``; the
``where`` filters; ``min_score``; the approximate-index knobs), and every front end (the CLI,
the REST API, the RAG pipeline, chat/recommend/write, the demo) hands one to
:meth:`Collection.search <crossmodal_rag.collection.Collection.search>`. The modes and their
default are declared here, once (:data:`MODES`, :data:`DEFAULT_MODE`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, overload

import numpy as np

from ..errors import QueryError
from .hits import Hit

if TYPE_CHECKING:
    from PIL import Image

    from ..store.ann import SearchParams

__all__ = ["DEFAULT_MODE", "MODES", "TARGETS", "Mode", "SearchRequest", "SearchResult", "Target", "check_k",
           "check_mode", "check_target"]

#: How a search ranks: ``dense`` (embeddings: CLIP, or the text space for texts), ``keyword``
#: (BM25 over captions, passages and OCR text), ``hybrid`` (both, fused by reciprocal rank) or
#: ``auto`` (hybrid for a text query in a collection with texts in its keyword index, else dense).
Mode = Literal["auto", "dense", "keyword", "hybrid"]
MODES: tuple[str, ...] = get_args(Mode)
#: The mode of every front end and of a library caller that names none (CLI, REST, RagSettings).
DEFAULT_MODE: Mode = "auto"

#: What a search returns: images, texts (captions, passages, OCR text) or all.
Target = Literal["images", "texts", "all"]
TARGETS: tuple[str, ...] = get_args(Target)


def check_target(target: str) -> Target:
    if target not in TARGETS:
        raise QueryError(f"unknown search target {target!r}; choose one of {', '.join(TARGETS)}")
    return target  # type: ignore[return-value]


def check_mode(mode: str | None) -> Mode:
    """``mode`` checked against :data:`MODES` (None: :data:`DEFAULT_MODE`)."""
    if mode is None:
        return DEFAULT_MODE
    if mode not in MODES:
        raise QueryError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise QueryError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _strings(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """One string or several, as a tuple (a single string is one item, not its characters)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class SearchRequest:
    """One search. Give a ``text``, an ``image``, a ``vector``, or a text and an image together;
    the rest has defaults. ``where``, ``plus`` and ``minus`` accept one string or several.

    Checked when made: ``target``, ``mode`` and ``k`` (a :class:`~crossmodal_rag.errors.QueryError`
    naming the valid choices); the query itself is checked when it is searched.
    """

    text: str | None = None  # a text query; arithmetic allowed ('"a cat" + snow - indoors', '2:cat')
    image: str | Path | Image.Image | None = None  # an image query: a path or a PIL image
    vector: np.ndarray | None = None  # a query embedding (D,) in CLIP's space, used instead of embedding
    # text/image (which then still say what the query is: keyword ranking reads the text,
    # ``min_score="auto"`` whether the query is an image)
    plus: tuple[str, ...] = ()  # texts added to the query vector
    minus: tuple[str, ...] = ()  # texts subtracted from it
    target: Target = "images"  # what to return: images | texts | all
    mode: Mode = DEFAULT_MODE  # auto | dense | keyword | hybrid (see MODES)
    k: int = 10  # hits wanted
    where: tuple[str, ...] = ()  # metadata filters, ANDed ('width>=1000', 'caption~dog'; see search.filters)
    min_score: float | str | None = None  # drop hits below this dense score; "auto": calibrated; None: keep all
    params: SearchParams | None = None  # nprobe / ef_search / rerank for this search (None: the stored ones)
    text_space: bool = True  # a text query for texts goes to the collection's text space when it has one
    cut: bool = True  # drop hits below min_score; False: keep them and only report the threshold (RAG
    # abstains on it and shows the nearest sources)
    dense_scores: bool = False  # every hit's ``score`` is its dense cosine, in the mode's order (RAG priors)

    def __post_init__(self) -> None:
        for name in ("where", "plus", "minus"):
            object.__setattr__(self, name, _strings(getattr(self, name)))
        check_target(self.target)
        object.__setattr__(self, "mode", check_mode(self.mode))
        object.__setattr__(self, "k", check_k(self.k))

    @classmethod
    def of(cls, request: SearchRequest | str | None = None, **changes: Any) -> SearchRequest:
        """``request`` (a :class:`SearchRequest`, a text query, or None) with ``changes`` applied:
        ``SearchRequest.of("a cat", k=5)``. An unknown keyword is refused naming the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown search option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        if isinstance(request, SearchRequest):
            if not changes:
                return request
            return cls(**{**{f.name: getattr(request, f.name) for f in fields(cls)}, **changes})
        if request is not None and not isinstance(request, str):
            raise TypeError(f"search takes a SearchRequest or a text query, got {type(request).__name__}")
        if request is not None:
            changes = {"text": request, **changes}
        return cls(**changes)

    @property
    def has_text(self) -> bool:
        """The request holds a non-blank text query."""
        return self.text is not None and bool(self.text.strip())


@dataclass(frozen=True)
class SearchResult(Sequence[Hit]):
    """What a search found: its hits, best first, and how it ranked them.

    A result is a sequence of its hits: ``for hit in coll.search("a cat")``, ``result[0]``,
    ``len(result)``; ``result.hits`` is the tuple itself.
    """

    hits: tuple[Hit, ...]  # best first, ranks 1..n
    mode: str  # the mode that ran: dense | keyword | hybrid (auto resolved)
    threshold: float | None = None  # min_score as a number in the top hit's space (None: none given)
    vector: np.ndarray | None = None  # the CLIP query embedding (D,) when the search made one
    reason: str | None = None  # why this mode ran, one line ("auto: hybrid: keyword weight 0.6 for codes ...")

    def __len__(self) -> int:
        return len(self.hits)

    def __iter__(self) -> Iterator[Hit]:
        return iter(self.hits)

    @overload
    def __getitem__(self, i: int) -> Hit: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[Hit, ...]: ...

    def __getitem__(self, i: int | slice) -> Hit | tuple[Hit, ...]:
        return self.hits[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SearchResult):
            return self.hits == other.hits and self.mode == other.mode and self.threshold == other.threshold
        if isinstance(other, list | tuple):  # a plain list of hits compares by its hits
            return list(self.hits) == list(other)
        return NotImplemented

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "mode_reason": self.reason, "threshold": self.threshold,
                "results": [h.to_dict() for h in self.hits]}
