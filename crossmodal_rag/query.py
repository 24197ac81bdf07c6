"""Query arithmetic: several texts (and an image) combined into one query vector.

Syntax of a text query (as rclip offers)::

    "a cat" + "snow" - "indoors"        quoted terms, added or subtracted
    cat + snow - indoors                bare terms (operators need spaces around them)
    2:cat + 0.5:"red car"               weights

The query vector is the L2-normalised weighted sum of the terms' unit embeddings (a subtracted
term has a negative weight). A query without operators or weights is a single plain term, so
"t-shirt" and "rock-n-roll" stay what they are. With an image, the image is one more term of
weight 1 (``--image a.jpg --plus "at night"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import QueryError

__all__ = ["QueryTerm", "combine", "parse_query"]

_TERM = re.compile(r'\s*(?:(?P<w>[0-9]*\.?[0-9]+)\s*:\s*)?(?:"(?P<q>[^"]*)"|(?P<b>.+?))\s*$', re.S)
_SPLIT = re.compile(r'("[^"]*")|\s+([+-])\s+')


@dataclass(frozen=True)
class QueryTerm:
    text: str
    weight: float = 1.0  # negative for a subtracted term


def parse_query(query: str) -> list[QueryTerm]:
    """Split a text query into weighted terms (see the module docstring)."""
    if query is None or not str(query).strip():
        raise QueryError("empty query: give a text to search for, or an image with --image")
    parts: list[tuple[int, str]] = []  # (sign, raw text)
    sign, buf, pos = 1, [], 0
    text = str(query).strip()
    if re.search(r'(^[+-]\s)|(\s[+-]$)', text) and not text.startswith('"'):
        raise QueryError(f"query {query!r} starts or ends with an operator; write \"a cat\" + \"snow\"")
    for m in _SPLIT.finditer(text):
        if m.group(1):  # a quoted run: keep as it is
            continue
        buf.append(text[pos : m.start()])
        parts.append((sign, "".join(buf)))
        buf, pos = [], m.end()
        sign = 1 if m.group(2) == "+" else -1
    buf.append(text[pos:])
    parts.append((sign, "".join(buf)))
    terms = []
    for sign, raw in parts:
        m = _TERM.match(raw)
        body = (m.group("q") if m and m.group("q") is not None else m.group("b") if m else raw) or ""
        weight = float(m.group("w")) if m and m.group("w") else 1.0
        body = " ".join(body.split())
        if not body:
            raise QueryError(f"query {query!r} has an empty term; write terms like \"a cat\" + \"snow\"")
        terms.append(QueryTerm(body, sign * weight))
    return terms


def combine(vectors: np.ndarray, weights: list[float]) -> np.ndarray:
    """Normalised weighted sum of unit vectors ``(T, D)`` -> ``(D,)`` float32."""
    v = (np.asarray(weights, dtype=np.float64)[:, None] * vectors.astype(np.float64)).sum(0)
    norm = np.linalg.norm(v)
    if norm < 1e-9:
        raise QueryError("the query terms cancel each other out; change the terms or their weights")
    return (v / norm).astype(np.float32)
