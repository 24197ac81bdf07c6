"""Start-up: whole-process wall time of the commands people type first, against ``python -c pass``.

Each command runs in a fresh interpreter, as a user runs it; the commands take turns (round
robin, ``--runs`` rounds) so that a change in the machine's load falls on all of them alike, and
each row reports the median and the minimum wall time and the median's excess over
``python -c pass`` timed in the same rounds. Commands:

* ``python -c "import crossmodal_rag"``;
* ``crossmodal-rag --help`` (the console script), ``python -m crossmodal_rag --help`` and
  ``search --help``;
* ``info DIR`` and ``check DIR`` on the sample collection (15 photos, 48 captions) indexed with
  a tiny random open_clip model (built once, in a temp folder);
* ``demo`` offline with an empty model cache: asked (``CROSSMODAL_RAG_OFFLINE=1``), and with no
  such variable but a hub that cannot be reached (``HF_ENDPOINT`` at a closed local port); both
  must fail (exit 1) with the missing-weights message.

``--before DIR`` also times the same module commands (``python -m crossmodal_rag``) with
``PYTHONPATH=DIR``, e.g. an export of an earlier commit (``git archive COMMIT | tar -x -C DIR``),
in the same rounds. Targets (issue 17): ``--help`` within 0.3 s of ``python -c pass``, ``info``
within 0.6 s, the offline ``demo`` failure within 3 s of start.

Run:  python benchmarks/bench_startup.py --runs 7 [--before /tmp/before] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

REPO = Path(__file__).resolve().parents[1]
#: Label -> (seconds of excess over `python -c pass`, what it applies to).
TARGETS = {"help": 0.3, "info": 0.6}
DEMO_TARGET_S = 3.0


@dataclass
class Case:
    label: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    expect_rc: int = 0
    expect_text: str = ""  # must appear in stdout + stderr
    target: str = ""  # a key of TARGETS, "demo" (absolute), or ""
    times: list[float] = field(default_factory=list)


def tiny_collection(root: Path) -> Path:
    """The sample photos indexed with a tiny random open_clip model."""
    from crossmodal_rag import Collection
    from crossmodal_rag.testing import make_tiny_open_clip

    model = make_tiny_open_clip(root / "tiny-model", seed=0)
    folder = root / "sample"
    with Collection.create(folder, f"open_clip:local-dir:{model}") as coll:
        coll.add(REPO / "data" / "sample")
    return folder


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cases(coll: Path, root: Path, before: Path | None) -> list[Case]:
    py = sys.executable
    script = Path(py).parent / "crossmodal-rag"
    offline_base = {"HF_HOME": str(root / "empty-hf"), "XDG_CACHE_HOME": str(root / "empty-cache")}
    asked = {**offline_base, "CROSSMODAL_RAG_OFFLINE": "1"}
    unreachable = {**offline_base, "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    weights_msg = "could not load weights for"

    def module_cases(tag: str, extra_env: dict[str, str]) -> list[Case]:
        m = [py, "-m", "crossmodal_rag"]
        return [
            Case(f"{tag}import crossmodal_rag", [py, "-c", "import crossmodal_rag"], dict(extra_env)),
            Case(f"{tag}-m crossmodal_rag --help", [*m, "--help"], dict(extra_env), 0, "usage:", "help"),
            Case(f"{tag}search --help", [*m, "search", "--help"], dict(extra_env), 0, "usage:", "help"),
            Case(f"{tag}info DIR", [*m, "info", str(coll)], dict(extra_env), 0, "collection:", "info"),
            Case(f"{tag}check DIR", [*m, "check", str(coll)], dict(extra_env), 0, "ok:"),
            Case(f"{tag}demo, offline asked", [*m, "demo", "-c", str(root / "demo")], {**extra_env, **asked},
                 1, weights_msg, "demo"),
            Case(f"{tag}demo, hub unreachable", [*m, "demo", "-c", str(root / "demo")],
                 {**extra_env, **unreachable}, 1, weights_msg, "demo"),
        ]

    out = [Case("python -c pass", [py, "-c", "pass"])]
    if script.is_file():
        out.append(Case("crossmodal-rag --help", [str(script), "--help"], {}, 0, "usage:", "help"))
    out += module_cases("", {})
    if before is not None:
        out += module_cases("before: ", {"PYTHONPATH": str(before)})
    return out


def run_once(case: Case) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CROSSMODAL_RAG_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH")}
    env.update(case.env)
    t0 = time.perf_counter()
    r = subprocess.run(case.argv, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(),
                       timeout=600)
    elapsed = time.perf_counter() - t0
    if r.returncode != case.expect_rc or case.expect_text not in r.stdout + r.stderr:
        raise SystemExit(f"{case.label}: exit {r.returncode} (expected {case.expect_rc})\n{r.stdout}\n{r.stderr}")
    return elapsed


def verdict(case: Case, base: float) -> str:
    med = statistics.median(case.times)
    if case.target == "demo":
        return f"< {DEMO_TARGET_S:g} s: " + ("met" if med < DEMO_TARGET_S else "MISSED")
    if case.target in TARGETS:
        limit = TARGETS[case.target]
        return f"+{limit:g} s: " + ("met" if med - base <= limit else "MISSED")
    return ""


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7, help="rounds (each command once per round)")
    ap.add_argument("--before", type=Path, help="a source tree to time too (PYTHONPATH), e.g. an earlier commit")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="xmrag-startup-"))
    try:
        coll = tiny_collection(root)
        all_cases = cases(coll, root, args.before)
        load_before = load_average()
        meter = _common.CpuMeter()
        for _ in range(args.runs):
            for case in all_cases:
                case.times.append(run_once(case))
        cpu = meter.stop()
        load_after = load_average()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    _common.print_machine(_common.machine_info())
    print(f"# load average (1/5/15 min) before: {load_before}, after: {load_after}; "
          f"other processes' CPU during the runs: {100 * cpu['foreign_s'] / cpu['wall_s']:.0f}% of one core")
    base = statistics.median(all_cases[0].times)
    rows = []
    print(f"\n{args.runs} runs each, round robin; wall seconds of the whole process\n")
    print("| command | median s | min s | median - `python -c pass` s | target |")
    print("| --- | --- | --- | --- | --- |")
    for case in all_cases:
        med, low = statistics.median(case.times), min(case.times)
        rows.append({"command": case.label, "median_s": med, "min_s": low, "excess_s": med - base,
                     "times_s": case.times, "verdict": verdict(case, base)})
        print(f"| {case.label} | {med:.3f} | {low:.3f} | {med - base:+.3f} | {verdict(case, base)} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "load_before": load_before, "load_after": load_after,
                                         "cpu": cpu}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
