"""Real sentence embeddings for the ANN benchmarks: one-line package summaries written by people,
embedded with the bundled all-MiniLM-L6-v2 (384-d, L2-normalised).

Reads a TSV whose column ``--column`` holds one summary per row (default: the package list with
summaries that this machine keeps; any text file with one sentence per line works with
``--column -1``), keeps distinct summaries of at least ``--min-chars`` characters, shuffles them
with ``--seed`` and embeds the first ``--count``. Vectors are written chunk by chunk to
``OUT.partNNN.npy`` (a killed run resumes) and joined into ``OUT`` (float32 ``(count, 384)``)
with the texts in ``OUT.txt``.

Run:  nice python benchmarks/embed_summaries.py --count 110000 --out /tmp/xmrag-bench/minilm_110k.npy
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_TSV = Path("/work/.library/env/packages/pypi.tsv")
CHUNK = 5_000


def read_texts(path: Path, column: int, min_chars: int, count: int, seed: int) -> list[str]:
    """Distinct one-line texts of ``path`` (column ``column``; -1: the whole line), shuffled."""
    seen: set[str] = set()
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if column >= 0 else ([ln] for ln in f)
        for i, row in enumerate(rows):
            if column >= 0 and i == 0:
                continue  # header
            text = (row[column] if column >= 0 and len(row) > column else row[0] if column < 0 else "").strip()
            if len(text) >= min_chars:
                seen.add(" ".join(text.split()))
    texts = sorted(seen)
    rng = np.random.default_rng(seed)
    rng.shuffle(texts)  # type: ignore[arg-type]
    if len(texts) < count:
        raise SystemExit(f"{path} holds {len(texts)} distinct texts of >= {min_chars} chars, not {count}")
    return texts[:count]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--texts", type=Path, default=DEFAULT_TSV)
    ap.add_argument("--column", type=int, default=4, help="TSV column of the text (-1: whole line)")
    ap.add_argument("--min-chars", type=int, default=20)
    ap.add_argument("--count", type=int, default=110_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--max-seq-length", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    from crossmodal_rag.encoders.sentence import SentenceEncoder

    texts = read_texts(args.texts, args.column, args.min_chars, args.count, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    enc = SentenceEncoder("minilm", device="cpu").load()
    impl = enc._backend
    if hasattr(impl, "max_tokens"):
        impl.max_tokens = min(int(impl.max_tokens), args.max_seq_length)
    parts = []
    t0 = time.perf_counter()
    for n, start in enumerate(range(0, len(texts), CHUNK)):
        part = args.out.with_name(f"{args.out.stem}.part{n:03d}.npy")
        parts.append(part)
        if part.is_file():
            continue
        vecs = enc.encode_texts(texts[start : start + CHUNK], batch_size=args.batch_size)
        np.save(part, vecs.astype(np.float32))
        done = start + len(vecs)
        logging.info("%d / %d embedded (%.0f texts/s)", done, len(texts), done / (time.perf_counter() - t0))
    np.save(args.out, np.concatenate([np.load(p) for p in parts]))
    for p in parts:
        p.unlink()
    logging.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
