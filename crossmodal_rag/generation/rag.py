"""Retrieval-augmented generation: P(y|x) = sum_z P(z|x) P(y|x,z) over the top-k retrieved items.

Modes:

* ``concat`` -- one prompt holding the question and the retrieved texts (under a token budget);
* ``rag-sequence`` -- candidates generated per item, each candidate y scored by
  ``log sum_z P(z|x) P(y|x,z)`` (every candidate under every item's prompt, one batched pass);
* ``rag-token`` -- at each decoding step the k next-token distributions are mixed with P(z|x)
  (the k items decoded in lock-step, one batched forward pass per step).

Every answer carries its sources with ``prior`` = P(z|x) (softmax of retrieval scores at
``prior_temperature``) and ``posterior`` = P(z|x,y) proportional to P(z|x) P(y|x,z), the share of
the answer's likelihood each source carried, computed for every mode by scoring the final answer
under each item's own prompt.

In every mode, y is the returned answer text re-tokenised plus the end-of-sequence token (never
the decode-time ids, which may hold special tokens the text drops, or lack the end token when
``max_new_tokens`` cut the answer). ``Answer.logprob`` is log P(y|x) under the mode's own model
(:data:`LOGPROB_OF`, also written in the answer as ``logprob_of``): the concat prompt's likelihood,
the rag-sequence mixture sum_z P(z|x) P(y|x,z), or the rag-token per-token mixture
prod_t sum_z P(z|x) p(y_t|x,z,y_<t).

With an image prefix (:class:`~crossmodal_rag.generation.prefix.ImagePrefix`) the generator also
reads images as prefix vectors: in ``concat`` the one prompt carries the query image's prefix
(when the query has an image); every item's own prompt (rag-sequence, rag-token, and the posterior
scoring of all modes) carries the prefix of the item's image when the item is an image, else the
query image's prefix, else none. ``Answer.prefix_images`` and ``Source.prefix_image`` say which.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from .._config import strict_from_dict
from ..errors import ImageDecodeError, QueryError
from ..ingestion.images import load_image
from ..lazy_torch import inference_mode, torch
from ..search import DEFAULT_MODE, Hit, SearchRequest, check_k
from ..search import MODES as SEARCH_MODES
from .constrained import SpanConstraint
from .evidence import ABSTAIN_WEIGHT, copy_sources
from .extractive import (
    ANSWER_STYLES,
    EXAMPLES_MIN_CONTEXT,
    EXTRACTIVE_SHORT_TEMPLATE,
    EXTRACTIVE_TEMPLATE,
    abstain_spans,
    cite,
    clean_answer,
    current_question,
    extractive_messages,
    is_short_answer_question,
    model_answer_style,
)
from .models import GenerationSettings, Prompt, load_generator
from .stopping import SentenceStop
from .stream import Event, Final, Sources, TextStream, Token

if TYPE_CHECKING:
    from ..collection import Collection
    from .checkpoint import RagCheckpoint
    from .interface import TextGenerator
    from .prefix import ImagePrefix

__all__ = ["LOGPROB_OF", "MODES", "Answer", "RagPipeline", "RagSettings", "Source", "priors"]

logger = logging.getLogger(__name__)

MODES = ("concat", "rag-sequence", "rag-token")
#: What ``Answer.logprob`` is in each mode: y = the returned text re-tokenised plus the end token.
LOGPROB_OF = {
    "concat": "log P(answer+eos | concat prompt)",
    "rag-sequence": "log sum_z P(z|x) P(answer+eos | x,z)",
    "rag-token": "sum_t log sum_z P(z|x) P(y_t | x,z,y<t) over answer+eos",
}

DEFAULT_TEMPLATE = (
    "Answer the question using the context.\n\nContext:\n{context}\n\nQuestion: {question}\n\nAnswer:"
)
#: With the default template, chat (instruct) models get the instruction and context as the
#: system message and the question as the user message: small instruct models follow the
#: context far more reliably that way than with everything in one user turn.
CHAT_SYSTEM_TEMPLATE = "Answer the question using the context.\n\nContext:\n{context}"


@dataclass(frozen=True)
class RagSettings:
    """How retrieval conditions generation."""

    k: int = 5  # items retrieved
    mode: str = "concat"  # concat | rag-sequence | rag-token
    target: str = "texts"  # what retrieval returns: texts (captions, passages), images, all
    prior_temperature: float = 0.05  # P(z|x) = softmax(score / prior_temperature)
    prompt_template: str = DEFAULT_TEMPLATE  # needs {context} and {question}
    item_template: str = "[{n}] {text}"  # one retrieved item inside the context
    context_separator: str = "\n"  # between items in concat mode
    max_context_tokens: int | None = None  # prompt budget; default: the generator's context
    default_question: str = "What does this image show?"  # for an image-only query
    min_score: float | str | None = None  # abstain below this top score ("auto": calibrated)
    where: tuple[str, ...] = ()  # metadata filters on retrieval (see crossmodal_rag.search.filters)
    abstain_answer: str = "not found in the collection"  # the answer when abstaining
    # how a text question retrieves: auto | dense | keyword | hybrid (crossmodal_rag.search.MODES)
    search_mode: str = DEFAULT_MODE
    # auto: short-answer questions get the extractive prompt, span-copying decoding and a stop at
    # the sentence end (generation.extractive); extract: every question; free: none.
    # model (default): auto for base decoder-only LMs, free for chat and seq2seq models, by
    # measurement (extractive.model_answer_style; benchmarks/RESULTS.md, "Small local answerers")
    answer_style: str = "model"

    def __post_init__(self) -> None:
        check_k(self.k)
        if self.answer_style not in ANSWER_STYLES:
            raise ValueError(f"unknown answer_style {self.answer_style!r}; choose one of {', '.join(ANSWER_STYLES)}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.prior_temperature <= 0:
            raise ValueError(f"prior_temperature must be > 0, got {self.prior_temperature}")
        for key in ("{context}", "{question}"):
            if key not in self.prompt_template:
                raise ValueError(f"prompt_template must contain {key}")
        if self.search_mode not in SEARCH_MODES:
            raise ValueError(f"unknown search_mode {self.search_mode!r}; choose one of {', '.join(SEARCH_MODES)}")
        from ..search.filters import parse_where

        parse_where(self.where)  # a bad filter is refused here, before any model loads

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RagSettings:
        return strict_from_dict(cls, data, "RAG settings")


@dataclass
class Source:
    """A retrieved item and how much it carried the answer."""

    rank: int
    id: int
    kind: str  # image | caption | passage
    path: str | None
    text: str  # what the generator read for this item
    caption: str  # the item's caption(s) or passage text (for an image: its captions joined)
    score: float  # retrieval score (cosine)
    prior: float  # P(z|x)
    posterior: float  # P(z|x,y)
    logprob: float  # log P(y|x,z): the answer text + end token under this item's own prompt
    included: bool = True  # in concat mode: whether it fit the prompt budget
    truncated: bool = False  # in concat mode: whether it was cut to fit
    prefix_image: str | None = None  # the image whose prefix this item's own prompt carried
    image: str | None = None  # vision-language generator: the picture shown with this item (its file)
    shard: str | None = None  # the index shard that holds it (retrieval over several collections)


@dataclass
class Answer:
    """A generated answer with its provenance."""

    answer: str
    question: str
    mode: str
    sources: list[Source]
    prompts: list[str]  # the exact texts the generator read
    timings: dict[str, float]
    generator: str
    encoder: str
    image: str | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)  # rag-sequence: all scored
    logprob: float | None = None  # log P(answer text + end token | x) under the mode's model
    logprob_of: str | None = None  # what logprob is: LOGPROB_OF[mode] (None when abstaining)
    abstained: bool = False  # True: the evidence was below min_score; sources are the nearest
    min_score: float | None = None  # the threshold that applied
    image_prefix: str | None = None  # the image-prefix checkpoint used, if any
    prefix_images: list[str | None] = field(default_factory=list)  # per prompt: the prefixed image
    prompt_images: list[list[str]] = field(default_factory=list)  # VLM: per prompt, the pictures it showed

    def to_dict(self) -> dict[str, Any]:
        """The answer as JSON shows it; the pictures a vision-language generator was shown
        (``prompt_images``, each source's ``image``) only when it was one."""
        d = asdict(self)
        if not self.prompt_images:
            del d["prompt_images"]
            for s in d["sources"]:
                del s["image"]
        for s in d["sources"]:
            if s["shard"] is None:
                del s["shard"]
        return d


def priors(scores: np.ndarray, temperature: float) -> np.ndarray:
    """P(z|x): softmax of retrieval scores at ``temperature`` (float64, sums to 1)."""
    z = np.asarray(scores, dtype=np.float64) / temperature
    z = z - z.max()
    p = np.exp(z)
    return p / p.sum()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - (m + math.log(np.exp(x - m).sum()))


def item_text(hit: Hit) -> str:
    """What the generator reads for a hit: an image's captions (and the text read in it, labelled),
    or the text itself (text read in an image labelled with the image's name)."""
    if hit.kind == "image":
        text = "; ".join(hit.captions) if hit.captions else f"an image ({Path(hit.path or '').name})"
        ocr = getattr(hit, "ocr", None)  # index --ocr
        return f"{text}; text in the image: {' / '.join(ocr.splitlines())}" if ocr else text
    if hit.kind == "ocr":
        return f"text in the image {Path(hit.path or '').name}: {' / '.join((hit.text or '').splitlines())}"
    if hit.kind == "passage" and hit.title:
        return f"{hit.title}: {hit.text}"
    return hit.text or ""


class RagPipeline:
    """Collection + generator + settings. ``ask`` answers a question and cites its sources.

    ``knowledge`` is an optional second collection the conditioning texts are retrieved from
    instead (it must use the same encoder). ``image_prefix`` lets the generator read images as
    prefix vectors (see the module docstring); it must match the collection's encoder and the
    generator (default generator: the checkpoint's own).
    """

    def __init__(
        self, collection: Collection, generator: str | TextGenerator | None = None,
        settings: RagSettings | None = None, generation: GenerationSettings | None = None,
        knowledge: Collection | None = None, image_prefix: ImagePrefix | None = None,
        query_projection: RagCheckpoint | str | None = "auto",
    ) -> None:
        self.collection = collection
        if generator is None and image_prefix is not None:
            generator = load_generator(image_prefix.generator_spec)
        # a Generator (transformers) or a LlamaCppGenerator (llama.cpp): one interface
        self.generator: TextGenerator = (load_generator(generator) if generator is None or isinstance(generator, str)
                                         else generator)
        self.settings = settings or RagSettings()
        # A query projection trained by `train rag` (auto: found in the generator's folder) maps
        # the query before search and sets P(z|x)'s temperature and the trained prompt.
        if query_projection == "auto":
            spec = self.generator.spec
            query_projection = None
            if os.path.isdir(os.path.expanduser(spec)):  # only a generator folder holds one (no torch else)
                from .checkpoint import has_rag_checkpoint, load_rag_checkpoint

                query_projection = load_rag_checkpoint(spec) if has_rag_checkpoint(spec) else None
        elif isinstance(query_projection, str):
            from .checkpoint import load_rag_checkpoint

            query_projection = load_rag_checkpoint(query_projection)
        self.query_projection = query_projection
        if query_projection is not None:
            query_projection.check_collection(collection)
            self.settings = query_projection.adapt(self.settings)
        self.generation = generation or GenerationSettings()
        self.knowledge = knowledge
        if knowledge is not None:  # queries are embedded by the main collection's encoder
            knowledge.check_compatible(collection)
        self.image_prefix = image_prefix
        if image_prefix is not None and getattr(self.generator, "sees_images", False):
            raise ValueError(f"the vision-language model {self.generator.spec} reads the images themselves; "
                             "leave the image prefix out")
        if image_prefix is not None:
            image_prefix.check_encoder(collection.manifest.encoder, collection.manifest.dim)
            image_prefix.check_generator(self.generator)

    # -- retrieval -------------------------------------------------------------------------
    def retrieve(self, question: str | None, image: str | Path | Image.Image | None, k: int,
                 target: str) -> tuple[list[Hit], np.ndarray | None]:
        """Top-k hits for the query (the image when given, else the question) and the CLIP query
        vector (None when the collection's text space retrieved); see :meth:`_retrieve`."""
        hits, vec, _ = self._retrieve(question, image, k, target)
        return hits, vec

    def _retrieve(self, question: str | None, image: str | Path | Image.Image | None, k: int,
                  target: str) -> tuple[list[Hit], np.ndarray | None, float | None]:
        """Hits, the CLIP query vector, and ``min_score`` as a number in the top hit's space.

        One :meth:`Collection.search <crossmodal_rag.collection.Collection.search>`: a text question
        alone in the main collection searches as the CLI does (``settings.search_mode``, the text
        space for texts where the collection has one); an image, a knowledge collection or a
        trained query projection search densely by the (projected) CLIP vector. Hits are not cut
        by ``min_score`` (the pipeline abstains below it and shows the nearest sources) and carry
        their cosine as ``score`` in the mode's order, so priors and min_score mean what they
        mean in dense mode. With ``target="all"``, a caption of an image already retrieved adds
        nothing and is left out."""
        s = self.settings
        vec = None
        if image is not None or self.knowledge is not None or self.query_projection is not None:
            vec = self.collection.embed_query(image=image) if image is not None else self.collection.embed_query(question)
        # a trained query projection maps the query for the search only (vec stays CLIP's)
        search = vec if vec is None or self.query_projection is None else self.query_projection.apply(vec)
        result = (self.knowledge or self.collection).search(SearchRequest(
            text=question, image=image, vector=search, k=k * 2 if target == "all" else k, target=target,  # type: ignore[arg-type]
            where=s.where, min_score=s.min_score, mode=s.search_mode if vec is None else "dense",  # type: ignore[arg-type]
            cut=False, dense_scores=True))
        hits = list(result.hits)
        if target == "all":  # a caption of an image already retrieved adds nothing new
            images = {h.id for h in hits if h.kind == "image"}
            hits = [h for h in hits if not (h.kind == "caption" and h.parent_id in images)][:k]
        return hits, vec if vec is not None else result.vector, result.threshold

    # -- prompts ---------------------------------------------------------------------------
    def _budget(self) -> int:
        s, g = self.settings, self.generator
        budget = s.max_context_tokens or g.max_input_tokens
        if g.kind == "causal":  # the answer shares the context window
            budget = min(budget, g.max_input_tokens - self.generation.max_new_tokens)
        if self.image_prefix is not None:  # prefix vectors take positions too
            budget -= self.image_prefix.config.settings.prefix_length
        return max(budget, 16)

    def extracts(self, question: str) -> bool:
        """Whether ``question`` gets an extractive answer (``RagSettings.answer_style``)."""
        style = self.answer_style
        # in a chat, the new message decides (the turns before it are context)
        return style == "extract" or (style == "auto" and is_short_answer_question(current_question(question)))

    @property
    def answer_style(self) -> str:
        """The answer style in force: ``RagSettings.answer_style``, with ``model`` resolved for
        this generator (:func:`~crossmodal_rag.generation.extractive.model_answer_style`)."""
        style = self.settings.answer_style
        if style == "model":
            g = self.generator
            g.load()
            style = model_answer_style(g.kind, g.is_chat)
        return style

    def _fill(self, question: str, context: str) -> Prompt:
        template = self.settings.prompt_template
        if template == DEFAULT_TEMPLATE and self.extracts(question):
            examples = self.generator.max_input_tokens >= EXAMPLES_MIN_CONTEXT  # else they crowd out the sources
            if self.generator.is_chat:  # worked examples as earlier turns (generation.extractive)
                return extractive_messages(context, question, examples)
            template = EXTRACTIVE_TEMPLATE if examples else EXTRACTIVE_SHORT_TEMPLATE
        if template == DEFAULT_TEMPLATE and self.generator.is_chat:
            return [{"role": "system", "content": CHAT_SYSTEM_TEMPLATE.replace("{context}", context)},
                    {"role": "user", "content": question}]
        return template.replace("{question}", question).replace("{context}", context)

    def _cost(self, prompt: Prompt) -> int:
        return self.generator.count_tokens(self.generator.render(prompt))

    def concat_prompt(self, question: str, texts: list[str]) -> tuple[Prompt, list[bool], list[bool]]:
        """One prompt with as many items as fit, in rank order.

        Truncation policy: items are added whole while they fit the budget; the first item that
        does not fit is cut to the tokens left (if at least 8 remain) and the rest are left out.
        The question and template are never cut. Returns (prompt, included, truncated).
        """
        g, s = self.generator, self.settings
        remaining = self._budget() - self._cost(self._fill(question, ""))
        parts: list[str] = []
        included = [False] * len(texts)
        truncated = [False] * len(texts)
        sep_cost = g.count_tokens(s.context_separator) if s.context_separator.strip() else 1
        for i, text in enumerate(texts):
            line = s.item_template.format(n=i + 1, text=text)
            cost = g.count_tokens(line) + (sep_cost if parts else 0)
            if cost <= remaining:
                parts.append(line)
                included[i] = True
                remaining -= cost
                continue
            if remaining - (sep_cost if parts else 0) >= 8:
                parts.append(g.truncate_tokens(line, remaining - (sep_cost if parts else 0)))
                included[i] = truncated[i] = True
            break
        return self._fill(question, s.context_separator.join(parts)), included, truncated

    def item_prompt(self, question: str, text: str) -> Prompt:
        """The prompt for one retrieved item (rag-sequence / rag-token), cut to the budget."""
        line = self.settings.item_template.format(n=1, text=text)
        room = self._budget() - self._cost(self._fill(question, ""))
        if self.generator.count_tokens(line) > room:
            line = self.generator.truncate_tokens(line, max(room, 8))
        return self._fill(question, line)

    # -- answering -------------------------------------------------------------------------
    def ask(
        self, question: str | None = None, image: str | Path | Image.Image | None = None, *,
        k: int | None = None, mode: str | None = None, target: str | None = None,
        hits: list[Hit] | None = None, prompt_question: str | None = None,
        on_event: Callable[[Event], None] | None = None, cancel: threading.Event | None = None,
    ) -> Answer:
        """Answer ``question`` (and/or retrieve by ``image``) from the collection.

        ``--image`` alone retrieves by the image and asks ``default_question``; with a question,
        the image drives retrieval and the question drives generation. ``hits`` skips retrieval
        (e.g. chat or write supply their own); ``prompt_question`` overrides the text put in the
        prompt's question slot. ``on_event`` sees each event of :meth:`stream` as it happens
        (sources, answer tokens, the final answer); ``cancel`` stops answering (QueryError).
        """
        final = None
        for event in self.stream(question, image, k=k, mode=mode, target=target, hits=hits,
                                 prompt_question=prompt_question, cancel=cancel):
            if on_event is not None:
                on_event(event)
            if isinstance(event, Final):
                final = event.answer
        if final is None:
            raise QueryError("answering was cancelled before the answer was complete")
        return final

    def stream(
        self, question: str | None = None, image: str | Path | Image.Image | None = None, *,
        k: int | None = None, mode: str | None = None, target: str | None = None,
        hits: list[Hit] | None = None, prompt_question: str | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        """:meth:`ask`, as events (:mod:`crossmodal_rag.generation.stream`): the sources with their
        priors, then the answer's text as it is decoded, then the final :class:`Answer`. Setting
        ``cancel`` stops decoding at the next token and ends the stream without a Final."""
        s = self.settings
        started = time.perf_counter()
        k = check_k(k if k is not None else s.k)
        mode = mode or s.mode
        if mode not in MODES:
            raise QueryError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode == "rag-token" and self.generation.num_beams > 1:
            raise QueryError("rag-token decodes greedily or by sampling; use --beams 1 (beam search "
                             "is available in concat and rag-sequence modes)")
        if question is not None and not question.strip():
            question = None
        if question is None and image is None and hits is None:
            raise QueryError("empty question: ask something, or give an image with --image")
        timings: dict[str, float] = {}
        t = time.perf_counter()
        target = target or s.target
        qvec = None
        if hits is None:  # the threshold in the top hit's own space (the text space's, or CLIP's)
            hits, qvec, threshold = self._retrieve(question, image, k, target)
        else:
            threshold = (self.knowledge or self.collection).resolve_min_score(
                s.min_score, query_is_image=image is not None, target=target)
        timings["retrieve"] = time.perf_counter() - t
        q_text = " ".join((prompt_question or question or s.default_question).split())
        image_label = str(image) if isinstance(image, str | Path) else None
        texts = [item_text(h) for h in hits]
        if not hits or (threshold is not None and max(h.score for h in hits) < threshold):
            # Abstain: no generation from evidence this weak; show the nearest sources.
            prior = priors(np.array([h.score for h in hits]), s.prior_temperature) if hits else []
            sources = [_source(h, x, p, 0.0, 0.0, False, False, None)
                       for h, x, p in zip(hits, texts, prior, strict=True)]
            yield Sources(sources, mode, streaming=False, abstained=True)
            yield Final(Answer(answer=s.abstain_answer, question=q_text, mode=mode, sources=sources,
                               prompts=[], timings=timings, generator=self.generator.spec,
                               encoder=self.collection.manifest.encoder, image=image_label,
                               abstained=True, min_score=threshold))
            return
        t = time.perf_counter()  # the generator loads only once an answer is to be generated
        self.generator.load()
        timings["load"] = time.perf_counter() - t
        prior = priors(np.array([h.score for h in hits]), s.prior_temperature)
        log_prior = np.log(np.maximum(prior, 1e-300))
        t = time.perf_counter()
        q_prefix, item_prefixes, q_label, item_labels = self._image_prefixes(image, qvec, hits)
        item_prompts = [self.item_prompt(q_text, x) for x in texts]
        included, truncated = [True] * len(hits), [False] * len(hits)
        prompts, prefix_labels = item_prompts, item_labels
        if mode == "concat":
            prompt, included, truncated = self.concat_prompt(q_text, texts)
            prompts, prefix_labels = [prompt], [q_label]
        seen: list[str | None] = [None] * len(hits)
        prompt_images: list[list[str]] = []
        if getattr(self.generator, "sees_images", False):  # a VLM: the pictures beside their texts
            from .rag_images import attach_images

            item_prompts, concat, seen, prompt_images = attach_images(  # type: ignore[assignment]
                item_prompts, prompts[0] if mode == "concat" else None, image, hits, included,
                self.generator.limits)  # type: ignore[attr-defined]
            prompts = [concat] if concat is not None else item_prompts  # type: ignore[list-item]
        timings["prompt"] = time.perf_counter() - t
        candidates: list[dict[str, Any]] = []
        extract = self.extracts(q_text)
        asked = current_question(q_text)  # in a chat, the new message (not the turns before it)
        gs = self.generation
        if extract:  # copy a span of a source's segment (or say they lack it), up to the sentence end
            kept = [i for i, inc in enumerate(included) if inc]
            # concat: the prior steers which source is copied; rag modes mix P(z|x) in themselves
            spans, weights = copy_sources([texts[i] for i in kept],
                                          [log_prior[i] if mode == "concat" else 0.0 for i in kept], asked)
            gs = replace(gs, stop="sentence", copy_from=spans, copy_whole=abstain_spans(), copy_weights=weights,
                         copy_whole_weight=ABSTAIN_WEIGHT)
        streaming = mode != "rag-sequence" and gs.num_beams == 1
        yield Sources([_source(h, x, p, 0.0, 0.0, inc, tr, pl, im) for h, x, p, inc, tr, pl, im
                       in zip(hits, texts, prior, included, truncated, item_labels, seen, strict=True)], mode, streaming)
        with self.generator.encoder_reuse():  # seq2seq: encode each prompt once
            t = time.perf_counter()
            if mode == "rag-sequence":
                answer, lp, candidates = self._rag_sequence(item_prompts, log_prior, timings, item_prefixes, gs)
                total = candidates[0]["logprob"]
                timings["first_token"] = time.perf_counter() - started
                if answer:
                    yield Token(answer)
            else:
                if not streaming:  # beam search: the whole answer at once
                    answer = self.generator.generate(prompts, gs,
                                                     prefixes=[q_prefix] if q_prefix is not None else None)[0][0]
                    pieces: Any = [answer] if answer else []
                elif mode == "concat":
                    pieces = self.generator.stream(prompts[0], gs, prefix=q_prefix, cancel=cancel)
                else:
                    pieces = TextStream(self._rag_token(item_prompts, log_prior, item_prefixes, cancel, gs),
                                        self.generator.decode)
                text, sent = "", 0  # an extractive answer's final full stop is held back, then dropped
                for piece in pieces:
                    timings.setdefault("first_token", time.perf_counter() - started)
                    text += piece
                    keep = len(text.rstrip(".,;:")) if extract else len(text)
                    if keep > sent:
                        yield Token(text[sent:keep])
                        sent = keep
                if cancel is not None and cancel.is_set():
                    return
                # what was streamed is the answer: only a held-back final stop is dropped
                answer = (pieces.answer.rstrip(".,;:").strip() if extract else pieces.answer) if streaming \
                    else clean_answer(answer, extract)
                timings["generate"] = time.perf_counter() - t
                t = time.perf_counter()
                lp, total = self._score(answer, item_prompts, item_prefixes, log_prior,
                                        (prompts[0], q_prefix) if mode == "concat" else None)
                timings["score"] = time.perf_counter() - t
            posterior = np.exp(_log_softmax(log_prior + lp))
            if mode == "concat":  # [n] citations that point at listed sources (generation.extractive)
                cited = cite(answer, texts, posterior.tolist(), included)
                if cited.startswith(answer) and len(cited) > len(answer):
                    yield Token(cited[len(answer):])
                answer = cited
            sources = [_source(h, x, p, post, lpi, inc, tr, pl, im) for h, x, p, post, lpi, inc, tr, pl, im
                       in zip(hits, texts, prior, posterior, lp, included, truncated, item_labels, seen, strict=True)]
            timings["total"] = time.perf_counter() - started
            yield Final(Answer(answer=answer, question=q_text, mode=mode, sources=sources,
                               prompts=[self.generator.render(p) for p in prompts],
                               timings=timings, generator=self.generator.spec,
                               encoder=self.collection.manifest.encoder, image=image_label,
                               candidates=candidates, logprob=total, logprob_of=LOGPROB_OF[mode], min_score=threshold,
                               image_prefix=self.image_prefix.label if self.image_prefix is not None else None,
                               prefix_images=prefix_labels if self.image_prefix is not None else [],
                               prompt_images=prompt_images))

    def _image_prefixes(
        self, image: str | Path | Image.Image | None, qvec: np.ndarray | None, hits: list[Hit],
    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None] | None, str | None, list[str | None]]:
        """The query image's prefix ``(P, H)`` and each item prompt's prefix (its own image's for an
        image item, else the query image's), with labels naming the images; all None without an
        image prefix. A retrieved image that cannot be read keeps the query's prefix (logged)."""
        ip = self.image_prefix
        if ip is None:
            return None, None, None, [None] * len(hits)
        q_prefix, q_label = None, None
        if image is not None:
            if qvec is None:
                qvec = self.collection.embed_query(image=image)
            q_prefix = ip.prefixes(qvec)[0]
            q_label = str(image) if isinstance(image, str | Path) else "query image"
        prefixes: list[torch.Tensor | None] = [q_prefix] * len(hits)
        labels: list[str | None] = [q_label] * len(hits)
        rows = [i for i, h in enumerate(hits) if h.kind == "image" and h.path]
        pils, ok = [], []
        for i in rows:
            try:
                pils.append(load_image(hits[i].path).image)  # type: ignore[arg-type]
                ok.append(i)
            except (ImageDecodeError, OSError) as e:
                logger.warning("retrieved image %s cannot be read (%s); its prompt gets no image prefix "
                               "of its own", hits[i].path, e)
        if ok:
            item = ip.prefixes(self.collection.encoder.encode_images(pils))
            for j, i in enumerate(ok):
                prefixes[i], labels[i] = item[j], hits[i].path
        return q_prefix, prefixes, q_label, labels

    def _score(self, answer: str, prompts: list[Prompt], prefixes: list[torch.Tensor | None] | None,
               log_prior: np.ndarray, concat: tuple[Prompt, torch.Tensor | None] | None,
               ) -> tuple[np.ndarray, float]:
        """The returned ``answer`` (re-tokenised, plus the end token) scored under each item's
        prompt, one batched pass: ``log P(y|x,z)`` per item ``(k,)`` and ``log P(y|x)`` under the
        mode's model -- the ``concat`` (prompt, prefix) when given, else the RAG-token per-token
        mixture ``sum_t log sum_z P(z|x) p(y_t|x,z,y_<t)``."""
        k = len(prompts)
        rows, pre = list(prompts), list(prefixes) if prefixes is not None else [None] * k
        if concat is not None:
            rows.append(concat[0])
            pre.append(concat[1])
        per_token = self.generator.answer_token_logprobs(
            rows, [answer] * len(rows), prefixes=pre if any(x is not None for x in pre) else None)
        items = np.stack(per_token[:k])  # (k, T): every row scores the same tokens
        if concat is not None:
            return items.sum(1), float(per_token[k].sum())
        return items.sum(1), float(np.logaddexp.reduce(log_prior[:, None] + items, axis=0).sum())

    def _rag_sequence(self, prompts: list[Prompt], log_prior: np.ndarray, timings: dict[str, float],
                      prefixes: list[torch.Tensor | None] | None = None, gs: GenerationSettings | None = None,
                      ) -> tuple[str, np.ndarray, list[dict[str, Any]]]:
        g, gs = self.generator, gs or self.generation
        t = time.perf_counter()
        per_item = g.generate(prompts, gs, num_return_sequences=gs.num_beams, prefixes=prefixes)
        timings["generate"] = time.perf_counter() - t
        t = time.perf_counter()
        extract = bool(gs.copy_from)
        cands = list(dict.fromkeys(clean_answer(c, extract) for group in per_item for c in group))
        k = len(prompts)
        # every candidate under every item's prompt, one batched pass: lp[z, y]
        flat = g.sequence_logprobs([p for p in prompts for _ in cands], cands * k,
                                   prefixes=[x for x in prefixes for _ in cands] if prefixes else None)
        lp = flat.reshape(k, len(cands))
        scores = np.logaddexp.reduce(log_prior[:, None] + lp, axis=0)
        best = int(np.argmax(scores))
        timings["score"] = time.perf_counter() - t
        ranked = sorted(range(len(cands)), key=lambda j: -scores[j])
        return cands[best], lp[:, best], [{"text": cands[j], "logprob": float(scores[j])} for j in ranked]

    @inference_mode
    def _rag_token(self, prompts: list[Prompt], log_prior: np.ndarray,
                   prefixes: list[torch.Tensor | None] | None = None,
                   cancel: threading.Event | None = None, gs: GenerationSettings | None = None) -> Iterator[int]:
        """Greedy (or sampled) RAG-token decoding: the answer's token ids as they are chosen, end
        token excluded (the text is scored afterwards by ``_score``)."""
        g, gs = self.generator, gs or self.generation
        state = g.start(prompts, prefixes, max_new_tokens=gs.max_new_tokens)
        try:
            lprior = torch.tensor(log_prior, dtype=torch.float32, device=g.device)[:, None]
            eos = g.eos_ids
            stop = SentenceStop(g.decode) if gs.stop == "sentence" else None
            copy = SpanConstraint.of(gs, g.tokenize, eos)
            rng = torch.Generator(device="cpu")
            if gs.seed is not None:
                rng.manual_seed(gs.seed)
            for step in range(gs.max_new_tokens):
                if cancel is not None and cancel.is_set():
                    return
                lp = state.logprobs().to(lprior.device)  # (k, V)
                mix = torch.logsumexp(lp + lprior, dim=0)  # log sum_z P(z|x) p(y_t | x, z, y_<t)
                if copy is not None:
                    mix = torch.from_numpy(copy.mask(mix.cpu().numpy()))
                tok = _sample(mix, gs, rng) if gs.do_sample else int(torch.argmax(mix))
                if tok in eos or (stop is not None and stop.stops(tok)):
                    return
                if copy is not None:
                    copy.advance(tok)
                yield tok
                if step + 1 < gs.max_new_tokens:
                    state.feed(tok)
        finally:
            state.close()


def _source(h: Hit, text: str, prior: float, posterior: float, logprob: float, included: bool,
            truncated: bool, prefix_image: str | None, image: str | None = None) -> Source:
    return Source(rank=h.rank, id=h.id, kind=h.kind, path=h.path, text=text,
                  caption=" | ".join(h.captions) if h.kind == "image" else (h.text or ""), score=h.score,
                  prior=float(prior), posterior=float(posterior), logprob=float(logprob), included=included,
                  truncated=truncated, prefix_image=prefix_image, image=image, shard=h.shard)


def _sample(logp: torch.Tensor, gs: GenerationSettings, rng: torch.Generator) -> int:
    probs = torch.softmax(logp.float().cpu() / gs.temperature, dim=-1)
    if gs.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < gs.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=rng))
