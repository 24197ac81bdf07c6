#!/usr/bin/env python
"""Proof that ``train clip`` learns: a tiny CLIP from scratch on the synthetic shapes.

A randomly initialised small open_clip model (3-layer ViT on 16x16 patches of 64x64 pictures with
fixed 2-D sine-cosine position embeddings, 2-layer text transformer) is trained with
:func:`crossmodal_rag.training.clip.train_clip` (the code behind ``crossmodal-rag train clip``) on
pictures from :mod:`crossmodal_rag.synthetic`, with hard-negative batches (``--hard-negatives
0.5``: half of each batch is caption neighbours of the other half, so captions that differ in one
word meet; without them the image embedding keeps colour and size but only one of shape and
position, whichever the patch size makes easy). It is then
loaded back from its saved folder through the ordinary model spec and measured on a held-out
gallery of new pictures whose captions are all different (so each caption has exactly one right
image): text->image recall@1 (target >= 0.8), and image->text recall@1.

Writes ``benchmarks/train_clip/``: ``metrics.jsonl`` (the training log), ``curve.png``,
``summary.json``. The whole run (data, training, evaluation) must take at most 10 minutes on a
2-core CPU; ``--quick`` is a short smoke run.

Usage::

    python benchmarks/train_clip.py                 # the proof
    python benchmarks/train_clip.py --quick         # seconds; just checks that the loss falls
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("CROSSMODAL_RAG_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def model_config(width: int, image_layers: int, text_layers: int, embed_dim: int, image_size: int,
                 patch_size: int = 8, pos_embed: str = "learnable") -> dict:
    """An open_clip ``model_cfg`` for small square pictures (a ViT on square patches) and short
    captions (the synthetic captions are at most 14 tokens with the start and end tokens)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "pos_embed_type": pos_embed, "width": width, "layers": image_layers,
                       "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": width, "heads": max(width // 32, 1),
                     "layers": text_layers},
    }


def recall_at_1(text_vecs, image_vecs) -> float:
    import numpy as np

    return float((np.argmax(text_vecs @ image_vecs.T, axis=1) == np.arange(len(text_vecs))).mean())


