"""Extractive answers and citations (generation/extractive.py): which questions are short-answer,
the clean-up of what small models wrap around a span, and [n] citations that always name a listed
source (hand-built cases, then a RAG pipeline on a tiny random LM, whose answers cite only
sources that exist)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings
from crossmodal_rag.generation.extractive import (EXTRACTIVE_TEMPLATE, NOT_IN_SOURCES, citations, cite, clean_answer,
                                                  current_question, extractive_messages, is_short_answer_question)
from crossmodal_rag.search import Hit


@pytest.mark.parametrize("question, short", [
    ("When was the Thesi Bridge completed?", True), ("Who founded the Gonol Library?", True),
    ("Near which town is the Moth mine?", True), ("How many people live on Shuk?", True),
    ("In which month is Shast stew eaten?", True), ("What error code does Fenwick show?", True),
    ("What does this image show?", False), ("Why is the sky blue?", False),
    ("How does the ferry work?", False), ("Describe the photo.", False), ("Explain the receipt", False),
    # what is seen, or a list: described freely, not copied (the default copies for base LMs)
    ("What is in this photo?", False), ("what is in the pictures?", False), ("What is shown here?", False),
    ("What can you see?", False), ("What photos of animals do I have?", False),
    ("What is in the box?", True), ("What is the cat looking at?", True), ("What photos did the museum lend?", True),
    ("What is it?", False), ("What is this picture about?", False), ("What is it built of?", True),
    ("What did it cost?", True),
    # a chat prompt: the new message decides, not the turns before it
    ("Conversation so far: User: Tell me about the bridge. Assistant: It is old. User: When was it built?", True),
    ("Conversation so far: User: When was it built? Assistant: 1825 User: Tell me more about it.", False),
])
def test_short_answer_questions(question: str, short: bool) -> None:
    assert is_short_answer_question(current_question(question)) is short


@pytest.mark.parametrize("raw, extractive, clean", [
    ("The answer is: 1825.", True, "1825"), ("Answer: copper", True, "copper"),
    ("Short answer: red [2].", True, "red"), (" 22:30.", True, "22:30"),
    ("The answer is: it opened in 1825.", False, "it opened in 1825."), ("3.5", True, "3.5"),
    ("The answerer was Ada.", True, "The answerer was Ada"),
])
def test_clean_answer(raw: str, extractive: bool, clean: str) -> None:
    assert clean_answer(raw, extractive) == clean


def test_cite_keeps_valid_numbers_drops_others_and_adds_the_source_that_holds_the_answer() -> None:
    texts = ["The bridge opened in 1825.", "The ferry leaves at 22:30.", "Tickets cost nine euros."]
    post, inc = [0.2, 0.5, 0.3], [True, True, True]
    assert cite("1825", texts, post, inc) == "1825 [1]"  # held by source 1, though 2 has more posterior
    assert cite("a boat", texts, post, inc) == "a boat [2]"  # held by none: the highest posterior
    assert cite("It leaves at 22:30 [2] and [7].", texts, post, inc) == "It leaves at 22:30 [2] and."
    assert cite("It leaves [9].", texts, post, inc) == "It leaves. [2]"
    assert cite("nine euros", texts, post, [True, True, False]) == "nine euros [2]"  # 3 not in the prompt
    assert cite(NOT_IN_SOURCES, texts, post, inc) == NOT_IN_SOURCES and cite("", texts, post, inc) == ""
    assert citations("a [1] b [12]") == [1, 12]


def test_the_prompts_hold_the_examples_and_the_task() -> None:
    text = EXTRACTIVE_TEMPLATE.replace("{context}", "[1] CTX").replace("{question}", "Q?")
    assert text.endswith("Context:\n[1] CTX\n\nQuestion: Q?\nShort answer:") and NOT_IN_SOURCES in text
    msgs = extractive_messages("[1] CTX", "Q?")
    assert msgs[0]["role"] == "system" and msgs[-1] == {"role": "user", "content": "Context:\n[1] CTX\n\nQuestion: Q?"}
    assert [m["role"] for m in msgs[1:-1]] == ["user", "assistant"] * 3


def _hit(rank: int, item_id: int, text: str, score: float) -> Hit:
    return Hit(rank=rank, score=score, id=item_id, kind="passage", path=None, text=text, captions=(),
               parent_id=None, title=None)


HITS = [_hit(1, 7, "the ferry leaves at half past ten from pier four", 0.31),
        _hit(2, 8, "tickets cost nine euros at the harbour office", 0.30),
        _hit(3, 9, "the harbour office closes at noon", 0.28)]


def test_rag_answers_cite_listed_sources_and_copy_spans(lm_dir: Path, tiny_oc_spec: str, tmp_path: Path) -> None:
    """A tiny random LM (transformers, so the logits processor): a short-answer question is
    answered with a span of a source and cites it; a free question and a write draft cite only
    numbers 1..k; rag-token copies too."""
    from crossmodal_rag import Collection
    from crossmodal_rag.apps.write import write
    from crossmodal_rag.generation.models import load_generator

    gen = load_generator(str(lm_dir))
    with Collection.create(tmp_path / "coll", tiny_oc_spec) as coll:  # hits are given: it stays empty
        pipe = RagPipeline(coll, gen, RagSettings(k=3, answer_style="auto"), GenerationSettings(max_new_tokens=8), query_projection=None)
        short = pipe.ask("When does the ferry leave?", hits=HITS)
        body = re.sub(r"\s*\[\d+\]", "", short.answer).strip()
        cited = citations(short.answer)
        assert cited and all(1 <= n <= 3 for n in cited), short.answer
        assert body == NOT_IN_SOURCES or body.lower() in HITS[cited[0] - 1].text.lower(), short.answer
        assert "Short answer:" in short.prompts[0]
        free = pipe.ask("Tell me about the harbour, please", hits=HITS)
        assert "Short answer:" not in free.prompts[0]
        assert all(1 <= n <= 3 for n in citations(free.answer)) and (citations(free.answer) or not free.answer)
        drafted = write(pipe, "The harbour office sells tickets", hits=HITS)
        assert drafted.answer and citations(drafted.answer) and all(1 <= n <= 3 for n in citations(drafted.answer))
        token = pipe.ask("When does the ferry leave?", hits=HITS, mode="rag-token").answer
        assert token == NOT_IN_SOURCES or any(token.lower() in h.text.lower() for h in HITS), token


def test_the_default_style_follows_the_model(lm_dir: Path, t5_dir: Path, tiny_gguf: Path, tiny_oc_spec: str,
                                             tmp_path: Path) -> None:
    """``answer_style="model"`` (the default): a base decoder-only LM copies short answers from the
    sources (as ``auto``), a chat model and a seq2seq model write freely (as ``free``); an explicit
    style wins over the model's."""
    from crossmodal_rag import Collection
    from crossmodal_rag.generation.models import load_generator
    from crossmodal_rag.testing import make_tiny_gguf

    assert RagSettings().answer_style == "model"
    chat_gguf = make_tiny_gguf(tmp_path / "chat.gguf", chat_template=(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"))
    with Collection.create(tmp_path / "coll", tiny_oc_spec) as coll:
        def pipe(gen: object, style: str = "model") -> RagPipeline:
            return RagPipeline(coll, gen, RagSettings(k=3, answer_style=style), GenerationSettings(max_new_tokens=6),
                               query_projection=None)

        base = pipe(load_generator(str(lm_dir)))
        assert base.answer_style == "auto" and base.extracts("When does the ferry leave?")
        assert not base.extracts("Tell me about the harbour, please")
        answer = base.ask("When does the ferry leave?", hits=HITS)
        body = re.sub(r"\s*\[\d+\]", "", answer.answer).strip()  # a random LM, held to the sources' spans
        assert "Short answer:" in answer.prompts[0]
        assert body == NOT_IN_SOURCES or any(body.lower() in h.text for h in HITS), answer.answer
        assert pipe(load_generator(str(tiny_gguf), runtime="llama.cpp")).answer_style == "auto"
        assert pipe(load_generator(str(chat_gguf), runtime="llama.cpp")).answer_style == "free"
        seq2seq = pipe(load_generator(str(t5_dir)))
        assert seq2seq.answer_style == "free"
        assert "Short answer:" not in seq2seq.ask("When does the ferry leave?", hits=HITS).prompts[0]
        assert pipe(load_generator(str(lm_dir)), "free").answer_style == "free"
        assert pipe(load_generator(str(t5_dir)), "auto").answer_style == "auto"


def test_a_chat_follow_up_is_answered_by_its_own_kind(lm_dir: Path, tiny_oc_spec: str, tmp_path: Path) -> None:
    """In a chat the prompt's question slot holds the turns so far and then the new message: a
    short follow-up ("When does it leave?") after a free first turn gets the copied answer (the
    default style, a base LM), a request to tell more does not."""
    from crossmodal_rag import Collection
    from crossmodal_rag.apps.chat import ChatSession
    from crossmodal_rag.generation.models import load_generator

    with Collection.create(tmp_path / "coll", tiny_oc_spec) as coll:
        pipe = RagPipeline(coll, load_generator(str(lm_dir)), RagSettings(k=3), GenerationSettings(max_new_tokens=6),
                           query_projection=None)
        chat = ChatSession()
        first = chat.send(pipe, "Tell me about the ferry, please", hits=HITS)
        assert "Short answer:" not in first.prompts[0]
        follow = chat.send(pipe, "When does it leave?", hits=HITS)
        assert follow.question.startswith("Conversation so far:") and "Short answer:" in follow.prompts[0]
        body = re.sub(r"\s*\[\d+\]", "", follow.answer).strip()
        assert body == NOT_IN_SOURCES or any(body.lower() in h.text for h in HITS), follow.answer
        more = chat.send(pipe, "Tell me more about it", hits=HITS)
        assert "Short answer:" not in more.prompts[0]
