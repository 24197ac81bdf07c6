"""The spans a short answer may copy (generation/evidence.py) and the source bias the copy
constraint adds to them (constrained.SpanConstraint.bias_steps), against brute-force oracles on
a character vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from crossmodal_rag.generation.constrained import NO_START, SpanConstraint, span_windows
from crossmodal_rag.generation.evidence import copy_sources, question_words, segments, without_words

END = 0


def chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def answers_with_bias(c: SpanConstraint, depth: int) -> dict[str, float]:
    """Every answer the constraint lets through within ``depth`` tokens, with the bias its steps
    added up to (the mask applied to zero log-probabilities, summed along the way)."""
    done: dict[str, float] = {}
    frontier = [("", c, 0.0)]
    for _ in range(depth):
        nxt = []
        for text, state, bias in frontier:
            m = state.mask(np.zeros(128))
            for tok in np.flatnonzero(np.isfinite(m)).tolist():
                if tok == END:
                    done[text] = bias + m[END]
                    continue
                if tok == ord("\n"):
                    continue
                child = state.restart()
                for t in [*chars(text), tok]:
                    child.advance(t)
                nxt.append((text + chr(tok), child, bias + m[tok]))
        frontier = nxt
    return done


def test_an_answer_carries_the_bias_of_the_best_source_it_is_a_span_of_at_every_step() -> None:
    # digits shared by both sources: the old first-token bias let "1718" through unpenalised
    sources, weights = ["1825", "1718 x"], [0.0, -3.0]
    got = answers_with_bias(SpanConstraint.build(sources, chars, [END], weights=weights), 7)
    assert got  # oracle: the highest weight among the sources holding the answer (as a span)
    for answer, bias in got.items():
        want = max(w for s, w in zip(sources, weights, strict=True) if answer.strip().lower() in s.lower())
        assert bias == pytest.approx(want), answer
    assert got["1825"] == 0.0 and got["1718"] == -3.0 and got["18"] == 0.0


def test_spans_never_start_at_a_function_word() -> None:
    text = "It is sold in Brend and in the market of Lune"
    got = {bytes(w).decode().strip().split()[0].lower() for w in span_windows([text], lambda t: list(t.encode()))}
    words = {w.lower() for w in text.split()}
    assert got == words - NO_START and "brend" in got and "in" not in got


def test_segments_end_at_sentences_ocr_lines_and_caption_separators() -> None:
    assert segments("The mill was built in 1642. It grinds rye.") == ["The mill was built in 1642.", "It grinds rye."]
    assert segments("text in the image a.jpg: Error 0x8A / Cannot reach mysql") == [
        "text in the image a.jpg: Error 0x8A", "Cannot reach mysql"]
    assert segments("a cat on a mat; a striped cat | a kitten\nline two") == [
        "a cat on a mat", "a striped cat", "a kitten", "line two"]
    assert segments("costs 5.14 EUR") == ["costs 5.14 EUR"]  # a decimal point ends nothing


def test_pieces_leave_out_the_question_words_and_the_function_words_at_their_ends() -> None:
    q = "What do traders sell at the Shur Market besides walnuts?"
    assert question_words(q) == {"traders", "sell", "shur", "market", "besides", "walnuts"}
    assert without_words("At the Shur Market traders sell grain and walnuts.", question_words(q)) == ["grain"]
    tall = question_words("How tall is the Stugain Lighthouse, in metres?")
    assert without_words("The Stugain Lighthouse is 2246 metres tall.", tall) == ["2246"]
    assert without_words("Phone +49 819 398111", question_words("What is the phone number?")) == ["+49 819 398111"]


def test_copy_sources_weights_every_piece_by_its_source_prior() -> None:
    texts = ["The Thesi Bridge was completed in 1825. It is built of basalt.", "The Fudrik Bridge was completed in 1718."]
    spans, weights = copy_sources(texts, [-0.1, -2.5], "When was the Thesi Bridge completed?", prior_weight=2.0)
    # "when" asks for a date: word runs weigh TYPE_WEIGHT (-2) less
    assert dict(zip(spans, weights, strict=True)) == pytest.approx({"1825.": -0.2, "built of basalt.": -2.2,
                                                                    "Fudrik": -7.0, "1718.": -5.0})
    # a source made only of the question's words keeps its segments; no question: the segments,
    # without function words at their ends
    assert copy_sources(["Thesi Bridge"], [0.0], "Thesi Bridge?") == (("Thesi Bridge",), (0.0,))
    assert copy_sources(texts[:1], [0.0])[0] == ("Thesi Bridge was completed in 1825.", "built of basalt.")


def test_the_whole_answers_carry_their_own_weight_from_the_settings() -> None:
    from crossmodal_rag.generation import GenerationSettings

    s = GenerationSettings(copy_from=("ab", "cd"), copy_whole=("no",), copy_weights=(0.0, -1.0), copy_whole_weight=-2.0)
    got = answers_with_bias(SpanConstraint.of(s, chars, [END]), 4)
    assert got["no"] == got[" no"] == -2.0 and got["ab"] == 0.0 and got["cd"] == -1.0 and "n" not in got
    assert SpanConstraint.of(GenerationSettings(), chars, [END]) is None  # free decoding
    unweighted = SpanConstraint.of(GenerationSettings(copy_from=("ab",), copy_whole=("no",)), chars, [END])
    assert set(answers_with_bias(unweighted, 4).values()) == {0.0}


def test_a_question_asking_for_a_number_or_a_name_weights_the_other_kind_down() -> None:
    from crossmodal_rag.generation.evidence import TYPE_WEIGHT, answer_type, typed_pieces

    kinds = {"How high is Mount Bapeirk in metres?": "number", "How many rows of coins are there?": "number",
             "In which year was she born?": "number", "Where are the workshops?": "name",
             "In which town is the school?": "name", "Who discovered the comet?": "name",
             "When was the bridge completed?": "number", "In which month is it eaten?": "number",
             "What did the ship carry?": None, "Which instrument is played?": None}
    assert {q: answer_type(q) for q in kinds} == kinds
    assert typed_pieces("founded in 1737 by Ada", "name") == [("founded", True), ("1737", False), ("Ada", True)]
    assert typed_pieces("four rows of coins", "number") == [("four", True), ("rows of coins", False)]
    assert typed_pieces("founded in 1737", None) == [("founded in 1737", True)]
    assert typed_pieces("eaten on the first day of August", "number") == [("eaten on the first day", False),
                                                                          ("August", True)]
    spans, weights = copy_sources(["It rises 8033 metres. It was climbed in 1721."], [0.0], "How high is it in metres?")
    assert dict(zip(spans, weights, strict=True)) == {"rises": TYPE_WEIGHT, "8033": 0.0, "climbed": TYPE_WEIGHT,
                                                      "1721.": 0.0}
