"""Crash-safety trials: SIGKILL `index` (creation and ingest), `remove` and `reindex` mid-phase.

Each trial starts the real CLI in a subprocess with ``CROSSMODAL_RAG_PHASE_FILE`` set, so the
library appends a line at the start and end of every phase (``create``, its ``create.folder``,
``ingest``, ``remove``, ``reindex`` and the ``persist`` each ends with). The trial waits for the
phase it aims at to start, sleeps a random part of that phase's calibrated duration (up to 1.2x,
so some kills land after it), and sends SIGKILL. Where the kill landed is read back from the
child's own markers: *mid* (the aimed phase was open), *before* or *after* it.

After every kill: the collection folder is either absent or a collection (never half-made); it
opens and passes `check`; every item whose commit the trial saw in SQLite just before the kill
is there, and nothing else (no duplicates, no item outside the source); a killed `remove` removed
all of its ids or none; a killed `reindex` kept every id searchable. Then the job is finished
(`index` again through the CLI after a killed creation; in this process otherwise) and the
result must be exactly the expected collection, with no staging or build leftovers.

    python benchmarks/crash_trials.py --trials 4 --out-json crash.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from crossmodal_rag import Collection
from crossmodal_rag._phases import PHASE_FILE_ENV
from crossmodal_rag.ingestion.importer import import_embeddings
from crossmodal_rag.ingestion.runner import IngestSettings, ingest
from crossmodal_rag.testing import make_tiny_open_clip

ENV = {**os.environ, "CROSSMODAL_RAG_OFFLINE": "1"}
#: What each operation's trials aim at: a phase, or a phase nested in another (a path).
AIMS = {
    "create": ("create", "create/create.folder", "create/create.folder/persist"),
    "ingest": ("ingest", "ingest/persist"),
    "remove": ("remove", "remove/persist"),
    "reindex": ("reindex", "reindex/persist"),
}
REINDEX_SPECS = ("IVF32,Flat", "HNSW16", "IVF16,PQ8np", "Flat")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "crossmodal_rag", "-q", *args]


def make_source(folder: Path, n: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"picture number {i}\nrandom noise {i}\n")
    (folder / "dup.png").write_bytes((folder / "img000.png").read_bytes())


# -- phase markers ----------------------------------------------------------------------------
def read_markers(path: Path) -> list[tuple[str, str, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        event, name, _pid, t = line.split()
        out.append((event, name, float(t)))
    return out


def open_paths(markers: list[tuple[str, str, float]]) -> tuple[list[str], dict[str, list[float]]]:
    """The phases open after ``markers`` (outermost first), and every closed phase path's
    durations (e.g. ``"ingest/persist": [0.01]``)."""
    stack: list[tuple[str, float]] = []
    durations: dict[str, list[float]] = {}
    for event, name, t in markers:
        if event == "start":
            stack.append((name, t))
            continue
        while stack:  # an inner phase without its end marker cannot happen; be lenient anyway
            top, started = stack.pop()
            if top == name:
                path = "/".join([s[0] for s in stack] + [name])
                durations.setdefault(path, []).append(t - started)
                break
    return [s[0] for s in stack], durations


def landing(markers: list[tuple[str, str, float]], aim: str) -> str:
    """``mid``, ``before`` or ``after`` the aimed phase path, at the last marker."""
    stack, durations = open_paths(markers)
    parts = aim.split("/")
    if stack[: len(parts)] == parts:
        return "mid"
    return "after" if aim in durations else "before"


@dataclass
class Kill:
    aim: str
    landed: str  # mid / before / after (the aimed phase), from the child's markers
    open_at_kill: str  # the phases open at the kill, e.g. "ingest/persist" ("" when none)
    killed: bool  # False: the child had already exited by itself
    observed: Any = None  # what the trial read in SQLite just before the kill


def kill_during(cmd: list[str], aim: str, duration: float, markers: Path, rng: random.Random,
                observe: Callable[[], Any] | None = None) -> Kill:
    markers.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env={**ENV, PHASE_FILE_ENV: str(markers)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = aim.split("/")
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        if open_paths(read_markers(markers))[0][: len(parts)] == parts:
            break
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 1.2 * duration))
    observed = observe() if observe else None
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = read_markers(markers)
    stack, _ = open_paths(seen)
    return Kill(aim, landing(seen, aim), "/".join(stack), killed, observed)


# -- reading a collection behind the library's back ------------------------------------------
def committed_shas(folder: Path) -> set[str]:
    """Image hashes committed in SQLite right now (read-only; empty if there is no file yet)."""
    db = folder / "metadata.sqlite"
    if not db.is_file():
        return set()
    try:
        conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            return {r[0] for r in conn.execute("SELECT sha256 FROM items WHERE kind = 'image'")}
        finally:
            conn.close()
    except sqlite3.DatabaseError:  # e.g. the schema is not there yet
        return set()


def state(folder: Path) -> tuple[list[str], set[int], list[str]]:
    """(check problems, image ids, image hashes with repeats) of the collection at ``folder``."""
    with Collection.open(folder) as c:
        report = c.check()
        ids = set(c.store.ids("image").tolist())
        shas = [r[0] for r in c.store.conn.execute("SELECT sha256 FROM items WHERE kind = 'image'")]
    return report.problems, ids, shas


def leftovers(folder: Path) -> list[str]:
    """Staging folders beside ``folder`` and build or temporary files inside it."""
    out = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.creating-")]
    index = folder / "index"
    if index.is_dir():
        out += [p.name for p in index.iterdir() if p.name.startswith(".build") or p.name.endswith(".tmp")]
    return out


# -- the trials ----------------------------------------------------------------------------
@dataclass
class Trials:
    work: Path
    spec: str
    src: Path
    n: int
    rng: random.Random
    durations: dict[str, float] = field(default_factory=dict)
    kills: list[dict[str, Any]] = field(default_factory=list)

    def index_cmd(self, coll: Path) -> list[str]:
        return cli("index", str(self.src), "-c", str(coll), "--model", self.spec, "--batch-size", "2",
                   "--workers", "0")

    def calibrate(self, cmd: list[str], name: str) -> None:
        markers = self.work / f"calib-{name}.markers"
        subprocess.run(cmd, env={**ENV, PHASE_FILE_ENV: str(markers)}, check=True, capture_output=True)
        for path, times in open_paths(read_markers(markers))[1].items():
            self.durations.setdefault(path, max(times))

    def record(self, op: str, trial: int, kill: Kill, failures: list[str]) -> None:
        entry = {"operation": op, "trial": trial, **asdict(kill), "failures": failures}
        entry.pop("observed")
        self.kills.append(entry)
        status = "FAIL " + "; ".join(failures) if failures else "ok"
        print(f"{op:8s} #{trial:<3d} aim {kill.aim:30s} landed {kill.landed:6s} "
              f"open [{kill.open_at_kill}] {status}", flush=True)

    def expected_shas(self) -> set[str]:
        return committed_shas(self.work / "full")

    # create: `index` into a new folder, killed while the collection is being made
    def create(self, trial: int, aim: str) -> None:
        coll = self.work / f"c{trial}" / "coll"
        coll.parent.mkdir()
        kill = kill_during(self.index_cmd(coll), aim, self.durations[aim], self.work / "m", self.rng)
        failures: list[str] = []
        if coll.exists():
            if not (coll / "manifest.json").is_file():
                failures.append(f"half-made folder: {sorted(p.name for p in coll.iterdir())}")
            else:
                failures += self._consistent(coll, set())
        r = subprocess.run(self.index_cmd(coll), env=ENV, capture_output=True, text=True)
        if r.returncode != 0:
            failures.append(f"index again failed: {r.stderr.strip()[-300:]}")
        else:
            failures += self._complete(coll)
        self.record("create", trial, kill, failures)
        shutil.rmtree(coll.parent)

    # ingest: `index` into an existing empty collection, killed mid-ingest
    def ingest(self, trial: int, aim: str) -> None:
        coll = self.work / f"i{trial}"
        shutil.copytree(self.work / "empty", coll, ignore=shutil.ignore_patterns(".lock"))
        kill = kill_during(self.index_cmd(coll), aim, self.durations[aim], self.work / "m", self.rng,
                           observe=lambda: committed_shas(coll))
        failures = self._consistent(coll, kill.observed)
        with Collection.open(coll, writable=True) as c:
            ingest(c, self.src, IngestSettings(batch_size=2, workers=0, progress=False))
        failures += self._complete(coll)
        self.record("ingest", trial, kill, failures)
        shutil.rmtree(coll)

    # remove: 20 random ids, killed mid-remove: all or none are gone
    def remove(self, trial: int, aim: str, full_ids: set[int]) -> None:
        coll = self.work / f"r{trial}"
        shutil.copytree(self.work / "full", coll, ignore=shutil.ignore_patterns(".lock"))
        victims = set(self.rng.sample(sorted(full_ids), 20))

        def gone_in_sqlite() -> bool:
            return committed_shas(coll) != self.expected_shas()

        kill = kill_during(cli("remove", *map(str, sorted(victims)), "-c", str(coll)), aim,
                           self.durations[aim], self.work / "m", self.rng, observe=gone_in_sqlite)
        problems, ids, _ = state(coll)
        failures = [f"check: {p}" for p in problems]
        gone = full_ids - ids
        if gone not in (set(), victims):
            failures.append(f"partial remove: {len(gone)} of {len(victims)} gone")
        if kill.observed and gone != victims:
            failures.append("a committed remove was undone")
        with Collection.open(coll, writable=True) as c:
            c.remove(ids=sorted(victims & ids))
        problems, ids, _ = state(coll)
        failures += [f"check after resume: {p}" for p in problems]
        if ids != full_ids - victims:
            failures.append("wrong ids after resume")
        if leftovers(coll):
            failures.append(f"leftovers: {leftovers(coll)}")
        self.record("remove", trial, kill, failures)
        shutil.rmtree(coll)

    # reindex: a rebuild to another index type, killed mid-build or mid-persist
    def reindex(self, trial: int, aim: str, queries: np.ndarray) -> None:
        coll = self.work / f"x{trial}"
        shutil.copytree(self.work / "vectors", coll, ignore=shutil.ignore_patterns(".lock"))
        spec = REINDEX_SPECS[trial % len(REINDEX_SPECS)]
        with Collection.open(coll) as c:
            want = c.store.ids("image")
        cmd = cli("reindex", str(coll), "--index", spec, "--sharded" if spec.startswith("IVF") else "--no-sharded")
        kill = kill_during(cmd, aim, self.durations[aim], self.work / "m", self.rng)
        failures: list[str] = []
        with Collection.open(coll) as c:
            failures += [f"check: {p}" for p in c.check().problems]
            if not np.array_equal(c.indexes["image"].ids(), want):
                failures.append("index ids changed")
            if len(c.search_vectors(queries, k=5)[0]) != 5:
                failures.append("search found fewer than 5")
            if kill.landed == "after" and c.manifest.index_types["image"] != spec:
                failures.append(f"finished reindex not in service ({c.manifest.index_types['image']})")
        with Collection.open(coll, writable=True) as c:
            c.reindex(spec)
        with Collection.open(coll) as c:
            failures += [f"check after resume: {p}" for p in c.check().problems]
            if c.manifest.index_types["image"] != spec:
                failures.append("resumed reindex did not take")
        if leftovers(coll):
            failures.append(f"leftovers: {leftovers(coll)}")
        self.record("reindex", trial, kill, failures)
        shutil.rmtree(coll)

    def _consistent(self, coll: Path, committed: set[str]) -> list[str]:
        problems, _, shas = state(coll)
        failures = [f"check: {p}" for p in problems]
        if len(shas) != len(set(shas)):
            failures.append("duplicate items")
        if committed - set(shas):
            failures.append(f"{len(committed - set(shas))} committed item(s) lost")
        if set(shas) - self.expected_shas():
            failures.append("items from nowhere")
        return failures

    def _complete(self, coll: Path) -> list[str]:
        failures = self._consistent(coll, set())
        _, ids, shas = state(coll)
        if set(shas) != self.expected_shas() or len(ids) != self.n:
            failures.append(f"{len(ids)} images after finishing, expected {self.n}")
        if leftovers(coll):
            failures.append(f"leftovers: {leftovers(coll)}")
        return failures


def summarise(kills: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for op, aims in AIMS.items():
        for aim in aims:
            mine = [k for k in kills if k["operation"] == op and k["aim"] == aim]
            if mine:
                rows.append({"operation": op, "aim": aim, "trials": len(mine),
                             **{w: sum(k["landed"] == w and k["killed"] for k in mine)
                                for w in ("mid", "before", "after")},
                             "exited": sum(not k["killed"] for k in mine),
                             "failures": sum(bool(k["failures"]) for k in mine)})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| operation | phase aimed at | trials | kills mid-phase | before it | after it | "
             "child had exited | failures |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| `{r['operation']}` | `{r['aim']}` | {r['trials']} | {r['mid']} | {r['before']} | "
                     f"{r['after']} | {r['exited']} | **{r['failures']}** |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=4, help="trials per aimed phase")
    ap.add_argument("--images", type=int, default=40)
    ap.add_argument("--vectors", type=int, default=4000, help="vectors of the reindex collection")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only", choices=list(AIMS), action="append", help="run these operations only")
    ap.add_argument("--out-json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="xmr-crash-"))
    t0 = time.perf_counter()
    try:
        spec = f"open_clip:local-dir:{make_tiny_open_clip(work / 'model')}"
        src = work / "src"
        make_source(src, args.images)
        t = Trials(work, spec, src, args.images, random.Random(args.seed))
        t.calibrate(t.index_cmd(work / "full"), "index")
        with Collection.open(work / "full") as c:
            full_ids = set(c.store.ids("image").tolist())
            dim = c.manifest.dim
        assert len(full_ids) == args.images and len(t.expected_shas()) == args.images
        Collection.create(work / "empty", spec).close()
        probe = work / "probe"
        shutil.copytree(work / "full", probe, ignore=shutil.ignore_patterns(".lock"))
        t.calibrate(cli("remove", *map(str, sorted(full_ids)[:20]), "-c", str(probe)), "remove")
        rng = np.random.default_rng(3)
        centres = rng.normal(size=(20, dim))
        x = centres[rng.integers(0, 20, args.vectors)] + 0.5 * rng.normal(size=(args.vectors, dim))
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        emb = work / "emb"
        emb.mkdir()
        np.save(emb / "part.npy", x)
        (emb / "part.jsonl").write_text("".join(json.dumps({"image_path": f"{i}.jpg"}) + "\n"
                                                for i in range(args.vectors)))
        import_embeddings(emb, work / "vectors", spec, progress=False, verify=0)
        t.calibrate(cli("reindex", str(work / "vectors"), "--index", "IVF32,Flat", "--sharded"), "reindex")
        print("calibrated phase durations (s):",
              json.dumps({k: round(v, 3) for k, v in sorted(t.durations.items())}), flush=True)

        ops = args.only or list(AIMS)
        for trial in range(args.trials * max(len(a) for a in AIMS.values())):
            for op in ops:
                aims = AIMS[op]
                if trial >= args.trials * len(aims):
                    continue
                aim = aims[trial % len(aims)]
                if op == "create":
                    t.create(trial, aim)
                elif op == "ingest":
                    t.ingest(trial, aim)
                elif op == "remove":
                    t.remove(trial, aim, full_ids)
                else:
                    t.reindex(trial, aim, x[:1])
        rows = summarise(t.kills)
        print(markdown(rows))
        seconds = time.perf_counter() - t0
        print(f"{len(t.kills)} trials in {seconds:.0f} s")
        if args.out_json:
            Path(args.out_json).write_text(json.dumps({
                "date": date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "python": platform.python_version(), "args": vars(args), "seconds": round(seconds, 1),
                "phase_durations_s": t.durations, "rows": rows, "kills": t.kills}, indent=2))
        sys.exit(1 if any(k["failures"] for k in t.kills) else 0)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
