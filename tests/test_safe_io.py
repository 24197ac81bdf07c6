"""safe_io: only regular files are read, and never more than the cap, even if the file grows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from crossmodal_rag.safe_io import FileReadError, open_regular, read_capped, read_regular


def test_caps_before_and_during_the_read(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 100)
    assert read_regular(f, max_bytes=100) == b"x" * 100
    with pytest.raises(FileReadError, match="exceeds the limit of 99 bytes"):
        read_regular(f, max_bytes=99)
    # the file grows between the size check and the read: the cap still holds
    with open_regular(f, max_bytes=150) as fh:
        with open(f, "ab") as w:
            w.write(b"y" * 40)
        assert read_capped(fh, f, 150) == b"x" * 100 + b"y" * 40  # grew, but within the cap
    with open_regular(f, max_bytes=150) as fh:
        with open(f, "ab") as w:
            w.write(b"z" * 20)
        with pytest.raises(FileReadError, match="grew past the limit of 150"):
            read_capped(fh, f, 150)


def test_non_regular_files_are_never_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "p")
    (tmp_path / "z").symlink_to("/dev/zero")
    (tmp_path / "d").mkdir()
    for name, kind in (("p", "named pipe"), ("z", "character device"), ("d", "directory")):
        with pytest.raises(FileReadError, match=kind) as info:
            read_regular(tmp_path / name, max_bytes=10)
        assert isinstance(info.value, OSError) and info.value.strerror == info.value.reason
    with pytest.raises(FileNotFoundError):
        read_regular(tmp_path / "missing", max_bytes=10)
