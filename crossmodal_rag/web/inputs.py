"""Request inputs validated at the boundary, before any parser sees them.

Every string a route takes is checked here before it reaches the query or ``where`` parsers, an
encoder or SQLite: a bounded length, no NUL, valid Unicode (a lone surrogate from a JSON ``\\ud800``
escape is refused); lists of strings are bounded in count. Item ids are bounded by what SQLite can
hold (``0 <= id < 2**63``, declared in the OpenAPI schema); ``min_score`` is ``auto`` or a finite
number. A failed check raises :class:`InputError`, answered 422 naming the field and the limit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["MAX_FILENAME_CHARS", "MAX_ID", "MAX_SCORE_CHARS", "InputError", "check_min_score", "check_text",
           "check_texts"]

MAX_ID = 2**63 - 1  # SQLite's INTEGER; a larger id cannot name an item
MAX_SCORE_CHARS = 32  # "auto" or a number
MAX_FILENAME_CHARS = 1024  # an upload's file name (only echoed back)


class InputError(ValueError):
    """A request field is unusable; ``str()`` names the field and what is wrong (answered 422)."""


def check_text(value: str, field: str, max_chars: int) -> str:
    """``value`` unchanged if it has at most ``max_chars`` characters, no NUL and is valid Unicode."""
    if len(value) > max_chars:
        raise InputError(f"{field} is {len(value)} characters; at most {max_chars} are allowed")
    if "\x00" in value:
        raise InputError(f"{field} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{field} is not valid Unicode (it holds a lone surrogate)") from None
    return value


def check_texts(values: Sequence[str], field: str, max_items: int, max_chars: int) -> list[str]:
    """Each of ``values`` checked with :func:`check_text`, and at most ``max_items`` of them."""
    if len(values) > max_items:
        raise InputError(f"{field} is given {len(values)} times; at most {max_items} are allowed")
    return [check_text(v, f"{field}[{i}]" if len(values) > 1 else field, max_chars) for i, v in enumerate(values)]


def check_min_score(value: str | float | None, field: str = "min_score") -> str | float | None:
    """``auto``, a finite number (as given) or None; anything else is an :class:`InputError`."""
    if value is None:
        return None
    if isinstance(value, str):
        check_text(value, field, MAX_SCORE_CHARS)
        if value.strip().lower() in ("", "auto"):
            return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{field} must be a number or 'auto', got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{field} must be a finite number or 'auto', got {value!r}")
    return value
