"""A trained query projection (``train rag``'s inference artefact): ``query_projection.safetensors``
(W and b) and ``rag_config.json`` (:class:`RagCheckpointConfig`: what it was trained for), saved
beside the generator. :class:`~crossmodal_rag.generation.rag.RagPipeline` loads it from a
generator folder (:func:`load_rag_checkpoint`), projects its queries with W and uses the trained
temperature and prompts. The trainer is :mod:`crossmodal_rag.training.rag`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from .._config import strict_from_dict
from ..errors import EncoderMismatchError, ModelSpecError
from ..maintenance import fingerprint

if TYPE_CHECKING:
    from ..collection import Collection

__all__ = [
    "QUERY_PROJECTION_FILE",
    "RAG_CONFIG_FILE",
    "QueryProjection",
    "RagCheckpoint",
    "RagCheckpointConfig",
    "has_rag_checkpoint",
    "load_rag_checkpoint",
]

logger = logging.getLogger(__name__)

_Settings = TypeVar("_Settings")  # RagSettings (not imported: generation.rag imports this module)

QUERY_PROJECTION_FILE = "query_projection.safetensors"
RAG_CONFIG_FILE = "rag_config.json"
_FORMAT = "crossmodal-rag/query-projection"
_FORMAT_VERSION = 2  # 2: the image tower's probe too (1: text probe only, still read)


@dataclass(frozen=True)
class RagCheckpointConfig:
    """``rag_config.json``: what a trained query projection belongs to."""

    encoder: str  # the encoder spec of the collection it was trained on
    dim: int  # embedding size (W is dim x dim)
    temperature: float  # of P(z|x)
    k: int  # items in the marginal during training
    mode: str  # rag-sequence | rag-token
    target: str  # texts | images | all
    bias: bool  # W has a bias
    prompt_template: str  # the prompt the generator was trained on
    item_template: str
    encoder_probe: list[list[float]] = field(default_factory=list)  # the collection's text probe embeddings
    encoder_image_probe: list[list[float]] | None = None  # its image probe (None: format 1, text only)
    base_generator: str = ""  # the generator spec training started from
    format: str = _FORMAT
    format_version: int = _FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RagCheckpointConfig:
        return strict_from_dict(cls, data, "rag_config.json")


class QueryProjection(torch.nn.Module):
    """``q -> normalize(W q + b)`` with ``W = I + step_scale * A`` and ``b = step_scale * c``.

    A and c are the trained parameters, initialised to zero (so W starts as the identity and b
    at zero); ``step_scale`` sets W's learning rate relative to the optimizer's (Adam moves every
    parameter by about lr per step, so W moves by about ``step_scale * lr``), and weight decay
    pulls W towards the identity. Saved and loaded as W and b (:meth:`weights`).
    """

    def __init__(self, dim: int, bias: bool = False, step_scale: float = 1.0) -> None:
        super().__init__()
        self.dim = int(dim)
        self.step_scale = float(step_scale)
        self.delta = torch.nn.Parameter(torch.zeros(self.dim, self.dim))
        self.delta_bias = torch.nn.Parameter(torch.zeros(self.dim)) if bias else None
        self.register_buffer("eye", torch.eye(self.dim), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """W ``(D, D)``."""
        return self.eye + self.step_scale * self.delta

    @property
    def bias(self) -> torch.Tensor | None:
        """b ``(D,)`` or None."""
        return None if self.delta_bias is None else self.step_scale * self.delta_bias

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` query embeddings -> ``(N, D)`` unit vectors."""
        return torch.nn.functional.normalize(torch.nn.functional.linear(queries, self.weight, self.bias), dim=-1)

    def weights(self) -> dict[str, torch.Tensor]:
        """``{"weight": W, "bias": b}`` (no bias key without a bias), detached, on the CPU."""
        out = {"weight": self.weight.detach().cpu().contiguous()}
        if self.bias is not None:
            out["bias"] = self.bias.detach().cpu().contiguous()
        return out

    @torch.no_grad()
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Set W (and b) from :meth:`weights`' format."""
        w = weights.get("weight")
        if w is None or tuple(w.shape) != (self.dim, self.dim):
            raise ValueError(f"expected a {self.dim}x{self.dim} 'weight', got "
                             f"{None if w is None else tuple(w.shape)}")
        if (self.delta_bias is None) != ("bias" not in weights) or set(weights) - {"weight", "bias"}:
            raise ValueError(f"expected keys {['weight', 'bias'] if self.delta_bias is not None else ['weight']}, "
                             f"got {sorted(weights)}")
        self.delta.copy_((w.to(self.delta) - self.eye) / self.step_scale)
        if self.delta_bias is not None:
            self.delta_bias.copy_(weights["bias"].to(self.delta_bias) / self.step_scale)

    @torch.no_grad()
    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Numpy in and out: ``(D,)`` or ``(N, D)`` -> the same shape, float32, unit rows."""
        x = np.asarray(vectors, dtype=np.float32)
        single = x.ndim == 1
        out = self(torch.from_numpy(np.atleast_2d(x)).to(device=self.delta.device, dtype=self.delta.dtype))
        out = out.float().cpu().numpy()
        return out[0] if single else out


@dataclass
class RagCheckpoint:
    """A loaded query projection with its config; see :func:`load_rag_checkpoint`."""

    folder: Path
    config: RagCheckpointConfig
    projection: QueryProjection

    @property
    def temperature(self) -> float:
        return self.config.temperature

    def apply(self, vector: np.ndarray) -> np.ndarray:
        """The projected query ``(D,)`` (or ``(N, D)``) for searching the collection."""
        return self.projection.project(vector)

    def adapt(self, settings: _Settings) -> _Settings:
        """``settings`` (a :class:`~crossmodal_rag.generation.rag.RagSettings`) for inference with
        this projection: P(z|x) at the trained temperature, and the prompt templates the generator
        was trained with unless others were given (a warning)."""
        changes: dict[str, Any] = {"prior_temperature": self.config.temperature}
        defaults = type(settings)()
        for name in ("prompt_template", "item_template"):
            given, trained = getattr(settings, name), getattr(self.config, name)
            if given == getattr(defaults, name):
                changes[name] = trained
            elif given != trained:
                logger.warning("%s differs from the one the generator in %s was trained with (%r)",
                               name, self.folder, trained)
        return replace(settings, **changes)

    def check_collection(self, collection: Collection) -> None:
        """Refuse (:class:`EncoderMismatchError`) a collection built with another encoder: its
        fingerprint (both towers, see :mod:`crossmodal_rag.maintenance.fingerprint`) must reproduce the one
        recorded at training, whatever the encoders' names (the same weights moved elsewhere are
        accepted; other weights under the same name are not). Without probes on either side, the
        names decide; a checkpoint of format 1 holds the text probe only (a warning)."""
        m = collection.manifest
        hint = (f"the query projection in {self.folder} was trained for encoder {self.config.encoder} "
                f"({self.config.dim}-d) but {collection.folder} was built with {m.encoder} ({m.dim}-d); "
                "use it with a collection of that encoder, or train rag again on this collection")
        if m.dim != self.config.dim:
            raise EncoderMismatchError(hint)
        stored, trained = fingerprint.read(collection.store), self.encoder_fingerprint()
        if stored is None or trained is None:
            if m.encoder != self.config.encoder:
                raise EncoderMismatchError(hint)
            return
        fingerprint.check(stored, trained, asked=f"{m.encoder} of {collection.folder}",
                          expected=self.config.encoder,
                          fix=f"The query projection in {self.folder} was trained for encoder "
                              f"{self.config.encoder}: use it with a collection of that encoder, "
                              "or train rag again on this collection")
        if stored.image is None or trained.image is None:
            older = self.folder if trained.image is None else collection.folder
            logger.warning("%s was made before image-tower fingerprints: only the text tower of %s "
                           "is verified against the query projection in %s", older,
                           collection.folder, self.folder)

    def encoder_fingerprint(self) -> fingerprint.Fingerprint | None:
        """The encoder fingerprint recorded at training (None: none recorded)."""
        if not self.config.encoder_probe:
            return None
        return fingerprint.Fingerprint.from_dict({"text": self.config.encoder_probe,
                                                  "image": self.config.encoder_image_probe})


def has_rag_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` holds a trained query projection (``rag_config.json`` beside it)."""
    path = Path(os.path.expanduser(str(folder)))
    return path.is_dir() and (path / RAG_CONFIG_FILE).is_file() and (path / QUERY_PROJECTION_FILE).is_file()


