"""Start-up stays light: ``--help``, ``info`` and ``check`` (and ``import crossmodal_rag``) run
without importing the heavy libraries, which load only in the code paths that need them.

Each case runs in a fresh interpreter that reports ``sys.modules`` as it exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

#: Never imported by --help, info or `import crossmodal_rag`.
HEAVY = ("torch", "transformers", "open_clip", "faiss", "fastapi")
#: Model code: the encoder backends, generation and training.
MODEL_CODE = ("crossmodal_rag.encoders.openclip", "crossmodal_rag.encoders.hf",
              "crossmodal_rag.generation", "crossmodal_rag.training", "crossmodal_rag.ingestion.runner")

#: Runs each argv through the CLI's main in one process and reports, after each, which of the
#: watched modules (or packages) are loaded; SystemExit (from --help) ends a case, not the process.
_RUNNER = r"""
import contextlib, io, json, sys
watched = json.loads(sys.argv[1])
cases = json.loads(sys.argv[2])
from crossmodal_rag.cli import main
out = []
for argv in cases:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    loaded = [w for w in watched if w in sys.modules]
    out.append({"argv": argv, "code": code, "stdout": buf.getvalue(), "loaded": loaded})
print(json.dumps(out))
"""


def _run_cli(cases: list[list[str]], watched: tuple[str, ...], env: dict[str, str] | None = None) -> list[dict]:
    env = env if env is not None else {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(list(watched)), json.dumps(cases)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def _subcommands() -> list[list[str]]:
    """Every subcommand path of the parser, nested ones (``eval retrieval``) included."""
    import argparse

    from crossmodal_rag.cli import build_parser

    def walk(parser: argparse.ArgumentParser, prefix: list[str]) -> list[list[str]]:
        paths = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    paths.append([*prefix, name])
                    paths.extend(walk(sub, [*prefix, name]))
        return paths

    return walk(build_parser(), [])


def test_help_imports_no_heavy_library() -> None:
    commands = _subcommands()
    assert ["search"] in commands and ["eval", "retrieval"] in commands and ["train", "clip"] in commands
    cases = [["--help"]] + [[*c, "--help"] for c in commands]
    results = _run_cli(cases, HEAVY + MODEL_CODE)
    assert [r["argv"] for r in results] == cases
    for r in results:
        assert r["code"] == 0 and "usage:" in r["stdout"], r
        assert r["loaded"] == [], f"`crossmodal-rag {' '.join(r['argv'])}` imported {r['loaded']}"


def test_info_and_check_import_no_torch(collection_copy: Path) -> None:
    info, info_json, check = _run_cli(
        [["info", str(collection_copy)], ["info", "--json", str(collection_copy)],
         ["check", str(collection_copy)]], HEAVY + MODEL_CODE)
    assert info["code"] == 0 and f"collection:     {collection_copy}" in info["stdout"]
    assert info["loaded"] == [], f"info imported {info['loaded']}"
    # The same facts the library reports, read with everything loaded.
    from crossmodal_rag import Collection

    with Collection.open(collection_copy) as coll:
        expected = coll.info()
    assert json.loads(info_json["stdout"]) == json.loads(json.dumps(expected))
    assert info_json["loaded"] == []
    # check reads the index files (faiss), but loads neither torch nor any model.
    assert check["code"] == 0 and check["stdout"].splitlines()[-1].startswith("ok: "), check
    assert [m for m in check["loaded"] if not m.startswith("faiss")] == [], check["loaded"]


_IMPORT_ONLY = r"""
import json, sys
watched = json.loads(sys.argv[1])
import crossmodal_rag
loaded = [w for w in watched if w in sys.modules]
resolved = {name: type(getattr(crossmodal_rag, name)).__name__ for name in crossmodal_rag.__all__}
from crossmodal_rag import Collection, ClipEncoder, ingest
print(json.dumps({"loaded": loaded, "resolved": resolved, "dir": dir(crossmodal_rag),
                  "names": [Collection.__name__, ClipEncoder.__name__, ingest.__name__]}))
