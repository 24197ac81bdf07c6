"""SECURITY.md's "no pickle, no eval, no shell" promises, checked on the package's source (AST).

The scanner is tested on hostile snippets first, so a clean scan of the package means something.
"""

from __future__ import annotations

import ast
import json
import sys
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


def _process_starts(source: str) -> list[str]:
    """The process-starting calls in ``source``: asyncio's ``create_subprocess_*``, ``multiprocessing``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and _dotted(node.func).split(".")[-1] in ("create_subprocess_exec",
                                                                                 "create_subprocess_shell"):
            found.append(_dotted(node.func).split(".")[-1])
        elif isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {m}" for m in modules if m.split(".")[0] == "multiprocessing"]
    return found


def test_only_the_decode_pool_starts_a_process_and_never_through_a_shell() -> None:
    """Issue 25's decode workers are the one process the package starts: this interpreter running
    ``crossmodal_rag.web.decode_worker``, by ``create_subprocess_exec`` with a fixed argv (no shell,
    nothing from a request)."""
    starts = {str(f.relative_to(PACKAGE)): _process_starts(f.read_text(encoding="utf-8"))
              for f in sorted(PACKAGE.rglob("*.py"))}
    assert {f: s for f, s in starts.items() if s} == {"web/decoding.py": ["create_subprocess_exec"]}
    assert _process_starts("import asyncio\nasyncio.create_subprocess_shell('ls')") == ["create_subprocess_shell"]
    from crossmodal_rag.web.decoding import DecodePool

    assert DecodePool().argv[:3] == [sys.executable, "-m", "crossmodal_rag.web.decode_worker"]


def test_folders_skip_hidden_and_symlinked_folders_and_manifests_stay_in_their_root(tmp_path: Path) -> None:
    from PIL import Image

    from crossmodal_rag.ingestion.sources import ImageRecord, Problem, read_source

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    Image.new("RGB", (4, 4)).save(outside / "secret.png")
    root = tmp_path / "photos"
    (root / ".hidden").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "mine.png")
    Image.new("RGB", (4, 4)).save(root / ".hidden" / "h.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    names = {r.path.name for r in read_source(root) if isinstance(r, ImageRecord)}
    assert names == {"mine.png"}  # not the hidden one, not the one behind the symlinked folder
    coco = {"images": [{"id": 1, "file_name": "mine.png"}, {"id": 2, "file_name": "../elsewhere/secret.png"},
                       {"id": 3, "file_name": str(outside / "secret.png")}],
            "annotations": [{"image_id": i, "id": i, "caption": "c"} for i in (1, 2, 3)]}
    (root / "captions.json").write_text(json.dumps(coco))
    records = list(read_source(root / "captions.json"))
    assert {r.path.name for r in records if isinstance(r, ImageRecord)} == {"mine.png"}
    assert sum("outside" in r.reason for r in records if isinstance(r, Problem)) == 2
    allowed = read_source(root / "captions.json", allow_outside_root=True)
    assert any(isinstance(r, ImageRecord) and r.path.name == "secret.png" for r in allowed)


def test_serve_binds_to_this_machine_by_default() -> None:
    from crossmodal_rag.cli import build_parser

    args = build_parser().parse_args(["serve", "-c", "somewhere"])
    assert args.host == "127.0.0.1"


def test_offline_loads_open_no_connection(tmp_path: Path) -> None:
    """CROSSMODAL_RAG_OFFLINE=1 alone (HF_HUB_OFFLINE unset): loading a hub model that is not cached
    fails with the weights hint and never opens a socket or resolves a host name."""
    import os
    import subprocess
    import sys

    code = """
import socket
attempts = []
def refuse(*a, **k):
    attempts.append(a[:2])
    raise OSError("network use during an offline run")
socket.socket.connect = socket.socket.connect_ex = refuse
socket.getaddrinfo = socket.create_connection = refuse
from crossmodal_rag.encoders import ClipEncoder
from crossmodal_rag.errors import WeightsUnavailableError
for spec in ("hf:openai/clip-vit-base-patch32", "open_clip:ViT-B-32/laion2b_s34b_b79k"):
    try:
        ClipEncoder(spec).load()
    except WeightsUnavailableError:
        pass
    else:
        raise SystemExit(spec + " loaded?")
print("attempts", len(attempts), attempts[:3])
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(CROSSMODAL_RAG_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "attempts 0 " in proc.stdout, proc.stdout


def test_an_index_file_damaged_behind_its_header_is_caught_on_open(collection_copy: Path) -> None:
    """Same size, same FAISS header, vectors overwritten: the SHA-256 checked on open refuses the
    file and the index is rebuilt from the metadata (searches agree with brute force)."""
    import numpy as np

    from crossmodal_rag import Collection

    manifest = json.loads((collection_copy / "manifest.json").read_text())
    path = collection_copy / manifest["files"]["image"]["path"]
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle - 64:middle + 64] = np.full(32, 1000.0, dtype=np.float32).tobytes()
    path.write_bytes(bytes(data))
    with Collection.open(collection_copy) as coll:
        ids = coll.store.ids("image")
        vectors = coll.store.vectors(ids, coll.manifest.dim)
        _, found = coll.indexes["image"].search(vectors, 1)
    np.testing.assert_array_equal(found[:, 0], ids)  # each stored vector finds itself
