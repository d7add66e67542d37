"""Image classification through a hybrid CNN + GNN model."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class ClassificationTask(nn.Module):
    """Owns the model, what one step computes, and the metrics it reports.

    The engine owns the loop: it calls :meth:`training_step` with an ``optimize(name, loss)`` callback
    that does the backward pass, clipping and optimizer step of the named optimizer, so a task with
    several networks (a GAN) calls it once per network.
    """

    monitor = "val/acc"  # the validation metric that picks best.ckpt
    monitor_mode = "max"

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, head: dict | None = None) -> None:
        """``head``: options of the classifier head (``bias``, ``dropout``); the model builder reads
        them from the task config and builds the head into ``model``, so they are not used here."""
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} is out of range; it must be in [0, 1)")
        self.model = model
        self.label_smoothing = label_smoothing

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{optimizer name: parameters}``: one optimizer for the whole model."""
        return {"model": [p for p in self.model.parameters() if p.requires_grad]}

    def training_step(self, batch, forward: Callable, optimize: Callable[[str, Tensor], None]) -> dict[str, Tensor]:
        """One step on ``batch = (images [B, C, H, W], labels [B])``; returns detached metrics."""
        images, labels = batch
        logits = forward(self.model, images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        optimize("model", loss)
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == labels).float().mean()}

    @torch.no_grad()
    def evaluation_step(self, batch, forward: Callable) -> dict[str, Tensor]:
        """Sums over ``batch`` for exact dataset-level means: ``loss`` (summed), ``correct``, ``count``."""
        images, labels = batch
        logits = forward(self.model, images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        return {"loss": loss, "correct": (logits.argmax(1) == labels).sum(), "count": torch.tensor(labels.numel())}

    @staticmethod
    def summarize(sums: dict[str, float]) -> dict[str, float]:
        """Dataset-level ``loss`` (mean) and ``acc`` from the summed evaluation steps."""
        count = max(1.0, float(sums["count"]))
        return {"loss": float(sums["loss"]) / count, "acc": float(sums["correct"]) / count}
