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


# -- atomic_write: the one way a file is replaced ------------------------------------------------

_KILLED_WRITER = """
import os, signal, sys
from crossmodal_rag.safe_io import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(b"new, half written")
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)  # between the write and the replace
"""


def test_a_writer_killed_before_the_replace_leaves_the_old_file(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    from crossmodal_rag.safe_io import atomic_write_bytes

    target = tmp_path / "manifest.json"
    atomic_write_bytes(target, b"old")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert target.read_bytes() == b"old"
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".manifest.json.") \
        and leftovers[0].name.endswith(".tmp")  # a hidden temp file, never the target
    atomic_write_bytes(target, b"new")  # the next writer is not hindered by the leftover
    assert target.read_bytes() == b"new"


def test_a_failed_block_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    from crossmodal_rag.safe_io import atomic_write, atomic_write_text

    target = tmp_path / "settings.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError, match="encoder died"), atomic_write(target) as f:
        f.write(b"new")
        raise RuntimeError("encoder died")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["settings.json"]


def test_a_link_planted_at_the_temp_name_is_not_followed(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The temporary name has a random part; even a link planted at the exact name the writer
    draws is neither written through nor removed: the writer draws another name."""
    import secrets

    from crossmodal_rag.safe_io import atomic_write_bytes

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "vectors-2.npy"
    target.write_bytes(b"old")
    link = tmp_path / f".vectors-2.npy.{os.getpid()}.0000aaaa.tmp"
    link.symlink_to(victim)
    draws = iter(["0000aaaa", "1111bbbb"])
    monkeypatch.setattr(secrets, "token_hex", lambda _n: next(draws))
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and victim.read_bytes() == b"precious"
    assert link.is_symlink() and not target.is_symlink()

    monkeypatch.setattr(secrets, "token_hex", lambda _n: "0000aaaa")  # every draw taken
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"newer")
    assert target.read_bytes() == b"new" and victim.read_bytes() == b"precious"


def test_a_link_at_the_target_is_replaced_not_written_through(tmp_path: Path) -> None:
    from crossmodal_rag.safe_io import atomic_write_bytes

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    target = tmp_path / "session.json"
    target.symlink_to(victim)
    atomic_write_bytes(target, b"{}", mode=0o600)
    assert victim.read_bytes() == b"precious" and not target.is_symlink()
    assert target.read_bytes() == b"{}" and target.stat().st_mode & 0o077 == 0
