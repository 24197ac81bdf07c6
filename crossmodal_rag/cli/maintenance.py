"""Commands that rebuild or retune what a collection holds without new data: ``reindex``,
``tune``, ``reembed``."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from .options import (
    MODEL_HELP,
    UsageError,
    add_collection,
    add_json,
    add_model,
    collection_dir,
    nonneg_int,
    positive_int,
    search_params,
    text_model_arg,
)
from .output import safe

if TYPE_CHECKING:
    from ..collection import Collection
    from ..store.ann import SearchParams


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``reindex``, ``tune`` and ``reembed`` to ``sub``."""
    ri = sub.add_parser("reindex", help="rebuild a collection's indexes (another type, retuned) "
                                        "from its stored embeddings, without re-encoding")
    add_collection(ri, positional=True)
    ri.add_argument("--index", dest="index_type", default=None, metavar="SPEC",
                    help="'auto' or a FAISS factory string (default: keep the current choice)")
    ri.add_argument("--max-index-memory", metavar="SIZE",
                    help="memory budget of the index 'auto' builds, e.g. 4G (default: a quarter of "
                         "the machine's RAM); 'auto' measures the families that fit on the "
                         "collection's own vectors and keeps the fastest at the target recall")
    ri.add_argument("--target-recall", type=float, default=0.95, metavar="R",
                    help="tune nprobe/efSearch to the fastest setting with recall@10 >= R (default 0.95)")
    ri.add_argument("--no-tune", dest="tune", action="store_false", help="keep FAISS's default search settings")
    ri.add_argument("--seed", type=int, default=0, help="seed of the training sample and tuning queries")
    ri.add_argument("--sharded", dest="sharded", action="store_true", default=None,
                    help="IVF: add shards separately and merge the lists on disk (default: over 2 GiB)")
    ri.add_argument("--no-sharded", dest="sharded", action="store_false")
    ri.add_argument("--workers", type=positive_int, default=2, metavar="N", help="parallel shard builds")
    ri.add_argument("--repair", action="store_true",
                    help="first re-embed, with the collection's encoder and from their sources, the "
                         "items whose stored vectors are not finite or not of unit norm (reindex "
                         "refuses to build from them otherwise); an image whose file is gone keeps a "
                         "sound committed vector or is removed, and is reported")
    ri.add_argument("--fsync", choices=("full", "normal", "off"), default="full")
    add_json(ri, help="print the build report as JSON")
    ri.set_defaults(handler=cmd_reindex)

    tu = sub.add_parser("tune", help="re-tune nprobe/efSearch to a target recall, or store explicit "
                                     "search defaults")
    add_collection(tu, positional=True)
    tu.add_argument("--target-recall", type=float, default=0.95, metavar="R")
    tu.add_argument("--seed", type=int, default=0)
    tu.add_argument("--nprobe", type=positive_int, metavar="N", help="store this nprobe instead of tuning")
    tu.add_argument("--ef-search", type=positive_int, metavar="N", help="store this efSearch instead of tuning")
    tu.add_argument("--rerank", type=nonneg_int, metavar="F", help="store this PQ re-rank factor")
    tu.add_argument("--index-name", choices=("image", "text"), help="only this index (explicit values)")
    add_json(tu, help="print the search settings (and what tuning measured) as JSON")
    tu.set_defaults(handler=cmd_tune)

    re_ = sub.add_parser("reembed", help="recompute a collection's vectors with another encoder "
                                         "(e.g. one trained with train clip); item ids stay the same")
    add_collection(re_, positional=True)
    add_model(re_, help=MODEL_HELP + " (CLIP; give --model, --text-model or both)")
    re_.add_argument("--text-model", metavar="SPEC", type=text_model_arg,
                     help="re-embed the texts' text space with this sentence encoder (none removes it)")
    re_.add_argument("--batch-size", type=positive_int, default=32, metavar="N")
    add_json(re_, help="the report is JSON (always; accepted for uniformity)")
    re_.set_defaults(handler=cmd_reembed)


def cmd_reindex(args: argparse.Namespace) -> int:
    from ..collection import Collection

    folder = collection_dir(args)
    with Collection.open(folder, writable=True, fsync=args.fsync) as coll:
        report = coll.reindex(args.index_type, max_index_memory=args.max_index_memory,
                              seed=args.seed, tune=args.tune, target_recall=args.target_recall,
                              sharded=args.sharded, workers=args.workers, repair=args.repair)
        # the report's "text_space": the collection rebuilt or updated it with the indexes
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, r in report.items():
        if name == "text_space":
            print(f"text space: {r['spec']}, {r['added']} rows embedded, {r['removed']} dropped"
                  + (" (rebuilt)" if r["rebuilt"] else ""))
            continue
        if name == "repair":
            _print_repair(r)
            continue
        build = r.get("build") or {}
        print(f"{name}: {r['index_type']}, {r['count']} vectors, built in {build.get('seconds', 0):.1f} s"
              f"{' (sharded)' if build.get('sharded') else ''}{_tuning_text(r.get('tuning'))}")
        _print_auto(build.get("auto"))
        for shard in r.get("shards_rebuilt", []):
            print(f"  rebuilt from the metadata: {shard['file']} ({safe(shard['reason'])})")
    return 0


