"""The notebooks run top to bottom (on the tiny models) and are committed without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook extras not installed")
nbclient = pytest.importorskip("nbclient", reason="notebook extras not installed")
pytest.importorskip("ipykernel", reason="notebook extras not installed")
pytest.importorskip("ipywidgets", reason="notebook extras not installed")

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"
NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_there_are_three_notebooks() -> None:
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_exploration.ipynb", "03_rag.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tiny_oc_spec: str, tmp_path_factory: pytest.TempPathFactory,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    from crossmodal_rag import Collection
    from crossmodal_rag.testing import make_tiny_t5

    work = tmp_path_factory.mktemp("nb")
    monkeypatch.setenv("CROSSMODAL_RAG_MODEL", tiny_oc_spec)
    monkeypatch.setenv("CROSSMODAL_RAG_GENERATOR", str(make_tiny_t5(work / "t5")))
    monkeypatch.setenv("CROSSMODAL_RAG_WORKDIR", str(work))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook shows no picture"
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    # run as documented (the notebooks extra: ipywidgets too), a notebook prints no warning and
    # nothing else on stderr (tqdm's "IProgress not found", transformers' deprecation warnings)
    stderr = [o["text"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not stderr, stderr
    # the notebook used the model and working folder it was pointed at, and indexed every photo
    with Collection.open(work / "sample.xmr") as coll:
        assert coll.manifest.encoder == tiny_oc_spec
        photos = [p for p in SAMPLE.rglob("*") if p.suffix.lower() in (".jpg", ".png")]
        assert coll.counts()["images"] == len(photos) > 0
    printed = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert f"model: {tiny_oc_spec}" in printed
