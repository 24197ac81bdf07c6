"""Query arithmetic: several texts (and an image) combined into one query vector.

Syntax of a text query (as rclip offers)::

    "a cat" + "snow" - "indoors"        quoted terms, added or subtracted
    cat + snow - indoors                bare terms (operators need spaces around them)
    2:cat + 0.5:"red car"               weights (from MIN_WEIGHT to MAX_WEIGHT; 1e-2:cat too)

A weight written as a product (``2*"coffee"``, ``coffee * 2``) is refused with a
:class:`~crossmodal_rag.errors.QueryError` naming the form above. The same arithmetic works in a
collection's text space (:meth:`~crossmodal_rag.search.text_space.TextSpace.embed_query`).

The query vector is the L2-normalised weighted sum of the terms' unit embeddings (a subtracted
term has a negative weight). A weight outside the range (``0:cat``, ``1e200:cat``, a 400-digit
number) is a :class:`~crossmodal_rag.errors.QueryError` naming it, as is a query vector that
is not finite or is zero: a query is never silently turned into a vector that finds nothing. A query without operators or weights is a single plain term, so
"t-shirt" and "rock-n-roll" stay what they are. With an image, the image is one more term of
weight 1 (``--image a.jpg --plus "at night"``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..errors import ImageDecodeError, QueryError
from ..ingestion.images import DEFAULT_MAX_IMAGE_PIXELS, load_image

if TYPE_CHECKING:
    from ..encoders import ClipEncoder

__all__ = ["MAX_QUERY_CHARS", "MAX_QUERY_TERMS", "MAX_TERM_CHARS", "MAX_WEIGHT", "MIN_WEIGHT", "QueryTerm",
           "bad_character", "check_query_vectors", "clip_term", "combine", "embed_query", "parse_query"]

logger = logging.getLogger(__name__)

#: Longest text query accepted (the encoder reads 77 tokens; this is far beyond); a longer one is
#: refused before it is parsed.
MAX_QUERY_CHARS = 16_384
#: Most terms one query may add or subtract (each is one encoder pass).
MAX_QUERY_TERMS = 32
#: Each query term is cut to this many characters (CLIP reads 77 tokens; this is far beyond). A
#: whole query over :data:`MAX_QUERY_CHARS` is refused before parsing.
MAX_TERM_CHARS = 4096

# The scanner reads a query once, left to right; the patterns are possessive, so no input makes
# them backtrack (linear time on any input).
_SPACE = re.compile(r"\s*+")
_PLAIN = re.compile(r'[^"\s]++')  # a run of characters that cannot start a quote or an operator
_WEIGHT = re.compile(r"((?:[0-9]++(?:\.[0-9]*+)?+|\.[0-9]++)(?:[eE][-+]?+[0-9]++)?+)\s*+:\s*+")
#: The range of a term's weight (``2:cat``): the terms' unit vectors are summed in float64, and
#: weights in this range keep the sum finite and its direction meaningful.
#: A number multiplying a word or a quoted term at a term's start (``2*coffee``, ``2 * "a cup"``).
_TIMES_HEAD = re.compile(r'(?:[0-9]++(?:\.[0-9]*+)?+|\.[0-9]++)\s*+[*\u00d7]\s*+(?:"|[^\W\d_])')
MIN_WEIGHT = 1e-3
MAX_WEIGHT = 1e3


@dataclass(frozen=True)
class QueryTerm:
    text: str
    weight: float = 1.0  # negative for a subtracted term


def bad_character(text: str) -> tuple[int, str] | None:
    """(position, description) of the first character no path, database or encoder can take (a
    NUL, a lone surrogate), or None."""
    nul = text.find("\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        if nul < 0 or e.start < nul:
            return e.start, "a lone surrogate (not valid Unicode)"
    return (nul, "a NUL character") if nul >= 0 else None


def parse_query(query: str, *, max_chars: int | None = MAX_QUERY_CHARS) -> list[QueryTerm]:
    """Split a text query into weighted terms (see the module docstring).

    Queries of more than ``max_chars`` characters (:data:`MAX_QUERY_CHARS`; None: no limit) or
    :data:`MAX_QUERY_TERMS` terms, and queries with a NUL or a lone surrogate, raise
    :class:`QueryError`. Parsing is one pass, linear in the length of the query.
    """
    if not isinstance(query, str):
        raise QueryError(f"a query is text, got {type(query).__name__}")
    if max_chars is not None and len(query) > max_chars:
        raise QueryError(f"query of {len(query)} characters is longer than the limit of {max_chars} "
                         "(MAX_QUERY_CHARS); shorten it")
    bad = bad_character(query)
    if bad is not None:
        raise QueryError(f"query contains {bad[1]} at position {bad[0]}; remove it")
    text = query.strip()
    if not text:
        raise QueryError("empty query: give a text to search for, or an image with --image")
    if _dangling_operator(text):
        raise QueryError(f"query {_short(query)} starts or ends with an operator; write \"a cat\" + \"snow\"")
    terms = []
    for sign, raw in _split(text):
        if _multiplied(raw):
            raise QueryError(f"query term {_short(raw)} multiplies by a number, which query arithmetic does not "
                             "read; write a weight as 2:coffee or 2:\"a cup of coffee\", and combine terms as "
                             "a + b - c (spaces around + and -)")
        weight, body = _weighted(raw)
        body = " ".join(body.split())
        if not body:
            raise QueryError(f"query {_short(query)} has an empty term; write terms like \"a cat\" + \"snow\"")
        terms.append(QueryTerm(body, sign * weight))
    return terms


def _multiplied(raw: str) -> bool:
    """``2*coffee``, ``2 * "a cup"``, ``"a cup"*2``, ``coffee × 2``: a weight written as a product
    (a number times a word or a quoted term; ``2*4 lumber`` is a plain term)."""
    if _TIMES_HEAD.match(raw):
        return True
    stripped = raw.rstrip()
    rest = stripped.rstrip("0123456789.").rstrip()
    if rest == stripped or not rest.endswith(("*", "\u00d7")):
        return False
    before = rest[:-1].rstrip()
    return bool(before) and (before[-1] == '"' or before[-1].isalpha())


def _short(query: str, shown: int = 200) -> str:
    return repr(query) if len(query) <= shown else repr(query[:shown]) + f"... ({len(query)} characters)"


def _dangling_operator(text: str) -> bool:
    """``+ x`` or ``x -``: an operator with whitespace on its inner side at either end (a query
    that opens with a quote is left alone, as before)."""
    if len(text) < 2 or text.startswith('"'):
        return False
    return (text[0] in "+-" and text[1].isspace()) or (text[-1] in "+-" and text[-2].isspace())


def _split(text: str) -> list[tuple[int, str]]:
    """(sign, raw term) at each `` + ``/`` - `` (whitespace on both sides) outside ``"quoted"``
    runs. ``text`` is stripped; each whitespace run and quoted run is scanned once. More than
    :data:`MAX_QUERY_TERMS` terms raise :class:`QueryError` as soon as they are seen."""
    parts: list[tuple[int, str]] = []
    sign, start, i, n = 1, 0, 0, len(text)
    while i < n:
        if text[i] == '"':
            close = text.find('"', i + 1)  # an unclosed quote is an ordinary character
            i = close + 1 if close >= 0 else i + 1
        elif text[i].isspace():
            j = _SPACE.match(text, i).end()
            if j + 1 < n and text[j] in "+-" and text[j + 1].isspace():
                parts.append((sign, text[start:i]))
                if len(parts) >= MAX_QUERY_TERMS:
                    raise QueryError(f"query has more than {MAX_QUERY_TERMS} terms (MAX_QUERY_TERMS); "
                                     "combine fewer texts")
                sign = 1 if text[j] == "+" else -1
                start = _SPACE.match(text, j + 1).end()
                j = start
            i = j
        else:
            i = _PLAIN.match(text, i).end()
    parts.append((sign, text[start:]))
    return parts


def _weighted(raw: str) -> tuple[float, str]:
    """``2:cat`` -> (2.0, "cat"); ``"red car"`` -> (1.0, "red car"); anything else is the body."""
    m = _WEIGHT.match(raw)
    weight, body = (_weight(m.group(1)), raw[m.end():]) if m and m.end() < len(raw) else (1.0, raw)
    if len(body) >= 2 and body[0] == '"' and body.find('"', 1) == len(body) - 1:
        body = body[1:-1]
    return weight, body


def _weight(text: str) -> float:
    """A weight's text -> its value, refused (QueryError naming it) outside the range."""
    shown = text if len(text) <= 24 else f"{text[:12]}...{text[-4:]} ({len(text)} characters)"
    value = float(text)  # digits, a point and an exponent only: always parses (inf when huge)
    if not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise QueryError(f"query weight {shown} is outside the allowed range {MIN_WEIGHT:g} to "
                         f"{MAX_WEIGHT:g} (write e.g. 2:cat + 0.5:dog)")
    return value


