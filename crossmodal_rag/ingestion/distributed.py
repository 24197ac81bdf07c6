"""Embedding on a Ray cluster: ``crossmodal-rag index SOURCE --collection DIR --ray [ADDRESS]``.

The stages, named for what flows through them::

    driver:  read_source -> records -> skip unchanged files (the single-process decisions)
    Ray:     (position, path) rows -> decode (CPU tasks: read, SHA-256, safe decode, the model's
             preprocess; a bad file becomes a row with its reason) -> pixels -> embed (an actor
             pool of encoders, one GPU each when the cluster has GPUs) -> vectors
    driver:  vectors -> embedding shards in DIR/staging/ray-<run>/ -> the single-process commit
             code, in source order and in the same batches -> SQLite + indexes; staging removed

Texts (new passages and the captions of the images to add) are split into windows on the driver
(the tokenizer is cheap) and embedded by the same encoder actors: they are rows of the same Ray
Dataset (text rows pass through the decode stage untouched), so each actor loads the model once.
Because the commit is the one :func:`crossmodal_rag.ingestion.runner.ingest` runs, in the same order and
batches, a Ray run gives the same ids and metadata as a single-process run, and the same vectors
within float tolerance.

What runs where: listing the source, the skip decisions, text windows, the shards and every
write to the collection happen on the driver (the only process that opens the collection);
reading and decoding images in Ray CPU tasks; the model in the actors. On a cluster of several
machines every node must read the source files and a ``local-dir:`` model at the same paths (a
shared filesystem) and have crossmodal-rag installed; hub models are fetched by each node.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .._config import strict_from_dict
from ..errors import CrossmodalError
from ..maintenance import fingerprint
from ..progress import tqdm
from ..safe_io import MAX_IMAGE_BYTES
from .runner import DecodeDataset, IngestReport, IngestSettings, ingest

if TYPE_CHECKING:
    from ..collection import Collection
    from ..encoders import ClipEncoder
    from .sources import ImageRecord

__all__ = [
    "STAGING_DIR",
    "DistributedError",
    "RayEmbedder",
    "RaySettings",
    "check_ray",
    "clean_staging",
    "ingest_ray",
    "require_ray",
]

logger = logging.getLogger(__name__)

#: Folder inside a collection where Ray runs write their embedding shards before the commit.
STAGING_DIR = "staging"
_RUN_PREFIX = "ray-"
_INSTALL_HINT = 'pip install "crossmodal-rag[distributed]"'
_DEFAULT_PORTS = {"": 6379, "ray": 10001}  # GCS port; Ray Client port
# Environment the encoder actors need to resolve the model as the driver does.
_FORWARDED_ENV = ("CROSSMODAL_RAG_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_ADDRESS_HINT = ("start one with `ray start --head`, or leave out the address (--ray alone) to start a "
                 "local Ray instance")
_DECODE_MEMORY = 8 * 2**20  # bytes reserved per image of a decode batch
_META_COLUMNS = ("error", "sha256", "size", "mtime_ns", "width", "height", "format")


class DistributedError(CrossmodalError):
    """Ray is missing, the cluster cannot be reached or lacks resources, or a Ray run failed."""


@dataclass(frozen=True)
class RaySettings:
    """Where and how the embedding step runs on Ray."""

    address: str | None = None  # None: start a local Ray instance; "auto", "HOST:PORT", "ray://HOST:PORT"
    actors: int | None = None  # encoder actors; None: one per GPU, or 1 on a cluster without GPUs
    batch_size: int | None = None  # images per decode task and encoder call; None: ingest's batch size
    actor_cpus: float = 1.0  # CPUs reserved by each encoder actor (its torch threads on CPU)
    gpus: bool | None = None  # one GPU per actor; None: when the cluster has GPUs
    connect_timeout_s: float = 10.0  # how long to wait for ADDRESS to answer

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"actors must be >= 1, got {self.actors}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.actor_cpus > 0:
            raise ValueError(f"actor_cpus must be > 0, got {self.actor_cpus}")
        if not self.connect_timeout_s > 0:
            raise ValueError(f"connect_timeout_s must be > 0, got {self.connect_timeout_s}")
        if self.address is not None and not self.address.strip():
            raise ValueError("address must not be empty (leave it out to start a local Ray instance)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RaySettings:
        return strict_from_dict(cls, data, "Ray settings")


# -- the run ---------------------------------------------------------------------------------
def ingest_ray(collection: Collection, source: str | Path, settings: IngestSettings | None = None,
               ray_settings: RaySettings | None = None) -> IngestReport:
    """:func:`~crossmodal_rag.ingestion.runner.ingest` with the embedding done on Ray (module docstring).

    Raises:
        DistributedError: Ray is not installed, the cluster cannot be reached or is too small
            for the actors asked for, or the Ray run failed (e.g. a node cannot load the model).
    """
    ray_settings = ray_settings or RaySettings()
    check_ray(ray_settings)  # fail before anything is read
    collection.require_writable()
    clean_staging(collection.folder)  # a crashed run's shards are never committed
    embedder = RayEmbedder(collection, ray_settings)
    try:
        report = ingest(collection, source, settings, embedder=embedder)
    finally:
        embedder.cleanup()
    report.timings["ray"] = embedder.seconds
    report.timings["ray_startup"] = embedder.startup_seconds
    return report


def clean_staging(folder: str | Path) -> int:
    """Remove the shards of Ray runs in collection ``folder`` (call with its write lock held).
    Returns how many runs' folders were removed."""
    root = Path(folder) / STAGING_DIR
    removed = 0
    if root.is_dir():
        for run in root.iterdir():
            if run.name.startswith(_RUN_PREFIX):
                shutil.rmtree(run, ignore_errors=True)
                removed += 1
        with contextlib.suppress(OSError):
            root.rmdir()  # only when empty
    if removed:
        logger.info("removed %d unfinished Ray run(s) from %s", removed, root)
    return removed


