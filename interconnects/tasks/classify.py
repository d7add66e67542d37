"""Image classification through a hybrid CNN + GNN model."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..checks import check_fraction
from .base import Forward, Optimize, Task


class ClassificationTask(Task):
    """Image → class: the hybrid model (backbone → interconnect → GNN → decoder → classifier head)
    trained with cross-entropy. Metrics: ``loss``, ``acc`` and the accuracy of each class
    (``test/acc/<class name>``); at test time a confusion-matrix picture."""

    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, head: dict | None = None,
                 class_names: tuple[str, ...] | None = None) -> None:
        """``head``: options of the classifier head (``bias``, ``dropout``); the model builder reads
        them from the task config and builds the head into ``model``, so they are not used here."""
        super().__init__()
        check_fraction("label_smoothing", label_smoothing)
        self.model = model
        self.label_smoothing = label_smoothing
        self.num_classes = model.head.fc.out_features if hasattr(model.head, "fc") else None
        self.class_names = tuple(class_names) if class_names else tuple(str(i) for i in range(self.num_classes or 0))

    @classmethod
    def from_config(cls, cfg, info) -> "ClassificationTask":
        from ..models.hybrid import build_model, build_part

        model = build_model(cfg, info.in_channels, info.image_size, info.num_classes)
        return build_part("task", cfg.task, model=model, class_names=tuple(info.class_names))

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"model": parameters}``: one optimizer for the whole model."""
        return {"model": [p for p in self.model.parameters() if p.requires_grad]}

    def training_step(self, batch, forward: Forward, optimize: Optimize) -> dict[str, Tensor]:
        """One step on ``batch = (images [B, C, H, W], labels [B])``; returns detached metrics."""
        images, labels = batch
        logits = forward(self.model, images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        optimize("model", loss)
        return {"loss": loss.detach(), "acc": (logits.argmax(1) == labels).float().mean()}

    def evaluation_step(self, batch, forward: Forward) -> dict[str, Tensor]:
        """Sums over ``batch``: ``loss`` (summed cross-entropy), ``count`` and ``confusion``
        ``[classes, classes]`` (rows: true class, columns: predicted)."""
        images, labels = batch
        logits = forward(self.model, images)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        c = logits.shape[1]
        confusion = torch.bincount(labels * c + logits.argmax(1), minlength=c * c).view(c, c)
        return {"loss": loss, "count": torch.tensor(labels.numel(), device=labels.device), "confusion": confusion}

    def summarize(self, sums: Mapping[str, Tensor], split: str) -> dict[str, float]:
        """Dataset-level ``loss`` (mean), ``acc``, and the accuracy of each class ``acc/<class name>``."""
        count = max(1.0, float(sums["count"]))
        confusion = sums["confusion"].double()
        metrics = {"loss": float(sums["loss"]) / count, "acc": float(confusion.diagonal().sum()) / count}
        per_class = confusion.diagonal() / confusion.sum(1).clamp(min=1)
        names = self.class_names if len(self.class_names) == len(per_class) else range(len(per_class))
        metrics.update({f"acc/{name}": float(v) for name, v in zip(names, per_class)})
        return metrics

    def pictures(self, batch, forward: Forward) -> dict:
        """What the interconnect sees on a few fixed images: keypoints, edges, adjacency."""
        from .. import viz

        images = batch[0]
        return viz.graph_pictures(self.model, images, *self._stats) if self._stats else {}

    def graph_input(self, batch):
        """The whole model, on the batch's images."""
        return self.model, batch[0]

    def test_pictures(self, sums: Mapping[str, Tensor]) -> dict:
        """The test split's confusion matrix as a figure."""
        from .. import viz

        return {"test/confusion": viz.confusion_figure(sums["confusion"].cpu(), self.class_names)}

    def parameter_table(self) -> list[tuple[str, int]]:
        """Trainable parameters of each stage of the model, then the total."""
        rows = [(name, sum(p.numel() for p in child.parameters() if p.requires_grad))
                for name, child in self.model.named_children()]
        rows.append(("total", sum(n for _, n in rows)))
        return rows

    def setup(self, data) -> None:
        """Keep the data's normalisation, to draw the pictures on the images as they look."""
        self._stats = (tuple(data.info.mean), tuple(data.info.std))

    _stats: tuple | None = None
