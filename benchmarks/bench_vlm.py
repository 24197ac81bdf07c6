"""Vision-language answers and generated captions (issue 33), on CPU, with random weights of
SmolVLM-256M's shape (Idefics3: 30 x 576 text layers, a 12 x 768 SigLIP-sized vision tower at
512 px, 64 tokens per image; byte-level vocabulary instead of 49k tokens).

* seconds per answer with k = 3 retrieved images and 32 new tokens, each mode (concat,
  rag-sequence, rag-token), ratios against concat;
* captions per second at ingest (``caption_collection`` after ``Collection.add``) and the ingest
  slowdown with ``--caption-model`` against the same ingest without it;
* peak RSS of ``crossmodal-rag ask`` with the VLM (a fresh process).

Run:  python benchmarks/bench_vlm.py --out benchmarks/vlm/results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

os.environ.setdefault("CROSSMODAL_RAG_TEXT_MODEL", "none")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crossmodal_rag import Collection  # noqa: E402
from crossmodal_rag.generation import GenerationSettings, RagPipeline, RagSettings  # noqa: E402
from crossmodal_rag.generation.vlm import VisionGenerator  # noqa: E402
from crossmodal_rag.ingestion.captioning import CaptionSettings, caption_collection  # noqa: E402
from crossmodal_rag.testing import make_tiny_open_clip  # noqa: E402
from crossmodal_rag.testing_vlm import make_tiny_vlm  # noqa: E402

SMOLVLM_256M = {"hidden": 576, "layers": 30, "vision_hidden": 768, "vision_layers": 12, "image_size": 512,
                "patch": 16, "scale_factor": 4}
PHOTOS = ("cat", "coffee", "pagoda", "dahlia", "grace_hopper", "camera", "coins", "handwritten_math")


def photos(dest: Path, captions: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        src = next((ROOT / "data" / "sample").glob(f"{name}.*[gG]"))
        shutil.copy(src, dest)
        if captions:
            shutil.copy(src.with_suffix(".txt"), dest)
    return dest


def rag_settings(mode: str) -> RagSettings:
    extra = {"answer_style": "free"} if "answer_style" in {f.name for f in dataclasses.fields(RagSettings)} else {}
    return RagSettings(k=3, mode=mode, target="images", **extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", type=int, default=1, help="answers timed per mode")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    info = _common.machine_info()
    _common.print_machine(info)
    work = Path(tempfile.mkdtemp(prefix="bench-vlm-"))
    results: dict[str, object] = {"machine": info, "model": "random Idefics3, SmolVLM-256M shape", **SMOLVLM_256M}
    try:
        t = time.perf_counter()
        vlm = make_tiny_vlm(work / "smolvlm-256m-random", "idefics3", seed=0, **SMOLVLM_256M)
        results["build_s"] = round(time.perf_counter() - t, 1)
        clip = f"open_clip:local-dir:{make_tiny_open_clip(work / 'clip', seed=0)}"
        gen = VisionGenerator(str(vlm))
        t = time.perf_counter()
        gen.load()
        results["load_s"] = round(time.perf_counter() - t, 2)
        params = sum(p.numel() for p in gen.model.parameters())
        results["parameters_m"] = round(params / 1e6, 1)
        print(f"model: {params / 1e6:.0f} M parameters, built in {results['build_s']} s, loaded in {results['load_s']} s")

        # -- answers, each mode -----------------------------------------------------------
        with Collection.create(work / "coll", clip) as coll:
            coll.add(photos(work / "captioned", captions=True))
            per_mode: dict[str, dict[str, float]] = {}
            for mode in ("concat", "rag-sequence", "rag-token"):
                pipe = RagPipeline(coll, gen, rag_settings(mode), GenerationSettings(max_new_tokens=32))
                times, cpu, tokens = [], [], []
                for i in range(args.answers):
                    c0 = time.process_time()
                    ans = pipe.ask(f"Describe what these photos show in detail, version {i}.")
                    cpu.append(time.process_time() - c0)
                    times.append(ans.timings["total"])
                    tokens.append(len(gen.answer_ids(ans.answer)) - 1)
                    assert len(ans.prompt_images) >= 1 and any(s.image for s in ans.sources)
                per_mode[mode] = {"s_per_answer": round(_common.median(times), 2),
                                  "cpu_s_per_answer": round(_common.median(cpu), 2),
                                  "answer_tokens": round(sum(tokens) / len(tokens), 1)}
                print(f"{mode}: {per_mode[mode]['s_per_answer']} s per answer "
                      f"({per_mode[mode]['answer_tokens']} tokens)", flush=True)
            base, base_cpu = per_mode["concat"]["s_per_answer"], per_mode["concat"]["cpu_s_per_answer"]
            for m in per_mode.values():
                m["x_concat"] = round(m["s_per_answer"] / base, 2)
                m["cpu_x_concat"] = round(m["cpu_s_per_answer"] / base_cpu, 2)
            results["answers"] = per_mode

        # -- captions at ingest -------------------------------------------------------------
        t, c0 = time.perf_counter(), time.process_time()
        with Collection.create(work / "plain", clip) as coll:
            coll.add(photos(work / "uncaptioned-a", captions=False))
        ingest_s, ingest_cpu = time.perf_counter() - t, time.process_time() - c0
        t, c0 = time.perf_counter(), time.process_time()
        with Collection.create(work / "captioned-coll", clip) as coll:
            coll.add(photos(work / "uncaptioned-b", captions=False))
            report = caption_collection(coll, CaptionSettings(model=str(vlm), max_new_tokens=32), gen)
        both_s, both_cpu = time.perf_counter() - t, time.process_time() - c0
        results["captions"] = {"images": report.captioned, "caption_s": round(report.seconds, 2),
                               "captions_per_s": round(report.captioned / report.seconds, 3),
                               "ingest_s": round(ingest_s, 2), "ingest_with_captions_s": round(both_s, 2),
                               "slowdown": round(both_s / ingest_s, 1), "ingest_cpu_s": round(ingest_cpu, 2),
                               "ingest_with_captions_cpu_s": round(both_cpu, 2),
                               "cpu_slowdown": round(both_cpu / ingest_cpu, 1)}
        print(f"captions: {results['captions']}", flush=True)

        # -- peak RSS of ask ------------------------------------------------------------------
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        t = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "crossmodal_rag", "-q", "ask", "What is shown?", "-c",
                              str(work / "coll"), "--generator", str(vlm), "--target", "images", "-k", "3",
                              "--max-new-tokens", "32", "--json"], capture_output=True, text=True, check=False)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        results["ask_cli"] = {"rc": run.returncode, "wall_s": round(time.perf_counter() - t, 1),
                              "peak_rss_mb": round(max(peak, before) / 1024), "stderr_tail": run.stderr[-300:]}
        print(f"ask CLI: {results['ask_cli']}")
        results["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
