"""Files a user names to eval and training commands are read only when they are regular files:
a FIFO (or a device) named like a dataset is refused at once, never opened for a blocking read."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from crossmodal_rag.errors import CrossmodalError

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def _returns_within(fn: Callable[[], object], seconds: float = 20.0) -> BaseException | None:
    """Run ``fn`` in a daemon thread: its exception (None if it returned); fails if it blocks."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fn()
            outcome.append(None)
        except BaseException as e:
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        # unblock the reader so the thread can end, then fail
        pytest.fail(f"{fn} blocked on a FIFO for {seconds} s")
    return outcome[0]


def _fifo(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    os.mkfifo(path)
    return path


def test_eval_qa_dataset_fifo_is_refused(tmp_path: Path) -> None:
    from crossmodal_rag.eval.generation import _read_jsonl

    fifo = _fifo(tmp_path, "qa.jsonl")
    err = _returns_within(lambda: _read_jsonl(fifo))
    assert isinstance(err, CrossmodalError) and str(fifo) in str(err) and "FIFO" in str(err).upper()


def test_eval_karpathy_json_fifo_is_refused(tmp_path: Path) -> None:
    from crossmodal_rag.eval.datasets import load_captioned

    fifo = _fifo(tmp_path, "karpathy.json")
    err = _returns_within(lambda: load_captioned(fifo))
    assert isinstance(err, CrossmodalError), err


def test_train_rag_examples_fifo_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from crossmodal_rag.training.rag import load_rag_examples

    fifo = _fifo(tmp_path, "train.jsonl")
    err = _returns_within(lambda: load_rag_examples(fifo))
    assert err is None or isinstance(err, CrossmodalError), err


def test_regular_qa_file_still_reads(tmp_path: Path) -> None:
    from crossmodal_rag.training.rag import load_rag_examples

    path = tmp_path / "train.jsonl"
    path.write_text('{"question": "what colour is the blik?", "answer": "red"}\n\nnot json\n')
    examples, skipped = load_rag_examples(path)
    assert [(e.question, e.answer) for e in examples] == [("what colour is the blik?", "red")]
    assert len(skipped) == 1 and ":3:" in skipped[0]
