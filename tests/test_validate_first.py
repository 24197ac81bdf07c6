"""Validate, then load (issue 28): every argument, path and filter of ``ask``/``chat``/``write`` is
checked before any model loads, and abstention under ``--min-score`` is decided from retrieval
before the generator loads. Loads are recorded by patching both runtimes' ``_load`` and the
encoder's, so the tests assert what happened instead of timing it."""

from __future__ import annotations

from pathlib import Path

import pytest

from crossmodal_rag import Collection
from crossmodal_rag.cli import main
from crossmodal_rag.errors import ModelSpecError
from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings
from crossmodal_rag.generation.llamacpp import LlamaCppGenerator
from crossmodal_rag.generation.models import Generator, check_generator_spec, load_generator


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the models that started loading (a generator of either runtime)."""
    seen: list[str] = []

    def record(self: object) -> None:
        seen.append(getattr(self, "spec", "?"))
        raise AssertionError(f"a model loaded: {self!r}")

    monkeypatch.setattr(LlamaCppGenerator, "_load", record)
    monkeypatch.setattr(Generator, "_load", record)
    return seen


@pytest.mark.parametrize("argv, message", [
    (["-g", "missing.gguf"], "GGUF file does not exist"),
    (["-g", "not a hub id!"], "neither a hub id"),
    (["-g", "./no-such-folder"], "has no config.json"),
    (["-w", "size >"], "size"),
    (["-w", "text~" + "x" * 40_000], "characters"),
    (["-w", "nosuchop"], "nosuchop"),
    (["--sample", "--temperature", "0"], "temperature"),
    (["--prior-temperature", "-1"], "prior-temperature"),
])
@pytest.mark.parametrize("command", ["ask", "chat", "write"])
def test_bad_arguments_fail_before_anything_loads(command: str, argv: list[str], message: str,
                                                   loads: list[str], sample_collection: Path, tiny_gguf: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base = ["-g", str(tiny_gguf)] if argv[0] != "-g" else []
    code = main([command, "what is on the table?", "-c", str(sample_collection), *base, *argv])
    err = capsys.readouterr().err
    assert code != 0 and message in err, err
    assert "loading generator" not in err and loads == []


def test_generator_spec_checks(tmp_path: Path, tiny_gguf: Path) -> None:
    assert check_generator_spec(f" {tiny_gguf} ") == str(tiny_gguf)
    assert check_generator_spec("google/flan-t5-base") == "google/flan-t5-base"
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    with pytest.raises(ModelSpecError, match="not a GGUF file"):
        check_generator_spec(str(fake))
    with pytest.raises(ModelSpecError, match="bundled model"):
        check_generator_spec("bundled:nosuch")
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_generator(str(tmp_path / "missing.gguf"))  # at once, not on first use


def test_abstention_is_decided_before_the_generator_loads(loads: list[str], sample_collection: Path,
                                                          tiny_gguf: Path) -> None:
    with Collection.open(sample_collection) as coll:
        pipe = RagPipeline(coll, LlamaCppGenerator(str(tiny_gguf)), RagSettings(k=2, min_score=0.999999),
                           GenerationSettings(max_new_tokens=4))
        answer = pipe.ask("a photo of a cat")
    assert answer.abstained and answer.answer == "not found in the collection" and loads == []


def test_cli_abstains_without_loading(loads: list[str], sample_collection: Path, tiny_gguf: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["ask", "a photo of a cat", "-c", str(sample_collection), "-g", str(tiny_gguf),
                 "--min-score", "0.999999", "--json"])
    captured = capsys.readouterr()
    assert code == 0 and '"abstained": true' in captured.out and loads == []
    assert "loading generator" not in captured.err


@pytest.mark.parametrize("argv, hint", [
    (["ask", "q", "--generater", "x.gguf"], "did you mean --generator for --generater?"),
    (["search", "q", "--tagret", "texts"], "did you mean --target for --tagret?"),
])
def test_unknown_flag_suggests_the_close_one(argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 28: an unknown flag got no "did you mean"."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and hint in capsys.readouterr().err


def test_unknown_flag_far_from_any_gets_no_guess(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["ask", "q", "--zzzzzz"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --zzzzzz" in err and "did you mean" not in err
