"""Fuzzing a collection's files (hypothesis): a manifest with any field of any JSON type, bound or
nesting, or cut or spliced as text; metadata rows with random bytes as vectors, undecodable or
NUL-bearing text, huge integers, damaged bookkeeping values. Reading such a collection (``info``,
``check``, searching, filtering, the fingerprint and calibration, a writable open) succeeds or
raises one of the library's own errors (:class:`~crossmodal_rag.errors.CrossmodalError`), each
within a time bound: never another exception, never a hang.

CROSSMODAL_RAG_FUZZ_EXAMPLES raises the number of cases (the default keeps the suite quick)."""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crossmodal_rag import Collection, fingerprint
from crossmodal_rag.errors import CrossmodalError
from crossmodal_rag.store.summary import read_summary

EXAMPLES = int(os.environ.get("CROSSMODAL_RAG_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=True)
#: Every reading of one damaged collection ends within this (seconds, on a loaded 2-core machine).
TIME_BOUND_S = 30.0
#: A hang is stopped outright (the process exits with the stacks of all threads) after this.
HARD_STOP_S = 180.0

# -- values a hostile file may hold ---------------------------------------------------------------
_STRINGS = st.sampled_from([
    "", "../../etc/passwd", "/etc/passwd", "index/../../x", "index/", "index//x", "embeddings/x",
    "a\x00b", "\ud800", "\x1b]0;owned\x07", "\u202etxt.exe", "index/image.1.faiss", "x" * 5000,
    "NaN", "1e999", "-1", "9" * 30, "Flat", "IVF1,Flat", "HNSW0", "auto", "0" * 64, "f" * 32,
])
_INTS = st.one_of(st.integers(-(2**70), 2**70),
                  st.sampled_from([0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63), 10**12, 10**30]))
_SCALARS = st.one_of(st.none(), st.booleans(), _INTS, st.floats(), st.text(max_size=30), _STRINGS)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=10) | _STRINGS, inner, max_size=4), max_leaves=12)
_DEEP = "\u0000deep\u0000"  # a placeholder value, replaced by deeply nested text after dumping


def _pristine_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


@st.composite
def manifest_texts(draw: st.DrawFn, base: dict[str, Any]) -> str:
    """The text of a damaged manifest: one to three fields replaced, removed or added at any
    depth, or the JSON text cut, spliced or nested deep."""
    data = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        node: Any = data
        while True:  # walk down a random path
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if not isinstance(child, (dict, list)) or draw(st.booleans()):
                break
            node = child
        if not keys:
            continue
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "deep"]))
        if action == "replace":
            node[key] = draw(_JSON)
        elif action == "delete" and isinstance(node, dict):
            del node[key]
        elif action == "add" and isinstance(node, dict):
            node[draw(st.text(max_size=10) | _STRINGS)] = draw(_JSON)
        elif action == "deep":
            node[key] = _DEEP
    text = json.dumps(data, indent=draw(st.sampled_from([None, 2])))
    depth = draw(st.sampled_from([2, 31, 33, 1000, 100_000]))
    text = text.replace(json.dumps(_DEEP), "[" * depth + "1" + "]" * depth)
    cut = draw(st.sampled_from(["none", "none", "truncate", "splice"]))
    if cut == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif cut == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(['"', "{", "]", "\\", "\x00", ",", "1e99999", "\udcff"])) + text[at:]
    return text


# -- metadata rows -------------------------------------------------------------------------------
_COLUMNS = {
    "items": ["id", "kind", "parent_id", "sha256", "text", "title", "ext_id", "origin", "width",
              "height", "format", "size_bytes", "extra", "added_at", "vector"],
    "paths": ["path", "item_id", "size_bytes", "mtime_ns", "added_at"],
}
_META_KEYS = ["generation", "schema_version", "next_item_id", "encoder_probe", "encoder_image_probe.v1",
              "calibration", "collection_id", "index_files", "unverified_shards"]
_SQL_VALUES = st.one_of(
    st.binary(max_size=200).map(lambda b: ("value", b)),
    st.binary(min_size=1, max_size=40).map(lambda b: ("text-bytes", b)),  # stored as TEXT, maybe not UTF-8
    st.text(max_size=40).map(lambda s: ("value", s)),
    st.sampled_from(["a\x00b", "\x1b[2J", "{", '{"a": ' * 5000, "[" * 5000, "[[1, 2], [3]]", "[[NaN]]",
                     "[[1e999]]", '{"generation": "x"}', "image", "window", "-5", "9" * 40, "abc",
                     '{"image": ["x"]}', '{"image": 5}']).map(lambda s: ("value", s)),
    _INTS.filter(lambda i: -(2**63) <= i < 2**63).map(lambda i: ("value", i)),
    st.floats(allow_nan=False).map(lambda f: ("value", f)),
    st.just(("value", None)),
)


#: Schema changes no writer of this library makes.
_DDL = [
    "CREATE VIEW v AS SELECT 1",
    "CREATE TRIGGER t AFTER UPDATE ON meta BEGIN DELETE FROM items; END",
    "ALTER TABLE items RENAME TO items_old; CREATE VIEW items AS SELECT * FROM items_old",
    "ALTER TABLE paths RENAME TO paths_old; CREATE TABLE paths (path TEXT)",
    "ALTER TABLE items DROP COLUMN title",
    "DROP TABLE paths",
    "DROP TABLE meta",
    "CREATE TABLE unrelated (x)",
    "CREATE INDEX items_len ON items(length(text))",
    "DROP INDEX items_kind",
]


