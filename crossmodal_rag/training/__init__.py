"""Training: the shared loop (:mod:`.loop`) and the tasks that plug into it
(``clip``: contrastive fine-tuning of the encoder; ``prefix``: the image-prefix mapping network;
``rag``: generator and query side together). Tasks are imported from their modules, so that
importing the package stays cheap."""

from __future__ import annotations

from .loop import (
           TrainingError,
           TrainResult,
           TrainSettings,
           TrainTask,
           resolve_device,
           split_indices,
           train,
)

__all__ = ["TrainResult", "TrainSettings", "TrainTask", "TrainingError", "resolve_device", "split_indices",
           "train"]
