"""``.gguf`` generators on llama.cpp (through ``llama-cpp-python``, the ``[llama]`` extra).

The file is memory-mapped and loaded once per process (:func:`~crossmodal_rag.generation.models.load_generator`
caches it); the weights stay quantised, so a 135M model loads in about a second and decodes
tens of tokens per second on two cores. Instruct models get the chat template stored in the
file's metadata (``tokenizer.chat_template``), rendered like transformers does.

:class:`LlamaCppGenerator` offers what :class:`~crossmodal_rag.generation.models.Generator` offers
RAG, with the same prompts and token ids (plain prompts get the BOS token, answers are scored as
text + end token):

* :meth:`~LlamaCppGenerator.generate` / :meth:`~LlamaCppGenerator.stream` -- greedy or sampled
  decoding with a KV cache, one prompt at a time;
* :meth:`~LlamaCppGenerator.answer_token_logprobs` -- teacher-forced log-probabilities of given
  answers: each distinct prompt is decoded once and every answer continues from its cache;
* :meth:`~LlamaCppGenerator.start` -- k prompts decoded in lock-step as k sequences of one
  context (one ``llama_decode`` per step for all k), for RAG-token.

Image prefixes and beam search need the transformers runtime (``CROSSMODAL_RAG_GGUF_RUNTIME=transformers``).
One context serves every call, under a lock: calls from several threads run one after another.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ModelSpecError, QueryError
from .prompting import GenerationSettings, Prefixes, Prompt, has_prefixes
from .stream import TextStream

__all__ = ["LlamaCppGenerator", "default_threads", "llama_cpp_available"]

logger = logging.getLogger(__name__)

_BACKEND_LOCK = threading.Lock()
_BACKEND_READY = False


def llama_cpp_available() -> bool:
    """Whether ``llama-cpp-python`` is installed (without importing it)."""
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


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
    """The llama_cpp module, its backend initialised once and its logging quiet (errors only)."""
    global _BACKEND_READY
    try:
        import llama_cpp
        from llama_cpp import _logger
    except ImportError as e:
        raise ModelSpecError("the llama.cpp runtime needs llama-cpp-python: pip install 'crossmodal-rag[llama]' "
                             f"(it builds from source with the system C++ compiler): {e}") from e
    with _BACKEND_LOCK:
        if not _BACKEND_READY:
            _logger.set_verbose(False)
            llama_cpp.llama_backend_init()
            _BACKEND_READY = True
    return llama_cpp


class LlamaCppGenerator:
    """A ``.gguf`` causal LM on llama.cpp; build it with :func:`load_generator` (loads lazily).
    Implements :class:`~crossmodal_rag.generation.interface.TextGenerator`."""

    runtime = "llama.cpp"
    kind = "causal"

    def __init__(self, spec: str, n_threads: int | None = None) -> None:
        self.spec = spec.strip()
        if not self.spec.endswith(".gguf"):
            raise ModelSpecError(f"the llama.cpp runtime reads .gguf files, not {self.spec!r}")
        self.device = "cpu"
        self.n_threads = n_threads or default_threads()
        self.model: Any = None  # llama_cpp._internals.LlamaModel
        self.chat_template: str | None = None
        self._eos_ids: set[int] = set()  # filled on load (see eos_ids)
        self._ctx: Any = None
        self._ctx_cells = self._ctx_seqs = 0
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
        path = Path(os.path.expanduser(self.spec))
        if not path.is_file():
            raise ModelSpecError(f"GGUF file does not exist: {path}")
        lib = _lib()
        from llama_cpp import _internals
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        params = lib.llama_model_default_params()
        params.use_mmap, params.n_gpu_layers = True, 0
        try:
            model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as e:
            raise ModelSpecError(f"llama.cpp cannot load {path}: {e} (not a GGUF model llama.cpp knows?)") from e
        vocab = model.vocab
        self.n_vocab = model.n_vocab()
        self.bos = int(lib.llama_vocab_bos(vocab))
        self.eos = int(lib.llama_vocab_eos(vocab))
        self._eos_ids = {t for t in range(self.n_vocab) if lib.llama_vocab_is_eog(vocab, t)}
        if self.eos >= 0:
            self._eos_ids.add(self.eos)
        self.n_ctx_train = model.n_ctx_train()
        self.chat_template = model.metadata().get("tokenizer.chat_template") or None
        self._formatter = None
        if self.chat_template:
            text = lambda t: model.token_get_text(t) if t >= 0 else ""  # noqa: E731
            self._formatter = Jinja2ChatFormatter(self.chat_template, eos_token=text(self.eos),
                                                  bos_token=text(self.bos))
        self._lib, self.model = lib, model
        logger.info("loaded %s on llama.cpp (%d threads)", self.spec, self.n_threads)

    # -- prompts -------------------------------------------------------------------------
    @property
    def max_input_tokens(self) -> int:
        self.load()
        return min(int(self.n_ctx_train or 512), 2048)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (special tokens written in the text are parsed; no BOS added)."""
        self.load()
        data = text.encode("utf-8")
        return self.model.tokenize(data, add_bos=False, special=True) if data else []

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens dropped (an incomplete UTF-8 tail becomes U+FFFD)."""
        self.load()
        buf = ctypes.create_string_buffer(256)
        out = bytearray()
        for t in ids:
            n = self._lib.llama_token_to_piece(self.model.vocab, int(t), buf, 256, 0, False)
            out += buf.raw[: max(n, 0)]
        return out.decode("utf-8", errors="replace")

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def truncate_tokens(self, text: str, n: int) -> str:
        return self.decode(self.tokenize(text)[: max(n, 0)])

    @property
    def is_chat(self) -> bool:
        self.load()
        return self._formatter is not None

    @property
    def eos_ids(self) -> set[int]:
        """The tokens that end an answer (the vocabulary's end-of-generation tokens and EOS)."""
        self.load()
        return self._eos_ids

    def render(self, prompt: Prompt) -> str:
        """Like :meth:`Generator.render`: the GGUF's chat template for instruct models."""
        self.load()
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self._formatter is not None:
            return self._formatter(messages=messages).prompt  # type: ignore[arg-type]
        return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The rendered prompt's token ids, with a leading BOS unless a chat template renders it."""
        ids = self.tokenize(self.render(prompt))
        if self.bos >= 0 and self._formatter is None and ids[:1] != [self.bos]:
            ids = [self.bos, *ids]
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        """The answer's token ids, then the end token."""
        ids = self.tokenize(answer)
        return [*ids, self.eos] if self.eos >= 0 else ids

    # -- the context ---------------------------------------------------------------------
    def _context(self, cells: int, seqs: int = 1) -> Any:
        """The (cleared) context, grown to hold ``cells`` tokens over ``seqs`` sequences."""
        cells = max(min(512, self.n_ctx_train or 512), -(-cells // 256) * 256)
        if self._ctx is None or cells > self._ctx_cells or seqs > self._ctx_seqs:
            from llama_cpp import _internals

            cells, seqs = max(cells, self._ctx_cells), max(seqs, self._ctx_seqs, 8)
            p = self._lib.llama_context_default_params()
            p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = cells, cells, min(cells, 512), seqs
            p.n_threads = p.n_threads_batch = self.n_threads
            p.kv_unified = True  # every sequence may use any cell (k prompts of any lengths)
            p.no_perf = True
            if self._ctx is not None:
                self._ctx.close()
            self._ctx = _internals.LlamaContext(model=self.model, params=p, verbose=False)
            self._ctx_cells, self._ctx_seqs = cells, seqs
        else:
            self._ctx.kv_cache_clear()
        return self._ctx

    def _decode(self, ctx: Any, entries: list[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """Decode ``(token, position, sequence, wants_logits)`` entries, in chunks that fit the
        batch; the float64 log-softmax rows of the entries that want logits, in order."""
        out: list[np.ndarray] = []
        step = self._ctx_cells
        for start in range(0, len(entries), step):
            chunk = entries[start : start + step]
            batch = self._lib.llama_batch_init(len(chunk), 0, 1)
            try:
                for i, (tok, pos, seq, want) in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                    batch.seq_id[i][0], batch.logits[i] = seq, want
                batch.n_tokens = len(chunk)
                rc = self._lib.llama_decode(ctx.ctx, batch)
                if rc != 0:
                    raise QueryError(f"llama.cpp could not decode {len(chunk)} tokens with {self.spec} "
                                     f"(llama_decode returned {rc}); try a shorter prompt or fewer items")
                for i, (_, _, _, want) in enumerate(chunk):
                    if want:
                        ptr = self._lib.llama_get_logits_ith(ctx.ctx, i)
                        out.append(_log_softmax(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))))
            finally:
                self._lib.llama_batch_free(batch)
        return out

    # -- generation ----------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], settings: GenerationSettings | None = None,
                 num_return_sequences: int = 1, prefixes: Prefixes = None) -> list[list[str]]:
        """Answers for each prompt (``num_return_sequences`` sampled ones each, or the greedy one)."""
        s = settings or GenerationSettings()
        self._check(s, prefixes)
        n = num_return_sequences
        if n > 1 and not s.do_sample:
            raise QueryError(f"{n} answers per prompt need beam search or sampling; the llama.cpp runtime "
                             "samples (--sample) but has no beam search: use --beams 1, or set "
                             "CROSSMODAL_RAG_GGUF_RUNTIME=transformers")
        rng = np.random.default_rng(s.seed)
        return [[self.stream(p, s, rng=rng).text() for _ in range(n)] for p in prompts]

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
            ids = self.prompt_ids(prompt)
            ctx = self._context(len(ids) + s.max_new_tokens)
            (logp,) = self._decode(ctx, [(t, i, 0, i == len(ids) - 1) for i, t in enumerate(ids)])
            eos = self._eos_ids
            for step in range(s.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    return
                tok = _pick(logp, s, rng)
                if tok in eos:
                    return
                yield tok
                if step + 1 < s.max_new_tokens:
                    (logp,) = self._decode(ctx, [(tok, len(ids) + step, 0, True)])

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
        (``(T_i,)`` float64 arrays). Each distinct prompt is decoded once; its answers continue
        from that cache."""
        self._check(GenerationSettings(), prefixes)
        if len(prompts) != len(answers):
            raise ValueError("prompts and answers must have the same length")
        out: list[np.ndarray | None] = [None] * len(prompts)
        with self._lock:
            groups: dict[tuple[int, ...], list[int]] = {}
            for i, p in enumerate(prompts):
                groups.setdefault(tuple(self.prompt_ids(p)), []).append(i)
            for p_ids, rows in groups.items():
                a_ids = {i: self.answer_ids(answers[i]) for i in rows}
                ctx = self._context(len(p_ids) + max(len(a) for a in a_ids.values()))
                n = len(p_ids) - 1
                self._decode(ctx, [(t, i, 0, False) for i, t in enumerate(p_ids[:-1])])
                for i in rows:
                    a = a_ids[i]
                    self._lib.llama_memory_seq_rm(ctx.memory, 0, n, -1)
                    feed = [p_ids[-1], *a[:-1]]
                    rows_lp = self._decode(ctx, [(t, n + j, 0, True) for j, t in enumerate(feed)])
                    out[i] = np.array([lp[y] for lp, y in zip(rows_lp, a, strict=True)], dtype=np.float64)
        return out  # type: ignore[return-value]

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


class LlamaDecodeState:
    """k prompts as k sequences of one context: :meth:`logprobs` gives the k next-token
    log-distributions ``(k, V)``; :meth:`feed` appends one token to every sequence (one decode).
    Holds the generator's lock until :meth:`close` (or garbage collection)."""

    def __init__(self, gen: LlamaCppGenerator, prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        self.gen, self.k = gen, len(prompt_ids)
        gen._lock.acquire()
        self._locked = True
        try:
            self.ctx = gen._context(sum(len(p) for p in prompt_ids) + self.k * (max_new_tokens + 1), self.k)
            self.lengths = [len(p) for p in prompt_ids]
            entries = [(t, i, z, i == len(p) - 1) for z, p in enumerate(prompt_ids) for i, t in enumerate(p)]
            self._rows = np.stack(gen._decode(self.ctx, entries))
        except BaseException:
            self.close()
            raise

    def logprobs(self) -> torch.Tensor:
        """Next-token log-probabilities for every row, a ``(k, V)`` float32 torch tensor."""
        return torch.from_numpy(self._rows.astype(np.float32))

    def feed(self, token: int) -> None:
        """Append ``token`` to every sequence and decode the k new positions at once."""
        entries = [(int(token), n, z, True) for z, n in enumerate(self.lengths)]
        self._rows = np.stack(self.gen._decode(self.ctx, entries))
        self.lengths = [n + 1 for n in self.lengths]

    def close(self) -> None:
        if self._locked:
            self._locked = False
            self.gen._lock.release()

    def __del__(self) -> None:
        self.close()


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


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
