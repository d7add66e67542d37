"""Image classification through a hybrid CNN + GNN model."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..checks import check_fraction
from ..models.airbench import fit_to_data
from .base import Forward, Optimize, Task

#: ``task.tta``: the views averaged at test time (``true``: airbench's flip and one-pixel shifts;
#: ``shift``: the shifts without the mirror, for images a mirror changes, such as digits)
TTA = {False: 1, "none": 1, "flip": 2, "shift": 3, True: 6, "flip_shift": 6}
TTA_CHOICES = "false, flip, shift (one-pixel shifts, no mirror) or true (flip and one-pixel shifts)"
#: training images a module that fits itself to the data (the whitening conv) is shown
FIT_IMAGES = 5000


def check_tta(tta, suffix: str = "") -> None:
    """Refuse a ``tta`` that is not one of :data:`TTA` (a bool or a name) in one line."""
    if not isinstance(tta, (bool, str)) or tta not in TTA:
        raise ValueError(f"tta={tta!r} is not supported; choose {TTA_CHOICES}{suffix}")


def tta_logits(model: nn.Module, images: Tensor, forward: Forward, views: int) -> tuple[Tensor, Tensor]:
    """``(averaged logits [B, classes], plain logits [B, classes])`` of ``images [B, C, H, W]``:
    ``views`` 1 (the images), 2 (and their mirror), 3 (half the images, half the images shifted one
    pixel up-left and down-right with reflect padding) or 6 (half the mirror pair, half the mirror
    pairs of the shifted images)."""
    plain = forward(model, images).float()
    if views == 1:
        return plain, plain
    if views != 3:
        pair = 0.5 * (plain + forward(model, images.flip(-1)).float())
        if views == 2:
            return pair, plain
    h, w = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = torch.cat([padded[..., :h, :w], padded[..., 2:, 2:]])
    if views == 3:
        return 0.5 * plain + 0.5 * forward(model, shifted).float().view(2, *plain.shape).mean(0), plain
    both = forward(model, torch.cat([shifted, shifted.flip(-1)])).float().view(4, *plain.shape)
    return 0.5 * pair + 0.5 * both.mean(0), plain


class ClassificationTask(Task):
    """Image → class: the hybrid model (backbone → interconnect → GNN → decoder → classifier head)
    trained with cross-entropy. Metrics: ``loss``, ``acc`` and the accuracy of each class
    (``test/acc/<class name>``); at test time a confusion-matrix picture."""

    monitor = "val/acc"
    monitor_mode = "max"

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, head: dict | None = None,
                 class_names: tuple[str, ...] | None = None, tta: bool | str = False) -> None:
        """``head``: options of the classifier head (``bias``, ``dropout``, ``pool``, ``scale``); the
        model builder reads them from the task config and builds the head into ``model``, so they
        are not used here. ``tta``: test-time augmentation of the test split (one of :data:`TTA`);
        ``metrics.json`` then holds ``test/tta_views`` and the accuracy without it,
        ``test/acc_plain``. :meth:`set_tta` moves it to another split (``evaluate.py tta=...``)."""
        super().__init__()
        check_fraction("label_smoothing", label_smoothing)
        self.set_tta(tta, "test")
        self._split = None
        self.model = model
        self.label_smoothing = label_smoothing
        self.num_classes = model.head.fc.out_features if hasattr(model.head, "fc") else None
        self.class_names = tuple(class_names) if class_names else tuple(str(i) for i in range(self.num_classes or 0))

    def set_tta(self, tta: bool | str, split: str) -> None:
        """Average the views of ``tta`` (one of :data:`TTA`) when ``split`` is evaluated; every other
        split (validation during training, for one) stays one view."""
        check_tta(tta)
        self.tta_views, self.tta_split = TTA[tta], split

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
        views = self.tta_views if self._split == self.tta_split else 1
        logits, plain = tta_logits(self.model, images, forward, views)
        loss = F.cross_entropy(logits.float(), labels, reduction="sum")
        c = logits.shape[1]
        confusion = torch.bincount(labels * c + logits.argmax(1), minlength=c * c).view(c, c)
        sums = {"loss": loss, "count": torch.tensor(labels.numel(), device=labels.device), "confusion": confusion}
        if views > 1:
            sums["correct_plain"] = (plain.argmax(1) == labels).sum()
            sums["tta_views"] = torch.tensor(views, device=labels.device)
        return sums

    def start_evaluation(self, split: str) -> None:
        """Test-time augmentation applies to its split only (``test``; validation stays one view)."""
        self._split = split

    def summarize(self, sums: Mapping[str, Tensor], split: str) -> dict[str, float]:
        """Dataset-level ``loss`` (mean), ``acc``, and the accuracy of each class ``acc/<class name>``."""
        count = max(1.0, float(sums["count"]))
        confusion = sums["confusion"].double()
        metrics = {"loss": float(sums["loss"]) / count, "acc": float(confusion.diagonal().sum()) / count}
        per_class = confusion.diagonal() / confusion.sum(1).clamp(min=1)
        names = self.class_names if len(self.class_names) == len(per_class) else range(len(per_class))
        metrics.update({f"acc/{name}": float(v) for name, v in zip(names, per_class)})
        if "correct_plain" in sums:
            metrics["acc_plain"] = float(sums["correct_plain"]) / count
            metrics["tta_views"] = float(self.tta_views)
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
        """Keep the data's normalisation, to draw the pictures on the images as they look; fit the
        model's parts that are fitted to training images (the airbench whitening conv) on
        :data:`FIT_IMAGES` unaugmented training images, unless a checkpoint already set them."""
        self._stats = (tuple(data.info.mean), tuple(data.info.std))
        if any(hasattr(m, "fit_to_data") and not bool(getattr(m, "fitted", True)) for m in self.model.modules()):
            fit_to_data(self.model, training_sample(data.train_view, FIT_IMAGES), len(data.train_view))

    _stats: tuple | None = None


def training_sample(view, n: int) -> Tensor:
    """``n`` training images ``[n, C, H, W]`` of the dataset ``view`` (all when fewer), normalised and
    not augmented, drawn by a fixed permutation (the same on every run)."""
    import copy

    plain = copy.copy(view)
    plain.augment = "none"
    order = torch.randperm(len(view), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return plain.__getitems__(order.tolist())[0]
