"""Messages that tell the truth (issue 17): each message a user meets in the first hour says what
happened, in the CLI's own spelling (flags, not Python keywords)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_cli import run


def test_an_empty_answer_is_reported_as_empty(sample_collection: Path, t5_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The generator answers "" from two retrieved sources: the CLI says the answer is empty, not
    that nothing was retrieved (the web page's wording)."""
    from crossmodal_rag.cli import main
    from crossmodal_rag.generation import Generator

    monkeypatch.setattr(Generator, "generate", lambda self, prompts, *a, **kw: [[""] for _ in prompts])
    assert main(["ask", "what is this?", "-c", str(sample_collection), "-g", str(t5_dir), "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "nothing was retrieved" not in out
    assert out.startswith("retrieved (prior")  # the sources with their priors come first (issue 19)
    assert "\n(the generator gave an empty answer)\n" in out and "sources:" in out
    assert out.count("posterior") == 2


def test_searching_a_modality_the_collection_lacks_says_so(tmp_path: Path, tiny_oc_spec: str, t5_dir: Path) -> None:
    corpus = tmp_path / "kb.jsonl"
    corpus.write_text('{"text": "the cat sat on the mat"}\n{"text": "coffee is brewed from beans"}\n')
    coll = tmp_path / "kb"
    assert run("index", str(corpus), "-c", str(coll), "--model", tiny_oc_spec).returncode == 0
    r = run("search", "a cat", "-c", str(coll))  # --target images is the default
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "holds no images" in r.stderr and "--target texts" in r.stderr and "target=" not in r.stderr
    r = run("search", "a cat", "-c", str(coll), "--target", "texts", "-k", "2")
    assert r.returncode == 0 and [row.split("\t")[4] for row in r.stdout.splitlines()[1:]] == ["passage"] * 2
    # retrieval for generation says the same in CLI words
    r = run("ask", "a cat", "-c", str(coll), "--target", "images", "-g", str(t5_dir))
    assert r.returncode == 2 and "holds no images" in r.stderr and "--target texts" in r.stderr, r.stderr
    assert "'texts'" not in r.stderr and "Traceback" not in r.stderr
    # the library says the same without naming a command-line flag
    from crossmodal_rag import Collection
    from crossmodal_rag.errors import QueryError

    with Collection.open(coll) as c, pytest.raises(QueryError, match="holds no images") as e:
        c.search("a cat", mode="dense")
    assert "--" not in str(e.value) and "'texts'" in str(e.value)
    with Collection.open(coll) as c:
        assert c.search("a cat", target="all", k=1, mode="dense")[0].kind == "passage"


def test_index_lists_each_skipped_file_once(tmp_path: Path, photos: Path, tiny_oc_spec: str) -> None:
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = run("index", str(photos), "-c", str(tmp_path / "c"), "--model", tiny_oc_spec)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("broken.jpg") == 1, r.stderr
    assert "skipped 1 item(s):" in r.stderr


def _reindex_to_hnsw(folder: Path) -> None:
    r = run("reindex", str(folder), "--index", "HNSW32", "--no-tune")
    assert r.returncode == 0, r.stderr


def test_reindex_and_tune_print_alike(collection_copy: Path) -> None:
    """Text by default (a line per index: name, type, what tuning chose), JSON with --json."""
    r = run("reindex", str(collection_copy), "--index", "HNSW32")
    assert r.returncode == 0, r.stderr
    reindexed = r.stdout.splitlines()
    assert [line.split(":")[0] for line in reindexed] == ["image", "text"]
    assert all("HNSW32" in line and "ef_search=" in line and "recall@10" in line for line in reindexed)
    r = run("tune", str(collection_copy))
    assert r.returncode == 0, r.stderr
    tuned = r.stdout.splitlines()
    assert [line.split(":")[0] for line in tuned] == ["image", "text"]
    assert all("HNSW32" in line and "ef_search=" in line and "recall@10" in line for line in tuned)
    for command in ("reindex", "tune"):
        r = run(command, str(collection_copy), "--json")
        assert r.returncode == 0 and set(json.loads(r.stdout)) == {"image", "text"}, r.stderr
    r = run("tune", str(collection_copy), "--ef-search", "40")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == "image: HNSW32, ef_search=40 (set)", r.stdout


def test_tune_nprobe_on_hnsw_names_ef_search(collection_copy: Path) -> None:
    _reindex_to_hnsw(collection_copy)
    r = run("tune", str(collection_copy), "--nprobe", "4")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--nprobe" in r.stderr and "HNSW" in r.stderr and "--ef-search" in r.stderr
    from crossmodal_rag import Collection

    with Collection.open(collection_copy) as c:  # nothing was stored
        assert all(ix.params.nprobe is None for ix in c.indexes.values())
    r = run("tune", "-c", str(collection_copy), "--ef-search", "24")
    assert r.returncode == 0, r.stderr


def _existing_run(out: Path, task: str, checkpoint: bool = True) -> None:
    out.mkdir(parents=True)
    (out / "settings.json").write_text(json.dumps({"task": task, "settings": {}}))
    if checkpoint:
        (out / "checkpoints" / "step-000001").mkdir(parents=True)
        (out / "checkpoints" / "step-000001" / "trainer_state.pt").write_bytes(b"")
        (out / "last").write_text("step-000001")


UNREACHABLE = {"clip": ["--model", "open_clip:ViT-B-32/laion2b_s34b_b79k"],
               "prefix": ["--model", "open_clip:ViT-B-32/laion2b_s34b_b79k", "-g", "google/flan-t5-base"],
               "rag": ["-g", "google/flan-t5-base"]}


@pytest.mark.parametrize("task", ["clip", "prefix", "rag"])
def test_train_checks_its_arguments_before_the_hub(task: str, tmp_path: Path, photos: Path,
                                                   sample_collection: Path) -> None:
    """An existing run without --resume, or --resume on another task's run, is refused before
    any model is looked for (the models named here are not available offline)."""
    env = {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    extra = [*UNREACHABLE[task], *(["-c", str(sample_collection)] if task == "rag" else [])]
    _existing_run(tmp_path / "run", task)
    r = run("train", task, str(photos), "--out", str(tmp_path / "run"), *extra, env=env)
    assert r.returncode == 2, r.stderr
    assert "already holds a training run" in r.stderr and "--resume" in r.stderr
    assert "resume=" not in r.stderr and "local-dir" not in r.stderr and "Traceback" not in r.stderr
    other = "clip" if task != "clip" else "prefix"
    _existing_run(tmp_path / "other", other, checkpoint=False)
    r = run("train", task, str(photos), "--out", str(tmp_path / "other"), "--resume", *extra, env=env)
    assert r.returncode == 2 and f"holds a '{other}' run" in r.stderr and "--out" in r.stderr, r.stderr


@pytest.mark.parametrize("task", ["clip", "prefix", "rag"])
def test_every_train_command_reports_absolute_paths(task: str, tmp_path: Path, photos: Path,
                                                    collection_copy: Path, tiny_oc_spec: str, t5_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag.cli import main

    monkeypatch.chdir(tmp_path)
    extra = {"clip": ["--model", tiny_oc_spec],
             "prefix": ["--model", tiny_oc_spec, "-g", str(t5_dir), "--prefix-length", "2", "--hidden-size", "16"],
             "rag": ["-c", str(collection_copy), "-g", str(t5_dir), "-k", "2"]}[task]
    argv = ["-q", "train", task, "photos", "--out", "run", "--steps", "1", "--batch-size", "2",
            "--val-fraction", "0", *extra]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    paths = {k: v for k, v in summary.items() if k in ("out_dir", "best_dir", "metrics_path", "image_prefix")}
    assert {"out_dir", "best_dir", "metrics_path"} <= set(paths)
    for key, value in paths.items():
        assert Path(value).is_absolute() and Path(value).exists(), (key, value)
    assert Path(summary["best_dir"]) == (tmp_path / "run" / "best").resolve()


def test_train_rag_too_few_items_speaks_cli(tmp_path: Path, photos: Path, collection_copy: Path, t5_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag.cli import main

    rc = main(["-q", "train", "rag", str(photos), "--out", str(tmp_path / "run"), "-c", str(collection_copy),
               "-g", str(t5_dir), "-k", "500", "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "fewer than 500" in err and "--top-k" in err and "k=" not in err, err


@pytest.mark.parametrize(("argv", "flag"), [
    (["ask", "q", "--prior-temperature", "0"], "--prior-temperature"),
    (["ask", "q", "--prompt-template", "no placeholders"], "--prompt-template"),
    (["ask", "q", "--top-p", "2"], "--top-p"),
])
def test_settings_errors_name_the_flag(argv: list[str], flag: str, sample_collection: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from crossmodal_rag.cli import main

    assert main([*argv, "-c", str(sample_collection)]) == 2
    err = capsys.readouterr().err
    assert flag in err and flag.lstrip("-").replace("-", "_") not in err, err


def test_gguf_dependencies_are_named_at_once_before_loading(tmp_path: Path) -> None:
    """Without gguf and accelerate, a .gguf generator names both (one install line) before
    transformers is imported."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    code = ("import sys\nsys.modules['gguf'] = None\nsys.modules['accelerate'] = None\n"
            "from crossmodal_rag.generation import Generator\nfrom crossmodal_rag.errors import ModelSpecError\n"
            f"try:\n    Generator({str(model)!r}, device='cpu').load()\n"
            "except ModelSpecError as e:\n    print(e)\n"
            "print('transformers' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    message, loaded = r.stdout.strip().splitlines()
    assert "gguf" in message and "accelerate" in message and "pip install gguf accelerate" in message
    assert loaded == "False"


@pytest.mark.parametrize("spec", ["hf:/etc", "org/..repo", "/etc", "org/repo--x"])
def test_a_bad_text_model_spec_is_a_usage_error_naming_the_forms(spec: str, tmp_path: Path, photos: Path,
                                                                 tiny_oc_spec: str) -> None:
    """Issue 25: ``index --text-model hf:/etc`` ended in an HFValidationError traceback after
    indexing. Now it is refused before anything is read or made, exit 2 like other usage errors,
    with one error line naming the spec and the valid forms."""
    coll = tmp_path / "coll"
    r = run("index", str(photos), "-c", str(coll), "--model", tiny_oc_spec, "--text-model", spec)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "HFValidationError" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--text-model" in errors[0] and repr(spec) in errors[0], r.stderr
    assert all(form in errors[0] for form in ("none", "minilm", "hub id", "folder"))
    assert not coll.exists()
