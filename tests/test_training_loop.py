"""The shared training loop, on a toy task (noisy linear regression in torch)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from crossmodal_rag.training import TrainingError, TrainSettings, TrainTask, split_indices, train


class LinearTask:
    """y = x @ w + noise; the model is a linear layer with dropout (so RNG state matters)."""

    name = "toy"

    def __init__(self, n: int = 200, dim: int = 4, seed: int = 0, noise: float = 0.1,
                 val_targets_shift: float = 0.0, crash_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = self.x @ w + noise * torch.randn(n, 1, generator=g)
        self.y_shift = val_targets_shift
        self.crash_at, self.train_calls = crash_at, 0
        torch.manual_seed(seed + 1)
        self.model = torch.nn.Sequential(torch.nn.Dropout(0.1), torch.nn.Linear(dim, 1))

    def num_examples(self) -> int:
        return len(self.x)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def loss(self, indices: Sequence[int], *, train: bool) -> torch.Tensor:
        self.model.train(train)
        if train:
            self.train_calls += 1
            if self.train_calls == self.crash_at:
                raise KeyboardInterrupt  # the process "dies" in the middle of this step
        idx = torch.as_tensor(list(indices))
        target = self.y[idx] + (0.0 if train else self.y_shift)
        return torch.nn.functional.mse_loss(self.model(self.x[idx]), target)

    def evaluate(self, indices: Sequence[int]) -> dict[str, float]:
        return {"n_val": float(len(indices))}

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state)

    def save_artifact(self, folder: Path) -> None:
        torch.save(self.model.state_dict(), folder / "model.pt")

    def to(self, device: str) -> None:
        self.model.to(device)


def _records(path: Path, split: str) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def test_settings_round_trip_and_validation() -> None:
    s = TrainSettings(max_steps=7, lr=0.01, grad_clip=None, device="cpu")
    assert TrainSettings.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError, match="unknown train settings"):
        TrainSettings.from_dict({**s.to_dict(), "max_step": 3})
    with pytest.raises(ValueError, match="val_fraction"):
        TrainSettings(val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainSettings(batch_size=0)


def test_split_indices() -> None:
    train_idx, val_idx = split_indices(103, 0.2, seed=5)
    assert len(val_idx) == round(103 * 0.2)
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(103))
    again = split_indices(103, 0.2, seed=5)
    assert np.array_equal(again[1], val_idx)
    assert not np.array_equal(split_indices(103, 0.2, seed=6)[1], val_idx)
    assert len(split_indices(3, 0.01, 0)[1]) == 1  # at least one validation example
    assert len(split_indices(10, 0.0, 0)[1]) == 0


def test_loss_falls_and_files(tmp_path: Path) -> None:
    task = LinearTask()
    assert isinstance(task, TrainTask)
    settings = TrainSettings(max_steps=60, batch_size=16, lr=0.2, eval_every=10, checkpoint_every=20,
                             keep_checkpoints=2, patience=0, device="cpu")
    result = train(task, settings, tmp_path / "run", progress=False)
    assert result.steps == 60 and not result.stopped_early
    lines = result.metrics_path.read_text().splitlines()
    recs = [json.loads(line) for line in lines]  # every line parses
    train_recs = _records(result.metrics_path, "train")
    val_recs = _records(result.metrics_path, "val")
    assert [r["step"] for r in train_recs] == list(range(1, 61))
    assert [r["step"] for r in val_recs] == [10, 20, 30, 40, 50, 60]
    assert all({"step", "split", "loss", "lr", "elapsed_s"} <= set(r) for r in recs)
    assert val_recs[0]["n_val"] == 20.0
    assert np.mean([r["loss"] for r in train_recs[-10:]]) < 0.2 * np.mean([r["loss"] for r in train_recs[:5]])
    assert val_recs[-1]["loss"] < 0.2 * val_recs[0]["loss"]
    # Best = the lowest validation loss, and best/ holds that step's model.
    best = min(val_recs, key=lambda r: r["loss"])
    assert result.best_step == best["step"] and result.best_val_loss == pytest.approx(best["loss"])
    assert (result.best_dir / "model.pt").is_file()
    # Checkpoints every 20 steps, only the newest two kept, "last" names the newest.
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step-000040", "step-000060"]
    assert (tmp_path / "run" / "last").read_text().strip() == "step-000060"
    state = torch.load(tmp_path / "run" / "checkpoints" / "step-000060" / "trainer_state.pt",
                       weights_only=True)
    assert state["step"] == 60
    saved = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert saved["task"] == "toy" and TrainSettings.from_dict(saved["settings"]) == settings
    # A second run into the same folder without resume is refused.
    with pytest.raises(TrainingError, match="resume"):
        train(LinearTask(), settings, tmp_path / "run", progress=False)


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    settings = TrainSettings(max_steps=50, batch_size=16, lr=0.03, warmup_steps=5, eval_every=10,
                             checkpoint_every=10, keep_checkpoints=3, patience=0, device="cpu")
    full = train(LinearTask(), settings, tmp_path / "full", progress=False)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(LinearTask(crash_at=24), settings, part, progress=False)
    assert (part / "last").read_text().strip() == "step-000020"
    assert len(_records(part / "metrics.jsonl", "train")) == 23  # 3 steps past the checkpoint
    resumed = train(LinearTask(seed=0), settings, part, resume=True, progress=False)
    assert resumed.steps == 50
    # The lines logged after the checkpoint by the interrupted run are dropped and logged again.
    a = [(r["step"], r["split"], r["loss"], r["lr"]) for r in map(json.loads, full.metrics_path.read_text().splitlines())]
    b = [(r["step"], r["split"], r["loss"], r["lr"]) for r in map(json.loads, resumed.metrics_path.read_text().splitlines())]
    assert a == b
    assert torch.equal(torch.load(full.best_dir / "model.pt")["1.weight"],
                       torch.load(resumed.best_dir / "model.pt")["1.weight"])


def test_early_stopping(tmp_path: Path) -> None:
    # Validation targets are shifted, so validation loss gets worse as training fits the data.
    task = LinearTask(val_targets_shift=5.0)
    settings = TrainSettings(max_steps=500, batch_size=16, lr=0.05, eval_every=5, patience=3,
                             checkpoint_every=1000, device="cpu")
    result = train(task, settings, tmp_path / "es", progress=False)
    assert result.stopped_early and result.steps < 500
    val = _records(result.metrics_path, "val")
    # Stopped right after `patience` passes without beating the best.
    best_i = min(range(len(val)), key=lambda i: val[i]["loss"])
    assert len(val) - 1 - best_i == 3
    assert result.best_step == val[best_i]["step"]
    # The stop wrote a checkpoint, and resuming a stopped run does nothing more.
    assert (tmp_path / "es" / "last").read_text().strip() == f"step-{result.steps:06d}"
    again = train(LinearTask(val_targets_shift=5.0), settings, tmp_path / "es", resume=True, progress=False)
    assert again.steps == result.steps and again.stopped_early


def test_non_finite_loss_is_an_error(tmp_path: Path) -> None:
    task = LinearTask()
    task.y[:] = float("nan")
    with pytest.raises(TrainingError, match="lower the learning rate"):
        train(task, TrainSettings(max_steps=3, device="cpu"), tmp_path / "nan", progress=False)
