"""The ingest wing: files in, committed items out.

The data's way, one module per stage::

    sources.py      a folder, manifest, COCO file or corpus -> image and text records
    image_sniff.py  a file's first bytes -> an allowed image format, or a refusal
    decode_budget.py what one decode may cost, checked before any pixel is decoded
    images.py       bytes or a path -> an RGB image (safe, bounded), or a one-line reason
    ocr.py, ocr_budget.py, ocr_stage.py   the text in images, read beside the embedding
    runner.py       records -> decoded batches -> vectors -> the collection (``ingest``)
    distributed.py  the embedding step on a Ray cluster, committed by the runner
    importer.py     precomputed embeddings (clip-retrieval's layout) -> a collection

Nothing is imported here: each stage loads its own dependencies when used.
"""

from __future__ import annotations

__all__: list[str] = []
