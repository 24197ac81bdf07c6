"""Shared helpers for the benchmarks: the cached random ViT-B-32 model and machine facts."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

DEFAULT_MODEL_DIR = Path(os.environ.get("XMRAG_BENCH_MODEL_DIR", "/tmp/xmrag-bench/vit-b-32-random"))


def vit_b32_random(folder: Path = DEFAULT_MODEL_DIR, seed: int = 0) -> str:
    """An ``open_clip:local-dir:`` spec for a random model with open_clip's ViT-B-32 config.

    Saved once (about 600 MB) and reused by later runs.
    """
    import open_clip

    from crossmodal_rag.testing import make_tiny_open_clip

    folder = Path(folder)
    if not (folder / "open_clip_model.safetensors").is_file():
        cfg = open_clip.get_model_config("ViT-B-32")
        assert cfg is not None, "open_clip has no ViT-B-32 config"
        make_tiny_open_clip(folder, seed=seed, model_cfg=cfg)
    return f"open_clip:local-dir:{folder}"


def machine_info() -> dict[str, object]:
    """nproc, CPU model, RAM, date and library versions, for RESULTS.md."""
    import faiss
    import numpy
    import open_clip
    import PIL
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import crossmodal_rag

        lib_version = crossmodal_rag.__version__
    except Exception:  # pragma: no cover
        lib_version = "?"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": ram_gib,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "open_clip": open_clip.__version__,
        "faiss": faiss.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "crossmodal_rag": lib_version,
        "git_commit": commit,
        "argv": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def print_machine(info: dict[str, object]) -> None:
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()))


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return statistics.median(values)


class CpuMeter:
    """CPU used on the whole machine vs by this process (and its waited-for children) over a span.

    ``foreign_s`` is CPU time spent by other processes (e.g. a test suite running beside the
    benchmark); ``steal_s`` is time the hypervisor gave to other guests. Either being large means
    the span's timing is disturbed. Linux only (``/proc/stat``); elsewhere both read as NaN.
    """

    def __init__(self) -> None:
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start()

    @staticmethod
    def _stat() -> tuple[float, float] | None:
        try:
            with open("/proc/stat") as f:
                fields = [float(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
        steal = fields[7] if len(fields) > 7 else 0.0
        busy = sum(fields[:8]) - idle - steal
        return busy, steal

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def start(self) -> None:
        self._s0, self._own0, self._w0 = self._stat(), self._own(), __import__("time").perf_counter()

    def stop(self) -> dict[str, float]:
        s1, own1, w1 = self._stat(), self._own(), __import__("time").perf_counter()
        own = own1 - self._own0
        if s1 is None or self._s0 is None:
            return {"wall_s": w1 - self._w0, "own_cpu_s": own, "foreign_s": float("nan"),
                    "steal_s": float("nan")}
        busy = (s1[0] - self._s0[0]) / self._hz
        steal = (s1[1] - self._s0[1]) / self._hz
        return {"wall_s": w1 - self._w0, "own_cpu_s": own, "foreign_s": max(busy - own, 0.0),
                "steal_s": steal}


def wait_quiet(max_wait_s: float, *, threshold_cores: float = 0.1, window_s: float = 2.0) -> float:
    """Wait (up to ``max_wait_s``) until other processes use under ``threshold_cores`` of CPU over a
    ``window_s`` window; returns the seconds waited. Call it between measurements, never inside one."""
    import time

    if max_wait_s <= 0:
        return 0.0
    t0 = time.perf_counter()
    while True:
        meter = CpuMeter()
        time.sleep(window_s)
        m = meter.stop()
        if not (m["foreign_s"] / m["wall_s"] >= threshold_cores) or time.perf_counter() - t0 >= max_wait_s:
            return time.perf_counter() - t0


def training_curve(metrics: Path, out: Path, *, loss_label: str, log_loss: bool,
                   series: list[tuple[str, str, str]], heldout: float | None, heldout_label: str,
                   target: float, title: str) -> None:
    """Two panels from a training run's metrics.jsonl: train/validation loss, and validation
    metrics (``series``: (key, marker, label)) with the held-out figure and the target."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    tr = [r for r in rows if r["split"] == "train"]
    va = [r for r in rows if r["split"] == "val"]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot([r["step"] for r in tr], [r["loss"] for r in tr], lw=0.6, alpha=0.6, label="train")
    ax[0].plot([r["step"] for r in va], [r["loss"] for r in va], "o-", label="validation")
    if log_loss:
        ax[0].set_yscale("log")
    ax[0].set_xlabel("step")
    ax[0].set_ylabel(loss_label)
    ax[0].legend()
    for key, marker, label in series:
        ax[1].plot([r["step"] for r in va], [r.get(key, 0) for r in va], marker, label=label)
    if heldout is not None:
        ax[1].axhline(heldout, color="g", ls=":", label=f"{heldout_label} = {heldout:.3f}")
    ax[1].axhline(target, color="r", ls="--", lw=0.8, label=f"target {target}")
    ax[1].set_ylim(0, 1.02)
    ax[1].set_xlabel("step")
    ax[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
