"""Applications on the retrieval + generation core: chat, recommendation, writing assistance."""

from .chat import ChatSession, ChatTurn
from .recommend import Recommendation, recommend
from .write import write

__all__ = ["ChatSession", "ChatTurn", "Recommendation", "recommend", "write"]