def load_rag_checkpoint(folder: str | Path, device: str | None = None) -> RagCheckpoint:
    """Load ``query_projection.safetensors`` + ``rag_config.json`` from ``folder``."""
    from safetensors.torch import load_file

    path = Path(os.path.expanduser(str(folder)))
    if not has_rag_checkpoint(path):
        raise ModelSpecError(f"{path} holds no query projection ({RAG_CONFIG_FILE} and "
                             f"{QUERY_PROJECTION_FILE}); give a folder written by `train rag`")
    try:
        config = RagCheckpointConfig.from_dict(json.loads((path / RAG_CONFIG_FILE).read_text()))
    except (ValueError, TypeError, OSError) as e:
        raise ModelSpecError(f"{path / RAG_CONFIG_FILE} is not a valid query-projection config: {e}") from e
    if config.format != _FORMAT or config.format_version > _FORMAT_VERSION:
        raise ModelSpecError(f"{path / RAG_CONFIG_FILE} has format {config.format} v{config.format_version}; "
                             f"this version reads {_FORMAT} up to v{_FORMAT_VERSION} (upgrade crossmodal-rag)")
    state = load_file(str(path / QUERY_PROJECTION_FILE))
    proj = QueryProjection(config.dim, bias=config.bias)
    try:
        proj.set_weights(state)
    except ValueError as e:
        raise ModelSpecError(f"{path / QUERY_PROJECTION_FILE} does not match {RAG_CONFIG_FILE}: "
                             f"{str(e).splitlines()[0]}") from e
    proj.eval()
    if device:
        proj.to(device)
    return RagCheckpoint(folder=path.resolve(), config=config, projection=proj)
