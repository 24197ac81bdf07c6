"""Multi-turn chat grounded in a collection.

The conversation shapes both steps: the retrieval query is the new message prefixed by the
previous user messages (most recent last, cut to ``history_chars``), and the prompt's question
slot holds the recent turns followed by the new message. A session saves to and resumes from a
JSON file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CrossmodalError, QueryError
from ..generation.extractive import CONVERSATION_HEADER
from ..generation.rag import Answer, RagPipeline
from ..safe_io import atomic_write_text

__all__ = ["ChatSession", "ChatTurn"]

SESSION_FORMAT = "crossmodal-rag chat session"


@dataclass
class ChatTurn:
    role: str  # "user" | "assistant"
    content: str
    sources: list[dict[str, Any]] = field(default_factory=list)  # for assistant turns
    image: str | None = None  # for user turns that brought an image


@dataclass
class ChatSession:
    """A conversation; :meth:`send` adds a user turn and the grounded assistant reply."""

    turns: list[ChatTurn] = field(default_factory=list)
    history_turns: int = 6  # how many earlier turns the prompt shows
    history_chars: int = 300  # how much earlier user text joins the retrieval query

    def retrieval_query(self, message: str) -> str:
        earlier = " ".join(t.content for t in self.turns if t.role == "user")
        earlier = earlier[-self.history_chars :] if self.history_chars else ""
        return f"{earlier} {message}".strip()

    def prompt_question(self, message: str) -> str:
        recent = self.turns[-self.history_turns :] if self.history_turns else []
        lines = [f"{'User' if t.role == 'user' else 'Assistant'}: {t.content}" for t in recent]
        if not lines:
            return message
        return f"{CONVERSATION_HEADER}\n" + "\n".join(lines) + f"\nUser: {message}"

    def send(self, pipeline: RagPipeline, message: str, image: str | None = None, **ask: Any) -> Answer:
        if not message or not message.strip():
            raise QueryError("empty chat message")
        message = " ".join(message.split())
        query = self.retrieval_query(message)
        if image is not None:
            answer = pipeline.ask(message, image=image, prompt_question=self.prompt_question(message), **ask)
        else:
            answer = pipeline.ask(query, prompt_question=self.prompt_question(message), **ask)
        self.turns.append(ChatTurn("user", message, image=image))
        self.turns.append(ChatTurn("assistant", answer.answer,
                                   sources=[asdict(s) for s in answer.sources]))
        return answer

    # -- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": SESSION_FORMAT, "version": 1, "history_turns": self.history_turns,
                "history_chars": self.history_chars, "turns": [asdict(t) for t in self.turns]}

    def save(self, path: str | Path) -> None:
        """Write atomically (a crash never leaves half a session file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        atomic_write_text(path, text, mode=0o600)  # a conversation: its owner's only

    @classmethod
    def load(cls, path: str | Path) -> ChatSession:
        from ..safe_io import read_regular_text

        try:  # only a regular file (a FIFO would block), of at most 64 MiB
            data = json.loads(read_regular_text(path, what="chat session"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise CrossmodalError(f"cannot read chat session {path}: {getattr(e, 'reason', None) or e}") from e
        if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
            raise CrossmodalError(f"{path} is not a crossmodal-rag chat session file")
        try:
            turns = [ChatTurn(**t) for t in data.get("turns", [])]
        except TypeError as e:
            raise CrossmodalError(f"{path}: malformed turn: {e}") from e
        return cls(turns=turns, history_turns=int(data.get("history_turns", 6)),
                   history_chars=int(data.get("history_chars", 300)))

    @classmethod
    def load_or_new(cls, path: str | Path | None) -> ChatSession:
        if path is not None and Path(path).exists():
            return cls.load(path)
        return cls()
