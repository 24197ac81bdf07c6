"""Golden CLI output (issue 16, step 1): what ``index``, ``search``, ``info``, ``check`` and
``ask --json`` print on a tiny collection, and the shape of every subcommand's parser, are pinned
in files under ``tests/e2e/golden/`` so that moving the CLI (or the modules behind it) is provably
behaviour-preserving.

Only stable fields are kept: paths under the test's temporary folders become ``<SOURCE>``,
``<COLLECTION>``, ``<MODEL>``, ``<GENERATOR>``; timestamps, timings, byte sizes and the library
version are masked; scores are rounded to 3 decimals.

A deliberate change of output: regenerate the files with

    CROSSMODAL_RAG_REGEN_GOLDEN=1 python -m pytest -q tests/e2e/test_cli_golden.py

and review ``git diff tests/e2e/golden/`` before committing them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

GOLDEN = Path(__file__).resolve().parent / "golden"
REGEN = os.environ.get("CROSSMODAL_RAG_REGEN_GOLDEN") == "1"

#: JSON keys whose values vary run to run (or machine to machine) and are masked.
_MASKED_KEYS = {"created_at", "updated_at", "library_version", "timings", "seconds", "bytes", "elapsed",
                "elapsed_s", "images_per_s", "collection_id",
                "sha256", "taken", "taken_from", "taken_to"}  # taken: the copied files' times
_MASK = "<masked>"


def _main(argv: list[str]) -> tuple[int, str]:
    from crossmodal_rag.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3) + 0.0  # + 0.0: no "-0.0"
    if isinstance(value, dict):
        return {k: (_MASK if k in _MASKED_KEYS else _rounded(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _round_numbers_in_text(text: str) -> str:
    """Numbers with 4 or more decimals (scores in TSV and in text lines) to 3 decimals."""
    return re.sub(r"-?\d+\.\d{4,}", lambda m: f"{float(m.group()):.3f}", text)


class _Paths:
    """Temporary paths and the placeholders they become in golden files (longest first)."""

    def __init__(self, pairs: dict[str, Path]) -> None:
        self.pairs = sorted(((str(p.resolve()), name) for name, p in pairs.items()),
                            key=lambda kv: len(kv[0]), reverse=True)

    def __call__(self, text: str) -> str:
        for path, name in self.pairs:
            text = text.replace(path, name)
        return text


def _normalise_json(text: str, paths: _Paths) -> str:
    return json.dumps(_rounded(json.loads(paths(text))), indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def _normalise_text(text: str, paths: _Paths) -> str:
    text = paths(text)
    text = re.sub(r"^(created|updated|taken):( +).*$", r"\1:\2" + _MASK, text, flags=re.M)
    text = re.sub(r"written by crossmodal-rag [^)]+\)", f"written by crossmodal-rag {_MASK})", text)
    text = re.sub(r"\d+ bytes", f"{_MASK} bytes", text)
    text = re.sub(r"in \d+(\.\d+)? ?s\b", f"in {_MASK}", text)
    text = re.sub(r"\(\d+(\.\d+)? (images|items)/s\)", f"({_MASK})", text)
    return _round_numbers_in_text(text)


def _golden(name: str, actual: str) -> str:
    """The pinned output ``name`` (with CROSSMODAL_RAG_REGEN_GOLDEN=1: ``actual``, written there)."""
    path = GOLDEN / name
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return actual
    assert path.is_file(), f"no golden file {path}: run with CROSSMODAL_RAG_REGEN_GOLDEN=1 to write it"
    return path.read_text(encoding="utf-8")


CHANGED = "CLI output changed (if intended, regenerate with CROSSMODAL_RAG_REGEN_GOLDEN=1 and review the diff)"


@pytest.fixture(scope="module")
def golden_env(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path, tiny_oc_dir: Path,
               t5_dir: Path) -> dict[str, Any]:
    """Five sample photos indexed through the CLI with the tiny open_clip model."""
    root = tmp_path_factory.mktemp("golden")
    source, coll = root / "photos", root / "coll"
    source.mkdir()
    for name in ("cat", "coffee", "pagoda", "dahlia", "grace_hopper"):
        shutil.copy(sample_dir / f"{name}.jpg", source)
        shutil.copy(sample_dir / f"{name}.txt", source)
    paths = _Paths({"<SOURCE>": source, "<COLLECTION>": coll, "<MODEL>": tiny_oc_dir, "<GENERATOR>": t5_dir})
    code, out = _main(["-q", "index", str(source), "-c", str(coll), "--model", f"open_clip:local-dir:{tiny_oc_dir}",
                       "--workers", "0"])
    assert code == 0
    return {"source": source, "coll": coll, "t5": t5_dir, "paths": paths, "index_stdout": out}


def test_index_output(golden_env: dict[str, Any]) -> None:
    actual = _normalise_text(golden_env["index_stdout"], golden_env["paths"])
    assert actual == _golden("index.txt", actual), CHANGED


def _cases(env: dict[str, Any]) -> list[tuple[str, list[str], Callable[[str, _Paths], str]]]:
    coll, source = str(env["coll"]), env["source"]
    gen = ["--generator", str(env["t5"]), "--max-new-tokens", "4"]
    return [
        ("search_text.tsv", ["search", "a cat", "-c", coll, "-k", "3"], _normalise_text),
        ("search_texts_target.tsv", ["search", "a cup of coffee", "-c", coll, "-k", "4", "--target", "texts"],
         _normalise_text),
        ("search_all_where.tsv", ["search", "flowers", "-c", coll, "-k", "5", "--target", "all",
                                  "--where", "caption~a", "--no-header"], _normalise_text),
        ("search_image.json", ["search", "--image", str(source / "cat.jpg"), "-c", coll, "-k", "3",
                               "--target", "all", "--json"], _normalise_json),
        ("search_plus_minus.json", ["search", "a temple", "--plus", "red", "--minus", "night", "-c", coll,
                                    "-k", "2", "--json"], _normalise_json),
        ("info.txt", ["info", coll], _normalise_text),
        ("info.json", ["info", coll, "--json"], _normalise_json),
        ("check.json", ["check", "-c", coll, "--json"], _normalise_json),
        ("ask_concat.json", ["ask", "what animal is in the photo?", "-c", coll, *gen, "-k", "3", "--json"],
         _normalise_json),
        ("ask_rag_sequence.json", ["ask", "what is in the cup?", "-c", coll, *gen, "-k", "2",
                                   "--mode", "rag-sequence", "--json"], _normalise_json),
        ("ask_image_rag_token.json", ["ask", "--image", str(source / "cat.jpg"), "-c", coll, *gen, "-k", "2",
                                      "--mode", "rag-token", "--target", "images", "--json"], _normalise_json),
    ]


_CASE_NAMES = [name for name, _, _ in _cases({"coll": "", "source": Path(), "t5": ""})]


@pytest.mark.parametrize("name", _CASE_NAMES)
def test_command_output(golden_env: dict[str, Any], name: str) -> None:
    argv, normalise = next((a, n) for c, a, n in _cases(golden_env) if c == name)
    code, out = _main(["-q", *argv])
    assert code == 0
    actual = normalise(out, golden_env["paths"])
    assert actual == _golden(name, actual), CHANGED


def _type_shape(parse: Any) -> Any:
    """A flag's type: its name and what it makes of a few probe strings (two closures of one
    factory, a positive and a non-negative integer, share a name and differ here)."""
    if parse is None:
        return None
    outcomes = {}
    for probe in ("-1", "0", "1", "0.5", "x"):
        try:
            outcomes[probe] = parse(probe)
        except (argparse.ArgumentTypeError, ValueError, TypeError):
            outcomes[probe] = "<refused>"
    return {"name": getattr(parse, "__name__", type(parse).__name__), "probes": outcomes}


def _parser_shape(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Every option and positional of a parser (and its subparsers): flags, dest, default, type,
    choices, nargs, required, metavar, help; the Python-version-independent part of ``--help``."""
    shape: dict[str, Any] = {"description": parser.description, "arguments": [], "commands": {}}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                shape["commands"][name] = {"help": helps.get(name), **_parser_shape(sub)}
            continue
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        kind = type(action).__name__.lstrip("_")
        default = action.default if action.default is not argparse.SUPPRESS else "<SUPPRESS>"
        type_name = _type_shape(action.type)
        shape["arguments"].append({
            "flags": list(action.option_strings), "dest": action.dest, "action": kind,
            "default": default, "const": action.const, "type": type_name,
            "choices": list(action.choices) if action.choices is not None else None,
            "nargs": action.nargs, "required": action.required, "metavar": action.metavar, "help": action.help,
        })
    return shape


def test_parser_shape() -> None:
    """Every subcommand's flags, as a data file: a move of the parser that adds, drops or
    changes a flag (its default, type, choices, help) fails here."""
    from crossmodal_rag.cli import build_parser

    shape = _parser_shape(build_parser())
    actual = json.dumps(shape, indent=1, sort_keys=True, default=str) + "\n"
    assert actual == _golden("parser.json", actual), CHANGED
