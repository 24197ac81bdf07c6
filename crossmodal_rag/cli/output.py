"""What the command line prints: every control character in text output escaped, JSON with
non-ASCII text kept, TSV fields on one line with backslashes doubled."""

from __future__ import annotations

import json
import logging
from typing import Any

# C0 controls, DEL, C1 controls and the bidirectional overrides and isolates: a caption, a file
# name or a generated answer holding them could move the cursor, recolour or rewrite the
# terminal, or reorder what is shown. Text output shows them as \x1b, \r, \u202e, ...
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
_NAMED = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}
_ESCAPES = {c: _NAMED.get(c, f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}") for c in _CONTROLS}
_ESCAPES_BUT_NEWLINE = {c: e for c, e in _ESCAPES.items() if c != 0x0A}
# JSON escapes C0 itself; these others are written as \uXXXX escapes (the same JSON string).
_JSON_ESCAPES = {c: f"\\u{c:04x}" for c in _CONTROLS if c >= 0x7F}


def safe(value: Any, *, newlines: bool = False) -> str:
    """``value`` as text for a terminal: every control character escaped (but newlines, if asked)."""
    text = "" if value is None else str(value)
    return text.translate(_ESCAPES_BUT_NEWLINE if newlines else _ESCAPES)


def to_json(value: Any) -> str:
    """Indented JSON, non-ASCII text kept, C1 and bidi controls escaped."""
    return json.dumps(value, indent=2, ensure_ascii=False).translate(_JSON_ESCAPES)


class EscapingFormatter(logging.Formatter):
    """Log lines (which name files and rows) with control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return safe(super().format(record), newlines=True)


def tsv_field(value: Any) -> str:
    """One TSV field: backslashes doubled (``\\`` -> ``\\\\``, so that an escape such as ``\\t``
    always stands for the character it names), control characters (tabs and newlines too)
    escaped, other runs of whitespace as one space."""
    text = "" if value is None else str(value)
    return " ".join(safe(text.replace("\\", "\\\\")).split())
