"""generation/stopping.py: where an answer ends, on token ids as they come and on decoded text."""

from __future__ import annotations

import pytest

from crossmodal_rag.generation.stopping import cut_text, stop_ids

# A toy vocabulary: each token is a piece of text, as a tokenizer's pieces are (leading spaces kept).
PIECES = ["It", " was", " built", " in", " 1825", ".", " It", " crosses", "\n", "3", ".5", " e", ".g", ".,",
          " ok", "!", "\"", " Next", "?", ")"]


def _decode(ids: list[int] | tuple[int, ...]) -> str:
    return "".join(PIECES[i] for i in ids)


def _ids(*pieces: str) -> list[int]:
    return [PIECES.index(p) for p in pieces]


@pytest.mark.parametrize(("pieces", "expected"), [
    (("It", " was", " built", " in", " 1825", ".", " It", " crosses"), "It was built in 1825."),
    (("3", ".5", " e", ".g", ".,", " ok", "!", " Next"), "3.5 e.g., ok!"),
    (("It", " was", "\n", " Next"), "It was"),
    (("It", " was", " ok", "!", "\"", " Next"), "It was ok!\""),
    (("It", " was", " ok", "?", ")", " Next", "?"), "It was ok?)"),
    (("\n", "It", " was"), "\nIt was"),  # a line break before any text does not end the answer
])
def test_token_rule_and_text_rule_agree(pieces: tuple[str, ...], expected: str) -> None:
    ids = _ids(*pieces)
    kept = list(stop_ids(iter(ids), _decode, "sentence"))
    assert _decode(kept) == expected
    assert cut_text(_decode(ids), "sentence") == expected.strip()


def test_eos_keeps_everything_and_the_source_is_closed_when_the_rule_ends_it() -> None:
    ids = _ids("It", " was", " built", " in", " 1825", ".", " It", " crosses")
    assert list(stop_ids(iter(ids), _decode, "eos")) == ids
    assert cut_text(_decode(ids), "eos") == _decode(ids)
    closed = []

    def source():
        try:
            yield from ids
        finally:
            closed.append(True)

    assert _decode(list(stop_ids(source(), _decode, "sentence"))) == "It was built in 1825."
    assert closed == [True]
