"""One llama.cpp context whose sequences keep decoded prompts: the KV cache that lets every RAG
mode decode each prompt once.

The context has :data:`SEQUENCES` sequences over one unified pool of KV cells. The first
:data:`PROMPT_SLOTS` hold prompts (:class:`PromptSlot`: the token ids, the sequence, and the
next-token log-distribution after the last prompt token); the others are working sequences that
an answer, a candidate being scored or a lock-step row continues in, after
:meth:`PromptCache.fork` has shared the prompt's cells with them (``llama_memory_seq_cp``: no
copy, the cells gain a sequence id). A new prompt starts from the longest prefix it shares with a
cached one (item prompts share the instruction; the concat prompt shares the first item), so only
its own tail is decoded.

Cells are counted as prompts take them: a prompt's tail stays until the cache is flushed; a
request reserves room for its working tokens, which return when it releases them. A request that does not fit flushes the
cache first (all prompts go), and grows the context when it alone needs more.

Pictures (GGUF VLMs, :mod:`~crossmodal_rag.generation.vlm_llamacpp`): a prompt's ids may hold runs
of placeholder ids below zero, one per position a picture takes: the run's first id names the
picture (:data:`MEDIA_CONT` fills the rest), and :attr:`PromptCache.media` decodes it whole at its
position. A shared prefix never ends inside a picture; a prompt ends with a text token.

Shapes: V the vocabulary; a log-distribution is ``(V,)`` float64.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import QueryError

__all__ = ["MEDIA_CONT", "PROMPT_SLOTS", "SEQUENCES", "CacheFull", "PromptCache", "PromptSlot", "log_softmax"]

logger = logging.getLogger(__name__)

SEQUENCES = 256  # llama.cpp's most (LLAMA_MAX_SEQ)
PROMPT_SLOTS = 64  # sequences 0..63 keep prompts; 64..255 are working sequences
MIN_CELLS = 2048  # the context's first size (grown by doubling when a request needs more)
MEDIA_CONT = -1  # the placeholder id of a picture's positions after its first


class CacheFull(QueryError):
    """llama.cpp found no free KV cells for a batch (the caller flushes and tries once more)."""


@dataclass
class PromptSlot:
    """A prompt decoded into sequence ``seq``: positions ``0..n-1`` hold ``ids``."""

    ids: tuple[int, ...]
    seq: int
    logp: np.ndarray  # (V,) log P(next token | prompt)
    tick: int = 0  # when it was last used (least recently used slots are evicted first)

    @property
    def n(self) -> int:
        return len(self.ids)


def _shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def log_softmax(logits: Sequence[float] | np.ndarray) -> np.ndarray:
    """``(V,)`` float64 log-probabilities from a row of logits."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


