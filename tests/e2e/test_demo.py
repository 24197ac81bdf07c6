"""The demo ends with the next commands to run on one's own folder, and answers a question with
``--generator`` (issue 17)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from crossmodal_rag.cli import build_parser


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "crossmodal_rag", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def next_commands(stdout: str) -> list[list[str]]:
    lines = [x.strip() for x in stdout.strip().splitlines()]
    tail = lines[-3:]
    assert all(x.startswith("crossmodal-rag ") for x in tail), stdout[-800:]
    return [shlex.split(x)[1:] for x in tail]


def test_demo_ends_with_index_search_serve_that_parse(tmp_path: Path, tiny_oc_spec: str) -> None:
    r = run("demo", "--model", tiny_oc_spec, "-c", str(tmp_path / "demo"), "-q")
    assert r.returncode == 0, r.stderr
    commands = next_commands(r.stdout)
    assert [c[0] for c in commands] == ["index", "search", "serve"]
    parser = build_parser()
    parsed = [parser.parse_args(c) for c in commands]  # each one a valid command line
    index, search, serve = parsed
    assert index.model == tiny_oc_spec  # the model the demo ran with, so it works offline too
    assert search.collection == serve.collection == [index.collection]  # search and serve: -c repeats (shards)
    assert search.text and serve.generator is None
    assert "next, on your own photos" in r.stdout


def test_demo_with_generator_answers_a_question(tmp_path: Path, tiny_oc_spec: str, t5_dir: Path) -> None:
    r = run("demo", "--model", tiny_oc_spec, "-c", str(tmp_path / "demo"), "--generator", str(t5_dir), "-q")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    question = out.index("\nQ: ")
    assert "sources:" in out[question:] and "posterior" in out[question:]
    serve = build_parser().parse_args(next_commands(out)[2])
    assert serve.generator == str(t5_dir)  # the answer's generator is the one to serve with
