"""``.gguf`` generators on llama.cpp, through the ``cyllama`` binding (prebuilt wheels; a default
dependency, see docs/fast-answers.md for how it was chosen).

The file is memory-mapped and loaded once per process (:func:`~crossmodal_rag.generation.models.load_generator`
caches it); the weights stay quantised, so a 135M model loads in under a second and decodes
tens of tokens per second on two cores. Instruct models get the chat template stored in the
file's metadata (``tokenizer.chat_template``), rendered like transformers does.

:class:`LlamaCppGenerator` offers what :class:`~crossmodal_rag.generation.models.Generator` offers
RAG, with the same prompts and token ids (plain prompts get the BOS token, answers are scored as
text + end token). Every prompt is decoded once into a :class:`~crossmodal_rag.generation.kv_cache.PromptCache`
slot and reused by whatever follows it:

* :meth:`~LlamaCppGenerator.generate` / :meth:`~LlamaCppGenerator.stream` -- greedy or sampled
  decoding; ``generate`` decodes all its prompts (and samples) in lock-step, one batch per step;
* :meth:`~LlamaCppGenerator.answer_token_logprobs` -- teacher-forced log-probabilities of given
  answers: every (prompt, answer) pair continues its prompt's cached slot, all pairs in one batch;
* :meth:`~LlamaCppGenerator.start` -- k prompts decoded in lock-step as k sequences of one
  context (one ``llama_decode`` per step for all k), for RAG-token.

Image prefixes and beam search need the transformers runtime (``CROSSMODAL_RAG_GGUF_RUNTIME=transformers``).
One context serves every call, under a lock: calls from several threads run one after another.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelSpecError, QueryError
from ..lazy_torch import torch
from .constrained import SpanConstraint
from .kv_cache import CacheFull, PromptCache, PromptSlot
from .prompting import GenerationSettings, Prefixes, Prompt, has_prefixes
from .stopping import SentenceStop
from .stream import TextStream

__all__ = ["BINDING", "LlamaCppGenerator", "default_threads", "llama_cpp_available", "render_chat_template"]

logger = logging.getLogger(__name__)

#: The Python package that binds llama.cpp (import name ``cyllama``).
BINDING = "cyllama"
_BACKEND_LOCK = threading.Lock()
_BACKEND_READY = False


def llama_cpp_available() -> bool:
    """Whether the llama.cpp binding (``cyllama``) is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(BINDING) is not None


def default_threads() -> int:
    """Threads for llama.cpp: ``CROSSMODAL_RAG_THREADS``, else the CPUs this process may use (<= 8)
    that the load average leaves idle (at least 1). llama.cpp's threads spin at a barrier after
    every layer: on two cores already busy, 2 threads decoded SmolLM2 at 1.3 tokens/s where 1
    thread managed 30 (docs/fast-answers.md)."""
    env = os.environ.get("CROSSMODAL_RAG_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        idle = cpus - os.getloadavg()[0]
    except OSError:
        idle = cpus
    return max(1, min(cpus, 8, round(idle)))


def _lib() -> Any:
    """cyllama's llama.cpp module, its backend initialised once and its logging off."""
    global _BACKEND_READY
    try:
        from cyllama.llama import llama_cpp
    except ImportError as e:
        raise ModelSpecError("the llama.cpp runtime needs the cyllama binding: pip install 'cyllama>=0.2.17,<0.3' "
                             f"(prebuilt wheels for Linux x86-64, macOS arm64 and Windows), or set "
                             f"CROSSMODAL_RAG_GGUF_RUNTIME=transformers: {e}") from e
    with _BACKEND_LOCK:
        if not _BACKEND_READY:
            llama_cpp.disable_logging()
            llama_cpp.llama_backend_init()
            _BACKEND_READY = True
    return llama_cpp


def _model_class(lib: Any) -> type:
    """cyllama's ``LlamaModel`` with the ``n_vocab`` that its ``LlamaContext.get_logits_ith``
    reads (0.2.17 and 0.2.18 read it from the model, which lacks it: AttributeError)."""

    class Model(lib.LlamaModel):  # type: ignore[misc,name-defined]
        @property
        def n_vocab(self) -> int:
            return int(self.get_vocab().n_vocab)

    return Model


def render_chat_template(template: str, messages: list[dict[str, str]], *, bos_token: str,
                         eos_token: str) -> str:
    """A chat template rendered as transformers renders it (sandboxed Jinja, blocks trimmed,
    the generation prompt added)."""
    from jinja2.exceptions import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos_token, eos_token=eos_token)


