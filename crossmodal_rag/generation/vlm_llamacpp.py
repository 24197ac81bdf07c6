"""GGUF vision-language models on llama.cpp: a language model, its projector, and pictures in the prompt.

``vlm:MODEL.gguf,mmproj=PROJ.gguf`` loads the model as :class:`~crossmodal_rag.generation.llamacpp.LlamaCppGenerator`
does and the projector with libmtmd (``cyllama.llama.mtmd``). A
:class:`~crossmodal_rag.generation.vision_prompt.VisionPrompt` is rendered with the model's chat
template, each picture as llama.cpp's media marker after its label; the text between markers is
tokenized as libmtmd tokenizes it, and each picture becomes a run of placeholder ids (its first id
from a hash of its pixels, :data:`~crossmodal_rag.generation.kv_cache.MEDIA_CONT` after) as long
as the positions libmtmd gives it. The KV cache (:mod:`~crossmodal_rag.generation.kv_cache`)
decodes text as for any GGUF model and hands each run to libmtmd (``eval_chunks``: the picture
encoded by the vision tower, its embeddings decoded at that position), so everything the text
generator does works unchanged on pictures:

* greedy or sampled answers and streaming, decoded in lock-step;
* teacher-forced log-probabilities of answers (every mode's posterior), each distinct prompt
  decoded once and every answer continuing it;
* RAG-token's k rows in one context, one decode per step;
* a prompt that shares a prefix with a cached one (the query picture and the instruction) decodes
  only its tail. A picture outside the shared prefix is encoded again (concat's pictures and each
  item prompt's own one): the binding offers no way to decode stored embeddings.

Bounded as transformers VLMs are (:class:`~crossmodal_rag.generation.vision_prompt.ImageLimits`):
pictures per prompt, their side before libmtmd resizes them to the projector's resolution, and the
image tokens a prompt holds. Projectors with M-RoPE positions (the Qwen2-VL family: a picture
takes fewer positions than tokens) are refused with the transformers alternative. libmtmd logs to
stderr and the binding offers no switch: its calls run with stderr sent aside, and a failed load
quotes what it wrote.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from PIL import Image

from ..errors import ModelSpecError, QueryError
from .kv_cache import MEDIA_CONT
from .llamacpp import LlamaCppGenerator
from .prompting import GenerationSettings, Prefixes, Prompt, has_prefixes
from .vision_prompt import ImageLimits, VisionPrompt
from .vlm_gguf import GgufVlmSpec, check_projector, parse_gguf_vlm

__all__ = ["MARKER", "LlamaCppVisionGenerator", "load_gguf_vlm"]

logger = logging.getLogger(__name__)

MARKER = "<__media__>"  # libmtmd's default media marker (mtmd_default_marker)
_PICTURES = 128  # pictures whose libmtmd chunks are kept (one request shows at most k + 1)
_STDERR_LOCK = threading.Lock()


@contextmanager
def _stderr_aside() -> Iterator[list[str]]:
    """File descriptor 2 sent to a scratch file while libmtmd runs (it logs every picture there);
    yields a list that holds what was written once the block ends. Kept as is when this module
    logs at DEBUG."""
    written: list[str] = []
    if logger.isEnabledFor(logging.DEBUG):
        yield written
        return
    with _STDERR_LOCK, tempfile.TemporaryFile() as scratch:
        saved = os.dup(2)
        os.dup2(scratch.fileno(), 2)
        try:
            yield written
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            scratch.seek(0)
            written.append(scratch.read()[-4000:].decode("utf-8", "replace"))


def _errors(text: str) -> str:
    """libmtmd's failure lines in what it wrote (the last three), or its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if any(w in ln.lower() for w in ("error", "fail", "unable", "mismatch", "hint"))]
    return "; ".join(errors[-3:] or lines[-1:])


