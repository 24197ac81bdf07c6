"""The documents name only things that exist: every test they cite (``tests/test_x.py::test_y``),
every ``crossmodal-rag`` subcommand that README, SECURITY.md, docs/ and benchmarks/ show, and
every ``--flag`` shown with it."""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from crossmodal_rag.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", REPO / "SECURITY.md", *(REPO / "docs").glob("*.md"),
               *(REPO / "benchmarks").glob("*.md")])
TEST_REF = re.compile(r"tests/((?:e2e/)?test_\w+\.py)(?:::(\w+))?")
FENCE = re.compile(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", re.M | re.S)
INLINE = re.compile(r"`(crossmodal-rag [^`\n]+)`")


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def _cited_tests() -> list[tuple[str, str, str | None]]:
    return sorted({(doc.name, m.group(1), m.group(2)) for doc in DOCS if doc.exists()
                   for m in TEST_REF.finditer(doc.read_text(encoding="utf-8"))}, key=str)


def test_the_documents_cite_tests() -> None:
    """The extraction itself works (a regex that found nothing would pass everything below)."""
    cited = _cited_tests()
    assert any(doc == "README.md" for doc, _, _ in cited) and any(name for _, _, name in cited)


@pytest.mark.parametrize(("doc", "file", "name"), _cited_tests(), ids=lambda v: str(v))
def test_cited_test_exists(doc: str, file: str, name: str | None) -> None:
    path = REPO / "tests" / file
    assert path.is_file(), f"{doc} cites tests/{file}, which does not exist"
    if name is not None:
        assert name in _test_functions(path), f"{doc} cites tests/{file}::{name}, which does not exist"


# -- commands shown in the README ------------------------------------------------------------------
def _invocations(text: str, *, inline: bool = True) -> list[str]:
    """Every ``crossmodal-rag ...`` command line in shell blocks (continuations joined, comments
    and prompts dropped) and, with ``inline``, in inline code."""
    found = []
    for lang, body in FENCE.findall(text):
        if lang not in ("", "bash", "sh", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("crossmodal-rag "):
                found.append(line)
    if inline:
        found += INLINE.findall(text)
    return found


def _words(command: str) -> list[str]:
    command = re.split(r"\s+#\s", command)[0]  # a trailing comment
    command = re.sub(r'"\$\(.*\)"', "VALUE", command)  # a "$(command substitution)"
    command = re.split(r"\s+(?:&&|\||;|>)\s+", command)[0]  # the first command of a pipeline
    try:
        return shlex.split(command)
    except ValueError:  # unbalanced quotes in a placeholder
        return command.split()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _resolve(words: list[str]) -> tuple[list[str], argparse.ArgumentParser, list[str]]:
    """(the subcommand path, its parser, the option strings it accepts, with the global ones)."""
    parser = top = build_parser()
    path: list[str] = []
    options = set(top._option_string_actions)
    for word in words[1:]:
        if word.startswith(("-", "[")):
            continue
        subs = _subparsers(parser)
        if not subs:
            break
        assert word in subs, f"`crossmodal-rag {' '.join([*path, word])}`: no such subcommand " \
                             f"(choices: {', '.join(sorted(subs))})"
        path.append(word)
        parser = subs[word]
        options |= set(parser._option_string_actions)
    return path, parser, sorted(options)


README_COMMANDS = _invocations((REPO / "README.md").read_text(encoding="utf-8"))
COMMANDS = sorted({(doc.name, c) for doc in DOCS if doc.exists()
                   for c in _invocations(doc.read_text(encoding="utf-8"))})
EXAMPLES = sorted({(doc.name, c) for doc in DOCS if doc.exists()
                   for c in _invocations(doc.read_text(encoding="utf-8"), inline=False)})


def test_the_readme_shows_commands() -> None:
    shown = {_resolve(_words(c))[0][0] for c in README_COMMANDS if len(_words(c)) > 1
             and not _words(c)[1].startswith("-")}
    assert {"index", "search", "ask", "serve", "train", "reindex"} <= shown, shown


@pytest.mark.parametrize(("doc", "command"), COMMANDS)
def test_documented_command_is_accepted(doc: str, command: str) -> None:
    words = _words(command)
    path, _, options = _resolve(words)
    for word in words[1:]:
        word = word.lstrip("[(")  # an optional flag in a synopsis: [--json]
        if not word.startswith("--"):
            continue
        flag = word.split("=", 1)[0].rstrip(".,;:)]")
        if flag == "--":
            continue
        assert flag in options, f"`{command}`: {flag} is not an option of `crossmodal-rag {' '.join(path)}`"


def _parse_error(command: str) -> str | None:
    """The real parser's complaint about ``command`` (None: accepted). A synopsis is read as an
    example: ``[--json]`` as ``--json``, ``images|texts|all`` as ``images``."""
    words = [w.strip("[]").split("|")[0] if not w.startswith(("'", '"')) else w for w in _words(command)[1:]]
    parser = build_parser()
    parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))  # type: ignore[method-assign]
    for sub in _subparsers(parser).values():
        sub.error = parser.error  # type: ignore[method-assign]
        for subsub in _subparsers(sub).values():
            subsub.error = parser.error  # type: ignore[method-assign]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args([w for w in words if w])
    except ValueError as e:
        return str(e)
    except SystemExit as e:  # --help / --version print and exit 0: accepted
        return None if e.code == 0 else f"exit {e.code}"
    return None


