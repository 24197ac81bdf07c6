"""End to end: the real CLI in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.badimages import write_bad_images


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "crossmodal_rag", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def test_index_search_info_check_remove(tmp_path: Path, photos: Path, tiny_oc_spec: str) -> None:
    coll = tmp_path / "coll"
    bad = photos / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    report = tmp_path / "report.json"
    r = run("index", str(photos), "--collection", str(coll), "--model", tiny_oc_spec, "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert "5 images, 15 captions" in r.stdout and "1 skipped" in r.stdout
    assert "broken.jpg" in r.stderr and "Traceback" not in r.stderr
    assert json.loads(report.read_text())["skipped"][0]["item"] == str(bad)

    r = run("search", "a cat", "--collection", str(coll), "--top-k", "3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].split("\t") == ["query", "rank", "score", "id", "kind", "path", "text"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [row[1] for row in rows] == ["1", "2", "3"] and all(row[4] == "image" for row in rows)
    scores = [float(row[2]) for row in rows]
    assert scores == sorted(scores, reverse=True)

    r = run("search", "--image", str(photos / "cat.jpg"), "-c", str(coll), "-k", "2", "--target", "texts", "--json")
    out = json.loads(r.stdout)
    assert out["target"] == "texts" and len(out["results"]) == 2
    assert {"id", "score", "path", "text", "kind", "captions"} <= set(out["results"][0])

    queries = tmp_path / "q.txt"
    queries.write_text(f'a cup of coffee\n\n{{"image": "{photos / "cat.jpg"}"}}\n{{"text": ""}}\n')
    r = run("search", "--queries", str(queries), "-c", str(coll), "-k", "1", "--json")
    assert r.returncode == 2 and "line 4" in r.stderr  # the bad query is reported, the others answered
    batch = json.loads(r.stdout)
    assert len(batch) == 2 and batch[1]["results"][0]["path"] == str(photos / "cat.jpg")

    r = run("info", str(coll))
    assert r.returncode == 0 and "5 images, 15 captions" in r.stdout and tiny_oc_spec in r.stdout
    info = json.loads(run("info", str(coll), "--json").stdout)
    assert info["counts"] == {"images": 5, "captions": 15, "passages": 0} and info["dim"] == 32
    r = run("check", str(coll))
    assert r.returncode == 0
    assert r.stdout.splitlines()[-1] == "ok: 5 images, 15 captions, 0 passages"
    assert all(line.startswith("note: ") for line in r.stdout.splitlines()[:-1])

    first_id = rows[0][3]
    r = run("remove", first_id, "--collection", str(coll))
    assert r.returncode == 0 and "removed 4 item(s)" in r.stdout
    r = run("remove", "424242", "--collection", str(coll))
    assert r.returncode == 1 and "424242" in r.stderr
    assert json.loads(run("info", str(coll), "--json").stdout)["counts"]["images"] == 4


def test_bad_queries_exit_2(sample_collection: Path, tmp_path: Path) -> None:
    for args, fragment in [
        (["search", "   "], "empty query"),
        (["search"], "give a TEXT query"),
        (["search", "--image", str(tmp_path / "nope.jpg")], "does not exist"),
        (["search", "cat", "--top-k", "0"], "integer >= 1"),
    ]:
        r = run(*args, "--collection", str(sample_collection))
        assert r.returncode == 2, (args, r.stderr)
        assert fragment in r.stderr and "Traceback" not in r.stderr
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    r = run("search", "--image", str(junk), "--collection", str(sample_collection))
    assert r.returncode == 2 and "junk.png" in r.stderr and "Traceback" not in r.stderr


def test_nothing_indexable_exits_1(tmp_path: Path, tiny_oc_spec: str) -> None:
    (tmp_path / "empty").mkdir()
    r = run("index", str(tmp_path / "empty"), "-c", str(tmp_path / "c1"), "--model", tiny_oc_spec)
    assert r.returncode == 1 and "found no images" in r.stderr
    write_bad_images(tmp_path / "bad")
    r = run("index", str(tmp_path / "bad"), "-c", str(tmp_path / "c2"), "--model", tiny_oc_spec)
    assert r.returncode == 1 and "nothing could be indexed" in r.stderr and "truncated" in r.stderr
    r = run("index", str(tmp_path / "missing"), "-c", str(tmp_path / "c3"), "--model", tiny_oc_spec)
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_wrong_encoder_and_missing_collection(sample_collection: Path, tiny_hf_dir: Path, tmp_path: Path) -> None:
    r = run("search", "cat", "-c", str(sample_collection), "--model", f"hf:{tiny_hf_dir}")
    assert r.returncode == 1 and "was built with" in r.stderr and "Traceback" not in r.stderr
    r = run("search", "cat", "-c", str(tmp_path / "none"))
    assert r.returncode == 1 and "does not exist" in r.stderr


def test_offline_default_model_fails_fast_with_instructions(tmp_path: Path, photos: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "hf"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    # plain `demo` runs its offline path instead (tests/e2e/test_demo_offline.py); naming the
    # default weights explicitly still fails fast
    default = "open_clip:ViT-B-32/laion2b_s34b_b79k"
    for args in (["demo", "--model", default], ["index", str(photos), "-c", str(tmp_path / "c")]):
        t0 = time.perf_counter()
        r = run(*args, env=env, timeout=120)
        assert r.returncode == 1, r.stderr
        assert time.perf_counter() - t0 < 60
        assert "local-dir" in r.stderr and "--model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "c").exists()  # no folder left behind for a collection never made


def test_demo_with_local_weights(tmp_path: Path, tiny_oc_dir: Path) -> None:
    r = run("demo", "--model", f"open_clip:local-dir:{tiny_oc_dir}", "--collection", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    assert "15 images" in r.stdout and '"a cat looking at the camera" -> images' in r.stdout
    assert "image space/astronaut.jpg -> texts" in r.stdout
    r = run("demo", "--model", f"open_clip:local-dir:{tiny_oc_dir}", "--collection", str(tmp_path / "demo"))
    assert r.returncode == 0 and "15 unchanged" in r.stdout


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["search", "--help"]])
def test_console_script_and_help(argv: list[str]) -> None:
    exe = Path(sys.executable).parent / "crossmodal-rag"
    r = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=60)
    from crossmodal_rag import __version__

    want = {"--version": f"crossmodal-rag {__version__}\n", "--help": "usage: crossmodal-rag [-h]",
            "search": "usage: crossmodal-rag search [-h]"}[argv[0]]
    assert r.returncode == 0 and r.stdout.startswith(want), r.stdout[:200]


def test_ask_chat_write_recommend(sample_collection: Path, sample_dir: Path, tmp_path: Path) -> None:
    from crossmodal_rag.testing import make_tiny_t5

    t5 = str(make_tiny_t5(tmp_path / "t5"))
    base = ["--collection", str(sample_collection), "--generator", t5, "--max-new-tokens", "4"]
    r = run("ask", "what animal is in the photo?", *base, "--k", "3", "--mode", "rag-sequence", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert {"answer", "sources", "prompts", "timings", "mode"} <= set(out) and out["mode"] == "rag-sequence"
    assert len(out["sources"]) == 3
    assert abs(sum(s["posterior"] for s in out["sources"]) - 1) < 1e-6
    assert {"id", "path", "caption", "text", "score", "prior", "posterior"} <= set(out["sources"][0])

    r = run("ask", "--image", str(sample_dir / "cat.jpg"), *base, "--mode", "rag-token")
    assert r.returncode == 0, r.stderr
    assert "sources:" in r.stdout and "posterior" in r.stdout

    session = tmp_path / "chat.json"
    assert run("chat", "hello", "--session", str(session), *base).returncode == 0
    r = run("chat", "and the cat?", "--session", str(session), *base, "--json")
    assert r.returncode == 0 and "User: hello" in json.loads(r.stdout)["prompts"][0]
    assert [t["role"] for t in json.loads(session.read_text())["turns"]] == ["user", "assistant"] * 2

    r = run("write", "The cat sat on the mat.", *base, "--json")
    assert r.returncode == 0 and "Draft: The cat sat on the mat." in json.loads(r.stdout)["prompts"][0]

    r = run("recommend", "--liked", "1", "2", "--top-k", "3", "--collection", str(sample_collection), "--json")
    recs = json.loads(r.stdout)
    assert r.returncode == 0 and len(recs) == 3 and not {1, 2} & {x["id"] for x in recs}

    for args, code in [(["ask", "  ", *base], 2), (["ask", *base], 2),
                       (["ask", "q", "--image", str(tmp_path / "none.jpg"), *base], 2),
                       (["ask", "q", "--collection", str(sample_collection), "--prior-temperature", "0"], 2),
                       (["recommend", "--liked", "999999", "--collection", str(sample_collection)], 2)]:
        r = run(*args)
        assert r.returncode == code, (args, r.stderr)
        assert "Traceback" not in r.stderr

    # Offline without --generator: one line says the default cannot be had and names the bundled
    # model that answers instead (issue 28); the answer comes from it.
    r = run("ask", "q", "--collection", str(sample_collection), env={"HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    notice = [line for line in r.stderr.splitlines() if "cannot be had" in line]
    assert len(notice) == 1 and "bundled" in notice[0] and "--generator" in notice[0], r.stderr
    assert r.stdout.strip()


# -- hostile files and output (issue 15) --------------------------------------------------------
def run_capped(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``run`` with an address-space cap: a FIFO that hangs the reader times out, and a read of
    /dev/zero ends in MemoryError, instead of taking the machine down."""
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (10 << 30, 10 << 30))

    env = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "crossmodal_rag", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, preexec_fn=limit)


