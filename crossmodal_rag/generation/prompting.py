"""What every generator is handed: the prompt, its prefix embeddings and the decoding settings.

Plain types shared by the transformers runtime (:mod:`crossmodal_rag.generation.models`), the
llama.cpp runtime (:mod:`crossmodal_rag.generation.llamacpp`) and streaming
(:mod:`crossmodal_rag.generation.stream`); this module imports none of them, so neither runtime
imports the other to get them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._config import strict_from_dict

__all__ = ["GenerationSettings", "Prefixes", "Prompt", "has_prefixes"]

#: A prompt: plain text, or chat messages ``[{"role": "system"|"user", "content": ...}]``.
Prompt = str | list[dict[str, str]]
#: Prefix embeddings, one ``(P_i, H)`` tensor or None per prompt (None: no prefixes at all).
Prefixes = Sequence[torch.Tensor | None] | None


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by every mode."""

    max_new_tokens: int = 64  # longest answer, in tokens
    num_beams: int = 1  # beam width (1 = greedy unless sampling)
    do_sample: bool = False  # sample instead of greedy/beam
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling mass
    seed: int | None = None  # makes sampling reproducible
    stop: str = "eos"  # eos: at the end token; sentence: also at the first sentence end or line break

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.stop not in ("eos", "sentence"):  # generation.stopping.STOPS
            raise ValueError(f"unknown stop {self.stop!r}; choose eos or sentence")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSettings:
        return strict_from_dict(cls, data, "generation settings")


def has_prefixes(prefixes: Prefixes) -> bool:
    """Whether any prompt carries a prefix (``prefixes`` may be None or all None)."""
    return prefixes is not None and any(p is not None for p in prefixes)
