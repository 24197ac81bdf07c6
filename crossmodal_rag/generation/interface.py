"""What a generator offers its callers: the interface both runtimes implement.

Two runtimes answer prompts: transformers (:class:`~crossmodal_rag.generation.models.Generator`,
any hub id, ``save_pretrained`` folder or ``.gguf`` file) and llama.cpp
(:class:`~crossmodal_rag.generation.llamacpp.LlamaCppGenerator`, ``.gguf`` files only).
:func:`~crossmodal_rag.generation.models.load_generator` returns either, typed as
:class:`TextGenerator`; the RAG pipeline, captioning, chat, writing, evaluation and the web app use
nothing else of it. A runtime satisfies the interface structurally (no base class): the same
names, the same parameters with the same defaults and types (tests/test_generator_interface.py
compares the signatures).

Shapes: N prompts (or prompt/answer pairs), k prompts decoded in lock-step, V the vocabulary,
T_i the tokens of answer i plus its end token, P x H a prefix (P vectors of the model's
input-embedding size).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import numpy as np

from ..lazy_torch import torch  # annotations only: imported if they are evaluated
from .prompting import GenerationSettings, Prefixes, Prompt
from .stream import TextStream

__all__ = ["LockStepState", "TextGenerator"]


class LockStepState(Protocol):
    """k prompts decoded together (RAG-token), from :meth:`TextGenerator.start`."""

    k: int  # how many prompts decode in lock-step

    def logprobs(self) -> torch.Tensor:
        """The next-token log-probabilities of every row, ``(k, V)`` float32."""
        ...

    def feed(self, token: int) -> None:
        """Append ``token`` to every row."""
        ...

    def close(self) -> None:
        """Release what decoding holds (llama.cpp: the context's lock); idempotent."""
        ...


class TextGenerator(Protocol):
    """A loaded-on-first-use text generator: prompts in, answers, token ids and log-probabilities
    out. Every method loads the model when it is not loaded yet.

    Not ``runtime_checkable`` on purpose: ``isinstance`` would read the properties, which load
    the model."""

    spec: str  # the generator spec it was built from (hub id, folder or .gguf file)
    runtime: str  # "transformers" | "llama.cpp"
    kind: str  # "seq2seq" | "causal" (llama.cpp: always causal; transformers: known once loaded)
    device: str  # where it computes ("cpu" on llama.cpp)

    def load(self) -> TextGenerator:
        """Load the model and tokenizer now (once per object); returns the generator."""
        ...

    # -- prompts and tokens ----------------------------------------------------------------
    @property
    def max_input_tokens(self) -> int:
        """The prompt budget in tokens: the model's context, capped at 2048."""
        ...

    @property
    def is_chat(self) -> bool:
        """Whether prompts are rendered with the model's chat template (an instruct model)."""
        ...

    @property
    def eos_ids(self) -> set[int]:
        """The token ids that end an answer."""
        ...

    def render(self, prompt: Prompt) -> str:
        """The text the model reads for ``prompt`` (a chat model's template applied)."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text``, no special tokens added."""
        ...

    def truncate_tokens(self, text: str, n: int) -> str:
        """``text`` cut to its first ``n`` tokens."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, no BOS or other special token added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens dropped."""
        ...

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids the model reads for ``prompt`` (rendered; with BOS where the model wants one)."""
        ...

    def answer_ids(self, answer: str) -> list[int]:
        """The token ids an answer is scored as: the text's tokens, then the end token."""
        ...

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], settings: GenerationSettings | None = None,
                 num_return_sequences: int = 1, prefixes: Prefixes = None) -> list[list[str]]:
        """``num_return_sequences`` answers per prompt, ``[N][num_return_sequences]``;
        ``prefixes``: one ``(P, H)`` tensor or None per prompt (transformers only)."""
        ...

    def stream(self, prompt: Prompt, settings: GenerationSettings | None = None,
               prefix: torch.Tensor | None = None, cancel: threading.Event | None = None) -> TextStream:
        """One prompt's answer as text deltas while it is decoded; setting ``cancel`` stops it."""
        ...

    def start(self, prompts: list[Prompt], prefixes: Prefixes = None, max_new_tokens: int = 256
              ) -> LockStepState:
        """Begin decoding the k ``prompts`` in lock-step (room for ``max_new_tokens`` each)."""
        ...

    @contextmanager
    def encoder_reuse(self) -> Iterator[None]:
        """A block (one answer: generation, then scoring) within which a prompt's encoder states
        may be computed once and reused (seq2seq on transformers; elsewhere nothing changes)."""
        yield

    # -- scoring ---------------------------------------------------------------------------
    def sequence_logprobs(self, prompts: list[Prompt], answers: list[str],
                          prefixes: Prefixes = None) -> np.ndarray:
        """``log P(answer_i + end | prompt_i)`` per pair, ``(N,)`` float64."""
        ...

    def answer_token_logprobs(self, prompts: list[Prompt], answers: list[str],
                              prefixes: Prefixes = None) -> list[np.ndarray]:
        """Per pair, ``log P(y_t | prompt_i, y_<t)`` for each token of :meth:`answer_ids`
        ``(answers[i])``: N arrays of shape ``(T_i,)`` float64, summing to :meth:`sequence_logprobs`."""
        ...
