"""Time per KB of the text parsers on their worst inputs, before and after they were made linear.

The "before" parsers are the modules as they were at ``--before`` (a git revision), loaded from
``git show`` into this process; the "after" ones are the installed package, called without the
length limit (``max_chars=None``) so the parser itself is timed, not the refusal. Times are CPU
seconds of this process (best of ``--repeat``), so other load on the machine does not count. A
"before" run longer than ``--budget`` seconds is stopped (SIGALRM) and shown as "> budget".

    python benchmarks/bench_parsers.py --before a65f345^ > parsers.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable
from typing import Any

from crossmodal_rag.errors import CollectionError, QueryError
from crossmodal_rag.search.filters import parse_where
from crossmodal_rag.search.query import parse_query
from crossmodal_rag.store.ann import parse_memory

# (parser, shape, builder of about n characters)
SHAPES: list[tuple[str, str, Callable[[int], str]]] = [
    ("parse_where", "size> + digits + stray", lambda n: "size>" + "1" * n + "!"),
    ("parse_where", "title~ + space run + x", lambda n: "title~a" + " " * n + "b"),
    ("parse_query", "digits + stray", lambda n: "1" * n + "x"),
    ("parse_query", "space run inside a term", lambda n: "a" + " " * n + "b"),
    ("parse_memory", "digits + stray", lambda n: "1" * n + "x"),
]


class _Stopped(Exception):
    pass


def _load_old(rev: str, path: str, package: str) -> types.ModuleType:
    """The module at ``path`` as it was at ``rev`` (its relative imports resolve to today's package)."""
    source = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"{package}._before_{path.rsplit('/', 1)[-1][:-3]}")
    module.__package__ = package
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:{path}", "exec"), module.__dict__)  # our own history, from git
    return module


def _parsers(rev: str | None) -> dict[str, Callable[[str], Any]]:
    if rev is None:
        return {"parse_where": lambda t: parse_where([t], max_chars=None),
                "parse_query": lambda t: parse_query(t, max_chars=None),
                "parse_memory": parse_memory}
    filters = _load_old(rev, "crossmodal_rag/filters.py", "crossmodal_rag")
    query = _load_old(rev, "crossmodal_rag/query.py", "crossmodal_rag")
    ann = _load_old(rev, "crossmodal_rag/store/ann.py", "crossmodal_rag.store")
    return {"parse_where": lambda t: filters.parse_where([t]), "parse_query": query.parse_query,
            "parse_memory": ann.parse_memory}


def _cpu_seconds(parse: Callable[[str], Any], text: str, repeat: int, budget: float) -> float | None:
    """Best CPU time of ``parse(text)`` over ``repeat`` runs; None when one ran past ``budget``."""
    def _alarm(signum: int, frame: Any) -> None:
        raise _Stopped

    old = signal.signal(signal.SIGALRM, _alarm)
    best = float("inf")
    try:
        for _ in range(repeat):
            signal.setitimer(signal.ITIMER_REAL, budget)
            t0 = time.process_time()
            try:
                parse(text)
            except (QueryError, CollectionError):
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            best = min(best, time.process_time() - t0)
    except _Stopped:
        return None
    finally:
        signal.signal(signal.SIGALRM, old)
    return best


def _cell(seconds: float | None, chars: int, budget: float) -> str:
    if seconds is None:
        return f"> {budget:.0f} s (stopped)"
    return f"{seconds * 1e3:,.2f} ms ({seconds * 1e3 / (chars / 1024):.3f} ms/KB)"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="git revision of the old parsers (omit: after only)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds before an old parse is stopped")
    args = ap.parse_args(argv)
    after = _parsers(None)
    before = _parsers(args.before) if args.before else None
    print(f"`python benchmarks/bench_parsers.py {' '.join(sys.argv[1:])}`; {platform.processor() or platform.machine()}, "
          f"Python {platform.python_version()}, {dt.date.today().isoformat()}; CPU time, best of {args.repeat}\n")
    print("| parser | input | characters | before | after |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, shape, build in SHAPES:
        stopped = False
        for n in args.sizes:
            text = build(n)
            old = "not run"
            if before is not None and not stopped:
                s = _cpu_seconds(before[name], text, 1 if n >= 10_000 else args.repeat, args.budget)
                stopped = s is None  # a bigger input would only take longer
                old = _cell(s, len(text), args.budget)
            elif stopped:
                old = f"> {args.budget:.0f} s (not run: the smaller input was stopped)"
            new = _cell(_cpu_seconds(after[name], text, args.repeat, args.budget), len(text), args.budget)
            print(f"| `{name}` | {shape} | {len(text):,} | {old} | {new} |", flush=True)


if __name__ == "__main__":
    main()
