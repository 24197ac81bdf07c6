#!/usr/bin/env python
"""Write a synthetic image-caption data set of coloured shapes (see crossmodal_rag.synthetic).

Each picture is one shape (circle, square, triangle, star, cross) of one of six colours, small or
large, in one of nine grid positions, on a white, black or grey background; its caption says all
of that, e.g. "a large red circle at the top left on a white background". The output is the same
bytes for the same seed (and Pillow version).

Usage::

    python data/make_shapes.py OUT_DIR [--n 2000] [--seed 0] [--size 64] [--distinct]

OUT_DIR then holds PREFIX-00000.png + PREFIX-00000.txt pairs and manifest.jsonl (image, caption,
shape, colour, size, position, background), ready for ``crossmodal-rag index OUT_DIR`` or
``crossmodal-rag train ... OUT_DIR/manifest.jsonl``.
"""

from __future__ import annotations

import argparse
import sys

from crossmodal_rag.synthetic import make_shapes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--n", type=int, default=2000, help="number of pictures (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--distinct", action="store_true", help="all captions different (n <= 1620)")
    p.add_argument("--prefix", default="shape", help="file-name prefix (default 'shape')")
    args = p.parse_args(argv)
    try:
        written = make_shapes(args.out, args.n, args.seed, args.size, distinct=args.distinct,
                              prefix=args.prefix)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} images with captions and manifest.jsonl to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
