"""Vision-language generators on transformers: prompts with pictures in, answers and scores out.

Any checkpoint ``AutoModelForImageTextToText`` and ``AutoProcessor`` load (SmolVLM / Idefics3,
LLaVA, Qwen2-VL, ...), by hub id (``vlm:HuggingFaceTB/SmolVLM-256M-Instruct``) or from a
``save_pretrained`` folder (recognised by its config). :class:`VisionGenerator` implements
:class:`~crossmodal_rag.generation.interface.TextGenerator`; its prompts may be
:class:`~crossmodal_rag.generation.vision_prompt.VisionPrompt` (text + images), rendered with the
model's own chat template and expanded into image tokens by the model's own processor.

* ``generate`` / ``stream``: transformers' ``generate`` on one prompt at a time (its key/value
  cache, whatever the family's position scheme);
* ``sequence_logprobs`` / ``answer_token_logprobs``: each distinct prompt read once (its images
  encoded once), every answer teacher-forced on a copy of that prompt's key/value cache --
  prompts with different image counts do not batch across families, so rows run one by one;
* ``start``: RAG-token lock-step decoding, one cache per row, one token per row and step
  (Qwen2-VL's 3-D position offset kept per row).

Image prefixes (``prefixes``) are for text-only generators; a VLM refuses them.
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

from ..encoders import default_device
from ..encoders._hub import hub_reachable, refused_pickle, unsafe_weights_error
from ..errors import ModelSpecError, QueryError, WeightsUnavailableError
from ..lazy_torch import inference_mode, torch
from .prompting import GenerationSettings, Prefixes, Prompt, has_prefixes
from .stopping import cut_text, stop_ids
from .stream import TextStream, transformers_token_ids
from .vision_prompt import ImageLimits, VisionPrompt, to_messages

__all__ = ["DEFAULT_VLM", "Row", "VisionGenerator", "VisionState", "is_vlm_folder"]

logger = logging.getLogger(__name__)

DEFAULT_VLM = "HuggingFaceTB/SmolVLM-256M-Instruct"

AnyPrompt = Prompt | VisionPrompt


def is_vlm_folder(path: str | Path) -> bool:
    """Whether ``path`` is a ``save_pretrained`` folder of an image-text-to-text model."""
    import json

    config = Path(os.path.expanduser(str(path))) / "config.json"
    try:
        data = json.loads(config.read_text()) if config.is_file() else {}
    except (OSError, ValueError):
        return False
    if "vision_config" not in data:
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return data.get("model_type") in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def _offline_hint(spec: str) -> str:
    return (f"could not load the vision-language model {spec}: it is not in the local cache and the model "
            "hub cannot be reached (offline?). Give a local folder written by save_pretrained instead "
            "(--generator /models/SmolVLM-256M-Instruct), set HF_HOME to a cache that holds it, or answer "
            "from texts with a text generator (--generator bundled:smollm2).")


class VisionGenerator:
    """A transformers vision-language model behind the TextGenerator interface (loads lazily)."""

    runtime = "transformers"
    sees_images = True  # the RAG pipeline hands it VisionPrompts

    def __init__(self, spec: str, device: str | None = None, limits: ImageLimits | None = None) -> None:
        self.spec = spec.strip().removeprefix("vlm:")
        if not self.spec:
            raise ModelSpecError("empty VLM spec: give a hub id (vlm:HuggingFaceTB/SmolVLM-256M-Instruct) "
                                 "or a local folder")
        self.device = device or default_device()
        self.limits = limits or ImageLimits()
        self.kind = "causal"
        self.model: Any = None
        self.processor: Any = None
        self.tokenizer: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VisionGenerator({self.spec!r}, device={self.device!r})"

    # -- loading -------------------------------------------------------------------------
    def load(self) -> VisionGenerator:
        with self._lock:
            if self.model is None:
                from ..progress import loading

                with loading(f"vision-language model {self.spec}"):
                    self._load()
        return self

    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = Path(os.path.expanduser(self.spec))
        local = path.exists() or self.spec.startswith(("/", "./", "../", "~"))
        if local and not (path / "config.json").is_file():
            raise ModelSpecError(f"VLM folder {path} does not exist or has no config.json; give a folder "
                                 "written by save_pretrained or a hub id")
        name = str(path.resolve()) if local else self.spec
        offline = not local and not hub_reachable()
        try:
            processor = AutoProcessor.from_pretrained(name, local_files_only=local or offline)
            model = AutoModelForImageTextToText.from_pretrained(name, local_files_only=local or offline)
        except OSError as e:
            if offline:
                raise WeightsUnavailableError(_offline_hint(self.spec)) from e
            raise ModelSpecError(f"cannot load the VLM {self.spec}: {str(e).splitlines()[0]}") from e
        except (ValueError, KeyError) as e:
            raise ModelSpecError(f"cannot load the VLM {self.spec}: {str(e).splitlines()[0]} (is it an "
                                 "image-text-to-text model?)") from e
        except Exception as e:
            if refused_pickle(e):
                raise unsafe_weights_error(f"VLM {self.spec}", e) from e
            raise
        self.processor, self.tokenizer = processor, processor.tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model.to(self.device).eval()
        logger.info("loaded VLM %s (%s) on %s", self.spec, type(model).__name__, self.device)

    # -- prompts and tokens ----------------------------------------------------------------
    @property
    def max_input_tokens(self) -> int:
        """The text budget: the model's context minus the image tokens a prompt may hold, capped at 2048."""
        self.load()
        cfg = self.model.config
        text = getattr(cfg, "text_config", cfg)
        n = int(getattr(text, "max_position_embeddings", None) or 2048)
        return max(min(n - self.limits.max_image_tokens, 2048), 64)

    @property
    def is_chat(self) -> bool:
        self.load()
        return bool(getattr(self.processor, "chat_template", None))

    @property
    def eos_ids(self) -> set[int]:
        self.load()
        ids: set[int] = set()
        for src in (self.model.generation_config, self.tokenizer):
            value = getattr(src, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        return ids

    def render(self, prompt: AnyPrompt) -> str:
        """The text the model reads, image placeholders included (its chat template applied)."""
        self.load()
        messages = to_messages(prompt)
        if self.is_chat:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        raise ModelSpecError(f"the VLM {self.spec} has no chat template; give an instruct checkpoint whose "
                             "processor carries one")

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

    def decode(self, ids: Sequence[int]) -> str:
        self.load()
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def inputs(self, prompt: AnyPrompt) -> dict[str, torch.Tensor]:
        """The processor's tensors for one prompt (a batch of one): ids with the image tokens
        expanded, attention mask, pixel values and the family's extras. Refuses a prompt over
        :class:`ImageLimits`."""
        self.load()
        vp = prompt if isinstance(prompt, VisionPrompt) else VisionPrompt(prompt)
        if len(vp.images) > self.limits.max_images:
            raise QueryError(f"{len(vp.images)} images in one prompt; the limit is {self.limits.max_images} "
                             "(ImageLimits.max_images)")
        kwargs: dict[str, Any] = {"text": [self.render(vp)], "return_tensors": "pt"}
        if vp.images:
            kwargs["images"] = [list(vp.images)]
        feats = self.processor(**kwargs)
        ids = feats["input_ids"][0]
        image_id = getattr(self.model.config, "image_token_id", None)
        n_image = int((ids == image_id).sum()) if image_id is not None else 0
        if n_image > self.limits.max_image_tokens:
            raise QueryError(f"the prompt's {len(vp.images)} images take {n_image} tokens; the limit is "
                             f"{self.limits.max_image_tokens} (fewer images, or a smaller max_side)")
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in feats.items()}

    def prompt_ids(self, prompt: AnyPrompt) -> list[int]:
        return [int(t) for t in self.inputs(prompt)["input_ids"][0]]

    def answer_ids(self, answer: str) -> list[int]:
        self.load()
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return [*ids, eos] if eos is not None else list(ids)

    # -- generation ------------------------------------------------------------------------
    @contextmanager
    def encoder_reuse(self) -> Iterator[None]:
        yield

    @staticmethod
    def _no_prefixes(prefixes: Prefixes) -> None:
        if has_prefixes(prefixes):
            raise QueryError("a vision-language model reads the images themselves; image prefixes are for "
                             "text generators (leave --image-prefix out)")

    @inference_mode
    def generate(self, prompts: list[AnyPrompt], settings: GenerationSettings | None = None,
                 num_return_sequences: int = 1, prefixes: Prefixes = None, **extra: Any) -> list[list[str]]:
        """``num_return_sequences`` answers per prompt, one ``generate`` call per prompt;
        ``extra``: more arguments for transformers' ``generate`` (a streamer, stopping criteria)."""
        self._no_prefixes(prefixes)
        self.load()
        s = settings or GenerationSettings()
        if s.seed is not None:
            torch.manual_seed(s.seed)
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "num_beams": s.num_beams,
                                  "do_sample": s.do_sample, "num_return_sequences": num_return_sequences,
                                  "pad_token_id": self.tokenizer.pad_token_id}
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_p=s.top_p)
        out: list[list[str]] = []
        for prompt in prompts:
            feats = self.inputs(prompt)
            more = dict(extra)
            if getattr(s, "copy_from", None):  # span-constrained decoding (generation.constrained)
                from transformers import LogitsProcessorList

                from .constrained import logits_processor, span_windows

                windows = span_windows(s.copy_from, self.tokenize)  # type: ignore[attr-defined]
                more["logits_processor"] = LogitsProcessorList(
                    [*extra.get("logits_processor", []),
                     logits_processor(windows, self.eos_ids, feats["input_ids"].shape[1])])
            ids = self.model.generate(**feats, **kwargs, **more)[:, feats["input_ids"].shape[1]:]
            out.append([cut_text(t, s.stop).strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)])
        return out

    def stream(self, prompt: AnyPrompt, settings: GenerationSettings | None = None,
               prefix: torch.Tensor | None = None, cancel: threading.Event | None = None) -> TextStream:
        self._no_prefixes([prefix])
        self.load()
        s = settings or GenerationSettings()
        if s.num_beams > 1:
            raise ValueError("beam search has no token order to stream; call generate()")
        ids = transformers_token_ids(self, prompt, s, None, cancel)  # type: ignore[arg-type]
        return TextStream(stop_ids(ids, self.decode, s.stop), self.decode)

    def start(self, prompts: list[AnyPrompt], prefixes: Prefixes = None, max_new_tokens: int = 256
              ) -> VisionState:
        self._no_prefixes(prefixes)
        return VisionState(self, [self.inputs(p) for p in prompts])

    # -- scoring ---------------------------------------------------------------------------
    def logits(self, feats: dict[str, torch.Tensor], extra: Sequence[int] = ()) -> torch.Tensor:
        """Next-token logits ``(L, V)`` float32 of one processed prompt followed by ``extra`` ids,
        one forward pass without a cache (the reference the cached paths are tested against)."""
        feats = dict(feats)
        if extra:
            more = torch.tensor([list(extra)], dtype=feats["input_ids"].dtype, device=self.device)
            feats["input_ids"] = torch.cat([feats["input_ids"], more], dim=1)
            feats["attention_mask"] = torch.cat([feats["attention_mask"], torch.ones_like(more)], dim=1)
            if "mm_token_type_ids" in feats:  # Qwen2-VL: text tokens are type 0
                feats["mm_token_type_ids"] = torch.cat([feats["mm_token_type_ids"], torch.zeros_like(more)], dim=1)
        return self.model(**feats, use_cache=False).logits[0].float()

    def prefill(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Row]:
        """One processed prompt read once (images encoded once): its last position's logits
        ``(V,)`` and a :class:`Row` whose cache later tokens continue."""
        name = _cache_name(self.model)
        out = self.model(**feats, use_cache=True)
        return out.logits[0, -1].float(), Row(getattr(out, name), _rope_state(self.model))

    def extend(self, row: Row, ids: Sequence[int]) -> torch.Tensor:
        """Feed ``ids`` after ``row`` (its cache grows): the logits ``(len(ids), V)``."""
        name = _cache_name(self.model)
        _set_rope_state(self.model, row.rope)  # Qwen2-VL keeps the 3-D position offset on the model
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        out = self.model(input_ids=tokens, use_cache=True, **{name: row.past})
        row.past = getattr(out, name)
        return out.logits[0].float()

    @inference_mode
    def answer_token_logprobs(self, prompts: list[AnyPrompt], answers: list[str],
                              prefixes: Prefixes = None) -> list[np.ndarray]:
        """Per pair, ``log P(y_t | prompt, y_<t)`` over the answer's tokens and the end token: each
        distinct prompt read once, every answer continuing a copy of its cache."""
        import copy

        self._no_prefixes(prefixes)
        if len(prompts) != len(answers):
            raise ValueError("prompts and answers must have the same length")
        self.load()
        out, read = [], {}
        for prompt, answer in zip(prompts, answers, strict=True):
            if id(prompt) not in read:
                read[id(prompt)] = self.prefill(self.inputs(prompt))
            last, row = read[id(prompt)]
            a = self.answer_ids(answer)
            rest = self.extend(Row(copy.deepcopy(row.past), row.rope), a[:-1]) if len(a) > 1 else last[None, :0]
            logp = torch.log_softmax(torch.cat([last[None], rest]), dim=-1)
            out.append(logp.gather(-1, torch.tensor(a, device=logp.device)[:, None])[:, 0].double().cpu().numpy())
        return out

    def sequence_logprobs(self, prompts: list[AnyPrompt], answers: list[str],
                          prefixes: Prefixes = None) -> np.ndarray:
        return np.array([t.sum() for t in self.answer_token_logprobs(prompts, answers, prefixes)], dtype=np.float64)


