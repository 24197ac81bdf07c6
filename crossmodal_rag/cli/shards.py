"""Several collections as one on the command line: repeated ``-c DIR`` or ``--shards FILE`` for
``search``, ``recommend``, ``ask`` and ``eval`` (the merge: :mod:`crossmodal_rag.search.shards`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .options import UsageError
from .output import safe

__all__ = ["add_collections", "open_main", "open_searchable", "report_partial", "shard_folders", "sharded_json"]


def add_collections(sp: argparse.ArgumentParser) -> None:
    """``-c/--collection DIR`` (repeatable: several collections searched as one) and ``--shards FILE``."""
    sp.add_argument("-c", "--collection", metavar="DIR", action="append", default=None,
                    help="collection folder; repeat -c to search several collections (index shards of "
                         "one encoder) as one")
    sp.add_argument("--shards", metavar="FILE",
                    help="a file naming shard collection folders, one a line (# comments; relative to the file)")


def shard_folders(args: argparse.Namespace) -> list[str]:
    """The folders of ``-c`` (each) and ``--shards FILE``, in that order; at least one."""
    folders = list(getattr(args, "collection", None) or [])
    if getattr(args, "shards", None):
        from ..serving.local import read_shard_list

        folders += [str(p) for p in read_shard_list(args.shards)]
    if not folders:
        raise UsageError(f"{args.command}: name the collection folder with -c DIR (repeatable) or --shards FILE")
    return folders


@contextmanager
def open_searchable(args: argparse.Namespace, **open_kwargs: Any) -> Iterator[Any]:
    """One collection (``Collection.open``) or several as one (``open_shards``): both search
    with ``.search(request)``."""
    folders = shard_folders(args)
    if len(folders) == 1:
        from ..collection import Collection

        with Collection.open(folders[0], **open_kwargs) as coll:
            yield coll
        return
    from ..serving.local import open_shards

    with open_shards(folders, **open_kwargs) as shards:
        yield shards


@contextmanager
def open_main(args: argparse.Namespace, **open_kwargs: Any) -> Iterator[Any]:
    """The first ``-c`` collection (it embeds the queries); with several, ``args.shard_set`` holds
    all of them searched as one, for :func:`~crossmodal_rag.cli.rag.pipeline_from_args` to
    retrieve from (as a knowledge collection: dense retrieval by the question's CLIP vector)."""
    folders = shard_folders(args)
    from ..collection import Collection

    if len(folders) == 1:
        with Collection.open(folders[0], **open_kwargs) as coll:
            yield coll
        return
    if getattr(args, "knowledge", None):
        raise UsageError(f"{args.command}: several -c collections are the knowledge already; leave out --knowledge")
    from ..serving.local import open_shards

    with open_shards(folders, model=open_kwargs.get("model")) as shards:
        args.shard_set = shards
        yield shards.first


def report_partial(result: Any, label: str = "") -> None:
    """A warning on stderr when ``result`` is missing shards (a :class:`ShardedResult`)."""
    for shard, why in getattr(result, "missing", ()):
        print(f"warning: {label}partial result: shard {safe(shard)} did not answer ({safe(why)})", file=sys.stderr)


def sharded_json(result: Any) -> dict[str, Any]:
    """The JSON fields of a search over several shards (none for one collection)."""
    if not hasattr(result, "missing"):
        return {}
    d = result.to_dict()
    return {"partial": d["partial"], "shards": d["shards"], "missing_shards": d["missing_shards"]}
