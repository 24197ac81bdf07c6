"""Re-embedding a collection with another encoder (crossmodal_rag/maintenance/reembed.py): refused whole when
an image is unreadable, ids kept and scores those of the new encoder (checked against its own
embeddings), the swap completed after a crash between its two renames."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crossmodal_rag import Collection
from crossmodal_rag.encoders import ClipEncoder
from crossmodal_rag.errors import CollectionError
from crossmodal_rag.maintenance.reembed import reembed_collection
from crossmodal_rag.synthetic import make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    make_shapes(folder, 24, seed=0, size=32)
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "crossmodal_rag", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_reembed_refuses_unreadable_images_and_changes_nothing(
    tmp_path: Path, shapes: Path, tiny_oc_spec: str, tiny_hf_dir: Path
) -> None:
    import shutil

    src = tmp_path / "src"
    shutil.copytree(shapes, src)
    coll_dir = tmp_path / "coll"
    with Collection.create(coll_dir, tiny_oc_spec) as coll:
        coll.add(src)
    (src / "shape-00003.png").write_bytes(b"not a png")
    before = (coll_dir / "manifest.json").read_bytes()
    with pytest.raises(CollectionError, match="shape-00003.png"):
        reembed_collection(coll_dir, f"hf:{tiny_hf_dir}", progress=False)
    assert (coll_dir / "manifest.json").read_bytes() == before
    with Collection.open(coll_dir) as coll:
        assert coll.manifest.encoder == tiny_oc_spec and coll.check().ok
        ids_before = coll.store.ids("image").tolist()
    # Restored, the collection re-embeds with any encoder (here another backend), from the CLI.
    shutil.copy(shapes / "shape-00003.png", src / "shape-00003.png")
    r = _cli("reembed", str(coll_dir), "--model", f"hf:{tiny_hf_dir}")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["encoder"] == f"hf:{tiny_hf_dir}"
    with Collection.open(coll_dir) as coll:
        assert coll.manifest.encoder == f"hf:{tiny_hf_dir}" and coll.check().ok
        assert coll.store.ids("image").tolist() == ids_before
        hit = coll.search(coll.get(ids_before[5])[0].captions[0], k=1, mode="dense")[0]
        enc = ClipEncoder(f"hf:{tiny_hf_dir}", device="cpu")
        expected = enc.encode_texts(coll.get(ids_before[5])[0].captions[0])[0]
        assert hit.score == pytest.approx(float((enc.encode_images([hit.path]) @ expected)[0]), abs=1e-5)
    assert not list(tmp_path.glob(".coll.*"))  # no staging or backup folder left behind


def test_a_swap_cut_between_its_renames_is_completed_by_the_next_call(
    tmp_path: Path, shapes: Path, tiny_oc_spec: str, tiny_hf_dir: Path
) -> None:
    """A re-embedding killed after the old folder went to the backup and before the new one took
    its place: the next call finds the staged collection marked ready and renames it in."""
    coll_dir = tmp_path / "coll"
    with Collection.create(coll_dir, tiny_oc_spec) as coll:
        coll.add(shapes)
        ids = coll.store.ids("image").tolist()
    reembed_collection(coll_dir, f"hf:{tiny_hf_dir}", progress=False)
    staging, backup = tmp_path / ".coll.reembed", tmp_path / ".coll.pre-reembed"
    shutil.copytree(coll_dir, backup)  # what the crash leaves: the backup, and the ready staging
    os.replace(coll_dir, staging)
    (staging / ".reembed-ready").write_text(f"hf:{tiny_hf_dir}\n")
    report = reembed_collection(coll_dir, f"hf:{tiny_hf_dir}", progress=False)
    assert report.previous_encoder == f"hf:{tiny_hf_dir}" and report.images == len(ids)
    assert not staging.exists() and not backup.exists()
    with Collection.open(coll_dir) as coll:
        assert coll.store.ids("image").tolist() == ids and coll.check().ok
