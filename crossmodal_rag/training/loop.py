"""The training loop shared by ``train clip``, ``train prefix`` and ``train rag``.

A training job is a :class:`TrainTask` (its examples, its trainable parameters, a batch loss and a
way to save the usable model); :func:`train` runs it: seeded train/validation split, AdamW with
linear warmup then cosine decay, gradient clipping, validation every ``eval_every`` steps, early
stopping on validation loss, checkpoints every ``checkpoint_every`` steps, resume from the newest
checkpoint, a progress bar (stderr) and one JSON line of metrics per event.

Layout of ``out_dir``::

    settings.json                 {"task": NAME, "settings": TrainSettings}
    metrics.jsonl                 {"step", "split": "train"|"val", "loss", "lr", "elapsed_s", ...}
    checkpoints/step-000200/      task.save_artifact(...) + trainer_state.pt
    last                          the newest checkpoint's name (text)
    best/                         the artifact of the step with the lowest validation loss

Resuming is exact: the batch order is a function of (seed, epoch), and the checkpoint holds the
optimizer, the scheduler and every RNG state, so a resumed run logs the same losses as an
uninterrupted one (on the same device and thread count).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from .._config import strict_from_dict
from ..errors import CrossmodalError
from ..safe_io import atomic_write_text

__all__ = [
    "TrainResult",
    "TrainSettings",
    "TrainTask",
    "TrainingError",
    "resolve_device",
    "split_indices",
    "train",
]

logger = logging.getLogger(__name__)

_STATE_FILE = "trainer_state.pt"


class TrainingError(CrossmodalError):
    """A training run cannot start or cannot go on (bad output folder, non-finite loss, ...)."""


@dataclass(frozen=True)
class TrainSettings:
    """How a model is trained (the task's own settings live with the task)."""

    max_steps: int = 1000  # optimizer steps
    batch_size: int = 32  # examples per step
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warmup from 0 to lr, then cosine decay to 0 at max_steps
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    val_fraction: float = 0.1  # share of the examples held out, split by seeded permutation
    eval_every: int = 50  # steps between validation passes
    checkpoint_every: int = 200  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    patience: int = 5  # validation passes without improvement before stopping; 0 = off
    seed: int = 0  # split, batch order, initialisation of new layers
    device: str | None = None  # None = cuda if available else cpu

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"train setting {name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "patience"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"train setting {name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"train setting lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"train setting weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"train setting grad_clip must be > 0 or None, got {self.grad_clip}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"train setting val_fraction must be in [0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        return strict_from_dict(cls, data, "train settings")


@runtime_checkable
class TrainTask(Protocol):
    """What a training job plugs into the loop.

    Examples are addressed by index in ``range(num_examples())``; the loop splits them and hands
    batches of indices to :meth:`loss`.
    """

    name: str  # "clip" / "prefix" / "rag"

    def num_examples(self) -> int: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def loss(self, indices: Sequence[int], *, train: bool) -> torch.Tensor:
        """Mean loss (a scalar tensor) of a batch of example indices; ``train=False`` during
        validation (eval mode, no augmentation)."""
        ...

    def evaluate(self, indices: Sequence[int]) -> dict[str, float]:
        """Extra validation metrics on these examples (may be ``{}``)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The trainable state (tensors) needed to resume."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_artifact(self, folder: Path) -> None:
        """Write the usable model into ``folder`` (loadable through a model spec)."""
        ...

    def to(self, device: str) -> None: ...

    # Optional: ``set_training_examples(indices)`` -- called once with the training split before
    # the first step (a task that composes its own batches, e.g. hard negatives, draws from these).


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or early-stopped) run produced."""

    steps: int  # optimizer steps done in total
    best_step: int  # step of the lowest validation loss (the last step without validation)
    best_val_loss: float  # nan without a validation set
    stopped_early: bool  # early stopping ended the run
    out_dir: Path
    best_dir: Path  # out_dir/best: the artifact to use
    metrics_path: Path

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("out_dir", "best_dir", "metrics_path"):
            d[key] = str(d[key])
        if math.isnan(self.best_val_loss):
            d["best_val_loss"] = None
        return d


def resolve_device(device: str | None) -> str:
    """``device``, or ``"cuda"`` when a GPU is present and ``"cpu"`` otherwise."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split of ``range(n)``.

    Returns ``(train, val)``: sorted int64 arrays, disjoint, covering ``range(n)``; ``val`` holds
    ``round(n * val_fraction)`` indices (at least 1 when ``val_fraction > 0`` and ``n >= 2``, and
    never all of them).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_val = min(max(round(n * val_fraction), 1), n - 1) if val_fraction > 0 and n >= 2 else 0
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)


def _batch_indices(train_idx: np.ndarray, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of step ``step`` (0-based): epochs are seeded permutations of the training
    set cut into full batches, so the batch is a pure function of (seed, step)."""
    n = len(train_idx)
    bs = min(batch_size, n)
    per_epoch = n // bs
    epoch, b = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return [int(i) for i in train_idx[perm[b * bs : (b + 1) * bs]]]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    span = max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))


def _rng_state(device: str) -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": list(random.getstate()),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_json_atomic(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


class _Run:
    """The mutable state of one run (what a checkpoint saves besides the task)."""

    def __init__(self) -> None:
        self.step = 0
        self.best_val = math.inf
        self.best_step = 0
        self.bad_evals = 0
        self.stopped_early = False
        self.elapsed = 0.0


def _validate(task: TrainTask, val_idx: np.ndarray, batch_size: int) -> tuple[float, dict[str, float]]:
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for start in range(0, len(val_idx), batch_size):
            batch = [int(i) for i in val_idx[start : start + batch_size]]
            total += float(task.loss(batch, train=False)) * len(batch)
            count += len(batch)
        extra = task.evaluate([int(i) for i in val_idx])
    return total / count, {k: float(v) for k, v in extra.items()}


def _save_checkpoint(
    out: Path, task: TrainTask, run: _Run, opt: torch.optim.Optimizer, sched: Any, device: str, keep: int
) -> None:
    ckpts = out / "checkpoints"
    ckpts.mkdir(exist_ok=True)
    name = f"step-{run.step:06d}"
    tmp = ckpts / (name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    task.save_artifact(tmp)
    torch.save(
        {"step": run.step, "best_val": run.best_val, "best_step": run.best_step, "bad_evals": run.bad_evals,
         "stopped_early": run.stopped_early, "elapsed": run.elapsed, "task": task.state_dict(),
         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(device)},
        tmp / _STATE_FILE,
    )
    final = ckpts / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(out / "last", name + "\n")
    done = sorted(p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", final)


def _save_best(out: Path, task: TrainTask) -> None:
    tmp = out / "best.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    task.save_artifact(tmp)
    old = out / "best.old"
    if old.exists():
        shutil.rmtree(old)
    if (out / "best").exists():
        os.replace(out / "best", old)
    os.replace(tmp, out / "best")
    shutil.rmtree(old, ignore_errors=True)


def _last_checkpoint(out: Path) -> Path | None:
    last = out / "last"
    if not last.is_file():
        return None
    folder = out / "checkpoints" / last.read_text().strip()
    if not (folder / _STATE_FILE).is_file():
        raise TrainingError(
            f"{last} names checkpoint {folder.name!r}, which is missing or incomplete; remove {last} "
            "to start over, or point it at a folder under checkpoints/"
        )
    return folder


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after ``step`` (by an interrupted run past its last checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by the interruption
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def train(
    task: TrainTask,
    settings: TrainSettings,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    metrics_path: str | Path | None = None,
) -> TrainResult:
    """Train ``task`` with ``settings``, writing checkpoints, metrics and ``best/`` into ``out_dir``.

    Args:
        resume: continue from the newest checkpoint in ``out_dir`` (a fresh start when there is
            none). Without it, an ``out_dir`` that already holds checkpoints is refused.
        progress: show a tqdm progress bar with the loss on stderr.
        metrics_path: the JSONL metrics file (default ``out_dir/metrics.jsonl``).

    Raises:
        TrainingError: ``out_dir`` holds a run of another task or an unreadable checkpoint, the
            task has no examples to train on, or the loss stopped being finite.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = Path(metrics_path) if metrics_path else out / "metrics.jsonl"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(settings.device)

    settings_file = out / "settings.json"
    ckpt = _last_checkpoint(out)
    if ckpt is not None and not resume:
        raise TrainingError(
            f"{out} already holds a training run (checkpoint {ckpt.name}); pass resume=True "
            "(--resume) to continue it, or choose another output folder"
        )
    if resume and settings_file.is_file():
        previous = json.loads(settings_file.read_text())
        if previous.get("task") != task.name:
            raise TrainingError(
                f"{out} holds a {previous.get('task')!r} run, not {task.name!r}; choose another output folder"
            )
        if previous.get("settings") != settings.to_dict():
            logger.warning("resuming %s with changed settings: %s -> %s", out, previous.get("settings"),
                           settings.to_dict())
    _write_json_atomic(settings_file, {"task": task.name, "settings": settings.to_dict()})

    n = task.num_examples()
    train_idx, val_idx = split_indices(n, settings.val_fraction, settings.seed)
    if len(train_idx) == 0:
        raise TrainingError(f"the {task.name} task has no training examples (got {n} examples in all)")

    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed % 2**32)
    random.seed(settings.seed)
    task.to(device)
    if hasattr(task, "set_training_examples"):
        task.set_training_examples([int(i) for i in train_idx])
    params = [p for p in task.trainable_parameters() if p.requires_grad]
    if not params:
        raise TrainingError(f"the {task.name} task has no trainable parameters")
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, settings.warmup_steps, settings.max_steps)
    )
    run = _Run()

    if resume and ckpt is not None:
        try:
            state = torch.load(ckpt / _STATE_FILE, map_location=device, weights_only=True)
        except Exception as e:  # any unreadable checkpoint is one message
            raise TrainingError(f"cannot read checkpoint {ckpt}: {e}; remove it (and {out / 'last'})") from e
        task.load_state_dict(state["task"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        run.step, run.best_val, run.best_step = state["step"], state["best_val"], state["best_step"]
        run.bad_evals, run.stopped_early, run.elapsed = state["bad_evals"], state["stopped_early"], state["elapsed"]
        _truncate_metrics(metrics, run.step)
        logger.info("resuming %s from %s", out, ckpt.name)
    else:
        if metrics.exists():
            metrics.unlink()
        logger.info("training %s: %d train / %d validation examples on %s", task.name, len(train_idx),
                    len(val_idx), device)

    from ..progress import tqdm

    bar = tqdm(total=settings.max_steps, initial=run.step, desc=f"train {task.name}", unit="step",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    started = time.perf_counter() - run.elapsed
    last_val: float | None = None
    with metrics.open("a") as log:

        def emit(record: dict[str, Any]) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()

        while run.step < settings.max_steps and not run.stopped_early:
            batch = _batch_indices(train_idx, settings.batch_size, settings.seed, run.step)
            lr = opt.param_groups[0]["lr"]
            loss = task.loss(batch, train=True)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"{task.name} loss became {loss.item()} at step {run.step + 1}; lower the learning "
                    f"rate (now {settings.lr}) or raise warmup_steps"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            record: dict[str, Any] = {"step": run.step + 1, "split": "train", "loss": loss.item(), "lr": lr}
            if settings.grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
                record["grad_norm"] = float(norm)
            opt.step()
            sched.step()
            run.step += 1
            run.elapsed = time.perf_counter() - started
            emit({**record, "elapsed_s": round(run.elapsed, 3)})

            final = run.step == settings.max_steps
            if len(val_idx) and (run.step % settings.eval_every == 0 or final):
                val_loss, extra = _validate(task, val_idx, settings.batch_size)
                last_val = val_loss
                emit({"step": run.step, "split": "val", "loss": val_loss, "lr": lr,
                      "elapsed_s": round(time.perf_counter() - started, 3), **extra})
                if val_loss < run.best_val:
                    run.best_val, run.best_step, run.bad_evals = val_loss, run.step, 0
                    _save_best(out, task)
                else:
                    run.bad_evals += 1
                    if settings.patience and run.bad_evals >= settings.patience:
                        run.stopped_early = True
                        logger.info("early stop at step %d: no improvement on %.4g (step %d) in %d passes",
                                    run.step, run.best_val, run.best_step, run.bad_evals)
            if not len(val_idx) and final:
                run.best_step = run.step
                _save_best(out, task)
            run.elapsed = time.perf_counter() - started
            if run.step % settings.checkpoint_every == 0 or final or run.stopped_early:
                _save_checkpoint(out, task, run, opt, sched, device, settings.keep_checkpoints)
            bar.update(1)
            postfix = {"loss": f"{record['loss']:.4f}"}
            if last_val is not None:
                postfix["val"] = f"{last_val:.4f}"
            bar.set_postfix(postfix, refresh=False)
    bar.close()
    if not (out / "best").is_dir():  # resumed a finished run that never saved one
        _save_best(out, task)
    return TrainResult(
        steps=run.step,
        best_step=run.best_step,
        best_val_loss=run.best_val if math.isfinite(run.best_val) else math.nan,
        stopped_early=run.stopped_early,
        out_dir=out,
        best_dir=out / "best",
        metrics_path=metrics,
    )
