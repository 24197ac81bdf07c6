"""One flag vocabulary (issue 17): every subcommand's parser, walked from ``build_parser()``, names
the shared flags the same way with the same meaning, and the top level hands unknown flags to the
subcommand's own usage."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from crossmodal_rag.cli import build_parser, main


def _children(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
          ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = []
    for name, sub in _children(parser).items():
        found.append(((*path, name), sub))
        found.extend(_walk(sub, (*path, name)))
    return found


ALL = _walk(build_parser())
LEAVES = {path: p for path, p in ALL if not _children(p)}

#: Subcommands that read or write no collection.
NO_COLLECTION = {("eval", "retrieval")}
#: Subcommands with a number of results or retrieved items.
TOP_K = {("search",), ("recommend",), ("demo",), ("ask",), ("chat",), ("write",), ("eval", "generation"),
         ("caption",), ("train", "prefix"), ("train", "rag")}
#: Subcommands that print JSON (with --json, or always, where --json is accepted as well).
JSON = {("search",), ("info",), ("check",), ("remove",), ("recommend",), ("duplicates",), ("ask",),
        ("chat",), ("write",), ("eval", "retrieval"), ("eval", "generation"), ("caption",), ("reindex",),
        ("tune",), ("reembed",), ("train", "clip"), ("train", "prefix"), ("train", "rag"), ("export-onnx",)}
#: Subcommands that embed with an encoder one may name.
MODEL = {("index",), ("search",), ("import",), ("ask",), ("chat",), ("write",), ("recommend",),
         ("eval", "retrieval"), ("eval", "generation"), ("serve",), ("caption",), ("demo",), ("reembed",),
         ("train", "clip"), ("train", "prefix"), ("export-onnx",), ("mcp",)}
#: Subcommands that filter retrieval by metadata.
WHERE = {("search",), ("recommend",), ("ask",), ("chat",), ("write",), ("eval", "generation")}
#: Subcommands that took the collection as a positional DIR before issue 17 (still accepted).
POSITIONAL = {("info",), ("check",), ("reindex",), ("tune",), ("duplicates",), ("reembed",)}


def _action(parser: argparse.ArgumentParser, option: str) -> argparse.Action | None:
    return parser._option_string_actions.get(option)


def test_the_walk_finds_every_subcommand() -> None:
    assert {("search",), ("eval", "retrieval"), ("train", "rag"), ("serve",), ("import",)} <= set(LEAVES)
    assert len(LEAVES) == 24  # export-onnx (issue 29) and mcp (issue 31) since 22
    for table in (NO_COLLECTION, TOP_K, JSON, MODEL, WHERE, POSITIONAL):
        assert table <= set(LEAVES), table - set(LEAVES)


@pytest.mark.parametrize("path", sorted(LEAVES), ids=" ".join)
def test_shared_flags_have_one_name_and_one_meaning(path: tuple[str, ...]) -> None:
    p = LEAVES[path]
    # -c/--collection everywhere a collection is used
    c, long = _action(p, "-c"), _action(p, "--collection")
    if path in NO_COLLECTION:
        assert c is None and long is None
    else:
        assert c is not None and c is long and c.dest == "collection", path
    positional = [a for a in p._actions if not a.option_strings and a.dest == "dir"]
    assert bool(positional) == (path in POSITIONAL), path
    # -k/--top-k (--k kept as an alias): one action, whatever dest the handler reads
    ks = [_action(p, o) for o in ("-k", "--top-k", "--k")]
    if path in TOP_K:
        assert ks[0] is not None and ks[0] is ks[1] is ks[2], path
        assert ks[0].metavar == "K"
    else:
        assert ks == [None, None, None], path
    # --json, -m/--model, -w/--where
    assert (_action(p, "--json") is not None) == (path in JSON), path
    m = _action(p, "-m")
    assert (m is not None) == (path in MODEL) and m is _action(p, "--model") and (m is None or m.dest == "model")
    w = _action(p, "-w")
    assert (w is not None) == (path in WHERE) and w is _action(p, "--where")
    if w is not None:
        assert w.dest == "where" and isinstance(w, argparse._AppendAction)


@pytest.mark.parametrize("path", [path for path, _ in ALL], ids=" ".join)
def test_quiet_and_verbose_after_every_subcommand(path: tuple[str, ...]) -> None:
    p = dict(ALL)[path]
    for option, dest in (("-q", "quiet"), ("--quiet", "quiet"), ("-v", "verbose"), ("--verbose", "verbose")):
        a = _action(p, option)
        assert a is not None and a.dest == dest, (path, option)
        assert a.default is argparse.SUPPRESS  # a value given before the subcommand is kept


def test_quiet_and_verbose_before_or_after() -> None:
    parse = build_parser().parse_args
    assert parse(["search", "x", "-c", "d"]).quiet is False
    assert parse(["search", "x", "-c", "d", "-q"]).quiet is True
    assert parse(["-q", "search", "x", "-c", "d"]).quiet is True
    assert parse(["search", "x", "-vv", "-c", "d"]).verbose == 2
    assert parse(["-v", "search", "x", "-c", "d"]).verbose == 1
    assert parse(["train", "clip", "src", "--out", "o", "-q"]).quiet is True
    assert parse(["info", "d", "--verbose"]).verbose == 1


@pytest.mark.parametrize("flag", ["-k", "--top-k", "--k"])
def test_every_spelling_of_top_k(flag: str) -> None:
    parse = build_parser().parse_args
    assert parse(["search", "x", flag, "2"]).top_k == 2
    assert parse(["ask", "q", flag, "3"]).k == 3
    assert parse(["recommend", "--liked", "1", flag, "4"]).top_k == 4
    assert parse(["caption", "a.jpg", "--image-prefix", "p", flag, "0"]).k == 0


def test_positional_and_option_collection() -> None:
    parse = build_parser().parse_args
    assert parse(["info", "a"]).dir == "a" and parse(["info", "-c", "a"]).collection == "a"
    assert parse(["reindex", "--collection", "a"]).collection == "a"


def test_search_with_k_alias_runs(sample_collection: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["search", "a cat", "-c", str(sample_collection), "--k", "2", "--json", "-q"]) == 0
    assert len(json.loads(capsys.readouterr().out)["results"]) == 2


@pytest.mark.parametrize(("argv", "usage"), [
    (["ask", "q", "--bogus"], "usage: crossmodal-rag ask"),
    (["ask", "--bogus", "q"], "usage: crossmodal-rag ask"),
    (["info", "d", "--frobnicate", "3"], "usage: crossmodal-rag info"),
    (["train", "rag", "src", "--out", "o", "-c", "d", "-g", "t5", "--nope"], "usage: crossmodal-rag train rag"),
    (["eval", "retrieval", "data.json", "--nope"], "usage: crossmodal-rag eval retrieval"),
])
def test_unknown_flag_prints_the_subcommands_usage(argv: list[str], usage: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(usage) and "unrecognized arguments" in err and argv[-1 if argv[-1] != "q" else 1] in err


def test_positional_and_option_collection_must_agree(sample_collection: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["info", str(sample_collection), "-c", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("usage: crossmodal-rag info") and "--collection" in err
    # the same folder twice is one collection
    assert main(["info", str(sample_collection), "-c", str(sample_collection) + "/", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"]["images"] == 15


#: Subcommands with --min-score (issue 25: each refuses what REST refuses).
MIN_SCORE = {("search",), ("ask",), ("chat",), ("write",), ("eval", "generation")}


def test_min_score_is_where_expected() -> None:
    assert {path for path, p in LEAVES.items() if _action(p, "--min-score")} == MIN_SCORE


@pytest.mark.parametrize("path", sorted(MIN_SCORE), ids=" ".join)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "+Infinity", "-nan", "1e400", "-1e999", "abc", "",
                                   "0x1", "1" + "0" * 400])
def test_min_score_that_is_not_finite_is_a_usage_error(path: tuple[str, ...], value: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 25: ``--min-score nan|inf|-inf`` were accepted (REST refuses them): now every
    subcommand that takes --min-score refuses them, numbers that overflow to them and text, as a
    usage error (exit 2) that names the flag and the range, before any collection is read (finite
    numbers pass, as in REST: a threshold just above 1 abstains always)."""
    with pytest.raises(SystemExit) as e:
        main([*path, f"--min-score={value}", "-c", "/nonexistent"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--min-score" in err and "from -1 to 1" in err and "'auto'" in err
    assert len(err) < 2000 and "Traceback" not in err
    if value.startswith("-"):  # argparse reads "-inf" as a flag: a usage error too
        with pytest.raises(SystemExit) as e:
            main([*path, "--min-score", value, "-c", "/nonexistent"])
        assert e.value.code == 2 and "--min-score" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["auto", "AUTO", "0.3", "-1", "1", " 0.25 ", "1e-3", "-0.0", "1.001"])
def test_min_score_auto_and_cosines_parse_as_given(value: str) -> None:
    for path in MIN_SCORE:
        dataset = ["data.json"] if path == ("eval", "generation") else []
        args, _ = build_parser().parse_known_args([*path, *dataset, f"--min-score={value}"])
        assert args.min_score == value
