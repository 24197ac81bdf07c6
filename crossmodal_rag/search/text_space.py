"""A collection's text space: its text items embedded by a sentence encoder, in their own index.

CLIP keeps embedding images and its own caption vectors (text->image search); a collection made
with ``index --text-model SPEC`` also holds every text row of its text index (captions,
passages, OCR text, windows of long texts) embedded by that sentence encoder
(:mod:`crossmodal_rag.encoders.sentence`), and text->text search and RAG retrieval over texts
use it. Layout, inside the collection folder::

    text_space/manifest.json      {"format": 1, "spec", "dim", "count", "probe": [[...], ...],
                                   "collection_id", "vectors": NAME, "ids": NAME}
    text_space/vectors-GEN.npy    (N, D) float32, unit rows     (no pickle: allow_pickle=False)
    text_space/ids-GEN.npy        (N,) int64, the collection's item ids of those rows

Each save writes a new generation of the two arrays (temporary file, fsync, rename), then the
manifest naming them (the commit point), then removes the older generation: a crash at any step
leaves the last committed space whole. ``collection_id`` binds the space to its collection (a
``text_space`` folder copied into another collection, or one whose id is blank, is refused).
``probe`` is the encoder's fingerprint (:func:`~crossmodal_rag.encoders.sentence.text_probe`):
an encoder that no longer reproduces it is refused
(:class:`~crossmodal_rag.errors.EncoderMismatchError`), as for CLIP. A space that breaks any
rule of :func:`~crossmodal_rag.search.text_space_audit.text_space_faults` (a probe that is not finite,
no collection id, vectors that are not finite or not unit norm, ids of images) is refused on
open with a :class:`~crossmodal_rag.errors.CollectionError` naming the fault; ``reindex``
rebuilds it (:func:`sync_text_space` with ``rebuild_refused``).

:func:`sync_text_space` brings the space up to date with the collection (embeds new text rows,
drops removed ones; rebuilds all for a new spec). A space that lags behind the collection still
answers (missing rows are not found, removed ones are skipped) and says so in the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..encoders.sentence import (
    SentenceEncoder,
    load_text_encoder,
    parse_text_model_spec,
    text_probe,
)
from ..errors import CollectionError, EncoderMismatchError
from ..safe_io import atomic_write, fsync_dir
from .text_space_audit import FORMAT, array_files, text_space_faults

if TYPE_CHECKING:
    from ..store.manifest import Manifest
    from ..store.metadata import MetadataStore
    from .hits import Hit

__all__ = ["TEXT_SPACE_DIR", "SyncReport", "TextSpace", "TextSpaceOwner", "array_files", "open_text_space",
           "remove_text_space", "sync_text_space"]

logger = logging.getLogger(__name__)

TEXT_SPACE_DIR = "text_space"
_MAX_MANIFEST_BYTES = 16 << 20
#: The space's own array files, of any generation, and their temporary files (``.NAME.PID.RANDOM.tmp``,
#: :func:`~crossmodal_rag.safe_io.atomic_write`'s; ``NAME.tmp`` of older saves).
_ARRAY_FILE = re.compile(r"(?:vectors|ids)(?:-[0-9]+)?\.npy(?:\.tmp)?"
                         r"|\.(?:vectors|ids|manifest)(?:-[0-9]+)?\.(?:npy|json)\.[0-9]+\.[0-9a-f]+\.tmp")


class TextSpaceOwner(Protocol):
    """A collection as its text space sees it (:class:`crossmodal_rag.Collection`)."""

    folder: Path  # the collection folder (the space lives in its ``text_space/``)
    store: MetadataStore  # the items whose texts the space embeds

    @property
    def manifest(self) -> Manifest: ...


@dataclass(frozen=True)
class SyncReport:
    """What :func:`sync_text_space` did."""

    spec: str | None  # the text model now in use (None: no text space)
    added: int  # rows embedded
    removed: int  # rows dropped
    rebuilt: bool  # every row embedded afresh (new spec or no space before)


class TextSpace:
    """A loaded text space: its manifest, its vectors and ids, and (on first use) its encoder."""

    def __init__(self, folder: Path, manifest: dict[str, Any], ids: np.ndarray,
                 vectors: np.ndarray, device: str | None = None) -> None:
        self.folder = folder
        self.manifest = manifest
        self.ids = ids
        self.vectors = vectors
        self._device = device
        self._encoder: SentenceEncoder | None = None
        self._index: Any = None

    @property
    def spec(self) -> str:
        return str(self.manifest["spec"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def encoder(self) -> SentenceEncoder:
        """The text model, loaded and checked against the stored probe on first use."""
        if self._encoder is None:
            enc = load_text_encoder(self.spec, self._device)
            assert enc is not None
            check_probe(enc, np.asarray(self.manifest["probe"], np.float32), self.folder.parent)
            self._encoder = enc
        return self._encoder

    @property
    def index(self) -> Any:
        """A :class:`~crossmodal_rag.store.vectors.VectorIndex` (exact inner product) over the rows."""
        if self._index is None:
            from ..store.vectors import VectorIndex

            index = VectorIndex(self.dim)
            index.add(self.ids, self.vectors)
            self._index = index
        return self._index

    def embed_query(self, text: str) -> np.ndarray:
        """A query text -> ``(D,)`` float32 unit vector in this space. Query arithmetic
        (``"festival" + "river" - "lantern"``, ``2:coffee``) works as in CLIP's space
        (:mod:`crossmodal_rag.search.query`): each term embedded by the sentence encoder, the
        weighted sum normalised; bad arithmetic raises :class:`~crossmodal_rag.errors.QueryError`."""
        from .query import check_query_vectors, combine, parse_query

        terms = parse_query(text)
        if len(terms) == 1 and terms[0].weight == 1.0:
            return check_query_vectors(self.encoder.encode_texts([terms[0].text]))[0]
        vectors = self.encoder.encode_texts([t.text for t in terms])
        return check_query_vectors(combine(vectors, [t.weight for t in terms])[None])[0]

    def search(self, store: MetadataStore, query: str | np.ndarray, k: int,
               allowed: Mapping[str, np.ndarray] | None = None, min_score: float | None = None) -> list[Hit]:
        """Top-``k`` text items of ``store`` for ``query`` (a text, or its vector in this space);
        windows count for their item. ``allowed``: ids per index a filter lets through."""
        from .dense import search_vectors

        text_allowed = None if allowed is None else {"text": allowed["text"]}
        vec = self.embed_query(query) if isinstance(query, str) else query
        return search_vectors({"text": self.index}, store, vec[None], k, "texts", text_allowed, min_score,
                              space="text")[0]


def check_probe(encoder: SentenceEncoder, stored: np.ndarray, collection: Path) -> None:
    """Refuse ``encoder`` when it does not reproduce the ``stored`` probe."""
    from ..maintenance.fingerprint import MIN_COSINE, rows_cosine

    cosine = rows_cosine(stored, text_probe(encoder))
    if not cosine >= MIN_COSINE:  # NaN: not reproduced
        raise EncoderMismatchError(
            f"{collection}: the text model {encoder.spec} does not produce the vectors this "
            f"collection's text space was built with (probe cosine {cosine:.3f}); rebuild it with "
            f"`crossmodal-rag reembed {collection} --text-model SPEC`")


def _folder(coll: TextSpaceOwner) -> Path:
    return Path(coll.folder) / TEXT_SPACE_DIR


def open_text_space(coll: TextSpaceOwner, device: str | None = None, *,
                    warn_lag: bool = True) -> TextSpace | None:
    """The collection's text space, or None when it has none. ``warn_lag``: log a warning when
    it holds another number of rows than the collection has texts (off for the sync that fixes it).

    Raises:
        CollectionError: the files are damaged or disagree with each other.
    """
    folder = _folder(coll)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    from ..safe_io import read_regular_text

    try:
        manifest = json.loads(read_regular_text(manifest_path, max_bytes=_MAX_MANIFEST_BYTES))
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format') if isinstance(manifest, dict) else None!r}"
                             f" (this version reads {FORMAT})")
        parse_text_model_spec(str(manifest["spec"]))
        ids_file, vectors_file = array_files(folder, manifest)
        ids = np.load(ids_file, allow_pickle=False)
        vectors = np.load(vectors_file, allow_pickle=False, mmap_mode="r")
        dim, count = int(manifest["dim"]), int(manifest["count"])
        if ids.shape != (count,) or vectors.shape != (count, dim) or ids.dtype != np.int64:
            raise ValueError(f"ids {ids.shape} and vectors {vectors.shape} do not match count {count}, "
                             f"dim {dim}")
    except (OSError, ValueError, KeyError, TypeError, OverflowError, EOFError) as e:
        raise CollectionError(
            f"{folder}: the text space is damaged ({str(e)[:200]}); rebuild it with "
            f"`crossmodal-rag reembed {coll.folder} --text-model SPEC` (or none)") from e
    loaded = np.asarray(vectors, np.float32)
    faults = text_space_faults(manifest, ids, loaded, collection_id=_collection_id(coll),
                               image_ids=coll.store.ids("image"))
    if faults:
        raise CollectionError(
            f"{folder}: the text space cannot be used: {'; '.join(faults)}. `crossmodal-rag reindex "
            f"{coll.folder}` rebuilds it (or `crossmodal-rag reembed {coll.folder} --text-model SPEC`)")
    space = TextSpace(folder, manifest, ids, loaded, device)
    if warn_lag:
        live, held = len(coll.store.ids("text")), len(space)
        if live != held:  # texts added or removed since the space was last brought up to date
            logger.warning("%s: the text space holds %d text rows, the collection %d; run `crossmodal-rag "
                           "reindex %s` to bring it up to date", coll.folder, held, live, coll.folder)
    return space


def _atomic_write(path: Path, write: Any) -> None:
    with atomic_write(path, sync_folder=False) as f:  # the folder is fsynced once, after all three
        write(f)


def _collection_id(coll: TextSpaceOwner) -> str:
    return str(getattr(coll.manifest, "collection_id", "") or "")


def _save(folder: Path, spec: str, probe: np.ndarray, ids: np.ndarray, vectors: np.ndarray,
          collection_id: str = "") -> None:
    folder.mkdir(exist_ok=True)
    gens = [int(m.group(1)) for p in folder.iterdir()
            if (m := re.fullmatch(r"(?:vectors|ids)-([0-9]+)\.npy", p.name))]
    gen = max(gens, default=0) + 1
    names = {"vectors": f"vectors-{gen}.npy", "ids": f"ids-{gen}.npy"}
    _atomic_write(folder / names["vectors"], lambda f: np.save(f, vectors, allow_pickle=False))
    _atomic_write(folder / names["ids"], lambda f: np.save(f, ids, allow_pickle=False))
    manifest = {"format": FORMAT, "spec": spec, "dim": int(vectors.shape[1]), "count": len(ids),
                "probe": np.round(probe, 6).tolist(), "collection_id": collection_id, **names}
    _atomic_write(folder / "manifest.json", lambda f: f.write(json.dumps(manifest).encode()))
    fsync_dir(folder)
    for p in folder.iterdir():  # older generations (and a crashed save's leftovers) go
        if p.name not in names.values() and _ARRAY_FILE.fullmatch(p.name):
            with contextlib.suppress(OSError):
                p.unlink()


def _texts(coll: TextSpaceOwner, ids: np.ndarray) -> list[str]:
    items = coll.store.get_items(ids.tolist())
    return [(items[i].text or "") if i in items else "" for i in ids.tolist()]


def _stored_spec(coll: TextSpaceOwner) -> str | None:
    """The text model a (refused) text space's manifest names, when it can be read and parsed."""
    from ..errors import ModelSpecError
    from ..safe_io import read_regular_text

    try:
        manifest = json.loads(read_regular_text(_folder(coll) / "manifest.json", max_bytes=_MAX_MANIFEST_BYTES))
        spec = manifest["spec"] if isinstance(manifest, dict) else None
        return str(parse_text_model_spec(spec)) if isinstance(spec, str) else None
    except (OSError, ValueError, KeyError, TypeError, ModelSpecError):
        return None