class PromptCache:
    """The context of one loaded model (cyllama objects), its prompt slots and working sequences.
    Not thread-safe: the generator calls it under its lock."""

    def __init__(self, lib: Any, model: Any, n_threads: int, n_ctx_train: int) -> None:
        self._lib, self._model = lib, model
        self.n_threads = n_threads
        self.n_ctx_train = n_ctx_train
        self.ctx: Any = None
        self.cells = 0  # the context's size in KV cells
        self.used = 0  # cells taken by prompts (and working tokens not yet released)
        self.slots: dict[tuple[int, ...], PromptSlot] = {}
        self._batch: Any = None
        self._ticks = itertools.count(1)
        self.request = 0  # slots used since this tick belong to the request in progress
        self.stats = {"prompt_tokens": 0, "reused_tokens": 0, "flushes": 0}
        # decodes the picture whose first placeholder id is given at (sequence, position) and
        # returns the positions it took (None: the prompts hold text only)
        self.media: Callable[[int, int, int], int] | None = None

    # -- the context -----------------------------------------------------------------------
    def _make(self, cells: int) -> None:
        lib = self._lib
        p = lib.LlamaContextParams()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = cells, cells, min(cells, 512), SEQUENCES
        p.n_threads = p.n_threads_batch = self.n_threads
        p.kv_unified = True  # every sequence may use any cell: prompts of any lengths share one pool
        p.swa_full = True  # sliding-window layers (Gemma 3) keep every position, so prefixes can be shared
        p.no_perf = True
        if self.ctx is not None:
            self.ctx.close()
        self.ctx = lib.LlamaContext(model=self._model, params=p, verbose=False)
        self._batch = lib.LlamaBatch(n_tokens=cells, embd=0, n_seq_max=1)
        self.cells, self.used, self.slots = cells, 0, {}
        logger.debug("llama.cpp context: %d cells, %d sequences, %d threads", cells, SEQUENCES, self.n_threads)

    def flush(self) -> None:
        """Forget every cached prompt (the cells are all free again)."""
        if self.ctx is not None:
            self.ctx.kv_cache_clear()
        self.used, self.slots = 0, {}
        self.stats["flushes"] += 1

    def begin(self, prompts: Sequence[Sequence[int]], extra: int) -> None:
        """Make room for a request: the ``prompts`` it decodes (those not cached yet count in full)
        and ``extra`` working tokens. Marks the start of the request (its slots are not evicted)."""
        self.request = next(self._ticks)
        fresh = {tuple(p) for p in prompts if tuple(p) not in self.slots}
        need = sum(len(p) for p in fresh) + extra
        if self.ctx is None or need > self.cells:
            cells = max(MIN_CELLS, self.cells)
            while cells < need:
                cells *= 2
            self._make(cells)
        elif self.used + need > self.cells:
            self.flush()

    # -- decoding --------------------------------------------------------------------------
    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> list[np.ndarray]:
        """Decode ``(token, position, sequence, wants_logits)`` entries (in chunks that fit the
        batch); the log-distributions of the entries that want logits, in order."""
        out: list[np.ndarray] = []
        step = self.cells
        for start in range(0, len(entries), step):
            chunk = entries[start : start + step]
            batch = self._batch
            batch.clear()
            for tok, pos, seq, want in chunk:
                batch.add(int(tok), int(pos), [int(seq)], bool(want))
            try:
                self.ctx.decode(batch)
            except ValueError as e:
                raise CacheFull(f"llama.cpp found no room for {len(chunk)} tokens in its KV cache: {e}") from e
            except RuntimeError as e:
                raise QueryError(f"llama.cpp could not decode {len(chunk)} tokens: {e}") from e
            for i, (_, _, _, want) in enumerate(chunk):
                if want:
                    out.append(log_softmax(self.ctx.get_logits_ith(i)))
        return out

    # -- prompts ---------------------------------------------------------------------------
    def prefill(self, prompts: Sequence[Sequence[int]]) -> list[PromptSlot]:
        """The slot of each prompt, decoding the ones not cached yet (each from the longest prefix
        it shares with a cached prompt)."""
        out = []
        for ids in prompts:
            key = tuple(ids)
            if not key:
                raise QueryError("an empty prompt cannot be decoded (the model needs at least one token)")
            slot = self.slots.get(key)
            if slot is None:
                slot = self._decode_prompt(key)
            else:
                self.stats["reused_tokens"] += len(key)
            slot.tick = next(self._ticks)
            out.append(slot)
        return out

    def _decode_prompt(self, ids: tuple[int, ...]) -> PromptSlot:
        seq = self._free_slot()
        shared, source = 0, None
        for slot in self.slots.values():
            n = _shared_prefix(slot.ids, ids)
            if n > shared:
                shared, source = n, slot
        shared = min(shared, len(ids) - 1)  # the last token is decoded again for its logits
        while shared > 0 and ids[shared] == MEDIA_CONT:  # a picture is decoded whole
            shared -= 1
        if source is not None and shared > 0:
            self.ctx.memory_seq_cp(source.seq, seq, 0, shared)
        tail = ids[shared:]
        logp = self._decode_tail(tail, shared, seq)
        self.used += len(tail)
        self.stats["prompt_tokens"] += len(tail)
        self.stats["reused_tokens"] += shared
        slot = PromptSlot(ids, seq, logp)
        self.slots[ids] = slot
        return slot

    def _decode_tail(self, tail: tuple[int, ...], start: int, seq: int) -> np.ndarray:
        """Decode ``tail`` at positions ``start..`` of ``seq`` (text in batches, each picture
        through :attr:`media`); the log-distribution after its last token."""
        if min(tail) >= 0:
            (logp,) = self.decode([(t, start + i, seq, i == len(tail) - 1) for i, t in enumerate(tail)])
            return logp
        if tail[-1] < 0 or self.media is None:
            raise QueryError("a prompt with pictures must end with text, on a model that reads pictures")
        i, rows = 0, []
        while i < len(tail):
            if tail[i] < 0:
                i += self.media(tail[i], seq, start + i)
                continue
            j = next((k for k in range(i, len(tail)) if tail[k] < 0), len(tail))
            rows = self.decode([(tail[k], start + k, seq, k == len(tail) - 1) for k in range(i, j)])
            i = j
        return rows[-1]

    def _free_slot(self) -> int:
        taken = {s.seq for s in self.slots.values()}
        for seq in range(PROMPT_SLOTS):
            if seq not in taken:
                return seq
        old = min(self.slots.values(), key=lambda s: s.tick)
        if old.tick >= self.request:
            raise QueryError(f"one request needs more than {PROMPT_SLOTS} distinct prompts at once; "
                             "retrieve fewer items (-k)")
        self.ctx.memory_seq_rm(old.seq, -1, -1)  # its own cells stay counted until the next flush
        del self.slots[old.ids]
        return old.seq

    # -- working sequences -----------------------------------------------------------------
    @staticmethod
    def working(n: int) -> list[int]:
        """``n`` working sequence ids (at most ``SEQUENCES - PROMPT_SLOTS`` at once)."""
        if n > SEQUENCES - PROMPT_SLOTS:
            raise QueryError(f"{n} sequences at once is more than llama.cpp's {SEQUENCES - PROMPT_SLOTS}")
        return list(range(PROMPT_SLOTS, PROMPT_SLOTS + n))

    def fork(self, slot: PromptSlot, seq: int) -> None:
        """Let working sequence ``seq`` continue ``slot``'s prompt (shares its cells)."""
        self.ctx.memory_seq_cp(slot.seq, seq, 0, slot.n)

    def release(self, seqs: Sequence[int]) -> None:
        """Empty working sequences ``seqs``: their own tokens' cells are free again (they were
        reserved by :meth:`begin`, never counted in ``used``)."""
        for seq in seqs:
            self.ctx.memory_seq_rm(seq, -1, -1)

    def close(self) -> None:
        if self.ctx is not None:
            self.ctx.close()
            self.ctx = None
