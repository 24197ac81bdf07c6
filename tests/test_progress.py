"""Progress where people wait (issue 17): bars over eval and caption loops, a status line while a
model loads, all on stderr; ``-q`` silences every bar (third-party ones too) and the known noisy
third-party warnings are filtered."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crossmodal_rag.progress import bar, loading

BAR = re.compile(r"(\d+)/(\d+) \[")  # tqdm's "n/total [elapsed" (the default bar format)


def totals(stderr: str) -> set[int]:
    """The totals of the bars that finished (n == total) in ``stderr``."""
    return {int(t) for n, t in BAR.findall(stderr) if n == t}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1", **(env or {})}
    full_env.pop("TQDM_DISABLE", None)
    return subprocess.run([sys.executable, "-m", "crossmodal_rag", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def no_progress(stderr: str) -> bool:
    return "\r" not in stderr and not BAR.search(stderr) and "loading" not in stderr and "%|" not in stderr


# -- the helpers ---------------------------------------------------------------------------------
def test_bar_counts_to_its_total_and_is_silent_when_disabled() -> None:
    out = io.StringIO()
    assert list(bar(range(7), desc="things", enabled=True, file=out)) == list(range(7))
    assert "things" in out.getvalue() and totals(out.getvalue()) == {7}
    quiet = io.StringIO()
    assert list(bar(range(7), enabled=False, file=quiet)) == list(range(7))
    assert quiet.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_loading_names_what_loads_and_how_long_it_took() -> None:
    out = _Terminal()
    with loading("generator tiny-t5", enabled=True, file=out, interval=0.05):
        time.sleep(0.3)
    lines = out.getvalue().replace("\r", "\n").split("\n")
    ticks = [x for x in lines if x.startswith("loading generator tiny-t5 ... ")]
    assert len(ticks) >= 3  # it moved while the model loaded
    took = float(re.search(r"\.\.\. (\d+\.\d)s", out.getvalue()).group(1))
    assert 0.3 <= took < 5
    failed = io.StringIO()
    with pytest.raises(OSError), loading("x", enabled=True, file=failed):
        raise OSError("no")
    assert failed.getvalue().rstrip().endswith("loading x ... failed")
    silent = io.StringIO()
    with loading("x", enabled=False, file=silent):
        pass
    assert silent.getvalue() == ""


def test_loading_is_one_line_when_not_a_terminal() -> None:
    """Issue 28: stderr to a file or pipe got the ticking line 65 times (15 KB of log)."""
    out = io.StringIO()
    with loading("generator tiny-t5", enabled=True, file=out, interval=0.01):
        time.sleep(0.2)
    assert "\r" not in out.getvalue()
    (line,) = out.getvalue().splitlines()
    assert re.fullmatch(r"loading generator tiny-t5 \.\.\. \d+\.\ds", line)


def test_quiet_silences_third_party_bars_and_noisy_warnings_are_filtered() -> None:
    code = """
import sys, warnings
from crossmodal_rag.cli import setup_logging
from crossmodal_rag.progress import NOISY_WARNINGS
setup_logging(0, {quiet})  # as main() does, before any library (tqdm) is imported
import tqdm
list(tqdm.tqdm(range(3), desc="third-party", file=sys.stderr))
for message, category in NOISY_WARNINGS:
    warnings.warn(message.replace("\\\\", "") + " (from a library)", category)
warnings.warn("an unrelated warning", UserWarning)
"""
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    quiet = subprocess.run([sys.executable, "-c", code.format(quiet=True)], capture_output=True, text=True,
                           env=env, timeout=120)
    loud = subprocess.run([sys.executable, "-c", code.format(quiet=False)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "third-party" not in quiet.stderr and "third-party" in loud.stderr and totals(loud.stderr) == {3}
    for err in (quiet.stderr, loud.stderr):
        assert "(from a library)" not in err, err
        assert "an unrelated warning" in err


# -- the library's loops ----------------------------------------------------------------------------
def test_eval_retrieval_bars_count_images_and_captions(sample_dir: Path, tiny_oc_spec: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag.eval import evaluate_retrieval
    from crossmodal_rag.eval.datasets import load_captioned

    items = load_captioned(sample_dir)
    report = evaluate_retrieval(sample_dir, tiny_oc_spec, progress=True)
    err = capsys.readouterr().err
    assert totals(err) == {len(items), sum(len(it.captions) for it in items)}
    assert report.images == len(items)
    evaluate_retrieval(sample_dir, tiny_oc_spec)  # the library is silent unless asked
    assert capsys.readouterr().err == ""


def test_eval_generation_bars_count_rows_and_images(sample_collection: Path, sample_dir: Path,
                                                    t5_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag import Collection
    from crossmodal_rag.eval import evaluate_captioning, evaluate_qa
    from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"q{i}?", "answers": ["a"]}) + "\n" for i in range(5)))
    with Collection.open(sample_collection) as coll:
        pipe = RagPipeline(coll, str(t5_dir), RagSettings(k=2), GenerationSettings(max_new_tokens=2))
        pipe.generator.load()  # (transformers' own "Loading weights" bar, outside the CLI)
        capsys.readouterr()
        evaluate_qa(pipe, qa, progress=True)
        assert totals(capsys.readouterr().err) == {5}
        evaluate_captioning(pipe, sample_dir, limit=3, progress=True)
        assert totals(capsys.readouterr().err) == {3}


# -- the command line -------------------------------------------------------------------------------
def test_cli_eval_retrieval_shows_progress_unless_quiet(sample_dir: Path, tiny_oc_spec: str) -> None:
    loud = run("eval", "retrieval", str(sample_dir), "--model", tiny_oc_spec, "--json")
    assert loud.returncode == 0, loud.stderr
    report = json.loads(loud.stdout)
    assert totals(loud.stderr) == {report["images"], report["captions"]}
    assert f"loading CLIP model {tiny_oc_spec} ... " in loud.stderr
    quiet = run("eval", "retrieval", str(sample_dir), "--model", tiny_oc_spec, "--json", "-q")
    assert quiet.returncode == 0 and json.loads(quiet.stdout)["images"] == report["images"]
    assert no_progress(quiet.stderr), quiet.stderr


def test_cli_caption_shows_progress_unless_quiet(sample_collection: Path, sample_dir: Path, t5_dir: Path,
                                                 tiny_oc_spec: str, tmp_path: Path) -> None:
    from tests.test_prefix import make_prefix

    ckpt = make_prefix(tmp_path / "prefix", tiny_oc_spec, str(t5_dir), retrieval_k=2)
    images = [str(p) for p in sorted(sample_dir.glob("*.jpg"))[:4]]
    args = ["caption", *images, "-c", str(sample_collection), "--image-prefix", str(ckpt),
            "--max-new-tokens", "3"]
    loud = run(*args)
    assert loud.returncode == 0, loud.stderr
    assert len(loud.stdout.strip().splitlines()) == 4 and totals(loud.stderr) == {4}
    assert f"loading generator {t5_dir} ... " in loud.stderr
    quiet = run(*args, "-q")
    assert quiet.returncode == 0 and quiet.stdout == loud.stdout
    assert no_progress(quiet.stderr), quiet.stderr