def sync_text_space(coll: TextSpaceOwner, spec: str | None = None, *, rebuild: bool = False,
                    device: str | None = None, batch_size: int = 64,
                    rebuild_refused: bool = False) -> SyncReport:
    """Bring ``coll``'s text space up to date.

    ``spec``: the text model (``none`` removes the space); None keeps the current one (no space:
    nothing to do). A spec other than the stored one, or ``rebuild``, embeds every row afresh;
    otherwise only rows added since are embedded and removed rows dropped.
    ``rebuild_refused``: a space that :func:`open_text_space` refuses (damaged files, a probe
    that is not finite, no collection id, bad vectors, ids of images) is rebuilt afresh with
    the text model its manifest names (or ``spec``) instead of raising.
    """
    try:
        current = open_text_space(coll, device, warn_lag=False)  # this call brings it up to date
    except CollectionError as e:
        stored = _stored_spec(coll)
        if not rebuild_refused or (spec is None and stored is None):
            raise
        logger.warning("%s; rebuilding the text space", e)
        current, rebuild, spec = None, True, spec or stored
    if spec is not None and parse_text_model_spec(spec) is None:
        removed = len(current) if current is not None else 0
        remove_text_space(coll)
        return SyncReport(None, 0, removed, False)
    if spec is None and current is None:
        return SyncReport(None, 0, 0, False)
    parsed = str(parse_text_model_spec(spec)) if spec is not None else current.spec  # type: ignore[union-attr]
    fresh = rebuild or current is None or current.spec != parsed
    want = coll.store.ids("text")
    if fresh:
        encoder = load_text_encoder(parsed, device)
        assert encoder is not None
        keep_ids, keep_vecs = np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        probe = text_probe(encoder)
    else:
        encoder = current.encoder  # checks the probe
        keep = np.isin(current.ids, want)
        keep_ids, keep_vecs = current.ids[keep], current.vectors[keep]
        probe = np.asarray(current.manifest["probe"], np.float32)
    new_ids = want[~np.isin(want, keep_ids)]
    if not fresh and not len(new_ids) and len(keep_ids) == len(current.ids):  # type: ignore[union-attr]
        return SyncReport(parsed, 0, 0, False)
    logger.info("text space: embedding %d text rows with %s", len(new_ids), parsed)
    new_vecs = encoder.encode_texts(_texts(coll, new_ids), batch_size=batch_size, progress=None)
    if not len(keep_ids):
        keep_vecs = np.zeros((0, new_vecs.shape[1]), np.float32)
    ids = np.concatenate([keep_ids, new_ids]).astype(np.int64)
    vectors = np.ascontiguousarray(np.concatenate([keep_vecs, new_vecs]), dtype=np.float32)
    order = np.argsort(ids, kind="stable")
    _save(_folder(coll), parsed, probe, ids[order], vectors[order], _collection_id(coll))
    removed = 0 if fresh else len(current.ids) - len(keep_ids)  # type: ignore[union-attr]
    return SyncReport(parsed, len(new_ids), removed, fresh)


def remove_text_space(coll: TextSpaceOwner) -> None:
    """Delete the collection's text space (its texts are searched in CLIP's space again)."""
    folder = _folder(coll)
    (folder / "manifest.json").unlink(missing_ok=True)  # the manifest first: never half-valid
    if folder.is_dir():
        for p in folder.iterdir():
            if _ARRAY_FILE.fullmatch(p.name):
                p.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # not empty: a file someone else put there stays
        folder.rmdir()