class RayEmbedder:
    """An :class:`~crossmodal_rag.ingestion.runner.Embedder` whose vectors come from a Ray run made in
    :meth:`prepare` and kept as shards until the commit has read them."""

    def __init__(self, collection: Collection, ray_settings: RaySettings) -> None:
        self.c = collection
        self.rs = ray_settings
        run = f"{_RUN_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.staging = collection.folder / STAGING_DIR / run
        self.seconds = 0.0  # the Ray part: start, embed, shards written
        self.startup_seconds = 0.0  # of which: until the first results came back
        self.first_rows = 0  # how many items those first results held
        self._images: _Shards | None = None
        self._texts: _Shards | None = None
        self._text_rows: dict[str, int] = {}

    # -- Embedder protocol ---------------------------------------------------------------
    def prepare(self, texts: list[str], images: list[ImageRecord], settings: IngestSettings) -> None:
        encoder = self.c.encoder.load()
        captions = [c for rec in images for c in rec.captions]
        windows = list(dict.fromkeys(w for t in dict.fromkeys(texts + captions)
                                     for w in encoder.text_windows(t)))
        if not windows and not images:
            return
        t0 = time.perf_counter()
        with _ray_session(self.rs) as ray, _quiet_ray_data(ray):
            plan = _Plan.make(ray, self.rs)
            logger.info("Ray: %d encoder actor(s) on %s, %g CPU(s) each", plan.actors,
                        "GPUs" if plan.gpus else "CPU", self.rs.actor_cpus)
            self.staging.mkdir(parents=True)
            ds = self._pipeline(ray, plan, encoder, windows, images, settings)
            self._texts = _Shards(self.staging, "texts", len(windows))
            self._images = _Shards(self.staging, "images", len(images))
            first, self.first_rows = _write_shards(ds, self._texts, self._images, settings.progress)
        self._text_rows = {w: i for i, w in enumerate(windows)}
        self.seconds = time.perf_counter() - t0
        self.startup_seconds = first - t0

    def _pipeline(self, ray: Any, plan: _Plan, encoder: ClipEncoder, windows: list[str],
                  images: list[ImageRecord], settings: IngestSettings) -> Any:
        """The Ray Dataset: one row per text window, then one per image file (``path`` empty for
        texts) -> decode tasks -> encoder actors."""
        batch_size = self.rs.batch_size or settings.batch_size
        rows = [{"position": i, "path": "", "text": w} for i, w in enumerate(windows)]
        rows += [{"position": i, "path": str(r.path), "text": ""} for i, r in enumerate(images)]
        # Decode tasks reserve memory for their batch (decoded images and pixels), which also
        # keeps Ray from fusing decoding into the encoder actors: it stays in parallel CPU tasks.
        decoded = ray.data.from_items(rows).map_batches(
            _decode_batch, batch_size=batch_size, num_cpus=1, memory=batch_size * _DECODE_MEMORY,
            batch_format="numpy",
            fn_kwargs={"transform": _preprocessor(encoder), "max_pixels": settings.max_image_pixels,
                       "max_bytes": settings.max_image_bytes})
        shape = tuple(encoder.preprocess(Image.new("RGB", (8, 8))).shape)
        return plan.embed(decoded, str(encoder.spec), _probe(encoder), batch_size, shape)

    def image_batches(self, images: list[ImageRecord],
                      settings: IngestSettings) -> Iterable[list[dict[str, Any]]]:
        shards = self._images
        if shards is None or shards.count != len(images):
            raise DistributedError("internal error: the Ray run did not embed these images")
        for start in range(0, len(images), settings.batch_size):
            yield [shards.image_row(i) for i in range(start, min(start + settings.batch_size, len(images)))]

    def image_vectors(self, decoded: list[dict[str, Any]]) -> np.ndarray:
        return np.ascontiguousarray(np.stack([o["vector"] for o in decoded]), dtype=np.float32)

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        """Vectors from the Ray run; texts it did not see (new captions of unchanged images)
        are embedded here."""
        out = np.zeros((len(texts), self.c.manifest.dim), np.float32)
        missing: list[int] = []
        for j, text in enumerate(texts):
            i = self._text_rows.get(text)
            if i is None or self._texts is None:
                missing.append(j)
            else:
                out[j] = self._texts.vector(i)
        if missing:
            logger.debug("embedding %d text(s) the Ray run did not see in this process", len(missing))
            out[missing] = self.c.encoder.encode_texts([texts[j] for j in missing])
        return out

    def cleanup(self) -> None:
        """Remove this run's shards (after the commit, or after a failure)."""
        self._images = self._texts = None
        shutil.rmtree(self.staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.staging.parent.rmdir()  # only when empty


# -- Ray stages (these run on the workers) -----------------------------------------------------
def _preprocessor(encoder: ClipEncoder) -> Any:
    """The encoder's image preprocessing without its weights, to ship to CPU tasks: exactly the
    transform the single-process DataLoader workers apply."""
    backend = copy.copy(encoder.backend)
    for heavy in ("model", "tokenizer"):
        if hasattr(backend, heavy):
            setattr(backend, heavy, None)
    return backend.preprocess


def _decode_batch(batch: dict[str, np.ndarray], transform: Any, max_pixels: int,
                  max_bytes: int = MAX_IMAGE_BYTES) -> dict[str, np.ndarray]:
    """Rows (position, path, text) -> the same plus error, file facts and ``pixels``: the
    preprocessed image ``(3, H, W)`` float32 as bytes (empty for texts and failed images).

    The per-file work is the single-process worker's (:class:`crossmodal_rag.ingestion.runner.DecodeDataset`),
    so errors carry the same reasons and the same limits apply (``--max-image-pixels``,
    ``--max-image-mb`` and the decode budgets). Text rows pass through."""
    paths = [str(p) for p in batch["path"]]
    images = [i for i, p in enumerate(paths) if p]
    dataset = DecodeDataset([Path(paths[i]) for i in images], transform, max_pixels, max_bytes)
    empty: dict[str, Any] = {"error": "", "sha256": "", "size": -1, "mtime_ns": -1, "width": -1,
                             "height": -1, "format": ""}
    cols: dict[str, list[Any]] = {c: [empty[c]] * len(paths) for c in _META_COLUMNS}
    pixels = [b""] * len(paths)
    for j, i in enumerate(images):
        out = dataset[j]
        for c in _META_COLUMNS:
            if out.get(c) is not None:
                cols[c][i] = out[c]
        if out["pixels"] is not None and not out["error"]:
            pixels[i] = np.ascontiguousarray(out["pixels"].numpy(), np.float32).tobytes()
    result = {"position": np.asarray(batch["position"], np.int64), "path": np.asarray(paths, object),
              "text": np.asarray(batch["text"], object), "pixels": np.asarray(pixels, object)}
    for c, values in cols.items():
        result[c] = np.asarray(values, dtype=object if isinstance(empty[c], str) else np.int64)
    return result


class _EncoderActor:
    """One model per actor, loaded once; embeds the text rows and the decoded image rows."""

    def __init__(self, spec: str, device: str, threads: int, probe: dict[str, Any],
                 shape: tuple[int, ...]) -> None:
        from ..encoders import load_encoder

        if device == "cpu":
            torch.set_num_threads(threads)
        self.encoder = load_encoder(spec, device).load()
        fingerprint.check(fingerprint.Fingerprint.from_dict(probe), fingerprint.compute(self.encoder),
                          asked=f"{spec} on Ray node {socket.gethostname()}", expected="the driver's",
                          fix="Give every node the same model files", error=DistributedError)
        self.shape = tuple(shape)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rows from the decode tasks -> (position, is_text, file facts, error, vector ``(D,)``);
        the pixels and texts stay here."""
        pixels, texts_col = batch.pop("pixels"), batch.pop("text")
        is_text = np.asarray([not p for p in batch.pop("path")], bool)
        is_image = np.asarray([bool(len(b)) for b in pixels], bool)
        vectors = np.zeros((len(is_text), self.encoder.dim), np.float32)
        if is_text.any():
            texts = [str(t) for t in texts_col[is_text]]
            vectors[is_text] = self.encoder.encode_texts(texts, batch_size=len(texts))
        if is_image.any():
            stacked = np.stack([np.frombuffer(b, np.float32).reshape(self.shape) for b in pixels[is_image]])
            vectors[is_image] = self.encoder.encode_pixels(torch.from_numpy(stacked))
        batch["vector"] = vectors
        batch["is_text"] = is_text
        return batch


def _probe(encoder: ClipEncoder) -> dict[str, Any]:
    return fingerprint.compute(encoder).to_dict()  # both towers


# -- the write stage (on the driver) ------------------------------------------------------------
class _Shards:
    """Embedding shards of one kind: ``<kind>-NNNNNN.npy`` vectors ``(n, D)`` float32 and
    ``<kind>-NNNNNN.json`` columns (position, and for images the file facts or the error).
    Vectors are memory-mapped; ``count`` rows, found by position."""

    def __init__(self, folder: Path, kind: str, count: int) -> None:
        self.folder, self.kind, self.count = folder, kind, count
        self.shard = np.full(count, -1, np.int64)  # position -> shard number
        self.row = np.zeros(count, np.int64)  # position -> row in that shard
        self._vectors: list[np.ndarray] = []
        self._meta: list[dict[str, list[Any]]] = []

    def write(self, batch: dict[str, np.ndarray]) -> None:
        k = len(self._vectors)
        stem = self.folder / f"{self.kind}-{k:06d}"
        positions = np.asarray(batch["position"], np.int64)
        np.save(stem.with_suffix(".npy"), np.ascontiguousarray(batch["vector"], np.float32))
        meta = {"position": positions.tolist()}
        if self.kind == "images":
            meta.update({c: np.asarray(batch[c]).tolist() for c in _META_COLUMNS})
        stem.with_suffix(".json").write_text(json.dumps(meta), encoding="utf-8")
        # Read back what was written: the commit uses the shards, not what Ray handed us.
        self._vectors.append(np.load(stem.with_suffix(".npy"), mmap_mode="r"))
        self._meta.append(json.loads(stem.with_suffix(".json").read_text(encoding="utf-8")))
        if ((positions < 0) | (positions >= self.count)).any() or (self.shard[positions] >= 0).any():
            raise DistributedError(f"Ray run returned unexpected or repeated {self.kind} rows")
        self.shard[positions] = k
        self.row[positions] = np.arange(len(positions))

    def check_complete(self) -> None:
        missing = int((self.shard < 0).sum())
        if missing:
            raise DistributedError(f"Ray run returned {self.count - missing} of {self.count} {self.kind}")

    def vector(self, position: int) -> np.ndarray:
        return self._vectors[self.shard[position]][self.row[position]]

    def image_row(self, position: int) -> dict[str, Any]:
        k, r = self.shard[position], self.row[position]
        meta = self._meta[k]
        out: dict[str, Any] = {"i": position, "error": meta["error"][r] or None}
        if out["error"] is None:
            out.update({c: meta[c][r] for c in _META_COLUMNS if c != "error"})
            out["vector"] = self._vectors[k][r]
        return out


def _write_shards(ds: Any, texts: _Shards, images: _Shards, progress: bool) -> tuple[float, int]:
    """Stream the run's output into shards (texts and images apart) as it arrives; returns the
    ``time.perf_counter()`` at which the first results arrived and how many items they held."""
    first, first_rows = 0.0, 0
    bar = tqdm(total=texts.count + images.count, unit=" items", desc="ray: embedding",
               disable=not progress, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            is_text = np.asarray(batch["is_text"], bool)
            if not first:
                first, first_rows = time.perf_counter(), len(is_text)
            for shards, rows in ((texts, is_text), (images, ~is_text)):
                if rows.any():
                    shards.write({k: np.asarray(v)[rows] for k, v in batch.items()})
            bar.update(len(is_text))
    except DistributedError:
        raise
    except Exception as e:  # a worker's failure arrives wrapped in Ray's exceptions
        raise DistributedError(f"the Ray run failed: {_root_message(e)}") from e
    finally:
        bar.close()
    texts.check_complete()
    images.check_complete()
    return first or time.perf_counter(), first_rows


# -- cluster -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """How many encoder actors, on what: checked against the cluster's resources."""

    actors: int
    gpus: bool
    actor_cpus: float

    @classmethod
    def make(cls, ray: Any, rs: RaySettings) -> _Plan:
        resources = ray.cluster_resources()
        n_gpus, n_cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
        gpus = n_gpus > 0 if rs.gpus is None else rs.gpus
        if gpus and n_gpus == 0:
            raise DistributedError("RaySettings(gpus=True) but the Ray cluster has no GPUs")
        actors = rs.actors or (n_gpus if gpus else 1)
        if gpus and actors > n_gpus:
            raise DistributedError(f"{actors} encoder actors need {actors} GPUs but the Ray cluster has "
                                   f"{n_gpus}; pass --ray-actors {n_gpus} or fewer")
        needed = actors * rs.actor_cpus + 1  # + one CPU for the decode tasks
        if n_cpus < needed:
            raise DistributedError(
                f"{actors} encoder actor(s) of {rs.actor_cpus:g} CPU(s) plus decoding need {needed:g} CPUs "
                f"but the Ray cluster has {n_cpus:g}; pass fewer --ray-actors")
        return cls(actors, gpus, rs.actor_cpus)

    def embed(self, ds: Any, spec: str, probe: dict[str, Any], batch_size: int,
              shape: tuple[int, ...]) -> Any:
        from ray.data import ActorPoolStrategy

        return ds.map_batches(
            _EncoderActor, compute=ActorPoolStrategy(size=self.actors), batch_size=batch_size,
            batch_format="numpy", num_gpus=1 if self.gpus else 0, num_cpus=self.actor_cpus,
            fn_constructor_kwargs={"spec": spec, "device": "cuda" if self.gpus else "cpu",
                                   "threads": max(1, math.floor(self.actor_cpus)), "probe": probe,
                                   "shape": shape})


def require_ray() -> Any:
    """The ``ray`` module, with Ray Data; :class:`DistributedError` with an install hint if missing."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise DistributedError(f"--ray needs Ray Data, which is not installed: {_INSTALL_HINT}") from e
    return ray


def check_ray(rs: RaySettings) -> None:
    """Fail early, before any work: Ray Data is installed, and ``rs.address`` (when given, and no
    Ray session is running in this process) answers. Raises :class:`DistributedError`."""
    if rs.address is not None:
        _bound_ray_connect(rs.connect_timeout_s)
    ray = require_ray()
    if rs.address is not None and not ray.is_initialized():
        _check_reachable(rs.address, rs.connect_timeout_s)


def _bound_ray_connect(timeout: float) -> None:
    """Make Ray give up on an address that accepts connections but does not answer after about
    ``timeout`` + 10 s, not after its default ~14 minutes of retries. Ray's C++ side reads
    ``RAY_py_gcs_connect_timeout_s`` when ``ray`` is first imported, so this only takes effect
    before that; a value the user set wins."""
    if "ray" not in sys.modules:
        os.environ.setdefault("RAY_py_gcs_connect_timeout_s", str(math.ceil(timeout)))


def _describe(address: str) -> str:
    """``address`` as the user gave it, with what ``auto`` resolves to when RAY_ADDRESS is set."""
    env = _ray_address_env() if address == "auto" else None
    return f"auto (RAY_ADDRESS={env})" if env else address


def _ray_address_env() -> str | None:
    """The address ``auto`` connects to when RAY_ADDRESS names one (else Ray searches itself)."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    return env if env not in ("", "auto", "local") else None


@contextlib.contextmanager
def _ray_session(rs: RaySettings) -> Iterator[Any]:
    """Ray, initialised: the caller's session if this process has one (used as it is, and left
    running), else a local instance or a connection to ``rs.address`` (shut down / disconnected
    afterwards)."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    verbose = logger.isEnabledFor(logging.INFO)
    kwargs: dict[str, Any] = {"include_dashboard": False, "ignore_reinit_error": True,
                              "logging_level": logging.INFO if verbose else logging.ERROR,
                              "log_to_driver": verbose}
    if rs.address is None:
        needed = (rs.actors or 1) * rs.actor_cpus + 1
        kwargs["num_cpus"] = max(os.cpu_count() or 1, math.ceil(needed))
        where = "a local Ray instance"
    else:
        _check_reachable(rs.address, rs.connect_timeout_s)
        kwargs["address"] = rs.address
        env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
        if env:
            kwargs["runtime_env"] = {"env_vars": env}
        where = f"the Ray cluster at {_describe(rs.address)}"
    # one connection attempt, not Ray's 20 (each up to ~20 s against an address that does not answer)
    retries = "RAY_gcs_server_port_wait_time_s"
    saved = os.environ.get(retries)
    if rs.address is not None and saved is None:
        os.environ[retries] = "1"
    try:
        ray.init(**kwargs)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError, ... depending on the case
        hint = f"; {_ADDRESS_HINT}" if rs.address is not None else ""
        raise DistributedError(f"cannot start or reach {where}: {_root_message(e).rstrip('.')}{hint}") from e
    finally:
        if saved is None:
            os.environ.pop(retries, None)
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str, timeout: float) -> None:
    """Fail fast (one line, no hang) when ``HOST:PORT`` does not answer. ``auto`` is checked
    where RAY_ADDRESS points; without it, Ray looks for a local cluster itself."""
    shown = _describe(address)
    if address == "auto":
        address = _ray_address_env() or ""
        if not address:
            return
    scheme, _, rest = address.rpartition("://")
    host, sep, port = rest.rpartition(":")
    if not sep:
        host, port = rest, str(_DEFAULT_PORTS.get(scheme, 6379))
    try:
        port_n = int(port)
    except ValueError:
        raise DistributedError(
            f"bad Ray address {shown!r}: expected HOST:PORT, ray://HOST:PORT or auto") from None
    try:
        socket.create_connection((host.strip("[]"), port_n), timeout=timeout).close()
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise DistributedError(f"cannot reach a Ray cluster at {shown}: {reason}; {_ADDRESS_HINT}") from None


@contextlib.contextmanager
def _quiet_ray_data(ray: Any) -> Iterator[None]:
    """Our progress bar instead of Ray Data's bars and per-run log lines (restored after)."""
    ctx = ray.data.DataContext.get_current()
    switches = [a for a in ("enable_progress_bars", "print_on_execution_start", "enable_auto_log_stats")
                if hasattr(ctx, a)]  # which exist depends on the Ray version
    saved = {a: getattr(ctx, a) for a in switches}
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    for a in switches:
        setattr(ctx, a, False)
    if not logger.isEnabledFor(logging.INFO):  # failures reach the user as DistributedError
        data_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for a, value in saved.items():
            setattr(ctx, a, value)
        data_logger.setLevel(level)


def _root_message(e: BaseException) -> str:
    """One line for a failure Ray wrapped (several times, tracebacks included): the last line of
    the innermost exception that has a message, e.g. ``ModelSpecError: ... does not exist``."""
    found = type(e).__name__
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        lines = [line.strip() for line in str(x).splitlines() if line.strip()]
        if lines:
            last = lines[-1]
            named = re.match(r"^([\w.]+(?:Error|Exception|Exit|Interrupt)\w*): (.*)$", last)
            found = (f"{named.group(1).rsplit('.', 1)[-1]}: {named.group(2)}" if named
                     else f"{type(x).__name__}: {last}")
        inner = getattr(x, "cause", None)
        x = inner if isinstance(inner, BaseException) else x.__cause__
    return found
