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

from crossmodal_rag import Collection
from crossmodal_rag.errors import CrossmodalError
from crossmodal_rag.maintenance import fingerprint
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
              "calibration", "collection_id", "index_files", "unverified_shards", "shard_files"]
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


# -- stored vectors (issue 25): float16 shards and text spaces ----------------------------------------
#: Cases of the vector generators (each reindexes and repairs too: slower than a read).
VECTOR_EXAMPLES = max(8, EXAMPLES // 4)
VECTOR_FUZZ = settings(max_examples=VECTOR_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                       derandomize=True)
_ROW_DAMAGE = ["nan", "inf", "-inf", "zero", "denormal", "half", "triple", "huge", "bits"]


def _damaged_row(kind: str, row: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A float16 row damaged one way (never still a unit vector)."""
    out = row.astype(np.float16)
    if kind in ("nan", "inf", "-inf"):
        out[rng.integers(0, len(out))] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[kind]
    elif kind == "zero":
        out[:] = 0
    elif kind == "denormal":
        out[:] = np.float16(6e-8)  # the smallest subnormal float16
    elif kind in ("half", "triple"):
        with np.errstate(all="ignore"):  # a row damaged twice may hold infinity already
            out = (row * (0.5 if kind == "half" else 3.0)).astype(np.float16)
    elif kind == "huge":
        out[:] = np.float16(65504)
    else:  # random bits: NaN and infinity included
        out = rng.integers(0, 2**16, len(out), dtype=np.uint16).view(np.float16)
        if np.isfinite(out).all() and abs(np.linalg.norm(out.astype(np.float32)) - 1) < 0.05:
            out[0] = np.nan
    return out


@st.composite
def shard_damage(draw: st.DrawFn) -> dict[str, Any]:
    """Damage to one index's float16 shard: rows of bad values (NaN, infinity, zero, denormal,
    rescaled, random bits), a shard of another dimension or dtype, a cut file, or an id moved
    out of the collection."""
    damage: dict[str, Any] = {"name": draw(st.sampled_from(["image", "text"])),
                              "kind": draw(st.sampled_from(["rows", "rows", "rows", "dim", "dtype", "cut", "ids"]))}
    if damage["kind"] == "rows":
        damage["rows"] = draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(_ROW_DAMAGE)),
                                       min_size=1, max_size=4))
    elif damage["kind"] == "dim":
        damage["factor"] = draw(st.sampled_from([0.5, 2.0, "minus one", "plus one", "one"]))
    elif damage["kind"] == "dtype":
        damage["dtype"] = draw(st.sampled_from(["float32", "float64", "int8", "uint16"]))
    elif damage["kind"] == "cut":
        damage["keep"] = draw(st.floats(0.0, 0.99))
    else:
        damage["id"] = draw(st.sampled_from([-5, 0, 2**62, -(2**63)]))
    damage["seed"] = draw(st.integers(0, 2**16))
    return damage


def _apply_shard_damage(folder: Path, damage: dict[str, Any]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    shard = manifest["embeddings"][damage["name"]][0]
    vec_path, ids_path = folder / shard["path"], folder / shard["ids_path"]
    vecs, ids = np.load(vec_path), np.load(ids_path)
    rng = np.random.default_rng(damage["seed"])
    kind = damage["kind"]
    if kind == "rows":
        for at, how in damage["rows"]:
            vecs[at % len(vecs)] = _damaged_row(how, vecs[at % len(vecs)].astype(np.float32), rng)
        np.save(vec_path, vecs)
    elif kind == "dim":
        d = vecs.shape[1]
        f = damage["factor"]
        new = {"minus one": d - 1, "plus one": d + 1, "one": 1}.get(f) if isinstance(f, str) else int(d * f)
        np.save(vec_path, np.resize(vecs, (len(vecs), new)).astype(np.float16))
    elif kind == "dtype":
        np.save(vec_path, vecs.astype(damage["dtype"]))
    elif kind == "cut":
        data = vec_path.read_bytes()
        vec_path.write_bytes(data[: int(len(data) * damage["keep"])])
    else:
        ids[rng.integers(0, len(ids))] = damage["id"]
        np.save(ids_path, ids)


def _check_then_repair(folder: Path, what: str) -> None:
    """`check` flags the damage; `reindex` refuses it (naming the fix) or rebuilds it; `reindex
    --repair` always ends in a collection that passes `check` and answers searches."""
    with Collection.open(folder) as c:
        report = c.check()
        assert not report.ok, f"{what}: check did not flag it"
    try:
        with Collection.open(folder, writable=True) as c:
            c.reindex(tune=False)
    except CrossmodalError as e:
        assert "reindex --repair" in str(e), f"{what}: {e}"
    else:
        with Collection.open(folder) as c:
            assert c.check().ok, (what, c.check().problems)
    with Collection.open(folder, writable=True) as c:
        c.reindex(tune=False, repair=True)
    with Collection.open(folder) as c:
        report = c.check()
        assert report.ok, (what, report.problems)
        query = c.store.vectors(c.store.ids("image")[:1].tolist(), c.manifest.dim)
        hits = c.search_vectors(query, k=5, target="all")[0]
        assert len(hits) == 5 and hits[0].score > 0.99, (what, hits)


def test_fuzz_float16_shards(sample_collection: Path) -> None:
    @VECTOR_FUZZ
    @given(damage=shard_damage())
    def run(damage: dict[str, Any]) -> None:
        with _damaged_copy(sample_collection) as folder:
            _apply_shard_damage(folder, damage)
            _read_everything(folder, writable=True)  # succeed, or one of the library's errors
            _check_then_repair(folder, json.dumps(damage))

    run()


@pytest.fixture(scope="module")
def text_space_collection(tmp_path_factory: pytest.TempPathFactory, tiny_oc_spec: str, sample_dir: Path) -> Path:
    from sentence_models import make_text_space_collection

    return make_text_space_collection(tmp_path_factory.mktemp("fuzz-ts"), tiny_oc_spec, sample_dir,
                                      ["the red bridge crosses the river", "a cargo ship carried salt",
                                       "comet seen every ten years"], seed=5)


_TS_FIELDS = ["format", "spec", "dim", "count", "probe", "collection_id", "vectors", "ids"]


@st.composite
def text_space_damage(draw: st.DrawFn) -> dict[str, Any]:
    """A hostile text space: its probe NaN, infinite, zero or of another shape; its collection id
    blank, missing or another's; ids of images, duplicated or outside the collection; vectors of
    bad values; another dimension; or any manifest field replaced by any JSON value."""
    kind = draw(st.sampled_from(["probe", "collection_id", "ids", "vectors", "dim", "field", "cut"]))
    damage: dict[str, Any] = {"kind": kind, "seed": draw(st.integers(0, 2**16))}
    if kind == "probe":
        damage["how"] = draw(st.sampled_from(["nan", "inf", "zero", "row", "column", "text", "scaled"]))
    elif kind == "collection_id":
        damage["value"] = draw(st.sampled_from(["", " ", None, "missing", "0" * 32, 5, "x" * 1000]))
    elif kind == "ids":
        damage["how"] = draw(st.sampled_from(["image", "duplicate", "negative", "huge"]))
    elif kind == "vectors":
        damage["rows"] = draw(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(_ROW_DAMAGE)),
                                       min_size=1, max_size=3))
    elif kind == "dim":
        damage["dim"] = draw(st.sampled_from([0, 1, 31, 33, 10**9, "32", None]))
    elif kind == "cut":
        damage["file"] = draw(st.sampled_from(["ids", "vectors"]))
        damage["keep"] = draw(st.floats(0.0, 0.99))
    else:
        damage["field"] = draw(st.sampled_from(_TS_FIELDS))
        damage["value"] = draw(_JSON)
    return damage


def _apply_text_space_damage(folder: Path, damage: dict[str, Any], image_ids: np.ndarray) -> None:
    from crossmodal_rag.search.text_space import array_files

    space = folder / "text_space"
    manifest = json.loads((space / "manifest.json").read_text())
    ids_file, vectors_file = array_files(space, manifest)
    ids, vectors = np.load(ids_file), np.load(vectors_file)
    rng = np.random.default_rng(damage["seed"])
    kind = damage["kind"]
    if kind == "probe":
        probe = np.asarray(manifest["probe"], np.float64)
        how = damage["how"]
        manifest["probe"] = ({"nan": np.full_like(probe, np.nan).tolist(), "inf": np.full_like(probe, np.inf).tolist(),
                              "zero": np.zeros_like(probe).tolist(), "row": probe[:-1].tolist(),
                              "column": probe[:, :-1].tolist(), "text": "probe", "scaled": (probe * 2).tolist()}[how])
    elif kind == "collection_id":
        if damage["value"] == "missing":
            manifest.pop("collection_id", None)
        else:
            manifest["collection_id"] = damage["value"]
    elif kind == "ids":
        at = rng.integers(0, len(ids))
        ids[at] = {"image": int(image_ids[0]), "duplicate": int(ids[(at + 1) % len(ids)]), "negative": -7,
                   "huge": 2**62}[damage["how"]]
        np.save(ids_file, np.sort(ids))
    elif kind == "vectors":
        for at, how in damage["rows"]:
            vectors[at % len(vectors)] = _damaged_row(how, vectors[at % len(vectors)], rng).astype(np.float32)
        np.save(vectors_file, vectors)
    elif kind == "dim":
        manifest["dim"] = damage["dim"]
    elif kind == "cut":
        path = ids_file if damage["file"] == "ids" else vectors_file
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * damage["keep"])])
    else:
        manifest[damage["field"]] = damage["value"]
    (space / "manifest.json").write_text(json.dumps(manifest))


def _spec_parses(folder: Path) -> bool:
    from crossmodal_rag.encoders.sentence import parse_text_model_spec

    spec = json.loads((folder / "text_space" / "manifest.json").read_text()).get("spec")
    try:
        return isinstance(spec, str) and parse_text_model_spec(spec) is not None
    except CrossmodalError:
        return False


def test_fuzz_text_spaces(text_space_collection: Path) -> None:
    from crossmodal_rag.cli import main
    from crossmodal_rag.search.text_space import open_text_space
    from crossmodal_rag.search.text_space_audit import check_text_space

    with Collection.open(text_space_collection) as c:
        image_ids = c.store.ids("image")

    @VECTOR_FUZZ
    @given(damage=text_space_damage())
    def run(damage: dict[str, Any]) -> None:
        what = json.dumps(damage, default=str)[:300]
        with _damaged_copy(text_space_collection) as folder:
            _apply_text_space_damage(folder, damage, image_ids)
            outcomes = _read_everything(folder)
            with Collection.open(folder) as c:
                opened = _attempt(outcomes, "open text space", lambda: open_text_space(c))
                _attempt(outcomes, "text search", lambda: c.search("a ship", k=3, target="texts", mode="dense"))
                problems, _ = check_text_space(folder, c.store, load_model=False)
                if outcomes["open text space"] != "ok":
                    assert outcomes["open text space"] == "CollectionError", (what, outcomes)
                    assert outcomes["text search"] != "ok", (what, outcomes)
                    # check flags it too, unless only the model it names is not here (then check
                    # notes the probe as not verified: a model missing here is not damage)
                    assert problems or not _spec_parses(folder), (what, outcomes)
                elif opened is not None:  # used: it keeps every rule
                    assert np.isfinite(opened.vectors).all() and not np.isin(opened.ids, image_ids).any(), what
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                code = main(["-q", "reindex", str(folder)])
            if code == 0:  # rebuilt (or kept): usable and in step
                with Collection.open(folder) as c:
                    space = open_text_space(c)
                    assert space is None or np.array_equal(space.ids, c.store.ids("text")), what
                    assert not check_text_space(folder, c.store, load_model=False)[0], what
            else:  # only when the model it names cannot be read: said so
                assert outcomes["open text space"] != "ok", (what, code)

    run()