@pytest.mark.parametrize(("doc", "command"), COMMANDS)
def test_documented_command_parses(doc: str, command: str) -> None:
    """Accepted by the real parser as it stands, positional arguments included; a command named
    in prose (inline, e.g. `crossmodal-rag info`) may leave out required arguments or show
    placeholders."""
    error = _parse_error(command)
    synopsis = (doc, command) not in EXAMPLES
    if error and synopsis and ("arguments are required" in error or re.search(r"'[A-Z][A-Z_]*'", error)):
        return  # a placeholder (K, DIR) where a value goes, or arguments left out in prose
    assert error is None, f"{doc}: `{command}` is refused: {error}"


def test_unknown_subcommand_and_flag_are_caught() -> None:
    """The checks above can fail: a made-up subcommand and a made-up flag are refused."""
    with pytest.raises(AssertionError, match="no such subcommand"):
        _resolve(["crossmodal-rag", "serach", "cat"])
    with pytest.raises(AssertionError, match="--top-n is not an option"):
        test_documented_command_is_accepted("x.md", "crossmodal-rag search cat [--top-n 5]")
    with pytest.raises(AssertionError, match="does not exist"):
        test_cited_test_exists("x.md", "test_cli.py", "test_no_such_test")
    assert EXAMPLES and len(EXAMPLES) < len(COMMANDS)
    assert "unrecognized arguments: shard.xmr" in _parse_error("crossmodal-rag serve shard.xmr")


# -- benchmark commands -----------------------------------------------------------------------
SCRIPT_RUN = re.compile(r"python (benchmarks/\w+\.py)([^`|\n]*)")
SCRIPT_RUNS = sorted({(doc.name, m.group(1), m.group(2).strip()) for doc in DOCS if doc.exists()
                      for m in SCRIPT_RUN.finditer(doc.read_text(encoding="utf-8"))})


@pytest.mark.parametrize(("doc", "script", "args"), SCRIPT_RUNS, ids=lambda v: str(v)[:60])
def test_documented_benchmark_command_exists(doc: str, script: str, args: str) -> None:
    """Each ``python benchmarks/x.py --flag ...`` the documents show names a script that exists
    and flags that script defines."""
    path = REPO / script
    assert path.is_file(), f"{doc} runs {script}, which does not exist"
    source = path.read_text(encoding="utf-8")
    for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", args):
        assert re.search(rf"[\"']{re.escape(flag)}[\"']", source), f"{doc}: {script} has no option {flag}"


def test_unknown_benchmark_flag_is_caught() -> None:
    assert SCRIPT_RUNS
    with pytest.raises(AssertionError, match="no option --no-such-flag"):
        test_documented_benchmark_command_exists("x.md", "benchmarks/bench_ann.py", "--sizes 10 --no-such-flag")