def load_gguf_vlm(spec: str) -> LlamaCppVisionGenerator:
    """``vlm:MODEL.gguf,mmproj=PROJ.gguf`` checked (both files GGUF, the binding has libmtmd), then
    its generator (loads lazily)."""
    files = parse_gguf_vlm(spec)
    if importlib.util.find_spec("cyllama") is None or importlib.util.find_spec("cyllama.llama.mtmd") is None:
        raise ModelSpecError(
            f"GGUF vision-language models ({files.model.name} + {files.mmproj.name}) need the llama.cpp binding "
            "cyllama with libmtmd (pip install 'cyllama>=0.2.18,<0.3'), or a transformers VLM: a save_pretrained "
            "folder (--generator /models/SmolVLM-256M-Instruct) or vlm:HuggingFaceTB/SmolVLM-256M-Instruct")
    return LlamaCppVisionGenerator(files)


class LlamaCppVisionGenerator(LlamaCppGenerator):
    """A GGUF VLM on llama.cpp (model + projector); build it with :func:`load_generator`
    (``vlm:MODEL.gguf,mmproj=PROJ.gguf``, loads lazily). Implements
    :class:`~crossmodal_rag.generation.interface.TextGenerator`; prompts may be VisionPrompts."""

    sees_images = True  # the RAG pipeline hands it VisionPrompts

    def __init__(self, files: GgufVlmSpec, n_threads: int | None = None, limits: ImageLimits | None = None) -> None:
        super().__init__(str(files.model), n_threads)
        self.files = files
        self.spec = f"vlm:{files.model},mmproj={files.mmproj}"
        self.limits = limits or ImageLimits()
        self.mtmd: Any = None  # cyllama MtmdContext
        self._pictures: OrderedDict[int, tuple[Any, int]] = OrderedDict()  # first id -> (chunks, positions)
        self._pictures_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LlamaCppVisionGenerator({str(self.files.model)!r}, mmproj={str(self.files.mmproj)!r})"

    # -- loading -------------------------------------------------------------------------
    def _load(self) -> None:
        check_projector(self.files.mmproj)  # before libmtmd, which aborts on some malformed files
        super()._load()
        try:
            self.mtmd = self._projector()
        except BaseException:
            self.model = None  # not loaded: the next call tries again
            raise
        self._cache.media = self._decode_picture  # type: ignore[union-attr]

    def _projector(self) -> Any:
        from cyllama.llama import mtmd

        path = self.files.mmproj
        check_projector(path, int(self.model.n_embd))
        params = mtmd.MtmdContextParams()
        params.use_gpu, params.n_threads, params.print_timings, params.warmup = False, self.n_threads, False, False
        written: list[str] = []
        try:
            with _stderr_aside() as written:
                ctx = mtmd.MtmdContext(str(path), self.model, params)
        except (RuntimeError, ValueError) as e:
            raise ModelSpecError(f"llama.cpp cannot use the projector {path} with {self.files.model.name}: "
                                 f"{_errors(''.join(written)) or e}") from e
        if not ctx.supports_vision:
            raise ModelSpecError(f"the projector {path} has no vision encoder")
        if ctx.uses_mrope:
            raise ModelSpecError(f"the projector {path} places pictures with M-RoPE (the Qwen2-VL family), which "
                                 "this runtime does not drive yet: use the transformers checkpoint instead "
                                 "(vlm:Qwen/Qwen2-VL-2B-Instruct or its save_pretrained folder)")
        return ctx

    @property
    def max_input_tokens(self) -> int:
        """The text budget: the model's context minus the image tokens a prompt may hold, capped at 2048."""
        self.load()
        return max(min(int(self.n_ctx_train or 2048) - self.limits.max_image_tokens, 2048), 64)

    def _check(self, s: GenerationSettings, prefixes: Prefixes) -> None:
        self.load()
        if has_prefixes(prefixes):
            raise QueryError("a vision-language model reads the images themselves; image prefixes are for "
                             "text generators (leave --image-prefix out)")
        if s.num_beams > 1:
            raise QueryError("beam search is not available on the llama.cpp runtime: use --beams 1 (or --sample)")

    # -- prompts with pictures -------------------------------------------------------------
    def render(self, prompt: Prompt | VisionPrompt) -> str:  # type: ignore[override]
        """The text the model reads: each picture as the media marker after its label, leading the
        last user message (as :func:`~crossmodal_rag.generation.vision_prompt.to_messages` places
        them), in the GGUF's chat template."""
        vp = prompt if isinstance(prompt, VisionPrompt) else VisionPrompt(prompt)
        messages = [{"role": "user", "content": vp.prompt}] if isinstance(vp.prompt, str) else list(vp.prompt)
        if vp.images:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            last = users[-1] if users else len(messages) - 1
            lead = "".join(f"{label}:{MARKER}" for label in vp.labels)
            messages[last] = {**messages[last], "content": lead + messages[last]["content"]}
        return super().render(messages)

    def prompt_ids(self, prompt: Prompt | VisionPrompt) -> list[int]:  # type: ignore[override]
        """The prompt's ids: text tokens as libmtmd tokenizes the text between markers (a leading
        BOS unless the chat template renders it), each picture a run of placeholder ids. Refuses a
        prompt over :class:`ImageLimits`."""
        vp = prompt if isinstance(prompt, VisionPrompt) else VisionPrompt(prompt)
        if len(vp.images) > self.limits.max_images:
            raise QueryError(f"{len(vp.images)} images in one prompt; the limit is {self.limits.max_images} "
                             "(ImageLimits.max_images)")
        parts = self.render(vp).split(MARKER)
        if len(parts) != len(vp.images) + 1:
            raise QueryError(f"the prompt's text holds llama.cpp's media marker {MARKER}; remove it")
        ids = self.tokenize(parts[0])
        if self.bos >= 0 and not self.chat_template and ids[:1] != [self.bos]:
            ids = [self.bos, *ids]
        n_image = 0
        for image, text in zip(vp.images, parts[1:], strict=True):
            first, n = self._picture(image)
            ids += [first, *[MEDIA_CONT] * (n - 1)]
            ids += self.tokenize(text)
            n_image += n
        if n_image > self.limits.max_image_tokens:
            raise QueryError(f"the prompt's {len(vp.images)} images take {n_image} tokens; the limit is "
                             f"{self.limits.max_image_tokens} (fewer images, or a smaller max_side)")
        if ids and ids[-1] < 0:
            raise QueryError("a prompt cannot end with a picture: give text after it")
        return ids

    def _picture(self, image: Image.Image) -> tuple[int, int]:
        """The picture's first placeholder id (below ``MEDIA_CONT``, from its pixels) and the
        positions it takes; libmtmd's chunks for it are kept for :meth:`_decode_picture`."""
        from cyllama.llama import mtmd

        image = image.convert("RGB")
        data = image.tobytes()
        digest = hashlib.blake2b(f"{image.width}x{image.height}".encode() + data, digest_size=7).digest()
        first = MEDIA_CONT - 1 - int.from_bytes(digest, "big")
        with self._pictures_lock:
            got = self._pictures.get(first)
            if got is None:
                self.load()
                bitmap = mtmd.MtmdBitmap.create_image(image.width, image.height, data)
                with _stderr_aside():
                    chunks = self.mtmd.tokenize(MARKER, [bitmap], False, True)
                n = int(chunks.total_tokens)
                if int(chunks.total_positions) != n:
                    raise QueryError(f"a picture takes {n} tokens but {chunks.total_positions} positions: "
                                     "not supported on this runtime")
                got = self._pictures[first] = (chunks, n)
            self._pictures.move_to_end(first)
            while len(self._pictures) > _PICTURES:
                self._pictures.popitem(last=False)
        return first, got[1]

    def _decode_picture(self, first: int, seq: int, pos: int) -> int:
        """The KV cache's ``media`` hook: decode the picture ``first`` names at ``pos`` of ``seq``."""
        with self._pictures_lock:
            got = self._pictures.get(first)
        if got is None:
            raise QueryError(f"a picture left the cache before it was decoded (more than {_PICTURES} pictures "
                             "in one request): retrieve fewer items (-k)")
        chunks, n = got
        ctx = self._cache.ctx  # type: ignore[union-attr]
        written: list[str] = []
        try:
            with _stderr_aside() as written:
                end = self.mtmd.eval_chunks(ctx, chunks, pos, seq, int(ctx.n_batch), False)
        except (RuntimeError, ValueError) as e:
            raise QueryError(f"llama.cpp could not decode a picture: {_errors(''.join(written)) or e}") from e
        if end != pos + n:
            raise QueryError(f"llama.cpp decoded a picture of {n} positions at {pos} but ended at {end}")
        return n
