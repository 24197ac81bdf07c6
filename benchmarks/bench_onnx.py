"""ONNX Runtime vs torch for the encoders (issue 29), all figures from one run on one machine.

A ViT-B-32-sized random open_clip model (benchmarks/_common.py) is exported once with
``export_clip`` (fp32 + int8) into an export cache, beside the bundled MiniLM's export. Then:

- cold ``crossmodal-rag search "TEXT" -c DIR`` wall (a fresh process each time, median of
  ``--cold-runs``), ``--runtime onnx`` and ``--runtime torch``, over data/sample indexed with a
  MiniLM text space;
- text query encode p50 at batch 1 and batch 16 (CLIP text tower; MiniLM at batch 1), with the
  default threads and with one thread per runtime, alternating query by query;
- image tower throughput on preprocessed batches of 16, and whole-ingest images/s of data/sample;
- int8 quality: MiniLM recall@1/@5 of the gold passage on data/passages_qa (200 questions) with
  fp32 and int8 ONNX; CLIP int8 vs fp32 rank agreement (top-10 overlap, top-1 equal) over the
  sample collection's images and captions queried by every caption.

    python benchmarks/bench_onnx.py --out-json /tmp/onnx.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import machine_info, pct, print_machine, vit_b32_random  # noqa: E402

WORK = Path(os.environ.get("XMRAG_BENCH_ONNX_DIR", "/tmp/xmrag-bench/onnx"))


def _timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _exports(spec: str) -> tuple[Path, Path, dict[str, float]]:
    from crossmodal_rag.encoders.onnx_export import export_clip
    from crossmodal_rag.encoders.onnx_runtime import cached_clip_export, cached_text_export
    from crossmodal_rag.encoders.onnx_export_text import export_sentence

    clip_dir, text_dir = cached_clip_export(spec), cached_text_export("minilm")
    took: dict[str, float] = {}
    if not (clip_dir / "visual" / "model_int8.onnx").is_file():
        t = time.perf_counter()
        export_clip(spec, clip_dir, int8=True)
        took["export_clip_s"] = time.perf_counter() - t
    if not (text_dir / "model_int8.onnx").is_file():
        t = time.perf_counter()
        export_sentence("minilm", text_dir, int8=True)
        took["export_minilm_s"] = time.perf_counter() - t
    return clip_dir, text_dir, took


def _collection(spec: str) -> Path:
    from crossmodal_rag.cli import main

    folder = WORK / "sample-coll"
    if not (folder / "manifest.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        os.environ["CROSSMODAL_RAG_RUNTIME"] = "torch"
        assert main(["index", str(ROOT / "data" / "sample"), "-c", str(folder), "-m", spec,
                     "--text-model", "minilm", "-q"]) == 0
    return folder


def cold_search(folder: Path, runs: int) -> dict[str, object]:
    """Fresh ``crossmodal-rag search`` processes, the runtimes alternating: wall, CPU seconds
    (user + system, less disturbed by other load than wall) and peak RSS of each."""
    out: dict[str, list[float]] = {}
    for _ in range(runs):
        for runtime in ("onnx", "torch"):
            t = time.perf_counter()
            proc = subprocess.Popen(["crossmodal-rag", "search", "a red car parked on a street", "-c", str(folder),
                                     "-k", "5", "-q", "--runtime", runtime], stdout=subprocess.DEVNULL,
                                    env=dict(os.environ, CROSSMODAL_RAG_RUNTIME=runtime))
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            assert proc.returncode == 0, f"search --runtime {runtime} failed"
            out.setdefault(f"cold_search_{runtime}_wall_s", []).append(time.perf_counter() - t)
            out.setdefault(f"cold_search_{runtime}_cpu_s", []).append(usage.ru_utime + usage.ru_stime)
            out.setdefault(f"cold_search_{runtime}_rss_mb", []).append(usage.ru_maxrss / 1024)
    return {k: statistics.median(v) for k, v in out.items()} | {"cold_search_runs": runs}


def single_thread(spec: str, clip_dir: Path, reps: int) -> dict[str, float]:
    """Text batch 1 and image batch 16 with one thread each for torch and onnxruntime, the two
    alternating query by query: the fairest comparison on a machine others load too."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from crossmodal_rag.encoders import ClipEncoder

    torch.set_num_threads(1)
    questions = [json.loads(line)["question"] for line in (ROOT / "data/passages_qa/qa.jsonl").open()][:reps]
    torch_enc = ClipEncoder(spec, device="cpu").load()
    pixels = np.random.default_rng(0).standard_normal((16, 3, 224, 224)).astype(np.float32)
    out: dict[str, float] = {}
    for name, file in (("onnx", "model.onnx"), ("int8", "model_int8.onnx")):
        enc = ClipEncoder(f"onnx:{clip_dir}" if name == "onnx" else f"onnx:int8:{clip_dir}").load()
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        backend = enc.backend
        backend.textual = ort.InferenceSession(str(clip_dir / "textual" / file), options, providers=["CPUExecutionProvider"])
        backend.visual = ort.InferenceSession(str(clip_dir / "visual" / file), options, providers=["CPUExecutionProvider"])
        enc.encode_texts(questions[:2]), torch_enc.encode_texts(questions[:2])
        t_text, o_text, t_img, o_img = [], [], [], []
        for q in questions:
            t_text += _timed(lambda q=q: torch_enc.encode_texts([q]), 1)
            o_text += _timed(lambda q=q: enc.encode_texts([q]), 1)
        for _ in range(3):
            t_img += _timed(lambda: torch_enc.encode_pixels(torch.from_numpy(pixels)), 1)
            o_img += _timed(lambda: enc.encode_pixels(pixels), 1)
        out[f"one_thread_text_b1_ms_torch_vs_{name}"] = statistics.median(t_text) * 1000
        out[f"one_thread_text_b1_ms_{name}"] = statistics.median(o_text) * 1000
        out[f"one_thread_text_b1_speedup_{name}"] = statistics.median(t_text) / statistics.median(o_text)
        out[f"one_thread_images_per_s_torch_vs_{name}"] = 16 / statistics.median(t_img)
        out[f"one_thread_images_per_s_{name}"] = 16 / statistics.median(o_img)
        out[f"one_thread_images_speedup_{name}"] = statistics.median(t_img) / statistics.median(o_img)
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def encode_speed(spec: str, clip_dir: Path, reps: int) -> dict[str, float]:
    import numpy as np
    from PIL import Image

    from crossmodal_rag.encoders import ClipEncoder

    questions = [json.loads(line)["question"] for line in (ROOT / "data/passages_qa/qa.jsonl").open()]
    photos = sorted((ROOT / "data" / "sample").rglob("*.jpg"))
    images = [Image.open(p).convert("RGB") for p in photos]
    encoders = {"torch": ClipEncoder(spec, device="cpu"), "onnx": ClipEncoder(f"onnx:{clip_dir}"),
                "int8": ClipEncoder(f"onnx:int8:{clip_dir}")}
    out: dict[str, float] = {}
    for name, enc in encoders.items():
        enc.load()
        enc.encode_texts(questions[:16])  # warm
        b1 = _timed(lambda: None, 0)
        for q in questions[:reps]:
            b1 += _timed(lambda q=q: enc.encode_texts([q]), 1)
        b16 = [(_timed(lambda i=i: enc.encode_texts(questions[i * 16:(i + 1) * 16]), 1)[0]) for i in range(8)]
        pixels = np.stack([np.asarray(enc.preprocess(im)) for im in (images * 3)[:16]])
        if name == "torch":
            import torch

            pixels = torch.from_numpy(pixels)
        enc.encode_pixels(pixels)  # warm
        img = _timed(lambda: enc.encode_pixels(pixels), 3)
        out[f"text_b1_p50_ms_{name}"] = pct(b1, 50) * 1000
        out[f"text_b16_p50_ms_{name}"] = pct(b16, 50) * 1000
        out[f"images_per_s_{name}"] = 16 / statistics.median(img)
    for name in ("onnx", "int8"):
        out[f"text_b1_speedup_{name}"] = out["text_b1_p50_ms_torch"] / out[f"text_b1_p50_ms_{name}"]
        out[f"text_b16_speedup_{name}"] = out["text_b16_p50_ms_torch"] / out[f"text_b16_p50_ms_{name}"]
        out[f"images_speedup_{name}"] = out[f"images_per_s_{name}"] / out["images_per_s_torch"]
    return out