class LlamaCppGenerator:
    """A ``.gguf`` causal LM on llama.cpp; build it with :func:`load_generator` (loads lazily).
    Implements :class:`~crossmodal_rag.generation.interface.TextGenerator`."""

    runtime = "llama.cpp"
    kind = "causal"

    def __init__(self, spec: str, n_threads: int | None = None) -> None:
        self.spec = spec.strip()
        if not self.spec.endswith(".gguf"):
            raise ModelSpecError(f"the llama.cpp runtime reads .gguf files, not {self.spec!r}")
        self.path = Path(os.path.expanduser(self.spec))  # the model file
        self.device = "cpu"
        self.n_threads = n_threads or default_threads()
        self.model: Any = None  # cyllama LlamaModel
        self.chat_template: str | None = None
        self._eos_ids: set[int] = set()  # filled on load (see eos_ids)
        self._cache: PromptCache | None = None
        self._load_lock = threading.Lock()
        # one context serves every call: decoding holds this lock (a plain Lock, so that a stream
        # abandoned in another thread and closed by the garbage collector still releases it)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LlamaCppGenerator({self.spec!r}, threads={self.n_threads})"

    # -- loading -------------------------------------------------------------------------
    def load(self) -> LlamaCppGenerator:
        with self._load_lock:
            if self.model is None:
                from ..progress import loading

                with loading(f"generator {self.spec} (llama.cpp runtime)"):
                    self._load()
        return self

    def _load(self) -> None:
        path = self.path
        if not path.is_file():
            raise ModelSpecError(f"GGUF file does not exist: {path}")
        lib = _lib()
        params = lib.LlamaModelParams()
        params.use_mmap, params.n_gpu_layers = True, 0
        try:
            model = _model_class(lib)(path_model=str(path), params=params, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise ModelSpecError(f"llama.cpp cannot load {path}: {e} (not a GGUF model llama.cpp knows?)") from e
        vocab = model.get_vocab()
        self._vocab = vocab
        self.n_vocab = int(vocab.n_vocab)
        self.bos = int(vocab.token_bos())
        self.eos = int(vocab.token_eos())
        self._eos_ids = {t for t in range(self.n_vocab) if vocab.is_eog(t)}
        if self.eos >= 0:
            self._eos_ids.add(self.eos)
        self.n_ctx_train = int(model.n_ctx_train)
        self.chat_template = model.metadata().get("tokenizer.chat_template") or None
        text = lambda t: vocab.get_text(t) if t >= 0 else ""  # noqa: E731
        self._bos_text, self._eos_text = text(self.bos), text(self.eos)
        self._cache = PromptCache(lib, model, self.n_threads, self.n_ctx_train)
        self.model = model
        logger.info("loaded %s on llama.cpp (%d threads)", self.spec, self.n_threads)

    # -- prompts -------------------------------------------------------------------------
    @property
    def max_input_tokens(self) -> int:
        self.load()
        return min(int(self.n_ctx_train or 512), 2048)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text are parsed; no BOS added)."""
        self.load()
        return list(self._vocab.tokenize(text, False, True)) if text else []

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens dropped (an incomplete UTF-8 tail becomes U+FFFD)."""
        self.load()
        ids = [int(t) for t in ids]
        return self._vocab.detokenize(ids, 4 * len(ids) + 64, False, False) if ids else ""

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def truncate_tokens(self, text: str, n: int) -> str:
        return self.decode(self.tokenize(text)[: max(n, 0)])

    @property
    def is_chat(self) -> bool:
        self.load()
        return self.chat_template is not None

    @property
    def eos_ids(self) -> set[int]:
        """The tokens that end an answer (the vocabulary's end-of-generation tokens and EOS)."""
        self.load()
        return self._eos_ids

    def render(self, prompt: Prompt) -> str:
        """Like :meth:`Generator.render`: the GGUF's chat template for instruct models."""
        self.load()
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.chat_template:
            return render_chat_template(self.chat_template, messages, bos_token=self._bos_text,
                                        eos_token=self._eos_text)
        return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The rendered prompt's token ids, with a leading BOS unless a chat template renders it."""
        ids = self.tokenize(self.render(prompt))
        if self.bos >= 0 and not self.chat_template and ids[:1] != [self.bos]:
            ids = [self.bos, *ids]
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's token ids, then the end token."""
        ids = self.tokenize(answer)
        return [*ids, self.eos] if self.eos >= 0 else ids

    # -- generation ----------------------------------------------------------------------
    def _cached(self, run: Any) -> Any:
        """``run(cache)`` under the lock; once more on a flushed cache when llama.cpp found no room."""
        with self._lock:
            cache = self._cache
            assert cache is not None  # loaded by _check
            try:
                return run(cache)
            except CacheFull:
                cache.flush()
                return run(cache)

    def generate(self, prompts: list[Prompt], settings: GenerationSettings | None = None,
                 num_return_sequences: int = 1, prefixes: Prefixes = None) -> list[list[str]]:
        """Answers for each prompt (``num_return_sequences`` sampled ones each, or the greedy one),
        all decoded in lock-step: one batch per step holds a token of every unfinished answer."""
        s = settings or GenerationSettings()
        self._check(s, prefixes)
        n = num_return_sequences
        if n > 1 and not s.do_sample:
            raise QueryError(f"{n} answers per prompt need beam search or sampling; the llama.cpp runtime "
                             "samples (--sample) but has no beam search: use --beams 1, or set "
                             "CROSSMODAL_RAG_GGUF_RUNTIME=transformers")
        ids = [self.prompt_ids(p) for p in prompts]
        rows = [i for i in range(len(prompts)) for _ in range(n)]
        texts: list[str] = []
        chunk = 128  # rows per lock-step batch (working sequences)
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            out = self._cached(lambda c, part=part: self._decode_rows(c, [ids[i] for i in part], s))
            texts += [TextStream(iter(t), self.decode).text() for t in out]
        return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]

    def _decode_rows(self, cache: PromptCache, prompts: list[list[int]], s: GenerationSettings) -> list[list[int]]:
        """Each row's new token ids (end token excluded), the rows decoded in lock-step."""
        cache.begin(prompts, len(prompts) * s.max_new_tokens)
        slots = cache.prefill(prompts)
        seqs = cache.working(len(slots))
        rng = np.random.default_rng(s.seed)
        out: list[list[int]] = [[] for _ in slots]
        stops = [SentenceStop(self.decode) if s.stop == "sentence" else None for _ in slots]
        copy = self._constraint(s)
        copies = [copy.restart() if copy is not None else None for _ in slots]
        try:
            for slot, seq in zip(slots, seqs, strict=True):
                cache.fork(slot, seq)
            logp = dict(enumerate(slot.logp for slot in slots))
            for step in range(s.max_new_tokens):
                entries, rows = [], []
                for r in list(logp):
                    c = copies[r]
                    tok = _pick(logp[r] if c is None else c.mask(logp[r]), s, rng)
                    stop = stops[r]
                    if tok in self._eos_ids or (stop is not None and stop.stops(tok)):
                        del logp[r]
                        continue
                    if c is not None:
                        c.advance(tok)
                    out[r].append(tok)
                    entries.append((tok, slots[r].n + step, seqs[r], True))
                    rows.append(r)
                if not entries or step + 1 == s.max_new_tokens:
                    break
                for r, row in zip(rows, cache.decode(entries), strict=True):
                    logp[r] = row
        finally:
            cache.release(seqs)
        return out

    def stream(self, prompt: Prompt, settings: GenerationSettings | None = None,
               prefix: torch.Tensor | None = None, cancel: threading.Event | None = None,
               rng: np.random.Generator | None = None) -> TextStream:
        """Decode one prompt: iterate for text deltas; then ``.answer`` is the stripped answer."""
        s = settings or GenerationSettings()
        self._check(s, [prefix])
        return TextStream(self._token_ids(prompt, s, cancel, rng or np.random.default_rng(s.seed)), self.decode)

    def _token_ids(self, prompt: Prompt, s: GenerationSettings, cancel: threading.Event | None,
                   rng: np.random.Generator) -> Iterator[int]:
        """The new token ids, end token excluded, as they are decoded."""
        with self._lock:
            cache = self._cache
            assert cache is not None
            ids = self.prompt_ids(prompt)
            try:
                cache.begin([ids], s.max_new_tokens)
                (slot,) = cache.prefill([ids])
            except CacheFull:
                cache.flush()
                (slot,) = cache.prefill([ids])
            (seq,) = cache.working(1)
            cache.fork(slot, seq)
            logp = slot.logp
            stop = SentenceStop(self.decode) if s.stop == "sentence" else None
            copy = self._constraint(s)
            try:
                for step in range(s.max_new_tokens):
                    if cancel is not None and cancel.is_set():
                        return
                    tok = _pick(logp if copy is None else copy.mask(logp), s, rng)
                    if tok in self._eos_ids or (stop is not None and stop.stops(tok)):
                        return
                    if copy is not None:
                        copy.advance(tok)
                    yield tok
                    if step + 1 < s.max_new_tokens:
                        (logp,) = cache.decode([(tok, slot.n + step, seq, True)])
            finally:
                cache.release([seq])

    def _constraint(self, s: GenerationSettings) -> SpanConstraint | None:
        """The span constraint of ``s.copy_from`` (None: decoding is free)."""
        return SpanConstraint.of(s, self.tokenize, self._eos_ids)

    @contextmanager
    def encoder_reuse(self) -> Iterator[None]:
        """Nothing to reuse: a causal LM has no encoder (the interface's no-op)."""
        yield

    def _check(self, s: GenerationSettings, prefixes: Prefixes) -> None:
        self.load()
        if has_prefixes(prefixes):
            raise ModelSpecError(f"image prefixes need the transformers runtime, and {self.spec} runs on "
                                 "llama.cpp: set CROSSMODAL_RAG_GGUF_RUNTIME=transformers")
        if s.num_beams > 1:
            raise QueryError("beam search is not available on the llama.cpp runtime: use --beams 1 (or "
                             "--sample), or set CROSSMODAL_RAG_GGUF_RUNTIME=transformers")

    # -- scoring -------------------------------------------------------------------------
    def answer_token_logprobs(self, prompts: list[Prompt], answers: list[str],
                              prefixes: Prefixes = None) -> list[np.ndarray]:
        """Per pair, ``log P(y_t | prompt_i, y_<t)`` for each token of ``answers[i]`` + end token
        (``(T_i,)`` float64 arrays). Each distinct prompt is decoded once (or found in the cache);
        every pair continues it in a working sequence, all pairs in one batch."""
        self._check(GenerationSettings(), prefixes)
        if len(prompts) != len(answers):
            raise ValueError("prompts and answers must have the same length")
        p_ids = [self.prompt_ids(p) for p in prompts]
        a_ids = [self.answer_ids(a) for a in answers]
        out: list[np.ndarray] = []
        chunk = 128  # pairs per batch (working sequences)
        for start in range(0, len(p_ids), chunk):
            part = range(start, min(start + chunk, len(p_ids)))
            out += self._cached(lambda c, part=part: _score_pairs(c, [p_ids[i] for i in part],
                                                                  [a_ids[i] for i in part]))
        return out

    def sequence_logprobs(self, prompts: list[Prompt], answers: list[str],
                          prefixes: Prefixes = None) -> np.ndarray:
        """``log P(answer_i + end | prompt_i)`` for each pair, ``(N,)`` float64."""
        return np.array([x.sum() for x in self.answer_token_logprobs(prompts, answers, prefixes)],
                        dtype=np.float64)

    def start(self, prompts: list[Prompt], prefixes: Prefixes = None, max_new_tokens: int = 256
              ) -> LlamaDecodeState:
        """Begin lock-step decoding of ``prompts`` (see :class:`LlamaDecodeState`)."""
        self._check(GenerationSettings(), prefixes)
        return LlamaDecodeState(self, [self.prompt_ids(p) for p in prompts], max_new_tokens)

    def cache_stats(self) -> dict[str, int]:
        """Prompt tokens decoded, prompt tokens found in the KV cache instead, and cache flushes."""
        return dict(self._cache.stats) if self._cache is not None else {}


