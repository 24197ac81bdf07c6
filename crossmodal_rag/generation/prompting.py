"""What every generator is handed: the prompt, its prefix embeddings and the decoding settings.

Plain types shared by the transformers runtime (:mod:`crossmodal_rag.generation.models`), the
llama.cpp runtime (:mod:`crossmodal_rag.generation.llamacpp`) and streaming
(:mod:`crossmodal_rag.generation.stream`); this module imports none of them, so neither runtime
imports the other to get them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ForwardRef

from .._config import strict_from_dict
from ..lazy_torch import torch  # noqa: F401  (Prefixes resolves "torch.Tensor" here)

__all__ = ["GenerationSettings", "Prefixes", "Prompt", "has_prefixes"]

#: A prompt: plain text, or chat messages ``[{"role": "system"|"user", "content": ...}]``.
Prompt = str | list[dict[str, str]]
#: Prefix embeddings, one ``(P_i, H)`` tensor or None per prompt (None: no prefixes at all).
# (resolved in this module when the hints are read, so defining it imports no torch)
Prefixes = Sequence[ForwardRef("torch.Tensor | None", module=__name__)] | None


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
    # texts the answer is copied from: each step may only continue a span of them (or end the
    # answer); empty: any token (see generation.constrained)
    copy_from: tuple[str, ...] = ()
    copy_whole: tuple[str, ...] = ()  # with copy_from: answers also allowed whole (not in the sources)
    copy_weights: tuple[float, ...] = ()  # per copy_from text: log-weight added to an answer copied from it
    copy_whole_weight: float = 0.0  # the copy_whole answers' log-weight, on the scale where the best text's is 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.copy_from, str) or not all(isinstance(t, str) for t in self.copy_from):
            raise ValueError("copy_from must be a sequence of texts, not a single string")
        if isinstance(self.copy_whole, str):
            raise ValueError("copy_whole must be a sequence of texts, not a single string")
        object.__setattr__(self, "copy_from", tuple(self.copy_from))
        object.__setattr__(self, "copy_whole", tuple(self.copy_whole))
        object.__setattr__(self, "copy_weights", tuple(float(w) for w in self.copy_weights))
        if self.copy_weights and len(self.copy_weights) != len(self.copy_from):
            raise ValueError(f"copy_weights has {len(self.copy_weights)} weights for {len(self.copy_from)} texts")
        if self.stop not in ("eos", "sentence"):  # generation.stopping.STOPS
            raise ValueError(f"unknown stop {self.stop!r}; choose eos or sentence")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSettings:
        return strict_from_dict(cls, data, "generation settings")


def has_prefixes(prefixes: Prefixes) -> bool:
    """Whether any prompt carries a prefix (``prefixes`` may be None or all None)."""
    return prefixes is not None and any(p is not None for p in prefixes)