def _print_repair(r: dict[str, Any]) -> None:
    """What ``reindex --repair`` did, one line per kind (and one per removed item)."""
    print(f"repair: {len(r['reembedded'])} item(s) re-embedded from their sources"
          + (f" ({' '.join(map(str, r['reembedded'][:20]))}{' ...' if len(r['reembedded']) > 20 else ''})"
             if r["reembedded"] else ""))
    if r["kept"]:
        print(f"repair: {len(r['kept'])} image(s) whose source is gone kept their committed vectors "
              f"({' '.join(map(str, r['kept'][:20]))})")
    for d in r["shards_dropped"]:
        print(f"repair: {d['index']} shard {d['file']} dropped and rebuilt from the metadata")
    for entry in r["removed"]:
        print(f"repair: removed item {entry['id']} ({safe(str(entry['path']))}): its stored vector was "
              f"unusable and its source is gone ({safe(entry['reason'])})")


def _print_auto(auto: dict[str, Any] | None) -> None:
    """What ``auto`` measured (one line per family) and why the winner won."""
    if not auto:
        return
    print(f"  auto: {safe(auto['reason'])}")
    for c in auto.get("candidates", []):
        if c.get("status") == "measured" or c.get("status") == "missed target":
            setting = f"{c['param']}={c['value']}, " if c.get("param") else ""
            print(f"    {c['spec']}: {c['status']}, {setting}recall@10 {c['recall']:.3f}, p50 "
                  f"{c['est_p50_ms']:.3f} ms, {c['scaled_bytes'] / 2**20:.1f} MiB")
        else:
            print(f"    {c['spec']}: {c['status']} (about {c['est_bytes'] / 2**20:.1f} MiB)")


def _tuning_text(tuning: dict[str, Any] | None) -> str:
    """What tuning chose and measured, as ``reindex`` and ``tune`` print it ('' if untuned)."""
    tuning = tuning or {}
    if not tuning.get("param"):
        return ""
    last = tuning["measured"][-1] if tuning.get("measured") else {}
    rerank = f", rerank={tuning['rerank']}" if tuning.get("rerank") is not None else ""
    return (f", {tuning['param']}={tuning['value']}{rerank} (recall@10 {last.get('recall', 0):.3f}, "
            f"p50 {last.get('p50_ms', 0):.2f} ms{'' if tuning.get('reached') else ', target missed'})")



_KNOBS = {"nprobe": ("--nprobe", "ivf"), "ef_search": ("--ef-search", "hnsw")}
_KNOB_OF_KIND = {"ivf": "--nprobe", "hnsw": "--ef-search"}


def _check_knobs(coll: Collection, params: SearchParams, only: str | None) -> None:
    """Refuse ``--nprobe`` where no chosen index is IVF and ``--ef-search`` where none is HNSW,
    naming the setting that index does take."""
    indexes = {n: ix for n, ix in coll.indexes.items() if only in (None, n)}
    for field, (flag, kind) in _KNOBS.items():
        if getattr(params, field) is None or any(ix.kind == kind for ix in indexes.values()):
            continue
        name, ix = next(iter(indexes.items()))
        other = _KNOB_OF_KIND.get(ix.kind)
        fix = f"set its search depth with {other}" if other else "exact search takes no search settings"
        raise UsageError(f"tune: {flag} applies to {kind.upper()} indexes; the {name} index is "
                         f"{ix.index_type} ({ix.kind.upper()}): {fix}")


def cmd_tune(args: argparse.Namespace) -> int:
    from ..collection import Collection

    params = search_params(args)
    with Collection.open(collection_dir(args), writable=True) as coll:
        if params is not None:
            _check_knobs(coll, params, args.index_name)
            coll.set_search_params(params, args.index_name)
            out = {n: {"index_type": ix.index_type, "search_params": ix.params.to_dict()}
                   for n, ix in coll.indexes.items()}
        else:
            out = coll.tune(target_recall=args.target_recall, seed=args.seed)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for name, r in out.items():
        if r.get("tuning"):
            line = _tuning_text(r["tuning"])
        else:
            shown = ", ".join(f"{k}={v}" for k, v in r["search_params"].items() if v is not None)
            line = f", {shown} (set)" if shown else " (exact: nothing to tune)"
        print(f"{name}: {r['index_type']}{line}")
        _print_auto(r.get("auto"))
    return 0


def cmd_reembed(args: argparse.Namespace) -> int:
    if not args.model and not args.text_model:
        raise UsageError("reembed: give --model SPEC (CLIP), --text-model SPEC, or both")
    out: dict[str, Any] = {}
    if args.model:
        from ..training.clip import reembed_collection

        out = reembed_collection(collection_dir(args), args.model, batch_size=args.batch_size,
                                 progress=not args.quiet).to_dict()
    if args.text_model:
        from ..collection import Collection

        with Collection.open(collection_dir(args), writable=True) as coll:
            text = coll.set_text_model(args.text_model, rebuild=True)
        out["text_space"] = {"spec": text.spec, "embedded": text.added, "removed": text.removed}
    print(json.dumps(out, indent=2))
    return 0