# -- README size, links and the code map ------------------------------------------------------
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)")
ARCHITECTURE = REPO / "docs" / "architecture.md"
MODULE_LINE = re.compile(r"^- `([\w/]+\.py)` — .*\(tests/((?:e2e/)?test_\w+\.py)\)\.$", re.M)


def test_readme_is_a_tour() -> None:
    """README at most ~400 lines (detail lives in docs/), and it links to every docs/ page."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert text.count("\n") <= 420, "README.md grew past ~400 lines: move detail into docs/"
    for page in (REPO / "docs").glob("*.md"):
        linked = f"docs/{page.name}" in text or any(
            f"]({page.name}" in p.read_text(encoding="utf-8") for p in (REPO / "docs").glob("*.md"))
        assert linked, f"docs/{page.name} is linked from neither README.md nor another docs/ page"


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists()], ids=lambda d: d.name)
def test_local_links_exist(doc: Path) -> None:
    for target in LINK.findall(doc.read_text(encoding="utf-8")):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (doc.parent / target).exists(), f"{doc.relative_to(REPO)} links to {target}, which does not exist"


def _modules_with_code() -> set[str]:
    """Every package module (path relative to crossmodal_rag/) that defines a function or class."""
    package = REPO / "crossmodal_rag"
    found = set()
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) for n in ast.walk(tree)):
            found.add(path.relative_to(package).as_posix())
    return found


def test_architecture_lists_every_module_with_its_test() -> None:
    """docs/architecture.md has one line per module (its job and its test file); no module is
    missing, none listed is gone, every cited test file exists."""
    listed = dict(MODULE_LINE.findall(ARCHITECTURE.read_text(encoding="utf-8")))
    assert len(listed) > 20, "the module lines of docs/architecture.md were not recognised"
    modules = _modules_with_code()
    assert not modules - set(listed), f"docs/architecture.md lacks {sorted(modules - set(listed))}"
    gone = {m for m in listed if not (REPO / "crossmodal_rag" / m).is_file()}
    assert not gone, f"docs/architecture.md lists modules that do not exist: {sorted(gone)}"
    missing_tests = {t for t in listed.values() if not (REPO / "tests" / t).is_file()}
    assert not missing_tests, f"docs/architecture.md cites missing test files: {sorted(missing_tests)}"


#: A backticked Python name in the code map: a class (``SearchRequest``), a constant
#: (``DEFAULT_MODE``) or a call (``load_encoder(spec)``); plain words (``auto``) are not code names.
CODE_NAME = re.compile(r"`([A-Z][a-z]\w*|[A-Z][A-Z0-9]*_[A-Z0-9_]+|[A-Z]{4,}|[a-z_]\w*(?=\()[^`]*)`")


def _package_names() -> set[str]:
    """Every class, function, method and assigned name defined in the package."""
    names: set[str] = set()
    for path in (REPO / "crossmodal_rag").rglob("*.py"):
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(n.name)
            elif isinstance(n, ast.Assign | ast.AnnAssign):
                for t in n.targets if isinstance(n, ast.Assign) else [n.target]:
                    names.update(x.id for x in ast.walk(t) if isinstance(x, ast.Name))
    return names


def _cited_code_names(text: str) -> set[str]:
    return {m.split("(")[0] for m in CODE_NAME.findall(text)}


def test_the_code_map_cites_only_names_that_exist() -> None:
    """Every Python name docs/architecture.md cites in backticks (a class, a constant, a call)
    is defined in the package (issue 26: the map named ``Encoder`` and ``create_encoder``)."""
    cited = _cited_code_names(ARCHITECTURE.read_text(encoding="utf-8"))
    assert {"SearchRequest", "Collection", "DEFAULT_MODE", "load_encoder"} <= cited  # the scan sees them
    missing = sorted(cited - _package_names())
    assert not missing, f"docs/architecture.md cites code names that do not exist: {missing}"


def test_the_code_name_scan_catches_a_missing_name() -> None:
    planted = "- `encoders/__init__.py` — the `Encoder` interface and `create_encoder(spec)` (tests/test_x.py)."
    assert _cited_code_names(planted) == {"Encoder", "create_encoder"}
    assert not {"Encoder", "create_encoder"} & _package_names()
