"""SECURITY.md's "no pickle, no eval, no shell" promises, checked on the package's source (AST).

The scanner is tested on hostile snippets first, so a clean scan of the package means something.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import crossmodal_rag

PACKAGE = Path(crossmodal_rag.__file__).parent

#: Modules that unpickle (or run code) when they read data.
PICKLING = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
#: Modules and calls that run other programs.
SHELL_MODULES = {"subprocess", "pty", "commands"}
SHELL_CALLS = {"system", "popen", "spawnl", "spawnle", "spawnlp", "spawnv", "spawnve", "spawnvp",
               "execl", "execle", "execlp", "execv", "execve", "execvp", "posix_spawn", "posix_spawnp"}
EVAL_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    """Every place in ``source`` that could unpickle, evaluate code or run a shell command."""
    found: list[str] = []

    def bad(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in PICKLING or top in SHELL_MODULES:
                    bad(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            top = (node.module or "").split(".")[0]
            names = {a.name for a in node.names}
            if top in PICKLING or top in SHELL_MODULES:
                bad(node, f"from {node.module} import ...")
            elif top == "torch" and "load" in names:
                bad(node, "from torch import load (use torch.load(..., weights_only=True))")
            elif top == "os" and names & SHELL_CALLS:
                bad(node, f"from os import {sorted(names & SHELL_CALLS)}")
        elif isinstance(node, ast.Attribute) and "pickle" in node.attr.lower():
            bad(node, f"uses {_dotted(node)}")  # read_pickle, to_pickle, pickle.loads, ...
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not _is_const(allow, False):
                bad(node, f"{name}(allow_pickle=...) not literally False")
            if name in ("torch.load", "torch.serialization.load") and not _is_const(
                    _keyword(node, "weights_only"), True):
                bad(node, f"{name} without weights_only=True")
            if isinstance(node.func, ast.Name) and name in EVAL_BUILTINS:
                bad(node, f"calls {name}()")
            if name.startswith("os.") and name[3:] in SHELL_CALLS:
                bad(node, f"calls {name}()")
            if name in ("importlib.import_module", "import_module") and node.args and isinstance(
                    node.args[0], ast.Constant) and str(node.args[0].value).split(".")[0] in PICKLING | SHELL_MODULES:
                bad(node, f"imports {node.args[0].value} dynamically")
            if _is_const(_keyword(node, "shell"), True):
                bad(node, f"{name}(shell=True)")
    return found


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "import cloudpickle as cp",
    "from joblib import load",
    "import dill.settings",
    "from marshal import loads",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "np.load(p, allow_pickle=flag)",
    "import torch\ntorch.load('ckpt.pt')",
    "torch.load('ckpt.pt', weights_only=False)",
    "from torch import load",
    "import pandas as pd\npd.read_pickle('x')",
    "df.to_pickle('x')",
    "eval(text)",
    "exec(code)",
    "import subprocess",
    "from subprocess import run",
    "import os\nos.system('ls')",
    "os.popen('ls')",
    "from os import system",
    "importlib.import_module('pickle')",
    "run(cmd, shell=True)",
])
def test_the_scanner_catches(snippet: str) -> None:
    assert violations(snippet), snippet


@pytest.mark.parametrize("snippet", [
    "np.load(p, mmap_mode='r', allow_pickle=False)",
    "np.save(f, a, allow_pickle=False)",
    "torch.load(p, map_location='cpu', weights_only=True)",
    "model.eval()",
    "model.to(device).eval()",
    "re.compile('x')",
])
def test_the_scanner_lets_safe_calls_pass(snippet: str) -> None:
    assert violations(snippet) == [], snippet


def test_the_package_has_no_pickle_eval_or_shell() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the whole package, not an empty folder
    found = [v for f in files for v in violations(f.read_text(encoding="utf-8"), str(f.relative_to(PACKAGE)))]
    assert found == []