def ingest_speed(spec: str, clip_dir: Path) -> dict[str, float]:
    from crossmodal_rag import Collection

    out: dict[str, float] = {}
    for name, model in (("torch", spec), ("onnx", f"onnx:{clip_dir}"), ("torch", spec), ("onnx", f"onnx:{clip_dir}")):
        folder = WORK / f"ingest-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        with Collection.create(folder, model) as coll:
            coll.encoder.encode_texts(["warm"])
            t = time.perf_counter()
            report = coll.add(ROOT / "data" / "sample")
            wall = time.perf_counter() - t
        rate = report.images_added / wall
        out[f"ingest_images_per_s_{name}"] = max(out.get(f"ingest_images_per_s_{name}", 0.0), rate)
    out["ingest_speedup_onnx"] = out["ingest_images_per_s_onnx"] / out["ingest_images_per_s_torch"]
    return out


def minilm_quality(text_dir: Path) -> dict[str, float]:
    import numpy as np

    from crossmodal_rag.encoders.onnx_sentence import OnnxSentenceBackend
    from crossmodal_rag.encoders.sentence import SentenceEncoder

    qa = [json.loads(line) for line in (ROOT / "data/passages_qa/qa.jsonl").open()]
    passages = [json.loads(line) for line in (ROOT / "data/passages_qa/passages.jsonl").open()]
    ids = [p["id"] for p in passages]
    gold = np.array([ids.index(q["passage_id"]) for q in qa])
    out: dict[str, float] = {}
    os.environ["CROSSMODAL_RAG_RUNTIME"] = "torch"
    torch_enc = SentenceEncoder("minilm", device="cpu")
    runs = {"torch": lambda t: torch_enc.encode_texts(t, batch_size=32)}
    for name, int8 in (("onnx", False), ("int8", True)):
        backend = OnnxSentenceBackend(text_dir, int8=int8)
        runs[name] = lambda t, b=backend: np.concatenate([b.encode(t[i:i + 32], "cpu") for i in range(0, len(t), 32)])
    for name, run in runs.items():
        p = run([x["text"] for x in passages])
        q = run([x["question"] for x in qa])
        order = np.argsort(-(q @ p.T), axis=1)
        out[f"minilm_recall@1_{name}"] = float((order[:, 0] == gold).mean())
        out[f"minilm_recall@5_{name}"] = float((order[:, :5] == gold[:, None]).any(1).mean())
        run(["warm"])
        out[f"minilm_b1_p50_ms_{name}"] = pct([_timed(lambda x=x: run([x["question"]]), 1)[0] for x in qa[:40]], 50) * 1000
    return out


