"""Generators: a seq2seq (T5-style) or causal LM behind one small interface.

Spec strings: a hub id (``google/flan-t5-base``), a local ``save_pretrained`` folder, or a
``.gguf`` file (loaded through transformers' ``gguf_file``; needs the ``gguf`` package). The
architecture decides the kind: encoder-decoder configs are ``seq2seq``, the rest ``causal``.

Besides ``generate``, a generator exposes what RAG needs:

* :meth:`Generator.sequence_logprobs` -- log P(y | prompt) for many (prompt, answer) pairs in
  one batched forward pass (teacher forcing, end-of-sequence token included);
* :meth:`Generator.start` / :meth:`DecodeState.step` -- incremental decoding of k prompts in
  lock-step (one batched forward pass per step, with a key/value cache), for RAG-token mixing.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._config import strict_from_dict
from ..encoders import default_device
from ..encoders._hub import hub_reachable
from ..errors import ModelSpecError, WeightsUnavailableError

__all__ = ["DEFAULT_GENERATOR", "DecodeState", "GenerationSettings", "Generator", "Prompt", "load_generator"]

logger = logging.getLogger(__name__)

DEFAULT_GENERATOR = "google/flan-t5-base"

#: A prompt: plain text, or chat messages ``[{"role": "system"|"user", "content": ...}]``.
Prompt = str | list[dict[str, str]]


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings shared by every mode."""

    max_new_tokens: int = 64  # longest answer, in tokens
    num_beams: int = 1  # beam width (1 = greedy unless sampling)
    do_sample: bool = False  # sample instead of greedy/beam
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling mass
    seed: int | None = None  # makes sampling reproducible

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSettings:
        return strict_from_dict(cls, data, "generation settings")


def _weights_hint(spec: str) -> str:
    return (
        f"could not load generator {spec}: it is not in the local cache and the model hub cannot be "
        "reached (offline?). Point --generator at local weights instead: a folder written by "
        "save_pretrained (e.g. --generator /models/flan-t5-base) or a .gguf file "
        "(--generator /models/model.Q4_K_M.gguf); or set HF_HOME to a cache that holds the model."
    )


