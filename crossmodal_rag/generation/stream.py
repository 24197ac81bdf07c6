"""Streaming answers: the events :meth:`RagPipeline.stream <crossmodal_rag.generation.rag.RagPipeline.stream>`
yields while it answers, in this order:

* :class:`Sources` -- once, after retrieval and before any generation: the retrieved items with
  their priors P(z|x) (posteriors are not known yet);
* :class:`Token` -- zero or more text deltas as the answer is decoded (``concat`` and
  ``rag-token``); ``rag-sequence`` (and beam search) yields the winning answer as one Token once
  every candidate is scored (``Sources.streaming`` says which);
* :class:`Final` -- once, last: the complete :class:`~crossmodal_rag.generation.rag.Answer` with
  posteriors, log-probability and timings.

``"".join(token.text for each Token).strip() == final.answer.answer``. A consumer that sets the
``cancel`` event stops decoding at the next token; the stream then ends without a Final.
:class:`TextDeltas` turns token ids into such deltas for any tokenizer.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from .prompting import GenerationSettings, Prefixes, Prompt

__all__ = ["Event", "Final", "Sources", "TextDeltas", "TextStream", "Token"]

#: What a streamed source carries before the answer exists (no posterior, no logprob yet).
_SOURCE_FIELDS = ("rank", "id", "kind", "path", "text", "caption", "score", "prior", "included", "truncated",
                  "prefix_image")


class _StreamsGenerate(Protocol):
    """What :func:`transformers_token_ids` needs of a generator (a transformers
    :class:`~crossmodal_rag.generation.models.Generator`): typed here so streaming imports no runtime."""

    @property
    def eos_ids(self) -> set[int]: ...

    def generate(self, prompts: list[Prompt], settings: GenerationSettings | None = None,
                 num_return_sequences: int = 1, prefixes: Prefixes = None, **extra: Any) -> list[list[str]]: ...


@dataclass(frozen=True)
class Sources:
    """The retrieved items and their priors, before generation starts."""

    sources: list[Any]  # rag.Source records; posterior and logprob are 0.0 here: see Final
    mode: str  # concat | rag-sequence | rag-token
    streaming: bool  # True: Token events arrive while decoding; False: one Token after scoring
    abstained: bool = False  # True: nothing is generated (the evidence is below min_score)

    def to_dict(self) -> dict[str, Any]:
        return {"event": "sources", "mode": self.mode, "streaming": self.streaming,
                "abstained": self.abstained,
                "sources": [{k: getattr(s, k) for k in _SOURCE_FIELDS} for s in self.sources]}


@dataclass(frozen=True)
class Token:
    """A piece of the answer's text, in order (never empty)."""

    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"event": "token", "text": self.text}


@dataclass(frozen=True)
class Final:
    """The complete answer, with posteriors."""

    answer: Any  # the rag.Answer (a dataclass; typed loosely so streaming does not import rag)

    def to_dict(self) -> dict[str, Any]:
        return {"event": "final", "answer": _json_safe(asdict(self.answer))}


Event = Sources | Token | Final


def _json_safe(value: Any) -> Any:
    """Non-finite floats (a -inf log-probability) as None, so the event is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


class TextDeltas:
    """Token ids in, new text out: ``push(id)`` returns what the answer's text gained (possibly
    ``""``: a multi-byte character split over tokens is held back until it is complete).

    ``decode`` maps the ids so far to text (special tokens dropped); the deltas concatenate to
    ``decode(all ids)``, or to the longest prefix of it seen when a tokenizer rewrites earlier text.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (call once decoding ends)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self.decode(self.ids)
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete UTF-8 sequence: wait for its other bytes
        if not text.startswith(self.emitted):
            return ""  # the tokenizer rewrote earlier text; what was sent stays as sent
        delta, self.emitted = text[len(self.emitted):], text if len(text) > len(self.emitted) else self.emitted
        return delta


class TextStream:
    """An answer being decoded: iterating yields its text deltas (see :class:`TextDeltas`) as the
    token ids arrive; afterwards :attr:`answer` is the whole text, stripped. ``close()`` stops
    decoding early."""

    def __init__(self, ids: Iterator[int], decode: Callable[[Sequence[int]], str]) -> None:
        self._ids = ids
        self._deltas = TextDeltas(decode)
        self.answer: str | None = None

    @property
    def ids(self) -> list[int]:
        """The token ids decoded so far."""
        return self._deltas.ids

    def __iter__(self) -> Iterator[str]:
        for token in self._ids:
            delta = self._deltas.push(token)
            if delta:
                yield delta
        delta = self._deltas.flush()
        if delta:
            yield delta
        self.answer = self._deltas.decode(self._deltas.ids).strip()

    def text(self) -> str:
        """Decode to the end; the answer."""
        for _ in self:
            pass
        return self.answer or ""

    def close(self) -> None:
        close = getattr(self._ids, "close", None)
        if close is not None:
            close()


def transformers_token_ids(gen: _StreamsGenerate, prompt: Prompt, s: GenerationSettings, prefix: torch.Tensor | None,
                           cancel: threading.Event | None) -> Iterator[int]:
    """transformers' ``generate`` for one prompt in a worker thread, its new token ids (end tokens
    dropped) handed over as they come; closing the iterator or setting ``cancel`` stops it."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    ids: queue.Queue[Any] = queue.Queue()
    stop, done = threading.Event(), object()

    class Streamer(BaseStreamer):
        first = True  # generate() puts the prompt (or the decoder's start token) first

        def put(self, value: torch.Tensor) -> None:
            if self.first:
                self.first = False
                return
            for t in value.reshape(-1).tolist():
                ids.put(int(t))

        def end(self) -> None:
            pass

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            halt = stop.is_set() or (cancel is not None and cancel.is_set())
            return torch.full((input_ids.shape[0],), halt, dtype=torch.bool, device=input_ids.device)

    def run() -> None:
        try:
            gen.generate([prompt], s, prefixes=[prefix] if prefix is not None else None,
                         streamer=Streamer(), stopping_criteria=StoppingCriteriaList([Stop()]))
        except BaseException as e:  # handed to the consumer
            ids.put(e)
        finally:
            ids.put(done)

    worker = threading.Thread(target=run, name="crossmodal-rag-generate", daemon=True)
    worker.start()
    eos = gen.eos_ids
    try:
        while (item := ids.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            if item not in eos:
                yield item
    finally:
        stop.set()
        worker.join()
