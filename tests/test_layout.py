"""store/layout.py: a writer keeps in index/ and embeddings/ exactly what the manifest and the
shards list, and refuses an unknown fsync policy by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from crossmodal_rag.errors import CollectionError
from crossmodal_rag.store.layout import (
    FSYNC_POLICIES,
    OWN_FOLDERS,
    check_fsync,
    remove_unlisted_files,
)
from crossmodal_rag.store.manifest import IndexFile, Manifest


def test_only_what_is_listed_stays(tmp_path: Path) -> None:
    for sub in OWN_FOLDERS:
        (tmp_path / sub).mkdir(parents=True)
    listed = ["index/image.3.faiss", "index/image.3.ivfdata", "index/text.2.faiss",
              "embeddings/image/000001.f16.npy", "embeddings/image/000001.ids.npy"]
    stale = ["index/image.2.faiss", "index/text.1.faiss.tmp", "embeddings/text/000007.f16.npy"]
    for rel in listed + stale:
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "index" / "part.0").mkdir()  # a sharded build's leftover folder
    (tmp_path / "index" / "part.0" / "a").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not ours")  # outside the owned folders
    manifest = Manifest(encoder="open_clip:ViT-B-32/x", dim=4, files={
        "image": IndexFile("index/image.3.faiss", 1, "0" * 64, 0, data_path="index/image.3.ivfdata", data_bytes=1),
        "text": IndexFile("index/text.2.faiss", 1, "0" * 64, 0)})
    remove_unlisted_files(tmp_path, manifest, listed[3:])
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == sorted([*listed, "notes.txt"])
    assert not (tmp_path / "index" / "part.0").exists()


def test_fsync_policies() -> None:
    for policy in FSYNC_POLICIES:
        check_fsync(policy)
    with pytest.raises(CollectionError, match="unknown fsync policy 'sometimes'; choose one of full, normal, off"):
        check_fsync("sometimes")
