"""Where an answer ends: at the end token (``stop="eos"``), or also at its first sentence end or
line break (``stop="sentence"``), so that a short extractive answer is not followed by an
invented second sentence, a base model does not write the next "Question:", and an answer is not
cut mid-sentence by ``max_new_tokens`` when its first sentence fits.

The rule reads token texts as they are decoded: the answer ends *before* a token that starts with
white space when the text so far ends a sentence (``.``, ``!`` or ``?``, maybe followed by a
closing quote or bracket), and before a token holding a line break once the answer has text. So
"3.5" and "e.g.," go on, "in 1825. It" stops after "1825.". Every runtime and mode applies the
same rule (llama.cpp and rag-token on token ids as they come; transformers' batched ``generate``
on its decoded text with :func:`cut_text`, which agrees).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence

__all__ = ["STOPS", "SentenceStop", "cut_text", "stop_ids"]

#: What may end an answer (``GenerationSettings.stop``).
STOPS = ("eos", "sentence")
_CLOSERS = "\"')]}»”’"
_END = re.compile(r"\n|[.!?][" + re.escape(_CLOSERS) + r"]*(?=\s)")


class SentenceStop:
    """Feed it each decoded token; :meth:`stops` says whether the answer ends before that token.
    ``decode`` turns the answer's token ids into text (a token's own text is what it adds: single
    tokens decoded alone lose their leading space in SentencePiece vocabularies)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""

    def stops(self, token: int) -> bool:
        """True: the answer ends before ``token`` (which is not part of it); else it is taken."""
        new = self.decode([*self.ids, int(token)])
        kept = self.text.rstrip("\ufffd")  # an incomplete UTF-8 tail may become a character now
        piece = new[len(kept):] if new.startswith(kept) else new
        if self.text.strip():
            if "\n" in piece:
                return True
            if piece[:1].isspace() and self.text.rstrip(_CLOSERS).endswith((".", "!", "?")):
                return True
        self.ids.append(int(token))
        self.text = new
        return False


def stop_ids(ids: Iterator[int], decode: Callable[[Sequence[int]], str], stop: str) -> Iterator[int]:
    """``ids`` until the answer ends by ``stop`` (the source is closed when the rule ends it)."""
    if stop != "sentence":
        yield from ids
        return
    rule = SentenceStop(decode)
    try:
        for token in ids:
            if rule.stops(token):
                return
            yield token
    finally:
        close = getattr(ids, "close", None)
        if close is not None:
            close()


def cut_text(text: str, stop: str) -> str:
    """``text`` (an answer decoded whole) cut where :class:`SentenceStop` would have ended it."""
    if stop != "sentence":
        return text
    lead = len(text) - len(text.lstrip())
    found = _END.search(text, lead)
    return (text[: found.end()] if found and found.group() != "\n" else text[: found.start()] if found
            else text).strip()