def test_index_skips_fifos_and_devices_and_releases_the_lock(tmp_path: Path, photos: Path,
                                                              tiny_oc_spec: str) -> None:
    os.mkfifo(photos / "a_fifo.jpg")  # sorted first: a blocking read would hang the whole run
    (photos / "b_zero.jpg").symlink_to("/dev/zero")
    (photos / "c_link.jpg").symlink_to(photos / "cat.jpg")  # a link to a regular file is indexed
    coll = tmp_path / "coll"
    r = run_capped("index", str(photos), "-c", str(coll), "--model", tiny_oc_spec, "--workers", "0", timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "named pipe" in r.stderr and "character device" in r.stderr and "Traceback" not in r.stderr
    assert "5 images" in r.stdout and "1 duplicates" in r.stdout and "2 skipped" in r.stdout
    from crossmodal_rag import Collection

    with Collection.open(coll, writable=True) as c:  # the write lock was released
        assert c.counts()["images"] == 5


def test_query_images_must_be_regular_files(sample_collection: Path, tmp_path: Path, sample_dir: Path) -> None:
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    queries = tmp_path / "q.jsonl"
    queries.write_text(f'{{"image": "{fifo}"}}\n{{"image": "/dev/zero"}}\n{{"image": "zero.jpg"}}\n'
                       f'{{"image": "{sample_dir / "cat.jpg"}"}}\n')
    r = run_capped("search", "--queries", str(queries), "-c", str(sample_collection), "-k", "1", "--json",
                   timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "line 1" in r.stderr and "named pipe" in r.stderr
    assert "line 2" in r.stderr and "line 3" in r.stderr and "character device" in r.stderr
    batch = json.loads(r.stdout)
    assert len(batch) == 1 and batch[0]["results"][0]["path"] == str(sample_dir / "cat.jpg")
    for path in (fifo, tmp_path / "zero.jpg"):
        r = run_capped("search", "--image", str(path), "-c", str(sample_collection), timeout=120)
        assert r.returncode == 2 and "regular" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = run_capped("search", "--queries", str(fifo), "-c", str(sample_collection), timeout=120)
    assert r.returncode == 2 and "named pipe" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_control_characters_are_escaped_in_text_output(tmp_path: Path, sample_dir: Path,
                                                       tiny_oc_spec: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    name = "evil\rname\x1b[2J.jpg"
    shutil.copy(sample_dir / "cat.jpg", src / name)
    (src / "evil\rname\x1b[2J.txt").write_text("red \x1b[31mALERT\x1b[0m \x9b31m bell\x07 \u202eeman\n")
    coll = tmp_path / "coll"
    r = run("index", str(src), "-c", str(coll), "--model", tiny_oc_spec)
    assert r.returncode == 0, r.stderr
    r = run("search", "red", "-c", str(coll), "-k", "2", "--target", "all")
    assert r.returncode == 0, r.stderr
    for ch in ("\x1b", "\r", "\x07", "\x9b", "\u202e"):
        assert ch not in r.stdout, repr(ch)
    rows = [line.split("\t") for line in r.stdout.splitlines()[1:]]
    assert len(rows) == 2 and all(len(row) == 7 for row in rows)
    assert {row[5] for row in rows} == {str(src) + "/evil\\rname\\x1b[2J.jpg"}
    texts = {row[6] for row in rows}
    assert "red \\x1b[31mALERT\\x1b[0m \\x9b31m bell\\x07 \\u202eeman" in texts
    # JSON keeps the exact text (json escapes it)
    r = run("search", "red", "-c", str(coll), "-k", "2", "--target", "texts", "--json")
    for ch in ("\x1b", "\r", "\x07", "\x9b", "\u202e"):  # C1 and bidi too, which json.dumps keeps
        assert ch not in r.stdout, repr(ch)
    out = json.loads(r.stdout)
    assert out["results"][0]["text"] == "red \x1b[31mALERT\x1b[0m \x9b31m bell\x07 \u202eeman"


class _RunsCode:
    """Pickles as a call to os.system: what a hostile checkpoint holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_weights_are_refused_with_one_line(tmp_path: Path, photos: Path,
                                                   sample_collection: Path) -> None:
    """A model folder whose .bin weights hold a pickle that would run code: refused unloaded,
    shown as one line naming the fix (safetensors), exit code 1 (a model that cannot be loaded)."""
    import pickle

    from crossmodal_rag.testing import make_tiny_hf_clip, make_tiny_open_clip, make_tiny_t5

    marker = tmp_path / "code-ran"
    folders = {"oc": make_tiny_open_clip(tmp_path / "oc", seed=0), "hf": make_tiny_hf_clip(tmp_path / "hf", seed=0),
               "t5": make_tiny_t5(tmp_path / "t5", seed=0)}
    for key, folder in folders.items():
        for f in folder.iterdir():
            if f.suffix in (".safetensors", ".bin", ".pt", ".pth"):
                f.unlink()
        name = "open_clip_pytorch_model.bin" if key == "oc" else "pytorch_model.bin"
        (folder / name).write_bytes(pickle.dumps({"state_dict": _RunsCode(marker)}))
    for args in (["index", str(photos), "-c", str(tmp_path / "c1"), "--model", f"open_clip:local-dir:{folders['oc']}"],
                 ["index", str(photos), "-c", str(tmp_path / "c2"), "--model", f"hf:{folders['hf']}"],
                 ["ask", "what is this?", "-c", str(sample_collection), "--generator", str(folders["t5"])]):
        r = run(*args)
        assert r.returncode == 1, (args, r.stderr[-2000:])
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert "pickled" in errors[0] and ".safetensors" in errors[0], errors[0]
    assert not marker.exists()


def _tsv_unescape(field: str) -> str:
    """The text a TSV field stands for: ``\\\\`` a backslash, ``\\t`` ``\\n`` ``\\r`` those
    characters, ``\\xHH`` and ``\\uHHHH`` the code point."""
    import re

    named = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
    return re.sub(r"\\(x[0-9a-f]{2}|u[0-9a-f]{4}|.)",
                  lambda m: named.get(m.group(1)) or chr(int(m.group(1)[1:], 16)), field)


def test_backslashes_are_escaped_in_tsv_so_every_escape_is_unambiguous(tmp_path: Path, sample_dir: Path,
                                                                      tiny_oc_spec: str) -> None:
    """Issue 25 (an earlier note): a caption holding a backslash followed by "t" printed the same
    TSV as one holding a tab. Now a backslash is written ``\\\\``, so each field reads back to the
    exact text (whitespace runs aside)."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sample_dir / "cat.jpg", src / "back\\slash.jpg")
    captions = ["C:\\temp\\new \\t is not a tab", "an escape \\x1b and a real one \x1b end"]
    (src / "back\\slash.txt").write_text("\n".join(captions) + "\n")
    coll = tmp_path / "coll"
    assert run("index", str(src), "-c", str(coll), "--model", tiny_oc_spec).returncode == 0
    query = "path\\to \\t\tcat"  # a literal backslash-t, then a tab
    r = run("search", query, "-c", str(coll), "-k", "3", "--target", "all", "--mode", "dense")
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()[1:]]
    assert len(rows) == 3 and all(len(row) == 7 for row in rows)
    assert {_tsv_unescape(row[0]) for row in rows} == {query}
    assert {_tsv_unescape(row[5]) for row in rows} == {str(src / "back\\slash.jpg")}
    texts = {_tsv_unescape(row[6]) for row in rows}
    assert set(captions) <= texts and " | ".join(captions) in texts
    assert "C:\\\\temp\\\\new \\\\t is not a tab" in {row[6] for row in rows}
    assert {row[0] for row in rows} == {"path\\\\to \\\\t\\tcat"}
