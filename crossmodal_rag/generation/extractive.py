"""Short answers copied from the sources, and citations that point at them.

Small local LMs answer a short-answer question ("When was the bridge completed?") best when they
are asked to copy the answer from the context and are held to it. RAG does that for every question
this module calls short-answer (:func:`is_short_answer_question`; ``RagSettings.answer_style``):

1. the prompt is :data:`EXTRACTIVE_TEMPLATE` (chat models: :data:`EXTRACTIVE_SYSTEM` as the system
   message and the question as the user message), which also says what to write when the sources
   do not hold the answer (:data:`NOT_IN_SOURCES`);
2. decoding copies a span of the sources or that phrase
   (:class:`~crossmodal_rag.generation.constrained.SpanConstraint`) and stops at a sentence end;
3. :func:`clean_answer` strips what small models put around the span ("The answer is:", a final
   full stop).

:func:`cite` then makes the answer's ``[n]`` citations point at sources that exist: numbers outside
the listed sources are dropped, and an answer without any gets the number of the source that holds
it (else the one with the highest posterior).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

__all__ = [
    "ANSWER_STYLES",
    "CONVERSATION_HEADER",
    "EXAMPLES_MIN_CONTEXT",
    "EXTRACTIVE_SHORT_TEMPLATE",
    "EXTRACTIVE_SYSTEM",
    "EXTRACTIVE_TEMPLATE",
    "NOT_IN_SOURCES",
    "abstain_spans",
    "citations",
    "cite",
    "clean_answer",
    "current_question",
    "extractive_messages",
    "is_short_answer_question",
    "model_answer_style",
]

#: RagSettings.answer_style: model (the generator's measured style, :func:`model_answer_style`),
#: auto (extractive for short-answer questions), extract (every question), free (never).
ANSWER_STYLES = ("model", "auto", "extract", "free")
#: How a chat prompt's question slot starts (apps/chat.py): the recent turns, then ``User: MESSAGE``.
CONVERSATION_HEADER = "Conversation so far:"
#: What an extractive answer says when the sources do not contain the answer.
NOT_IN_SOURCES = "not in the sources"
_INSTRUCTION = (
    "Copy the answer to the question from the context: the fewest words that answer it, not a sentence. "
    f"If the context does not contain it, write: {NOT_IN_SOURCES}."
)
_EXAMPLE = "[1] The Old Mill in Harby was built in 1642. It grinds rye for the bakers of Lune."
#: Worked examples (question, answer) over ``_EXAMPLE``: one word, a number, and a missing fact.
_SHOTS = (("What does the Old Mill grind?", "rye"), ("When was the Old Mill built?", "1642"),
          ("Who built the Old Mill?", NOT_IN_SOURCES))
#: The extractive prompt (plain models): the instruction, three worked examples, then the task.
EXTRACTIVE_TEMPLATE = (_INSTRUCTION + f"\n\nContext:\n{_EXAMPLE}\n\n"
                       + "".join(f"Question: {q}\nShort answer: {a}\n" for q, a in _SHOTS)
                       + "\nContext:\n{context}\n\nQuestion: {question}\nShort answer:")
#: Without the examples: for generators whose context is under :data:`EXAMPLES_MIN_CONTEXT` tokens
#: (the examples would crowd out the sources).
EXTRACTIVE_SHORT_TEMPLATE = _INSTRUCTION + "\n\nContext:\n{context}\n\nQuestion: {question}\nShort answer:"
#: The worked examples are shown to generators that read at least this many tokens.
EXAMPLES_MIN_CONTEXT = 1024
#: Chat models: the instruction is the system message (see :func:`extractive_messages`).
EXTRACTIVE_SYSTEM = _INSTRUCTION


def extractive_messages(context: str, question: str, examples: bool = True) -> list[dict[str, str]]:
    """The extractive prompt for chat models: the instruction as the system message, the worked
    examples as earlier turns (the first with the example context), then the context and question."""
    messages = [{"role": "system", "content": _INSTRUCTION}]
    for i, (q, a) in enumerate(_SHOTS if examples else ()):
        ask = f"Context:\n{_EXAMPLE}\n\nQuestion: {q}" if i == 0 else f"Question: {q}"
        messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": a}]
    return [*messages, {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {question}"}]

_SHORT = re.compile(
    r"^(?:(?:in|on|at|from|to|by|for|of|with|since|until|near|after|before|under|over|into|through|during|"
    r"behind|beside|between|across|along|around|about|against|among|inside|outside|towards?|upon|within|"
    r"without|via|per)\s+)?"
    r"(?:who|whom|whose|when|where|which|what(?!\s+(?:does|do|did|is|are|was|were)\s+(?:this|that|it)(?:\s+about)?\s*\?*$)"
    r"(?!\s+(?:does|do|did|is|are|was|were)\s+(?:this|that|it|the)\s+(?:image|picture|photo)\b)"
    r"(?!\s+(?:does|do|did)\s+.*\b(?:mean|show|do|look\s+like)\?*$)"
    # a request to describe what is seen ("what is in this photo?", "what can you see?", "what is
    # shown?") or to list ("what photos of cats do I have?") is not a short fact
    r"(?!\s+(?:is|are|was|were)\s+(?:(?:in|on)\s+)?(?:this|these|that|those|the|my|our)\s+"
    r"(?:image|picture|photo|pic|scene|shot)s?\b)"
    r"(?!\s+(?:is|are|was|were)\s+(?:shown|seen|visible|happening|going\s+on)\b)"
    r"(?!\s+(?:can|do|does|did|could)\s+(?:you|i|we|one)\s+see\b)"
    r"(?!\s+(?:photos|pictures|images|pics|items|files|documents)\b.*\b(?:do|did|have)\s+(?:i|we)\b)"
    r"|how\s+(?:many|much|high|tall|long|old|far|deep|big|large|wide|heavy|often))\b",
    re.IGNORECASE,
)
_LABEL = re.compile(r"^\s*(?:(?:the\s+)?(?:short\s+)?answer(?:\s+is\b\s*:?|\s*:)|a:)\s*", re.IGNORECASE)
_CITE = re.compile(r"\s*\[(\d+)\]")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def _norm(text: str) -> str:
    """Lower case, punctuation as spaces, spaces collapsed (for "does this source hold it")."""
    return " ".join(text.lower().translate(_PUNCT).split())


def is_short_answer_question(question: str) -> bool:
    """Whether ``question`` asks for a short fact (who, when, where, which, what, how many/high/...):
    not why/how questions, requests to describe or explain, or "what does this image show"."""
    return bool(_SHORT.match(" ".join(question.split())))


def current_question(question: str) -> str:
    """The question being asked now: ``question`` itself, or for a chat prompt (the conversation so
    far, then the new message) the new message, which decides whether the answer is a short fact."""
    if question.startswith(CONVERSATION_HEADER) and "User:" in question:
        return question.rsplit("User:", 1)[1].strip()
    return question


def abstain_spans() -> tuple[str, ...]:
    """The texts an extractive answer may copy besides the sources: the not-in-sources phrase."""
    return (NOT_IN_SOURCES, NOT_IN_SOURCES.capitalize())


def clean_answer(text: str, extractive: bool) -> str:
    """``text`` without a leading "The answer is:" / "Answer:" label; an extractive answer also
    without a final full stop or comma and without citation marks the model copied."""
    out = _LABEL.sub("", text.strip(), count=1).strip() or text.strip()
    if extractive:
        out = _CITE.sub("", out).strip().rstrip(".,;:").strip()
    return out


def citations(answer: str) -> list[int]:
    """The source numbers cited in ``answer`` as ``[n]``, in order."""
    return [int(m.group(1)) for m in _CITE.finditer(answer)]


def cite(answer: str, texts: Sequence[str], posteriors: Sequence[float], included: Sequence[bool]) -> str:
    """``answer`` with ``[n]`` citations that refer to listed sources (1-based, as the prompt numbers
    them): numbers outside ``1..len(texts)`` or of sources left out of the prompt are dropped; an
    answer without a valid one gets the source whose text contains it (highest posterior first),
    else the included source with the highest posterior. An empty or not-in-sources answer is
    returned as is."""
    valid = {n for n in range(1, len(texts) + 1) if included[n - 1]}
    kept = _CITE.sub(lambda m: m.group(0) if int(m.group(1)) in valid else "", answer).strip()
    body = _CITE.sub("", kept).strip()
    if not body or not valid or _norm(body) == _norm(NOT_IN_SOURCES):
        return kept
    if citations(kept):
        return kept
    order = sorted(valid, key=lambda n: -posteriors[n - 1])
    norm = f" {_norm(body)} "
    holding = [n for n in order if norm in f" {_norm(texts[n - 1])} "]
    return f"{kept} [{(holding or order)[0]}]"


def model_answer_style(kind: str, is_chat: bool) -> str:
    """The answer style ``model`` stands for, by the generator: ``auto`` (copied spans for
    short-answer questions) for a base decoder-only LM, ``free`` for instruction-tuned chat models
    and sequence-to-sequence models.

    Measured (benchmarks/RESULTS.md, "Small local answerers"): Gemma 3 270M, a base LM, answers
    better copied on every measure (exact match 0.83 vs 0.00, contains-gold 0.83 vs 0.67 on the
    dev questions, and faster); SmolLM2-135M-Instruct, a chat model, finds the gold answer more
    often writing a sentence (contains-gold 0.68 free vs 0.58 copied). A base LM does not follow
    an instruction to be brief, so holding it to the sources' spans is what makes it answer.
    """
    return "auto" if kind == "causal" and not is_chat else "free"