def plot(metrics: Path, out: Path, heldout: float | None) -> None:
    from _common import training_curve

    training_curve(metrics, out, loss_label="CLIP loss", log_loss=False,
                   series=[("t2i_r1", "o-", "val text->image R@1"), ("i2t_r1", "s-", "val image->text R@1")],
                   heldout=heldout, heldout_label="held-out gallery t2i R@1", target=0.8,
                   title="train clip: tiny CLIP from scratch on synthetic shapes")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(HERE / "train_clip"), help="results folder")
    p.add_argument("--train-n", type=int, default=6000, help="training pictures")
    p.add_argument("--gallery-n", type=int, default=300, help="held-out pictures (distinct captions)")
    p.add_argument("--steps", type=int, default=3000, help="at most this many steps")
    p.add_argument("--budget", type=float, default=600,
                   help="wall-clock budget in seconds for the whole run; the step count is fitted to it "
                        "(0: run --steps)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--image-layers", type=int, default=3)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64, help="picture side in pixels")
    p.add_argument("--patch-size", type=int, default=16, help="ViT patch side in pixels")
    p.add_argument("--pos-embed", choices=("learnable", "sin_cos_2d"), default="sin_cos_2d",
                   help="the ViT's position embedding")
    p.add_argument("--hard-negatives", type=float, default=0.5,
                   help="share of each batch filled with caption neighbours (ClipTaskSettings.hard_negatives)")
    p.add_argument("--neighbours", type=int, default=24, help="caption neighbours per example (hard negatives)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-model", metavar="DIR",
                   help="keep the trained encoder (an open_clip:local-dir: folder) in DIR, e.g. for "
                        "train_prefix.py --features clip --clip open_clip:local-dir:DIR")
    p.add_argument("--quick", action="store_true", help="a few steps on little data (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_n, args.gallery_n, args.steps, args.batch_size, args.eval_every = 200, 40, 30, 32, 10
        args.budget = 0

    import numpy as np
    import torch
    from _common import machine_info

    from crossmodal_rag.encoders import ClipEncoder
    from crossmodal_rag.synthetic import make_shapes
    from crossmodal_rag.testing import make_tiny_open_clip
    from crossmodal_rag.training import TrainSettings, train
    from crossmodal_rag.training.clip import ClipTask, ClipTaskSettings, artifact_spec
    from crossmodal_rag.training.pairs import read_captioned_images

    t0, c0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="xmrag-train-clip-"))
    try:
        cfg = model_config(args.width, args.image_layers, args.text_layers, args.embed_dim, args.image_size,
                           args.patch_size, args.pos_embed)
        base = make_tiny_open_clip(work / "init", seed=args.seed, model_cfg=cfg)
        make_shapes(work / "train", args.train_n, seed=args.seed, size=args.image_size)
        gallery = make_shapes(work / "gallery", args.gallery_n, seed=args.seed + 1000, distinct=True,
                              size=args.image_size)
        t_data = time.perf_counter() - t0

        task = ClipTask(f"open_clip:local-dir:{base}", read_captioned_images(work / "train" / "manifest.jsonl"),
                        ClipTaskSettings(hard_negatives=args.hard_negatives, neighbours=args.neighbours))
        steps, step_s = args.steps, None
        if args.budget:
            # Steps that fit the wall-clock budget on this machine now: time a few forward and
            # backward passes (no optimizer step, so the model is unchanged).
            times = []
            for i in range(8):  # the first passes warm up allocators and caches
                t = time.perf_counter()
                task.loss(list(range(i * args.batch_size, (i + 1) * args.batch_size)), train=True).backward()
                times.append(time.perf_counter() - t)
            step_s = float(np.median(times[2:])) * 1.5  # + optimizer step (AdamW) and validation passes
            for prm in task.trainable_parameters():
                prm.grad = None
            left = args.budget - (time.perf_counter() - t0) - 40  # evaluation, plots, margin
            steps = max(50, min(args.steps, int(left / step_s)))
            print(f"# {step_s:.3f} s/step measured: {steps} steps fit the {args.budget} s budget", flush=True)
        settings = TrainSettings(max_steps=steps, batch_size=args.batch_size, lr=args.lr,
                                 weight_decay=0.05, warmup_steps=min(50, steps // 10),
                                 val_fraction=0.05, eval_every=args.eval_every,
                                 checkpoint_every=max(steps // 3, 1), patience=0, seed=args.seed,
                                 device="cpu")
        t1 = time.perf_counter()
        result = train(task, settings, work / "run", progress=True)
        summary = {"model": artifact_spec(result.best_dir), "metrics_path": result.metrics_path,
                   "steps": result.steps, "best_step": result.best_step, "examples": task.num_examples()}
        t_train = time.perf_counter() - t1

        # Held-out gallery: load the trained encoder through its model spec, as a user would.
        t2 = time.perf_counter()
        enc = ClipEncoder(summary["model"], device="cpu")
        img = enc.encode_images([path for path, _ in gallery], batch_size=128)
        txt = enc.encode_texts([cap for _, cap in gallery], batch_size=128)
        t2i = recall_at_1(txt, img)
        i2t = recall_at_1(img, txt)
        t2i_100 = float(np.mean([recall_at_1(txt[i : i + 100], img[i : i + 100])
                                 for i in range(0, len(gallery) - 99, 100)])) if len(gallery) >= 100 else None
        base_enc = ClipEncoder(f"open_clip:local-dir:{base}", device="cpu")
        t2i_untrained = recall_at_1(base_enc.encode_texts([c for _, c in gallery]),
                                    base_enc.encode_images([q for q, _ in gallery]))
        train_caps = {json.loads(line)["caption"] for line in (work / "train" / "manifest.jsonl").open()}
        seen = float(np.mean([cap in train_caps for _, cap in gallery]))
        t_eval = time.perf_counter() - t2
        wall = time.perf_counter() - t0

        shutil.copy(summary["metrics_path"], out / "metrics.jsonl")
        plot(out / "metrics.jsonl", out / "curve.png", t2i)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train_losses = [r["loss"] for r in rows if r["split"] == "train"]
        result = {
            "target": "held-out text->image recall@1 >= 0.8 within 600 s wall",
            "heldout_t2i_recall_at_1": round(t2i, 4),
            "heldout_i2t_recall_at_1": round(i2t, 4),
            "heldout_t2i_recall_at_1_galleries_of_100": None if t2i_100 is None else round(t2i_100, 4),
            "untrained_t2i_recall_at_1": round(t2i_untrained, 4),
            "gallery_size": len(gallery),
            "chance_recall_at_1": round(1 / len(gallery), 4),
            "gallery_captions_also_in_training_share": round(seen, 4),
            "met": bool(t2i >= 0.8 and wall <= 600),
            "wall_s": round(wall, 1),
            "data_s": round(t_data, 1), "setup_s": round(t1 - t0 - t_data, 1), "train_s": round(t_train, 1), "eval_s": round(t_eval, 1),
            "steps": summary["steps"], "best_step": summary["best_step"],
            "measured_s_per_step_before_training": step_s, "budget_s": args.budget,
            "first_train_loss": round(float(np.mean(train_losses[:10])), 4),
            "last_train_loss": round(float(np.mean(train_losses[-10:])), 4),
            "train_pictures": args.train_n, "examples_after_split": summary["examples"],
            "settings": settings.to_dict(), "model_cfg": cfg,
            "parameters": int(sum(t.numel() for t in enc.backend.model.parameters())),
            "torch_threads": torch.get_num_threads(),
            "process_cpu_s": round(time.process_time() - c0, 1),
            "loadavg_1min_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "machine": machine_info(),
            "command": "python benchmarks/train_clip.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        if args.save_model:
            shutil.rmtree(args.save_model, ignore_errors=True)
            best = Path(summary["model"].split("local-dir:", 1)[-1])  # open_clip:local-dir:FOLDER
            shutil.copytree(best, args.save_model)
        (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "settings", "model_cfg")},
                         indent=2))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