class Generator:
    """A loaded text generator; build it with :func:`load_generator` (loads lazily)."""

    def __init__(self, spec: str, device: str | None = None) -> None:
        self.spec = spec.strip()
        if not self.spec:
            raise ModelSpecError("empty generator spec: give a hub id, a local folder or a .gguf file")
        self.device = device or default_device()
        self.model: Any = None
        self.tokenizer: Any = None
        self.kind = ""  # "seq2seq" | "causal"
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Generator({self.spec!r}, kind={self.kind or '?'}, device={self.device!r})"

    # -- loading -------------------------------------------------------------------------
    def load(self) -> Generator:
        with self._lock:
            if self.model is None:
                self._load()
        return self

    def _load(self) -> None:
        from transformers import (
            AutoConfig,
            AutoModelForCausalLM,
            AutoModelForSeq2SeqLM,
            AutoTokenizer,
        )

        path = Path(os.path.expanduser(self.spec))
        kwargs: dict[str, Any] = {}
        if self.spec.endswith(".gguf"):
            if not path.is_file():
                raise ModelSpecError(f"GGUF file does not exist: {path}")
            name, kwargs = str(path.parent), {"gguf_file": path.name}
            local = True
        elif path.exists() or self.spec.startswith(("/", "./", "../", "~")):
            if not path.is_dir() or not (path / "config.json").is_file():
                raise ModelSpecError(
                    f"generator folder {path} does not exist or has no config.json; give a folder "
                    "written by save_pretrained, a .gguf file, or a hub id"
                )
            name, local = str(path.resolve()), True
        else:
            name, local = self.spec, False
        offline = not local and not hub_reachable()
        kwargs["local_files_only"] = local or offline
        try:
            config = AutoConfig.from_pretrained(name, **kwargs)
            self.kind = "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"
            auto = AutoModelForSeq2SeqLM if self.kind == "seq2seq" else AutoModelForCausalLM
            tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
            model = auto.from_pretrained(name, **kwargs)
        except ImportError as e:
            raise ModelSpecError(f"cannot load {self.spec}: {e} (for .gguf files: pip install gguf)") from e
        except OSError as e:
            if offline:
                raise WeightsUnavailableError(_weights_hint(self.spec)) from e
            raise ModelSpecError(f"cannot load generator {self.spec}: {str(e).splitlines()[0]}") from e
        except (ValueError, KeyError) as e:
            raise ModelSpecError(f"cannot load generator {self.spec}: {str(e).splitlines()[0]}") from e
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer, self.model = tokenizer, model.to(self.device).eval()
        logger.info("loaded %s generator %s on %s", self.kind, self.spec, self.device)

    # -- prompts -------------------------------------------------------------------------
    @property
    def max_input_tokens(self) -> int:
        """The prompt budget: the model's context (capped at 2048), minus room to answer for LMs."""
        self.load()
        cfg = self.model.config
        n = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if not n and tok_max and tok_max < 100_000:
            n = tok_max
        n = min(int(n or 512), 2048)
        return n

    def count_tokens(self, text: str) -> int:
        self.load()
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate_tokens(self, text: str, n: int) -> str:
        self.load()
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"][: max(n, 0)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @property
    def is_chat(self) -> bool:
        """A decoder-only model whose tokenizer has a chat template (an instruct model)."""
        self.load()
        return self.kind == "causal" and bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt: Prompt) -> str:
        """The text the model reads. A prompt is a string or a list of chat messages
        (``{"role", "content"}``); chat models get their chat template applied (a string becomes
        the user message), other models read the messages' contents joined by blank lines."""
        self.load()
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.is_chat:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if isinstance(prompt, str):
            return prompt
        return "\n\n".join(m["content"] for m in prompt)

    def _prompt_ids(self, prompts: list[Prompt]) -> list[list[int]]:
        tok = self.tokenizer
        if self.kind == "seq2seq":
            return [tok(self.render(p))["input_ids"] for p in prompts]
        out = []
        for p in prompts:
            ids = tok(self.render(p), add_special_tokens=False)["input_ids"]
            if tok.bos_token_id is not None and not getattr(tok, "chat_template", None) and (
                not ids or ids[0] != tok.bos_token_id
            ):
                ids = [tok.bos_token_id, *ids]
            out.append(ids)
        return out

    def _answer_ids(self, answer: str) -> list[int]:
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return [*ids, eos] if eos is not None else ids

    def _pad(self, seqs: list[list[int]], left: bool) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if left:
                ids[i, width - len(s):], mask[i, width - len(s):] = torch.tensor(s), 1
            else:
                ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        return ids.to(self.device), mask.to(self.device)

    # -- generation ----------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[Prompt], settings: GenerationSettings | None = None,
                 num_return_sequences: int = 1) -> list[list[str]]:
        """Answers for each prompt (``num_return_sequences`` each), in one batched ``generate``."""
        self.load()
        s = settings or GenerationSettings()
        if s.seed is not None:
            torch.manual_seed(s.seed)
        ids, mask = self._pad(self._prompt_ids(prompts), left=self.kind == "causal")
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "num_beams": s.num_beams,
                                  "do_sample": s.do_sample,
                                  "num_return_sequences": num_return_sequences,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        if self.kind == "causal":
            out = out[:, ids.shape[1]:]
        texts = [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        n = num_return_sequences
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    @torch.inference_mode()
    def sequence_logprobs(self, prompts: list[Prompt], answers: list[str]) -> np.ndarray:
        """``log P(answer_i | prompt_i)`` for each pair, one batched forward pass. Shape ``(N,)``."""
        self.load()
        if len(prompts) != len(answers):
            raise ValueError("prompts and answers must have the same length")
        if not prompts:
            return np.zeros(0)
        p_ids = self._prompt_ids(prompts)
        a_ids = [self._answer_ids(a) for a in answers]
        if self.kind == "seq2seq":
            # Each distinct prompt is encoded once and its states shared by every answer scored
            # under it (rag-sequence scores every candidate under every item's prompt).
            keys = [tuple(ids) for ids in p_ids]
            uniq = list(dict.fromkeys(keys))
            row = torch.tensor([uniq.index(k) for k in keys], device=self.device)
            enc, enc_mask = self._pad([list(k) for k in uniq], left=False)
            states = self.model.get_encoder()(input_ids=enc, attention_mask=enc_mask).last_hidden_state
            labels, lab_mask = self._pad(a_ids, left=False)
            dec_in = self.model._shift_right(labels)
            logits = self.model(encoder_outputs=(states.index_select(0, row),),
                                attention_mask=enc_mask.index_select(0, row),
                                decoder_input_ids=dec_in).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            tok = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            return (tok * lab_mask).sum(-1).cpu().double().numpy()
        seqs = [p + a for p, a in zip(p_ids, a_ids, strict=True)]
        ids, mask = self._pad(seqs, left=False)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        sel = torch.zeros_like(tok)
        for i, (p, a) in enumerate(zip(p_ids, a_ids, strict=True)):
            sel[i, len(p) - 1 : len(p) - 1 + len(a)] = 1
        return (tok * sel).sum(-1).cpu().double().numpy()

    @torch.inference_mode()
    def start(self, prompts: list[Prompt]) -> DecodeState:
        """Begin lock-step decoding of ``prompts``; see :class:`DecodeState`."""
        self.load()
        return DecodeState(self, self._prompt_ids(prompts))


class DecodeState:
    """k prompts decoded together: every :meth:`step` feeds the same next token to all rows and
    returns the k next-token log-distributions ``(k, V)``, in one forward pass with a KV cache."""

    def __init__(self, gen: Generator, prompt_ids: list[list[int]]) -> None:
        self.gen = gen
        self.k = len(prompt_ids)
        self.past: Any = None
        model = gen.model
        if gen.kind == "seq2seq":
            ids, self.enc_mask = gen._pad(prompt_ids, left=False)
            self.encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=self.enc_mask)
            start = model.config.decoder_start_token_id
            self.next_input = torch.full((self.k, 1), start, dtype=torch.long, device=gen.device)
        else:
            self.next_input, self.mask = gen._pad(prompt_ids, left=True)
            self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)

    @torch.inference_mode()
    def logprobs(self) -> torch.Tensor:
        """Next-token log-probabilities for every row, ``(k, V)`` float32."""
        model = self.gen.model
        if self.gen.kind == "seq2seq":
            out = model(encoder_outputs=self.encoder_outputs, attention_mask=self.enc_mask,
                        decoder_input_ids=self.next_input, past_key_values=self.past, use_cache=True)
        else:
            out = model(input_ids=self.next_input, attention_mask=self.mask, position_ids=self.pos,
                        past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def feed(self, token: int) -> None:
        """Append ``token`` to every row."""
        self.next_input = torch.full((self.k, 1), int(token), dtype=torch.long, device=self.gen.device)
        if self.gen.kind == "causal":
            self.mask = torch.cat([self.mask, torch.ones((self.k, 1), dtype=self.mask.dtype,
                                                         device=self.mask.device)], dim=1)
            self.pos = self.pos[:, -1:] + 1


_CACHE: dict[tuple[str, str], Generator] = {}
_CACHE_LOCK = threading.Lock()


def load_generator(spec: str | None = None, device: str | None = None) -> Generator:
    """The process-wide generator for ``spec`` (default :data:`DEFAULT_GENERATOR`); lazy."""
    spec = (spec or DEFAULT_GENERATOR).strip()
    key = (spec, device or default_device())
    with _CACHE_LOCK:
        gen = _CACHE.get(key)
        if gen is None:
            gen = _CACHE[key] = Generator(spec, device=key[1])
        return gen