def clip_rank_agreement(clip_dir: Path) -> dict[str, float]:
    import numpy as np

    from crossmodal_rag.encoders import ClipEncoder

    photos = sorted((ROOT / "data" / "sample").rglob("*.jpg")) + sorted((ROOT / "data" / "sample").rglob("*.png"))
    captions = [line.strip() for p in photos if p.with_suffix(".txt").is_file()
                for line in p.with_suffix(".txt").read_text().splitlines() if line.strip()]
    ranked = {}
    for name, spec in (("fp32", f"onnx:{clip_dir}"), ("int8", f"onnx:int8:{clip_dir}")):
        enc = ClipEncoder(spec)
        items = np.concatenate([enc.encode_images(photos), enc.encode_texts(captions)])
        ranked[name] = np.argsort(-(enc.encode_texts(captions) @ items.T), axis=1)[:, :10]
    a, b = ranked["fp32"], ranked["int8"]
    overlap = [len(set(x) & set(y)) / 10 for x, y in zip(a, b, strict=True)]
    return {"clip_int8_top10_overlap": float(np.mean(overlap)), "clip_int8_top1_equal": float((a[:, 0] == b[:, 0]).mean()),
            "clip_rank_queries": len(captions), "clip_rank_items": len(photos) + len(captions)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=40, help="batch-1 text queries per runtime")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: cold,encode,single,ingest,minilm,rank")
    ap.add_argument("--out-json")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    WORK.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("CROSSMODAL_RAG_ONNX_DIR", str(WORK / "cache"))
    os.environ.setdefault("CROSSMODAL_RAG_OFFLINE", "1")
    info = machine_info()
    import onnxruntime

    info["onnxruntime"] = onnxruntime.__version__
    print_machine(info)
    spec = vit_b32_random()
    clip_dir, text_dir, result = _exports(spec)
    result = dict(result)
    if "cold" not in skip:
        result |= cold_search(_collection(spec), args.cold_runs)
    os.environ["CROSSMODAL_RAG_RUNTIME"] = "torch"  # the in-process comparisons name their runtime
    if "encode" not in skip:
        result |= encode_speed(spec, clip_dir, args.reps)
    if "single" not in skip:
        result |= single_thread(spec, clip_dir, min(args.reps, 30))
    if "ingest" not in skip:
        result |= ingest_speed(spec, clip_dir)
    if "minilm" not in skip:
        result |= minilm_quality(text_dir)
    if "rank" not in skip:
        result |= clip_rank_agreement(clip_dir)
    for key, value in result.items():
        print(f"{key}\t{value:.4g}" if isinstance(value, float) else f"{key}\t{value}")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"machine": info, "result": result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