def check_query_vectors(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` ``(Q, D)`` as float32, refused (QueryError) when a row is not finite or is
    zero: such a vector scores every item NaN or 0, and would find nothing."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    if vectors.ndim != 2:
        raise QueryError(f"query vectors must be a (Q, D) array, got shape {vectors.shape}")
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        raise QueryError(f"query vector {int(np.flatnonzero(~finite)[0])} holds NaN or infinity; "
                         "embed the query again (a query's weights are limited to "
                         f"{MIN_WEIGHT:g}..{MAX_WEIGHT:g})")
    zero = ~(np.abs(vectors).max(axis=1, initial=0.0) > 0)
    if zero.any():
        raise QueryError(f"query vector {int(np.flatnonzero(zero)[0])} is zero: it matches nothing; "
                         "give a query that says something")
    return vectors


#: A weighted sum shorter than this x the sum of |weights| counts as cancelled.
CANCEL_TOLERANCE = 1e-3


def combine(vectors: np.ndarray, weights: list[float]) -> np.ndarray:
    """Normalised weighted sum of unit vectors ``(T, D)`` -> ``(D,)`` float32."""
    v = (np.asarray(weights, dtype=np.float64)[:, None] * vectors.astype(np.float64)).sum(0)
    norm = np.linalg.norm(v)
    if not np.isfinite(norm):
        raise QueryError("the query terms' weighted sum is not finite; use weights from "
                         f"{MIN_WEIGHT:g} to {MAX_WEIGHT:g}")
    # relative to the weights: terms that cancel leave float32 noise (~1e-6 per component, from
    # encoding the same text in different batch positions), whose direction means nothing
    if norm < CANCEL_TOLERANCE * float(np.abs(np.asarray(weights, dtype=np.float64)).sum()):
        raise QueryError("the query terms cancel each other out; change the terms or their weights")
    return (v / norm).astype(np.float32)


def clip_term(text: str, get_encoder: Callable[[], ClipEncoder]) -> str:
    """``text`` cut to :data:`MAX_TERM_CHARS` characters, with a warning when it was longer
    (``get_encoder`` is called only then, to name the encoder's token limit)."""
    if len(text) > MAX_TERM_CHARS:
        logger.warning("query of %d characters truncated to %d (the encoder reads at most %d "
                       "tokens)", len(text), MAX_TERM_CHARS, get_encoder().max_text_tokens)
        return text[:MAX_TERM_CHARS]
    return text


def embed_query(
    get_encoder: Callable[[], ClipEncoder], text: str | None = None,
    image: str | Path | Image.Image | None = None, *, plus: list[str] | None = None,
    minus: list[str] | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """A query embedding ``(D,)`` from a text, an image (path or PIL image), or both.

    Text queries support arithmetic (see the module docstring); ``plus``/``minus`` add or subtract
    more texts. The result is the normalised weighted sum of the terms' embeddings.
    ``get_encoder`` gives the encoder when it is first needed, so a query refused while it is
    read never loads a model.
    """
    texts: list[str] = []
    weights: list[float] = []
    if text is not None:
        for term in parse_query(text):
            texts.append(clip_term(term.text, get_encoder))
            weights.append(term.weight)
    for extra, sign in ((plus or [], 1.0), (minus or [], -1.0)):
        for t in extra:
            if not t or not str(t).strip():
                raise QueryError("empty --plus/--minus text")
            texts.append(clip_term(" ".join(str(t).split()), get_encoder))
            weights.append(sign)
    vectors = []
    if image is not None:
        if isinstance(image, Image.Image):
            pil = image.convert("RGB")
        else:
            try:
                pil = load_image(image, max_pixels=max_image_pixels).image
            except ImageDecodeError as e:
                raise QueryError(f"query image {e.path}: {e.reason}") from e
        vectors.append(get_encoder().encode_images([pil]))
        weights.insert(0, 1.0)
    elif text is None:
        raise QueryError("empty query: give a text to search for, or an image with --image")
    if texts:
        vectors.append(get_encoder().encode_texts(texts))
    stacked = np.concatenate(vectors)
    if len(weights) == 1 and weights[0] == 1.0:
        return check_query_vectors(stacked[:1])[0]
    return check_query_vectors(combine(stacked, weights)[None])[0]
