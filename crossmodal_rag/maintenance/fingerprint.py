"""Encoder fingerprints: what both towers of a CLIP encoder make of a few fixed inputs.

A collection records the fingerprint of the encoder that built it (in its metadata, see
:func:`write`). Another encoder is accepted only if it reproduces the fingerprint: the text
tower on :data:`PROBE_TEXTS` and the image tower on :func:`probe_images` (synthetic pictures
drawn by code, no files), each row within cosine :data:`MIN_COSINE` of the stored one. So two
models that share a text tower but not an image tower (a fine-tune with a frozen text tower, a
swapped checkpoint) are told apart.

Collections made before image probes existed hold only the text probe (:attr:`Fingerprint.image`
is None); :meth:`crossmodal_rag.collection.Collection.open` checks their text probe and records
the image probe of the collection's own encoder the first time it is used writable.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ..errors import CollectionError, EncoderMismatchError

from pathlib import Path

if TYPE_CHECKING:
    from ..encoders import ClipEncoder
    from ..store.metadata import MetadataStore

__all__ = [
    "IMAGE_KEY",
    "MIN_COSINE",
    "PROBE_TEXTS",
    "REEMBED_MIN_COSINE",
    "TEXT_KEY",
    "Fingerprint",
    "check",
    "compute",
    "mismatch",
    "mismatch_error",
    "probe_images",
    "read",
    "record_image_probe",
    "rows_cosine",
    "verify_encoder",
    "write",
]

#: Texts whose embeddings fingerprint the text tower.
PROBE_TEXTS = ("a photo of a dog", "a red car parked on a street", "an empty white page")
#: Every probe row of two encoders must agree at least this well (1.0 = identical; devices and
#: dtypes of one model stay above 0.999, different weights fall far below).
MIN_COSINE = 0.99
#: Meta keys of the stored probes. The text key predates image probes; the image key carries the
#: version of :func:`probe_images`, so changing the pictures can never compare unlike probes.
TEXT_KEY = "encoder_probe"
IMAGE_KEY = "encoder_image_probe.v1"
#: An embedding made elsewhere (an import) and the encoder's own embedding of the same image must
#: agree at least this well: float16 storage and resampling differences stay well above it.
REEMBED_MIN_COSINE = 0.98
logger = logging.getLogger(__name__)

_PROBE_SIZE = 224  # the usual CLIP input: preprocessing changes the pictures as little as possible
#: Longest stored probe read (4 rows of a 65536-d embedding as JSON fit in 16 MiB).
_MAX_PROBE_CHARS = 16 << 20


@dataclass(frozen=True)
class Fingerprint:
    """Probe embeddings of one encoder."""

    text: np.ndarray  # (len(PROBE_TEXTS), D) float32, unit rows
    image: np.ndarray | None  # (len(probe_images()), D) float32; None: not recorded (older collection)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (e.g. to send to another process)."""
        return {"text": self.text.tolist(),
                "image": None if self.image is None else self.image.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fingerprint:
        image = data.get("image")
        return cls(np.asarray(data["text"], dtype=np.float32),
                   None if image is None else np.asarray(image, dtype=np.float32))


def probe_images() -> list[Image.Image]:
    """Four deterministic RGB pictures (gradient, checkerboard, rings, shapes), drawn with
    numpy from formulas only (no random numbers, no files), so every install draws the same."""
    n = _PROBE_SIZE
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / (n - 1)  # (n, n) each, in [0, 1]
    gradient = np.stack([x, y, 1.0 - 0.5 * (x + y)], axis=-1)
    cells = ((np.floor(x * 8) + np.floor(y * 8)) % 2).astype(np.float32)
    checker = np.stack([cells, 0.2 + 0.6 * cells, 1.0 - cells], axis=-1)
    r = np.hypot(x - 0.5, y - 0.5)
    rings = np.stack([0.5 + 0.5 * np.cos(r * 40), 0.5 + 0.5 * np.sin(r * 25), r / r.max()], axis=-1)
    shapes = np.ones((n, n, 3), np.float32) * np.array([0.9, 0.85, 0.7], np.float32)  # beige ground
    shapes[np.hypot(x - 0.3, y - 0.35) < 0.18] = (0.85, 0.1, 0.1)  # red disc
    shapes[(np.abs(x - 0.7) < 0.15) & (np.abs(y - 0.7) < 0.12)] = (0.1, 0.2, 0.8)  # blue box
    shapes[(y > 0.55) & (y - 0.55 > np.abs(x - 0.3) * 1.5)] = (0.1, 0.6, 0.2)  # green triangle
    return [Image.fromarray(np.round(a * 255).clip(0, 255).astype(np.uint8), "RGB")
            for a in (gradient, checker, rings, shapes)]


def compute(encoder: ClipEncoder) -> Fingerprint:
    """The fingerprint of ``encoder``: both towers on the probes (loads the model)."""
    return Fingerprint(encoder.encode_texts(list(PROBE_TEXTS)), encoder.encode_images(probe_images()))


def read(store: MetadataStore) -> Fingerprint | None:
    """The fingerprint stored in a collection's metadata; None if it holds none.

    Raises:
        CollectionError: a stored probe is not a matrix of finite numbers (a damaged metadata
            file), naming its key.
    """
    text = store.get_meta(TEXT_KEY)
    if not text:
        return None
    image = store.get_meta(IMAGE_KEY)
    return Fingerprint(_parse_probe(store, TEXT_KEY, text),
                       _parse_probe(store, IMAGE_KEY, image) if image else None)


def _parse_probe(store: MetadataStore, key: str, text: str) -> np.ndarray:
    """A stored probe: a JSON list of equally long rows of finite numbers, at most
    :data:`_MAX_PROBE_CHARS` characters."""
    problem = None
    if len(text) > _MAX_PROBE_CHARS:
        problem = f"{len(text)} characters long (at most {_MAX_PROBE_CHARS})"
    else:
        try:
            rows = np.asarray(json.loads(text), dtype=np.float32)
        except (ValueError, TypeError, RecursionError) as e:  # not JSON, ragged, not numbers, too deep
            problem = f"not a matrix of numbers ({str(e)[:80]})"
        else:
            if rows.ndim != 2 or rows.size == 0 or not np.isfinite(rows).all():
                problem = f"not a matrix of finite numbers (shape {rows.shape})"
    if problem is None:
        return rows
    raise CollectionError(
        f"{store.path}: the stored encoder fingerprint {key!r} is {problem}; the metadata file is "
        f"damaged. Run `crossmodal-rag check {store.path.parent}`, and restore the file from a "
        "backup or index the sources into a new collection")


def write(store: MetadataStore, fingerprint: Fingerprint) -> None:
    """Store ``fingerprint`` (call inside one of the store's transactions or snapshots)."""
    store.set_meta(TEXT_KEY, json.dumps(fingerprint.text.round(6).tolist()))
    if fingerprint.image is not None:
        store.set_meta(IMAGE_KEY, json.dumps(fingerprint.image.round(6).tolist()))


def rows_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest cosine between corresponding rows of ``a`` and ``b`` (-1.0 if the shapes differ)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if a.shape != b.shape or a.size == 0:
        return -1.0
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(((a * b).sum(1) / np.maximum(norms, 1e-12)).min())


def mismatch(stored: Fingerprint, fresh: Fingerprint) -> str | None:
    """None if ``fresh`` reproduces ``stored`` (the image tower only where both have one), else
    which tower differs, e.g. ``"image tower, probe cosine 0.412"``."""
    pairs = [("text", stored.text, fresh.text)]
    if stored.image is not None and fresh.image is not None:
        pairs.append(("image", stored.image, fresh.image))
    for tower, a, b in pairs:
        cosine = rows_cosine(a, b)
        if cosine < MIN_COSINE:
            return f"{tower} tower, probe cosine {cosine:.3f}"
    return None


def mismatch_error(asked: str, expected: str, problem: str, fix: str,
                   error: type[Exception] = EncoderMismatchError) -> Exception:
    """The one wording of "these encoders embed differently": names the encoder ``asked`` for,
    the one ``expected`` (e.g. "the one that built the collection"), what differs and the fix."""
    return error(f"encoder {asked} gives different embeddings from {expected} ({problem}). {fix}")


def check(stored: Fingerprint, fresh: Fingerprint, *, asked: str, expected: str, fix: str,
          error: type[Exception] = EncoderMismatchError) -> None:
    """Raise :func:`mismatch_error` unless ``fresh`` (of encoder ``asked``) reproduces ``stored``
    (of encoder ``expected``); see :func:`mismatch`."""
    problem = mismatch(stored, fresh)
    if problem:
        raise mismatch_error(asked, expected, problem, fix, error)


def verify_encoder(store: MetadataStore, encoder: ClipEncoder, *, asked: str, dim: int,
                   where: str | Path, fix: str) -> tuple[Fingerprint | None, Fingerprint | None]:
    """Refuse (:class:`~crossmodal_rag.errors.EncoderMismatchError`) ``encoder`` (named
    ``asked``) for the collection ``where`` (its metadata ``store`` holds ``dim``-d vectors)
    unless it makes ``dim``-d embeddings that reproduce the stored fingerprint; ``fix`` ends
    the message. Returns ``(stored, fresh)`` fingerprints, ``(None, None)`` when the store holds
    none (logged: nothing can be verified). The caller decides on an older store's missing image
    probe (``stored.image is None``: see :func:`record_image_probe`)."""
    if encoder.dim != dim:
        raise EncoderMismatchError(
            f"encoder {asked} makes {encoder.dim}-d embeddings but {where} holds {dim}-d ones. {fix}")
    stored = read(store)
    if stored is None:
        logger.warning("%s holds no encoder fingerprint; %s cannot be verified", where, asked)
        return None, None
    memo = _Memo.of(encoder, store)
    if memo is not None and memo.passed():
        return stored, stored  # this very export already reproduced this very fingerprint
    fresh = compute(encoder)
    check(stored, fresh, asked=asked, expected="the one that built the collection", fix=fix)
    if memo is not None and stored.image is not None:
        memo.record()
    return stored, fresh


class _Memo:
    """Checks passed by an ONNX export folder, kept in it (``verified_fingerprints.json``): the key
    hashes the spec, the size and mtime of the tower files and the collection's stored probes, so
    a changed file or fingerprint checks again. Saves the image tower's load and the probes on
    every cold query."""

    FILE = "verified_fingerprints.json"

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key

    @classmethod
    def of(cls, encoder: ClipEncoder, store: MetadataStore) -> _Memo | None:
        import hashlib

        spec = encoder.spec
        folder = spec.local_path if spec.backend == "onnx" else None
        if folder is None:
            return None
        name = "model_int8.onnx" if spec.pretrained == "int8" else "model.onnx"
        digest = hashlib.sha256(str(spec).encode())
        try:
            for tower in ("visual", "textual"):
                st = (folder / tower / name).stat()
                digest.update(f"|{tower}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            return None
        for key in (TEXT_KEY, IMAGE_KEY):
            digest.update(b"|" + (store.get_meta(key) or "").encode())
        return cls(folder / cls.FILE, digest.hexdigest())

    def _keys(self) -> list[str]:
        try:
            keys = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [k for k in keys if isinstance(k, str)][-64:] if isinstance(keys, list) else []

    def passed(self) -> bool:
        return self.key in self._keys()

    def record(self) -> None:
        import os

        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            tmp.write_text(json.dumps([*self._keys(), self.key]), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as e:  # a read-only export: it is checked every time, as any encoder
            logger.debug("cannot record the fingerprint check in %s: %s", self.path, e)


def record_image_probe(store: MetadataStore, stored: Fingerprint, fresh: Fingerprint) -> None:
    """Add ``fresh``'s image probe to the ``stored`` fingerprint of a collection made before
    image probes (its text probe matched): bookkeeping only, the generation stays."""
    with store.snapshot():
        write(store, Fingerprint(stored.text, fresh.image))