class Row:
    """One prompt being continued: its key/value cache and (Qwen2-VL) its 3-D position offset."""

    def __init__(self, past: Any, rope: Any) -> None:
        self.past, self.rope = past, rope


def _cache_name(model: Any) -> str:
    """The cache argument's name: ``cache`` from transformers 5.2x, else ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _rope_state(model: Any) -> Any:
    inner = getattr(model, "model", None)
    return getattr(inner, "rope_deltas", None)


def _set_rope_state(model: Any, value: Any) -> None:
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "rope_deltas"):
        inner.rope_deltas = value


class VisionState:
    """k processed prompts decoded in lock-step, each with its own cache (images read once)."""

    def __init__(self, gen: VisionGenerator, feats: list[dict[str, torch.Tensor]]) -> None:
        self.gen, self.k = gen, len(feats)
        with torch.inference_mode():
            first = [gen.prefill(f) for f in feats]
        self.rows = [r for _, r in first]
        self.next = torch.stack([lg for lg, _ in first])  # (k, V)

    def logprobs(self) -> torch.Tensor:
        return torch.log_softmax(self.next, dim=-1)

    @inference_mode
    def feed(self, token: int) -> None:
        self.next = torch.stack([self.gen.extend(r, [int(token)])[-1] for r in self.rows])

    def close(self) -> None:
        """Drop the caches."""
        self.rows = []