def _score_pairs(cache: PromptCache, prompts: list[list[int]], answers: list[list[int]]) -> list[np.ndarray]:
    """Teacher-forced log-probabilities of each answer (ids ending with the end token) after its
    prompt: every pair continues its prompt's slot in a working sequence, all in one batch."""
    cache.begin(prompts, sum(len(a) for a in answers))
    slots = cache.prefill(prompts)
    seqs = cache.working(len(slots))
    entries: list[tuple[int, int, int, bool]] = []
    try:
        for slot, seq, a in zip(slots, seqs, answers, strict=True):
            cache.fork(slot, seq)
            entries += [(t, slot.n + j, seq, True) for j, t in enumerate(a[:-1])]
        rows = iter(cache.decode(entries))
        out = []
        for slot, a in zip(slots, answers, strict=True):
            dists = [slot.logp, *(next(rows) for _ in a[:-1])]
            out.append(np.array([lp[y] for lp, y in zip(dists, a, strict=True)], dtype=np.float64))
        return out
    finally:
        cache.release(seqs)


class LlamaDecodeState:
    """k prompts continued in k working sequences of one context: :meth:`logprobs` gives the k
    next-token log-distributions ``(k, V)``; :meth:`feed` appends one token to every sequence (one
    decode). Holds the generator's lock until :meth:`close` (or garbage collection)."""

    def __init__(self, gen: LlamaCppGenerator, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        self.gen, self.k = gen, len(prompt_ids)
        gen._lock.acquire()
        self._locked = True
        self.seqs: list[int] = []
        try:
            cache = gen._cache
            assert cache is not None
            self.cache = cache
            try:
                cache.begin(prompt_ids, self.k * (max_new_tokens + 1))
                slots: list[PromptSlot] = cache.prefill(prompt_ids)
            except CacheFull:
                cache.flush()
                slots = cache.prefill(prompt_ids)
            self.seqs = cache.working(self.k)
            for slot, seq in zip(slots, self.seqs, strict=True):
                cache.fork(slot, seq)
            self.lengths = [slot.n for slot in slots]
            self._rows = np.stack([slot.logp for slot in slots])
        except BaseException:
            self.close()
            raise

    def logprobs(self) -> torch.Tensor:
        """Next-token log-probabilities for every row, a ``(k, V)`` float32 torch tensor."""
        return torch.from_numpy(self._rows.astype(np.float32))

    def feed(self, token: int) -> None:
        """Append ``token`` to every sequence and decode the k new positions at once."""
        entries = [(int(token), n, seq, True) for seq, n in zip(self.seqs, self.lengths, strict=True)]
        self._rows = np.stack(self.cache.decode(entries))
        self.lengths = [n + 1 for n in self.lengths]

    def close(self) -> None:
        if self._locked:
            self._locked = False
            try:
                if self.seqs:
                    self.cache.release(self.seqs)
            finally:
                self.gen._lock.release()

    def __del__(self) -> None:
        self.close()


def _pick(logp: np.ndarray, s: GenerationSettings, rng: np.random.Generator) -> int:
    """Greedy, or a sample at ``temperature`` from the top-``top_p`` mass."""
    if not s.do_sample:
        return int(np.argmax(logp))
    p = np.exp((logp - logp.max()) / s.temperature)
    p /= p.sum()
    if s.top_p < 1.0:
        order = np.argsort(-p)
        keep = order[np.cumsum(p[order]) - p[order] < s.top_p]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))
