"""``train rag``: fine-tune the generator and the query side together with the RAG marginal
likelihood, the document index staying fixed (as in RAG).

For an example (query x, target y) the frozen CLIP encoder gives the query embedding q (exactly as
:meth:`RagPipeline.retrieve` does: the image when there is one, else the question). A trainable
query projection W (``d x d``, initialised to the identity, optional bias) maps it, and the
retrieval scores of the collection's item vectors z are ``s_z = <normalize(W q), z>``. With the
top-k items, ``P(z|x) = softmax(s / temperature)`` and ``P(y|x,z)`` from the generator under the
item's own prompt (:meth:`RagPipeline.item_prompt`, so training and inference prompts are the
same text, teacher forcing), the loss is

* ``rag-sequence``: ``-log sum_z P(z|x) P(y|x,z)``;
* ``rag-token``: ``-sum_t log sum_z P(z|x) P(y_t|x,z,y_<t)``.

Gradients reach W through the scores, and the generator through the likelihoods.

Retrieval: a candidate set (``candidates`` items, default ``4 k``) is retrieved once per example
with the unprojected query (W = identity at the start, so it holds the initial top-k), and each
step re-scores the candidates with the current W and keeps their top-k. Items outside the
candidate set cannot enter the top-k during training (at inference the projected query searches
the whole collection). Long texts are re-scored by their item vector (their first window).

The artifact (:meth:`RagTrainTask.save_artifact`) is a folder that ``--generator DIR`` loads: the
generator in ``save_pretrained`` format plus ``query_projection.safetensors`` and
``rag_config.json``. A :class:`~crossmodal_rag.generation.RagPipeline` whose generator is such a
folder projects its queries with W and uses the trained temperature for ``P(z|x)``
(:func:`load_rag_checkpoint`). The artefact's classes live in
:mod:`crossmodal_rag.generation.checkpoint` (used at inference; re-exported here).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._config import strict_from_dict
from ..errors import QueryError, SourceError
from ..generation.checkpoint import (
    QUERY_PROJECTION_FILE,
    RAG_CONFIG_FILE,
    QueryProjection,
    RagCheckpoint,
    RagCheckpointConfig,
    has_rag_checkpoint,
    load_rag_checkpoint,
)
from ..maintenance import fingerprint
from ..safe_io import MAX_JSON_BYTES, open_regular, read_regular_text

if TYPE_CHECKING:
    from ..collection import Collection
    from ..generation.models import Generator

__all__ = [
    "QUERY_PROJECTION_FILE",
    "RAG_CONFIG_FILE",
    "TRAIN_DEFAULTS",
    "QueryProjection",
    "RagCheckpoint",
    "RagCheckpointConfig",
    "RagExample",
    "RagTrainSettings",
    "RagTrainTask",
    "has_rag_checkpoint",
    "load_rag_checkpoint",
    "load_rag_examples",
    "token_logprobs",
    "train_rag",
]

logger = logging.getLogger(__name__)

RAG_TRAIN_MODES = ("rag-sequence", "rag-token")
#: Loop settings for ``train rag`` where the command line gives none (fine-tuning a real generator).
TRAIN_DEFAULTS: dict[str, Any] = {"max_steps": 1000, "batch_size": 8, "lr": 1e-4, "warmup_steps": 50}


# -- settings ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RagTrainSettings:
    """What the ``rag`` task trains and how it scores (the loop's settings are separate)."""

    k: int = 4  # items in the marginal (the top-k of the re-scored candidates)
    candidates: int = 0  # items retrieved once per example and re-scored each step; 0 = 4 * k
    temperature: float = 0.05  # P(z|x) = softmax(score / temperature); also used at inference
    mode: str = "rag-sequence"  # rag-sequence | rag-token (form of the marginal likelihood)
    target: str = "texts"  # what retrieval returns: texts, images, all
    bias: bool = False  # the query projection has a bias
    projection_lr_scale: float = 0.05  # W's learning rate relative to the generator's (see QueryProjection)
    freeze_generator: bool = False  # train only the query projection
    freeze_projection: bool = False  # train only the generator
    question: str | None = None  # prompt question of image-caption examples (default: the pipeline's)
    prompt_template: str | None = None  # default: RagSettings' template
    item_template: str | None = None  # default: RagSettings' item template
    max_answer_chars: int = 512  # longer targets are cut

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.candidates and self.candidates < self.k:
            raise ValueError(f"candidates must be 0 or >= k ({self.k}), got {self.candidates}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.mode not in RAG_TRAIN_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(RAG_TRAIN_MODES)}")
        if self.target not in ("texts", "images", "all"):
            raise ValueError(f"unknown target {self.target!r}; choose texts, images or all")
        if self.freeze_generator and self.freeze_projection:
            raise ValueError("freeze_generator and freeze_projection together leave nothing to train")
        for key in ("{context}", "{question}"):
            if self.prompt_template is not None and key not in self.prompt_template:
                raise ValueError(f"prompt_template must contain {key}")
        if not self.projection_lr_scale > 0:
            raise ValueError(f"projection_lr_scale must be > 0, got {self.projection_lr_scale}")
        if self.max_answer_chars < 1:
            raise ValueError(f"max_answer_chars must be >= 1, got {self.max_answer_chars}")

    @property
    def num_candidates(self) -> int:
        return self.candidates or 4 * self.k

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RagTrainSettings:
        return strict_from_dict(cls, data, "rag train settings")


# -- examples ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RagExample:
    """One training pair: the query (a question and/or an image) and the target text y."""

    answer: str
    question: str | None = None
    image: str | None = None  # retrieval is by the image when there is one (as in ``ask``)


def _is_qa_jsonl(path: Path) -> bool:
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        return False
    try:
        with open_regular(path, max_bytes=MAX_JSON_BYTES, what="training file") as f:
            for raw in iter(lambda: f.readline(10 << 20), b""):  # a line is at most 10 MB here
                line = raw.decode("utf-8")
                if line.strip():
                    obj = json.loads(line)
                    return isinstance(obj, dict) and "question" in obj
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return False


def load_rag_examples(source: str | Path, *, image_root: str | Path | None = None,
                      allow_outside_root: bool = False) -> tuple[list[RagExample], list[str]]:
    """Training pairs from ``source`` and the one-line reasons of rows skipped.

    * a QA JSONL file: rows ``{"question", "answer"}`` (or ``"answers": [...]``, the first is the
      target), optional ``"image"`` (relative to the file) to retrieve by;
    * anything the ingest reads (folder with same-stem ``.txt`` captions, manifest, COCO json):
      image-caption pairs, x = the image, y = each caption (``image_root`` and
      ``allow_outside_root`` as for the ingest).
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise SourceError(f"training source {source} does not exist")
    examples: list[RagExample] = []
    skipped: list[str] = []
    if _is_qa_jsonl(path):
        try:
            text = read_regular_text(path, max_bytes=MAX_JSON_BYTES, what="training file")
        except (OSError, UnicodeDecodeError) as e:
            raise SourceError(f"cannot read {path}: {e}") from e
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append(f"{path}:{n}: invalid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                skipped.append(f"{path}:{n}: expected a JSON object")
                continue
            answers = row.get("answers") or row.get("answer")
            answer = answers[0] if isinstance(answers, list) and answers else answers
            question = " ".join(str(row.get("question") or "").split())
            if not isinstance(answer, str) or not answer.strip() or not question:
                skipped.append(f"{path}:{n}: needs a non-empty 'question' and 'answer' (or 'answers')")
                continue
            image = row.get("image")
            if image:
                img = Path(str(image)).expanduser()
                img = img if img.is_absolute() else path.parent / img
                if not img.is_file():
                    skipped.append(f"{path}:{n}: image {img} does not exist")
                    continue
                image = str(img)
            examples.append(RagExample(answer=" ".join(answer.split()), question=question, image=image or None))
        return examples, skipped
    from .pairs import read_captioned_images

    try:
        data = read_captioned_images(path, image_root=image_root, allow_outside_root=allow_outside_root,
                                     min_images=1)
    except SourceError as e:
        if path.suffix.lower() in (".jsonl", ".ndjson"):  # neither QA rows nor image-caption rows
            raise SourceError(
                f"{source} holds no training pairs: a QA file needs rows like "
                '{"question": "...", "answer": "..."} (its first row decides the format), an image '
                "manifest rows with image and caption columns") from e
        raise
    skipped += [f"{p.item}: {p.reason}" for p in data.skipped]
    examples += [RagExample(answer=caption, image=str(image)) for image, caption in data.pairs()]
    return examples, skipped


# -- differentiable likelihoods ------------------------------------------------------------
def token_logprobs(generator: Generator, prompt_ids: list[list[int]], answer_ids: list[list[int]]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``log P(y_t | prompt, y_<t)`` with gradients (teacher forcing), the computation of
    :meth:`Generator.sequence_logprobs` token by token, on a transformers
    :class:`~crossmodal_rag.generation.models.Generator` (training updates its ``model``). The ids
    are what :meth:`Generator.prompt_ids` and :meth:`Generator.answer_ids` give.

    Returns ``(logp, mask)``, both ``(N, T)`` with T the longest answer (end-of-sequence token
    included): ``logp[i, t]`` for answer i's token t, ``mask`` 1 where a token exists.
    """
    g, model = generator, generator.model
    if g.kind == "seq2seq":
        enc, enc_mask = g.pad(prompt_ids, left=False)
        labels, lab_mask = g.pad(answer_ids, left=False)
        logits = model(input_ids=enc, attention_mask=enc_mask,
                       decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels)).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return logp * lab_mask, lab_mask.float()
    seqs = [p + a for p, a in zip(prompt_ids, answer_ids, strict=True)]
    ids, mask = g.pad(seqs, left=False)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    width = max(len(a) for a in answer_ids)
    index = torch.zeros((len(seqs), width), dtype=torch.long, device=logp.device)
    out_mask = torch.zeros((len(seqs), width), device=logp.device)
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
        index[i, : len(a)] = torch.arange(len(p) - 1, len(p) - 1 + len(a))
        out_mask[i, : len(a)] = 1
    return logp.gather(1, index) * out_mask, out_mask