"""


def test_import_is_light_and_every_public_name_resolves() -> None:
    r = subprocess.run([sys.executable, "-c", _IMPORT_ONLY, json.dumps(list(HEAVY + MODEL_CODE))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["loaded"] == [], f"import crossmodal_rag imported {out['loaded']}"
    import crossmodal_rag

    assert sorted(out["resolved"]) == sorted(crossmodal_rag.__all__)
    assert out["resolved"]["Collection"] == "type" and out["resolved"]["ingest"] == "function"
    assert out["resolved"]["__version__"] == "str" and out["resolved"]["DEFAULT_MODEL"] == "str"
    assert set(crossmodal_rag.__all__) <= set(out["dir"])
    assert out["names"] == ["Collection", "ClipEncoder", "ingest"]


def test_unknown_attribute_is_an_attribute_error() -> None:
    import crossmodal_rag

    with pytest.raises(AttributeError, match="no_such_name"):
        crossmodal_rag.no_such_name  # noqa: B018
    assert not hasattr(crossmodal_rag, "no_such_name")


DEFAULT_CLIP = "open_clip:ViT-B-32/laion2b_s34b_b79k"


def _offline_envs(tmp_path: Path) -> dict[str, dict[str, str]]:
    """An empty model cache, and no hub: asked for (CROSSMODAL_RAG_OFFLINE), or not reachable
    (the endpoint refuses connections: nothing listens on the port of a closed socket)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items()
            if k not in ("CROSSMODAL_RAG_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    base.update(HF_HOME=str(tmp_path / "hf"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    return {"asked": {**base, "CROSSMODAL_RAG_OFFLINE": "1"},
            "unreachable": {**base, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port}"}}


@pytest.mark.parametrize("how", ["asked", "unreachable"])
def test_offline_demo_fails_before_loading_torch(tmp_path: Path, how: str) -> None:
    """Without the named model's weights and without the hub, `demo` says so before it
    imports torch or open_clip (which alone take seconds), and writes nothing. (Without --model,
    the demo runs its offline path instead: tests/e2e/test_demo_offline.py.)"""
    env = _offline_envs(tmp_path)[how]
    (result,) = _run_cli([["demo", "-c", str(tmp_path / "demo"), "--model", DEFAULT_CLIP]],
                         HEAVY + MODEL_CODE, env=env)
    assert result["code"] == 1
    assert result["loaded"] == [], f"the offline demo imported {result['loaded']}"
    assert not (tmp_path / "demo").exists()


def test_offline_demo_message(tmp_path: Path) -> None:
    env = _offline_envs(tmp_path)["unreachable"]
    r = subprocess.run([sys.executable, "-m", "crossmodal_rag", "demo", "-c", str(tmp_path / "demo"),
                        "--model", DEFAULT_CLIP], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1
    assert "could not load weights for open_clip:ViT-B-32/laion2b_s34b_b79k" in r.stderr
    assert "local-dir" in r.stderr and "--model" in r.stderr and "Traceback" not in r.stderr


def test_known_tag_files_match_open_clip() -> None:
    """The table the offline check reads agrees with open_clip's own pretrained table (the
    backend looks for these files in the hub cache when the hub cannot be reached)."""
    import open_clip

    from crossmodal_rag.encoders import DEFAULT_MODEL, parse_model_spec
    from crossmodal_rag.encoders._hub import OPEN_CLIP_TAG_FILES

    default = parse_model_spec(DEFAULT_MODEL)
    assert f"{default.name}/{default.pretrained}" in OPEN_CLIP_TAG_FILES
    for tag, (repo, names) in OPEN_CLIP_TAG_FILES.items():
        arch, pretrained = tag.split("/")
        cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        assert not cfg.get("file")
        hub = cfg["hf_hub"]
        expected_repo, expected_file = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
        assert repo == expected_repo
        assert list(names) == ([expected_file] if expected_file else []) + [
            "open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
