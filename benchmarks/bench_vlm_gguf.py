"""GGUF vision-language answers and generated captions on llama.cpp (issue 33), on CPU, with a
random GGUF VLM of SmolVLM-256M's text shape (30 x 576 Llama layers, Q8_0; byte-level vocabulary)
and a LLaVA-style projector (a 12 x 768 CLIP tower, ``mlp`` projector; ``--image-size`` pixels in
16-pixel patches: 128 px gives SmolVLM's 64 tokens per image).

* seconds per answer with k = 3 retrieved images and 32 new tokens, each mode (concat,
  rag-sequence, rag-token) on a fresh generator (cold: every prompt and picture decoded), then
  ``--answers`` - 1 more questions over the same items (warm: the prompt cache holds the
  items' pictures and contexts); ratios against concat;
* captions per second (``caption_collection`` after ``Collection.add``);
* peak RSS of ``crossmodal-rag ask`` with the GGUF VLM (a fresh process).

Run:  python benchmarks/bench_vlm_gguf.py --out benchmarks/vlm/gguf.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
from bench_vlm import photos, rag_settings

os.environ.setdefault("CROSSMODAL_RAG_TEXT_MODEL", "none")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from crossmodal_rag import Collection
from crossmodal_rag.generation import GenerationSettings, RagPipeline
from crossmodal_rag.generation.models import load_generator
from crossmodal_rag.generation.vlm_gguf import parse_gguf_vlm
from crossmodal_rag.generation.vlm_llamacpp import LlamaCppVisionGenerator
from crossmodal_rag.ingestion.captioning import CaptionSettings, caption_collection
from crossmodal_rag.testing import make_tiny_open_clip
from crossmodal_rag.testing_vlm import make_tiny_gguf_vlm

SHAPE = {"hidden": 576, "layers": 30, "qtype": "Q8_0", "vision_hidden": 768, "vision_layers": 12, "patch": 16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--answers", type=int, default=2, help="answers timed per mode (the first on a cold cache)")
    ap.add_argument("--image-size", type=int, default=128, help="the projector's resolution (pixels)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    info = _common.machine_info()
    _common.print_machine(info)
    work = Path(tempfile.mkdtemp(prefix="bench-vlm-gguf-"))
    shape = {**SHAPE, "image_size": args.image_size}
    results: dict[str, object] = {"machine": info, "model": "random GGUF VLM (Llama + mlp projector)", **shape,
                                  "image_tokens": (args.image_size // shape["patch"]) ** 2}
    try:
        t = time.perf_counter()
        model, proj = make_tiny_gguf_vlm(work / "vlm", seed=0, **shape)
        results["build_s"] = round(time.perf_counter() - t, 1)
        results["file_mb"] = {"model": round(model.stat().st_size / 2**20), "mmproj": round(proj.stat().st_size / 2**20)}
        spec = f"vlm:{model},mmproj={proj}"
        clip = f"open_clip:local-dir:{make_tiny_open_clip(work / 'clip', seed=0)}"
        gen = load_generator(spec)
        t = time.perf_counter()
        gen.load()
        results["load_s"] = round(time.perf_counter() - t, 2)
        results["threads"] = gen.n_threads  # type: ignore[attr-defined]
        print(f"built in {results['build_s']} s ({results['file_mb']} MB), loaded in {results['load_s']} s, "
              f"{results['threads']} llama.cpp threads", flush=True)

        # -- answers, each mode -----------------------------------------------------------
        with Collection.create(work / "coll", clip) as coll:
            coll.add(photos(work / "captioned", captions=True))
            per_mode: dict[str, dict[str, float]] = {}
            for mode in ("concat", "rag-sequence", "rag-token"):
                gen = LlamaCppVisionGenerator(parse_gguf_vlm(spec)).load()  # a cold prompt cache
                pipe = RagPipeline(coll, gen, rag_settings(mode), GenerationSettings(max_new_tokens=32))
                times, cpu, tokens = [], [], []
                for i in range(args.answers):
                    c0 = time.process_time()
                    ans = pipe.ask(f"Describe what these photos show in detail, version {i}.")
                    cpu.append(time.process_time() - c0)
                    times.append(ans.timings["total"])
                    tokens.append(len(gen.answer_ids(ans.answer)) - 1)
                    assert len(ans.prompt_images) >= 1 and any(s.image for s in ans.sources)
                per_mode[mode] = {"s_per_answer": round(times[0], 2), "cpu_s_per_answer": round(cpu[0], 2),
                                  "warm_s_per_answer": round(_common.median(times[1:] or times), 2),
                                  "answer_tokens": round(sum(tokens) / len(tokens), 1),
                                  "cache": gen.cache_stats()}
                print(f"{mode}: {per_mode[mode]}", flush=True)
            base, base_cpu = per_mode["concat"]["s_per_answer"], per_mode["concat"]["cpu_s_per_answer"]
            for m in per_mode.values():
                m["x_concat"] = round(m["s_per_answer"] / base, 2)
                m["cpu_x_concat"] = round(m["cpu_s_per_answer"] / base_cpu, 2)
            results["answers"] = per_mode

        # -- captions -------------------------------------------------------------------------
        with Collection.create(work / "captioned-coll", clip) as coll:
            coll.add(photos(work / "uncaptioned", captions=False))
            report = caption_collection(coll, CaptionSettings(model=spec, max_new_tokens=32), gen)
        results["captions"] = {"images": report.captioned, "skipped": len(report.skipped),
                               "caption_s": round(report.seconds, 2),
                               "s_per_image": round(report.seconds / max(report.captioned + len(report.skipped), 1), 2)}
        print(f"captions: {results['captions']}", flush=True)

        # -- peak RSS of ask ------------------------------------------------------------------
        t = time.perf_counter()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            run = subprocess.Popen([sys.executable, "-m", "crossmodal_rag", "-q", "ask", "What is shown?", "-c",
                                    str(work / "coll"), "--generator", spec, "--target", "images", "-k", "3",
                                    "--max-new-tokens", "32", "--json"], stdout=out, stderr=err)
            # the child's own VmHWM, read until it exits (its ru_maxrss counts this process's memory:
            # a vfork child's high-water mark before exec is the parent's)
            hwm = 0
            while run.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    status = Path(f"/proc/{run.pid}/status").read_text()
                    hwm = max(hwm, int(status.split("VmHWM:")[1].split()[0]))
                time.sleep(0.1)
            err.seek(0)
            results["ask_cli"] = {"rc": run.returncode, "wall_s": round(time.perf_counter() - t, 1),
                                  "peak_rss_mb": round(hwm / 1024),
                                  "stderr_tail": err.read()[-300:].decode("utf-8", "replace")}
        print(f"ask CLI: {results['ask_cli']}")
        results["load_average_end"] = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
