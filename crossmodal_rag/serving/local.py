"""Index shards opened in this process: each a :class:`~crossmodal_rag.collection.Collection`
behind the :class:`~crossmodal_rag.search.shards.Shard` interface, checked to share one encoder
(its stored fingerprint: probe embeddings of both towers), and read from ``-c`` flags or a shard
list file (one folder a line, ``#`` comments, relative to the file)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CollectionError
from ..maintenance import fingerprint
from ..safe_io import read_regular_text
from ..search import hybrid, routing
from ..search.dense import resolve_min_score
from ..search.filters import allowed_ids, parse_where
from ..search.request import SearchRequest, SearchResult
from ..search.shards import ShardSet, ShardSettings
from ..store import bm25, fulltext
from ..store.bm25 import Bm25Stats

if TYPE_CHECKING:
    from ..collection import Collection
    from ..store.items import Item

__all__ = ["LocalShard", "ShardMismatchError", "check_encoders", "open_shards", "read_shard_list", "shard_names"]

logger = logging.getLogger(__name__)


class ShardMismatchError(CollectionError):
    """A shard was made with another encoder than the first shard."""


class LocalShard:
    """An open collection as a shard (its folder's name unless ``name`` is given)."""

    def __init__(self, collection: Collection, name: str | None = None) -> None:
        self.collection = collection
        self.name = name or collection.folder.name

    @property
    def has_text_space(self) -> bool:
        return self.collection.text_space is not None

    def search(self, request: SearchRequest) -> SearchResult:
        return self.collection.search(request)

    def keyword_stats(self, query: str, arithmetic: bool) -> Bm25Stats:
        return bm25.query_stats(self.collection.store, hybrid.keyword_text(query) if arithmetic else query)

    def keyword(self, request: SearchRequest, query: str, arithmetic: bool, routed: bool,
                stats: Bm25Stats | None = None) -> SearchResult:
        """The keyword ranking ``request.k`` deep (BM25 with ``stats`` when given), each hit with
        its cosine: in the text space (``routed``), else in CLIP's with ``request.vector`` (none:
        no cosine)."""
        coll = self.collection
        conditions = parse_where(request.where)
        allowed = allowed_ids(coll.store, conditions) if conditions else None
        hits = hybrid.keyword_hits(coll.store, query, request.k, request.target, allowed, arithmetic=arithmetic,
                                   stats=stats)
        space = coll.text_space if routed else None
        if space is not None:
            vector = space.embed_query(request.text or "")
            hits = routing.text_dense_scores(space, vector, [h.ranked(h.rank, space="text") for h in hits])
            return SearchResult(tuple(hits), "keyword", routing.space_threshold(space, request.min_score))
        threshold = None
        if request.vector is not None:
            vector = np.asarray(request.vector, np.float32).reshape(-1)
            hits = hybrid.dense_scores(coll.store, coll.manifest.dim, vector, hits)
            threshold = resolve_min_score(request.min_score, coll.store, coll.manifest.dim,
                                          query_is_image=request.image is not None, target=request.target)
        return SearchResult(tuple(hits), "keyword", threshold)

    def doc_freqs(self, words: Sequence[str]) -> tuple[dict[str, int], int]:
        return fulltext.doc_freqs(self.collection.store, words)

    def get(self, ids: list[int]) -> list[Item]:
        return self.collection.get(list(ids))

    def path_entry(self, path: str) -> tuple[int, int | None, int | None] | None:
        return self.collection.store.path_entry(path)

    def counts(self) -> dict[str, int]:
        return self.collection.counts()


def read_shard_list(path: str | Path) -> list[Path]:
    """The shard folders a list file names: one a line, ``#`` comments, blank lines skipped,
    relative paths from the file's folder."""
    path = Path(path)
    try:
        text = read_regular_text(path, what="shard list")
    except (OSError, UnicodeDecodeError) as e:
        raise CollectionError(f"cannot read shard list {path}: {getattr(e, 'reason', None) or e}") from e
    folders = []
    for line in text.splitlines():
        s = line.split("#", 1)[0].strip()
        if s:
            folder = Path(s).expanduser()
            folders.append(folder if folder.is_absolute() else path.resolve().parent / folder)
    if not folders:
        raise CollectionError(f"shard list {path} names no collection folder (one a line)")
    return folders


def shard_names(folders: Sequence[str | Path]) -> list[str]:
    """A name per shard folder: its last part, or more of its path where two would be equal."""
    paths = [Path(f).expanduser().resolve() for f in folders]
    if len(set(paths)) != len(paths):
        dup = next(str(p) for p in paths if paths.count(p) > 1)
        raise CollectionError(f"shard {dup} is named twice; give each collection once")
    depth = 1
    while True:
        names = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(names)) == len(names) or depth >= max(len(p.parts) for p in paths):
            return names
        depth += 1


def check_encoders(collections: Sequence[Collection], names: Sequence[str]) -> None:
    """Refuse (:class:`ShardMismatchError`, naming the odd shard) unless every collection was
    made with the first one's encoder: same dimension, and stored fingerprints that agree
    (collections without one: the same encoder name)."""
    first, first_fp = collections[0], fingerprint.read(collections[0].store)
    for coll, name in zip(collections[1:], names[1:], strict=True):
        problem = None
        if coll.manifest.dim != first.manifest.dim:
            problem = f"{coll.manifest.dim}-d vectors, not {first.manifest.dim}-d"
        else:
            fp = fingerprint.read(coll.store)
            if fp is not None and first_fp is not None:
                problem = fingerprint.mismatch(first_fp, fp)
            elif coll.manifest.encoder != first.manifest.encoder:
                problem = f"encoder {coll.manifest.encoder}"
        if problem is not None:
            raise ShardMismatchError(
                f"shard {name} ({coll.folder}) was made with another encoder than shard {names[0]} "
                f"({first.manifest.encoder}): {problem}. Leave it out, or rebuild it with "
                f"--model {first.manifest.encoder}")


def open_shards(folders: Sequence[str | Path], *, model: str | None = None, mmap: bool = False,
                settings: ShardSettings | None = None) -> ShardSet:
    """Open ``folders`` (read-only) as one :class:`~crossmodal_rag.search.shards.ShardSet`; the
    first shard embeds the queries. Raises :class:`ShardMismatchError` for a shard of another
    encoder (before any model loads)."""
    from ..collection import Collection

    if not folders:
        raise CollectionError("no shard given: name collection folders with -c (repeatable) or --shards FILE")
    names = shard_names(folders)
    opened: list[Collection] = []
    try:
        for folder in folders:
            opened.append(Collection.open(folder, model=model, mmap=mmap))
        check_encoders(opened, names)
    except BaseException:
        for coll in opened:
            coll.close()
        raise
    first = opened[0]
    shards = [LocalShard(c, n) for c, n in zip(opened, names, strict=True)]
    return _Owned(shards, lambda r: first.embed_query(r.text, r.image, plus=list(r.plus), minus=list(r.minus)),
                  encoder=first.manifest.encoder, dim=first.manifest.dim, settings=settings, owned=opened)


class _Owned(ShardSet):
    """A shard set that closes the collections it opened."""

    def __init__(self, *args: object, owned: list[Collection], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.owned = owned
        self.first = owned[0]

    def close(self) -> None:
        super().close()
        for coll in self.owned:
            coll.close()

    def __enter__(self) -> _Owned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