@st.composite
def sql_damage(draw: st.DrawFn) -> list[tuple[str, tuple[Any, ...]]]:
    """One to three statements setting a column of a row (or a meta value) to a hostile value,
    sometimes a schema change too."""
    statements = []
    if draw(st.integers(0, 7)) == 0:
        for ddl in draw(st.sampled_from(_DDL)).split("; "):
            statements.append((ddl, ()))
    for _ in range(draw(st.integers(1, 3))):
        kind, value = draw(_SQL_VALUES)
        expr = "CAST(? AS TEXT)" if kind == "text-bytes" else "?"
        if draw(st.integers(0, 3)) == 0:
            key = draw(st.sampled_from(_META_KEYS))
            statements.append((f"INSERT OR REPLACE INTO meta(key, value) VALUES (?, {expr})", (key, value)))
            continue
        table = draw(st.sampled_from(sorted(_COLUMNS)))
        column = draw(st.sampled_from(_COLUMNS[table]))
        row = draw(st.integers(1, 70))
        statements.append((f"UPDATE {table} SET {column} = {expr} WHERE rowid = ?", (value, row)))
    return statements


def _apply_sql(folder: Path, statements: list[tuple[str, tuple[Any, ...]]]) -> None:
    conn = sqlite3.connect(folder / "metadata.sqlite", isolation_level=None)
    try:
        conn.execute("PRAGMA ignore_check_constraints = ON")
        for sql, params in statements:
            with contextlib.suppress(sqlite3.DatabaseError):  # NOT NULL, UNIQUE: left as it was
                conn.execute(sql, params)
    finally:
        conn.close()


# -- reading a damaged collection ----------------------------------------------------------------
def _attempt(outcomes: dict[str, str], name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``: success, or one of the library's errors with a message, is all that may happen."""
    try:
        result = fn()
    except CrossmodalError as e:
        assert str(e).strip(), f"{name}: {type(e).__name__} without a message"
        outcomes[name] = type(e).__name__
        return None
    outcomes[name] = "ok"
    return result


def _read_everything(folder: Path, *, writable: bool = False) -> dict[str, str]:
    """Every way of reading the collection at ``folder``; returns what each one did."""
    from crossmodal_rag.cli import main

    outcomes: dict[str, str] = {}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        outcomes["cli info"] = str(main(["-q", "info", str(folder)]))
        outcomes["cli info --json"] = str(main(["-q", "info", str(folder), "--json"]))
    assert outcomes["cli info"] in ("0", "1") and outcomes["cli info --json"] in ("0", "1"), outcomes
    _attempt(outcomes, "info", lambda: read_summary(folder))
    coll = _attempt(outcomes, "open", lambda: Collection.open(folder))
    if coll is not None:
        with coll:
            query = np.random.default_rng(0).standard_normal((1, coll.manifest.dim)).astype(np.float32)
            query /= np.linalg.norm(query)
            _attempt(outcomes, "check", coll.check)
            _attempt(outcomes, "search", lambda: [coll.get([h.id for h in hits]) for hits in
                                                  coll.search_vectors(query, k=70, target="all")])
            _attempt(outcomes, "filter", lambda: coll.search_vectors(query, k=5, where="width>=1"))
            _attempt(outcomes, "fingerprint", lambda: fingerprint.read(coll.store))
            _attempt(outcomes, "calibration", lambda: coll.resolve_min_score(
                "auto", query_is_image=False, target="images"))
            _attempt(outcomes, "info()", coll.info)
    if writable:
        def write() -> None:
            with Collection.open(folder, writable=True) as c:
                c.persist()
        _attempt(outcomes, "writable open", write)
    log = os.environ.get("CROSSMODAL_RAG_FUZZ_LOG")
    if log:  # a census of what the readers did (benchmarks/RESULTS.md counts them)
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(outcomes) + "\n")
    return outcomes


@contextlib.contextmanager
def _damaged_copy(source: Path) -> Any:
    with tempfile.TemporaryDirectory(prefix="fuzz-coll-") as tmp:
        dest = Path(tmp) / "coll"
        shutil.copytree(source, dest, ignore=shutil.ignore_patterns(".lock"))
        faulthandler.dump_traceback_later(HARD_STOP_S, exit=True)
        start = time.monotonic()
        try:
            yield dest
        finally:
            faulthandler.cancel_dump_traceback_later()
        assert time.monotonic() - start < TIME_BOUND_S, "reading one damaged collection took too long"


@pytest.fixture(scope="module")
def pristine(sample_collection: Path) -> dict[str, Any]:
    return _pristine_manifest(sample_collection)


def test_fuzz_manifest(sample_collection: Path, pristine: dict[str, Any]) -> None:
    @FUZZ
    @given(text=manifest_texts(pristine))
    def run(text: str) -> None:
        with _damaged_copy(sample_collection) as folder:
            (folder / "manifest.json").write_text(text, encoding="utf-8", errors="surrogatepass")
            outcomes = _read_everything(folder)
            if outcomes["info"] != "ok":  # a refused manifest: every reader refuses it alike
                assert outcomes["open"] == "CollectionError" and outcomes["cli info"] == "1", outcomes

    run()


def test_fuzz_metadata_rows(sample_collection: Path) -> None:
    @FUZZ
    @given(statements=sql_damage())
    def run(statements: list[tuple[str, tuple[Any, ...]]]) -> None:
        with _damaged_copy(sample_collection) as folder:
            _apply_sql(folder, statements)
            outcomes = _read_everything(folder, writable=True)
            # the CLI and the library read the same summary, and agree on whether it can be read
            assert outcomes["cli info"] == outcomes["cli info --json"] == ("0" if outcomes["info"] == "ok" else "1"), outcomes
            if outcomes["open"] != "ok":  # a collection that does not open is refused by every reader alike
                assert outcomes["open"] == "CollectionError" and "check" not in outcomes, outcomes

    run()