# -- the task ------------------------------------------------------------------------------
class RagTrainTask:
    """The ``rag`` :class:`~crossmodal_rag.training.TrainTask`: query projection + generator.

    Built from an open collection (its vectors stay fixed), a generator spec (a fresh, uncached
    copy is trained) and the examples. Embedding the queries and retrieving the candidates happen
    once, here.
    """

    name = "rag"

    def __init__(self, collection: Collection, generator: str, examples: Sequence[RagExample],
                 settings: RagTrainSettings | None = None, *, device: str | None = None,
                 progress: bool = False) -> None:
        from ..generation.models import Generator
        from ..generation.rag import RagPipeline, RagSettings, item_text

        self.settings = s = settings or RagTrainSettings()
        self.collection = collection
        self.device = device or "cpu"
        self.generator = Generator(generator, device=self.device).load()
        rs_fields: dict[str, Any] = {"k": s.k, "target": s.target, "prior_temperature": s.temperature}
        if s.prompt_template is not None:
            rs_fields["prompt_template"] = s.prompt_template
        if s.item_template is not None:
            rs_fields["item_template"] = s.item_template
        if s.question is not None:
            rs_fields["default_question"] = s.question
        self.rag_settings = RagSettings(**rs_fields)
        self.pipeline = RagPipeline(collection, self.generator, self.rag_settings, query_projection=None)
        self.projection = QueryProjection(collection.manifest.dim, bias=s.bias, step_scale=s.projection_lr_scale)
        if has_rag_checkpoint(generator):  # training goes on from an earlier `train rag` folder
            base = load_rag_checkpoint(generator)
            base.check_collection(collection)
            if base.config.bias == s.bias:
                self.projection.set_weights(base.projection.weights())
        if s.freeze_projection:
            self.projection.requires_grad_(False)
        if s.freeze_generator:
            self.generator.model.requires_grad_(False)

        # queries, embedded as RagPipeline.retrieve does, and the candidates they retrieve
        self.skipped: list[str] = []
        vectors = _embed_queries(collection, examples, self.skipped, progress)
        self.examples = [ex for ex, v in zip(examples, vectors, strict=True) if v is not None]
        if not self.examples:
            raise SourceError("no usable training examples" + (f": {self.skipped[0]}" if self.skipped else ""))
        q = np.stack([v for v in vectors if v is not None])
        c = s.num_candidates
        hits = collection.search_vectors(q, k=c, target=s.target)
        if any(len(h) < s.k for h in hits):
            raise SourceError(f"the collection returns fewer than {s.k} {s.target} items for some "
                              f"queries; index more items or retrieve fewer (--top-k)")
        width = min(len(h) for h in hits)
        self.candidate_ids = np.array([[h.id for h in hs[:width]] for hs in hits], dtype=np.int64)
        uniq, where = np.unique(self.candidate_ids, return_inverse=True)
        vecs = collection.store.vectors(uniq.tolist(), collection.manifest.dim)[where.reshape(-1)]
        self.queries = torch.from_numpy(q)
        self.item_vectors = torch.from_numpy(vecs.reshape(len(q), width, -1))  # (N, C, D)
        self.item_texts = [[item_text(h) for h in hs[:width]] for hs in hits]
        self.questions = [" ".join((ex.question or self.rag_settings.default_question).split())
                          for ex in self.examples]
        self.answers = [ex.answer[: s.max_answer_chars] for ex in self.examples]
        g = self.generator
        self.prompts = [[self.pipeline.item_prompt(qt, t) for t in texts]
                        for qt, texts in zip(self.questions, self.item_texts, strict=True)]
        self.prompt_ids = [[g.prompt_ids(p) for p in ps] for ps in self.prompts]
        self.answer_ids = [g.answer_ids(a) for a in self.answers]
        self.contains = np.array([[_contains(t, a) for t in texts]
                                  for texts, a in zip(self.item_texts, self.answers, strict=True)])
        logger.info("rag task: %d examples, %d candidates each, k=%d", len(self.examples), width, s.k)

    # -- TrainTask -------------------------------------------------------------------------
    def num_examples(self) -> int:
        return len(self.examples)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = [p for p in self.projection.parameters() if p.requires_grad]
        return params + [p for p in self.generator.model.parameters() if p.requires_grad]

    def to(self, device: str) -> None:
        self.device = device
        self.generator.device = device
        self.generator.model.to(device)
        self.projection.to(device)
        self.queries = self.queries.to(device)
        self.item_vectors = self.item_vectors.to(device)

    def scores(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Re-scored candidates: ``(top, log_prior)``, both ``(B, k)``: the candidate positions
        of the top-k under the current W and their log P(z|x) (differentiable in W)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.queries.device)
        q = self.projection(self.queries.index_select(0, idx))  # (B, D)
        z = self.item_vectors.index_select(0, idx)  # (B, C, D)
        s = torch.einsum("bd,bcd->bc", q, z) / self.settings.temperature
        top = torch.topk(s.detach(), self.settings.k, dim=1).indices  # the selection is not differentiated
        return top, torch.log_softmax(s.gather(1, top), dim=1)

    def log_likelihoods(self, indices: Sequence[int], top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``log P(y_t | x, z, y_<t)`` ``(B, k, T)`` and the answer mask ``(B, T)``."""
        top_l = top.tolist()
        prompts = [self.prompt_ids[i][c] for i, row in zip(indices, top_l, strict=True) for c in row]
        answers = [self.answer_ids[i] for i, row in zip(indices, top_l, strict=True) for _ in row]
        logp, mask = token_logprobs(self.generator, prompts, answers)
        b, k = top.shape
        return logp.view(b, k, -1), mask.view(b, k, -1)[:, 0]

    def _forward(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        top, log_prior = self.scores(indices)
        tok, mask = self.log_likelihoods(indices, top)
        return top, log_prior, tok, mask

    def marginal_nll(self, log_prior: torch.Tensor, tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-example negative log marginal likelihood ``(B,)`` in the configured form."""
        if self.settings.mode == "rag-token":
            mix = torch.logsumexp(log_prior.unsqueeze(-1) + tok, dim=1)  # (B, T)
            return -(mix * mask).sum(-1)
        return -torch.logsumexp(log_prior + tok.sum(-1), dim=1)

    def loss(self, indices: Sequence[int], *, train: bool) -> torch.Tensor:
        self.generator.model.train(train and not self.settings.freeze_generator)
        self.projection.train(train)
        _, log_prior, tok, mask = self._forward(indices)
        return self.marginal_nll(log_prior, tok, mask).mean()

    @torch.no_grad()
    def posteriors(self, indices: Sequence[int], batch_size: int = 32) -> dict[str, np.ndarray]:
        """For each example: the top-k candidate positions, P(z|x) and P(z|x,y) (rag-sequence
        form, as the pipeline reports), all ``(N, k)``."""
        self.generator.model.eval()
        tops, priors_, posts = [], [], []
        indices = list(indices)
        for start in range(0, len(indices), batch_size):
            batch = indices[start : start + batch_size]
            top, log_prior, tok, _ = self._forward(batch)
            joint = log_prior + tok.sum(-1)
            tops.append(top.cpu().numpy())
            priors_.append(log_prior.exp().cpu().double().numpy())
            posts.append(torch.softmax(joint.double(), dim=1).cpu().numpy())
        return {"top": np.concatenate(tops), "prior": np.concatenate(priors_), "posterior": np.concatenate(posts)}

    def evaluate(self, indices: Sequence[int]) -> dict[str, float]:
        """Posterior and prior mass on the items that contain the answer text, over the examples
        that retrieve at least one such item, and the share of examples that do."""
        indices = list(indices)
        if not indices:
            return {}
        out = self.posteriors(indices)
        has = np.take_along_axis(self.contains[indices], out["top"], axis=1)  # (N, k) bool
        found = has.any(1)
        metrics = {"answer_in_topk": float(found.mean())}
        if found.any():
            metrics["posterior_answer_item"] = float((out["posterior"] * has).sum(1)[found].mean())
            metrics["prior_answer_item"] = float((out["prior"] * has).sum(1)[found].mean())
            metrics["top1_answer_item"] = float(has[np.arange(len(has)), out["posterior"].argmax(1)][found].mean())
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = {f"projection.{k}": v for k, v in self.projection.state_dict().items()}
        if not self.settings.freeze_generator:
            state.update({f"generator.{k}": v for k, v in self.generator.model.state_dict().items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.projection.load_state_dict({k[len("projection."):]: v for k, v in state.items()
                                         if k.startswith("projection.")})
        gen = {k[len("generator."):]: v for k, v in state.items() if k.startswith("generator.")}
        if gen:
            self.generator.model.load_state_dict(gen)

    def checkpoint_config(self) -> RagCheckpointConfig:
        s, m = self.settings, self.collection.manifest
        probe = fingerprint.read(self.collection.store)
        return RagCheckpointConfig(
            encoder=m.encoder, dim=m.dim, temperature=s.temperature, k=s.k, mode=s.mode, target=s.target,
            bias=s.bias, prompt_template=self.rag_settings.prompt_template,
            item_template=self.rag_settings.item_template,
            encoder_probe=probe.text.tolist() if probe else [],
            encoder_image_probe=probe.image.tolist() if probe and probe.image is not None else None,
            base_generator=self.generator.spec)

    def save_artifact(self, folder: Path) -> None:
        """The fine-tuned generator (``save_pretrained``) + ``query_projection.safetensors`` +
        ``rag_config.json``: load it with ``--generator FOLDER``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.generator.model.save_pretrained(folder)
        self.generator.tokenizer.save_pretrained(folder)
        save_file(self.projection.weights(), str(folder / QUERY_PROJECTION_FILE))
        (folder / RAG_CONFIG_FILE).write_text(json.dumps(self.checkpoint_config().to_dict(), indent=2) + "\n")


def _embed_queries(collection: Collection, examples: Sequence[RagExample], skipped: list[str],
                   progress: bool, batch_size: int = 64) -> list[np.ndarray | None]:
    """Each example's query embedding as :meth:`RagPipeline.retrieve` makes it (None: skipped).
    Plain text queries (no query arithmetic) are encoded in batches, the rest one by one."""
    from ..progress import tqdm
    from ..search.query import parse_query

    out: list[np.ndarray | None] = [None] * len(examples)
    plain: list[tuple[int, str]] = []
    bar = tqdm(total=len(examples), desc="embedding queries", disable=not progress)
    for n, ex in enumerate(examples):
        try:
            if not ex.image:
                terms = parse_query(ex.question or "")
                if len(terms) == 1 and terms[0].weight == 1.0:
                    plain.append((n, collection.clip_query(terms[0].text)))
                    continue
            vec = collection.embed_query(image=ex.image) if ex.image else collection.embed_query(ex.question)
            out[n] = np.asarray(vec, dtype=np.float32)
        except QueryError as e:
            skipped.append(f"example {n + 1}: {e}")
        bar.update(1)
    for start in range(0, len(plain), batch_size):
        chunk = plain[start : start + batch_size]
        vecs = collection.encoder.encode_texts([t for _, t in chunk])
        for (n, _), v in zip(chunk, vecs, strict=True):
            out[n] = np.asarray(v, dtype=np.float32)
        bar.update(len(chunk))
    bar.close()
    return out


def _contains(text: str, answer: str) -> bool:
    a = " ".join(answer.lower().split())
    return bool(a) and a in " ".join(text.lower().split())


def train_rag(collection: str | Path | Collection, source: str | Path | Sequence[RagExample], out_dir: str | Path,
              *, generator: str, settings: RagTrainSettings | None = None, train_settings: Any = None,
              image_root: str | Path | None = None, allow_outside_root: bool = False, resume: bool = False,
              progress: bool = True, metrics_path: str | Path | None = None) -> dict[str, Any]:
    """Train the ``rag`` task end to end; returns a JSON-able summary (the loop's result, the
    number of examples, skipped rows and the final validation metrics).

    ``collection`` is a folder or an open :class:`~crossmodal_rag.Collection`; ``source`` a QA JSONL
    file, anything the ingest reads (image-caption pairs), or a list of :class:`RagExample`.
    """
    from ..collection import Collection
    from .loop import TrainSettings, resolve_device, split_indices, train

    ts = train_settings or TrainSettings(**TRAIN_DEFAULTS)
    rs = settings or RagTrainSettings()
    skipped: list[str] = []
    if isinstance(source, str | Path):
        examples, skipped = load_rag_examples(source, image_root=image_root,
                                              allow_outside_root=allow_outside_root)
    else:
        examples = list(source)
    if not examples:
        raise SourceError(f"no usable training examples in {source}" + (f" ({skipped[0]})" if skipped else ""))
    owned = not isinstance(collection, Collection)
    coll = Collection.open(collection) if owned else collection
    try:
        task = RagTrainTask(coll, generator, examples, rs, device=resolve_device(ts.device), progress=progress)
        result = train(task, ts, out_dir, resume=resume, progress=progress, metrics_path=metrics_path)
        _, val = split_indices(task.num_examples(), ts.val_fraction, ts.seed)
        best = Path(result.best_dir)
        if has_rag_checkpoint(best):  # the final metrics are those of the best artifact
            task.load_state_dict(_artifact_state(best, task))
        final = task.evaluate(val.tolist()) if len(val) else {}
    finally:
        if owned:
            coll.close()
    summary = {"task": "rag", **result.to_dict(), "examples": task.num_examples(),
               "skipped": skipped + task.skipped, "settings": rs.to_dict(), "train_settings": ts.to_dict(),
               "val_metrics": {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in final.items()}}
    return summary


def _artifact_state(folder: Path, task: RagTrainTask) -> dict[str, Any]:
    """The task state held by a saved artifact (projection, and the generator when trained)."""
    from safetensors.torch import load_file

    proj = QueryProjection(task.projection.dim, bias=task.settings.bias, step_scale=task.projection.step_scale)
    proj.set_weights(load_file(str(folder / QUERY_PROJECTION_FILE)))
    state: dict[str, Any] = {f"projection.{k}": v for k, v in proj.state_dict().items()}
    if not task.settings.freeze_generator:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        auto = AutoModelForSeq2SeqLM if task.generator.kind == "seq2seq" else AutoModelForCausalLM
        model = auto.from_pretrained(str(folder))
        state.update({f"generator.{k}": v for k, v in model.state_dict().items()})
    return state

