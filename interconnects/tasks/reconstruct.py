"""An autoencoder through the graph (``task=reconstruct``).

backbone → interconnect → GNN → graph → CNN (:func:`~interconnects.models.hybrid.build_hybrid`) →
:class:`~interconnects.models.generative.Reconstructor` back to the input size. The decoder must not
add the backbone's map (``decoder.fuse=none``) nor fill empty cells from it (``decoder.empty=zero``):
either would carry the image around the graph, and the reconstruction would say nothing of what the
nodes hold. With keypoints the metrics measure how much of an image ``K`` nodes carry.

Loss ``mse`` or ``l1`` on ``[0, 1]`` pixels; metrics PSNR and SSIM on ``[0, 1]`` pixels (torchmetrics),
averaged per image over the split, and ``baseline_psnr``: the PSNR of predicting the training set's
mean image for every image, the floor a reconstruction has to beat.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchvision.utils import make_grid

from ..models.generative import Reconstructor
from ..models.hybrid import build_hybrid, check_settings
from .base import Forward, Optimize, Task

RECONSTRUCT_LOSSES = ("mse", "l1")


def check_decoder(decoder_cfg, interconnect_cfg) -> None:
    """One-line ``ValueError`` when the decoder would let the backbone's map bypass the graph."""
    if interconnect_cfg is None or interconnect_cfg.get("_target_") is None:
        return  # no graph (the CNN autoencoder baseline): nothing to bypass
    fuse = decoder_cfg.get("fuse", "none")
    if fuse != "none":
        raise ValueError(
            f"decoder.fuse={fuse!r} would let the backbone's map bypass the graph; task=reconstruct needs "
            "decoder.fuse=none (what task=reconstruct sets)"
        )
    empty = decoder_cfg.get("empty", "zero")
    if empty != "zero":
        raise ValueError(
            f"decoder.empty={empty!r} would fill cells without a node from the backbone's map, bypassing the "
            "graph; task=reconstruct needs decoder.empty=zero"
        )


class ReconstructionTask(Task):
    """Encode through the graph, decode to the image. ``model`` (the hybrid encoder + graph → CNN)
    and ``reconstructor`` train together in one optimizer group, ``model``.

    Args:
        loss: ``mse`` or ``l1``, on ``[0, 1]`` pixels.
        channels: width of the reconstructor's upsampling blocks.
        pictures: inputs (and reconstructions) in the picture logged each epoch.
    """

    monitor = "val/psnr"
    monitor_mode = "max"

    def __init__(self, model: nn.Module, in_channels: int, image_size, mean, std, loss: str = "mse",
                 channels: int = 32, pictures: int = 8) -> None:
        super().__init__()
        if loss not in RECONSTRUCT_LOSSES:
            raise ValueError(f"task.loss={loss!r} is not supported; choose one of {', '.join(map(repr, RECONSTRUCT_LOSSES))}")
        if isinstance(pictures, bool) or not isinstance(pictures, int) or pictures < 1:
            raise ValueError(f"task.pictures={pictures!r} is out of range; it must be an integer ≥ 1")
        shape = getattr(model, "out_shape", None)
        if shape is None or len(shape) != 3:
            raise ValueError(
                f"decoder gives features of shape {shape}, not a map [C, h, w]; task=reconstruct needs a "
                "decoder that returns a map (decoder=scatter)"
            )
        try:
            reconstructor = Reconstructor(shape[0], in_channels, shape[1:], image_size, channels)
        except ValueError as exc:
            raise ValueError(f"task.{exc}") from None
        self.model, self.reconstructor = model, reconstructor
        self.loss_name, self.num_pictures = loss, pictures
        c = len(mean)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1), persistent=False)
        # the training set's mean image in [0, 1], set by setup (the baseline_psnr reference)
        self.register_buffer("mean_image", torch.zeros(0), persistent=False)

    @classmethod
    def from_config(cls, cfg, info) -> "ReconstructionTask":
        """Checks the decoder (``decoder.fuse=none``, ``decoder.empty=zero``), then builds the hybrid
        encoder from ``cfg`` and the reconstructor from ``cfg.task``."""
        from omegaconf import OmegaConf

        check_decoder(cfg.decoder, cfg.interconnect)
        options = OmegaConf.to_container(cfg.task, resolve=True)
        options.pop("_target_", None)
        check_settings("task", cls, options, ("model", "in_channels", "image_size", "mean", "std"))
        model = build_hybrid(cfg, info.in_channels, tuple(info.image_size))
        try:
            return cls(model, info.in_channels, info.image_size, info.mean, info.std, **options)
        except TypeError as exc:
            raise ValueError(f"task: {exc}") from None

    def setup(self, data) -> None:
        """Keeps the training images' mean image (``[1, C, H, W]`` in ``[0, 1]``) for ``baseline_psnr``."""
        images = data.train_view.images
        self.mean_image = (images.float().mean(0, keepdim=True) / 255).to(self.mean.device)

    def optimizer_groups(self) -> dict[str, list[nn.Parameter]]:
        """One group, ``model``: the encoder and the reconstructor (``optimizer.lr`` as in classification)."""
        return {"model": [p for p in self.parameters() if p.requires_grad]}

    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.model, "reconstructor": self.reconstructor}

    def to_pixels(self, images: Tensor) -> Tensor:
        """Normalised images (or predictions) ``[B, C, H, W]`` → pixels (``[0, 1]`` for images)."""
        return images * self.std + self.mean

    def reconstruct(self, images: Tensor, forward: Forward) -> Tensor:
        """Normalised ``images [B, C, H, W]`` → reconstructed pixels ``[B, C, H, W]`` (not clamped)."""
        return self.to_pixels(forward(self.reconstructor, forward(self.model, images)).float())

    def _loss(self, recon: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        fn = F.mse_loss if self.loss_name == "mse" else F.l1_loss
        return fn(recon, target, reduction=reduction)

    def training_step(self, batch, forward: Forward, optimize: Optimize) -> dict[str, Tensor]:
        """One step on ``batch = (images [B, C, H, W], labels)`` (labels ignored): ``loss``, ``psnr``."""
        images = batch[0]
        target = self.to_pixels(images)
        recon = self.reconstruct(images, forward)
        loss = self._loss(recon, target)
        optimize("model", loss)
        with torch.no_grad():
            psnr = peak_signal_noise_ratio(recon.detach().clamp(0, 1), target, data_range=1.0)
        return {"loss": loss.detach(), "psnr": psnr}

    @torch.no_grad()
    def evaluation_step(self, batch, forward: Forward) -> dict[str, Tensor]:
        """Per-image sums: ``loss``, ``psnr``, ``ssim`` (and ``baseline_psnr`` once set up), ``count``."""
        images = batch[0]
        target = self.to_pixels(images).clamp(0, 1)
        recon = self.reconstruct(images, forward)
        per_image = self._loss(recon, target, reduction="none").flatten(1).mean(1)
        recon = recon.clamp(0, 1)
        psnr = peak_signal_noise_ratio(recon, target, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(recon, target, data_range=1.0, reduction="none")
        sums = {"loss": per_image.sum(), "psnr": psnr.sum(), "ssim": ssim.sum(),
                "count": torch.tensor(images.shape[0], device=images.device)}
        if self.mean_image.numel():
            baseline = self.mean_image.expand_as(target)
            sums["baseline_psnr"] = peak_signal_noise_ratio(baseline, target, data_range=1.0, reduction="none",
                                                            dim=(1, 2, 3)).sum()
        return sums

    def summarize(self, sums: Mapping[str, Tensor], split: str) -> dict[str, float]:
        """Means per image over the split: ``loss``, ``psnr``, ``ssim`` (and ``baseline_psnr``)."""
        count = max(1.0, float(sums["count"]))
        return {key: float(value) / count for key, value in sums.items() if key != "count"}

    @torch.no_grad()
    def graph_input(self, batch):
        """The encoder through the graph (the hybrid model), on the batch's images."""
        return self.model, batch[0]

    def pictures(self, batch, forward: Forward) -> dict[str, Tensor]:
        """``reconstructions``: a grid ``[C, H', W']`` in ``[0, 1]``, inputs above their reconstructions."""
        images = batch[0][: self.num_pictures]
        target = self.to_pixels(images).clamp(0, 1)
        recon = self.reconstruct(images, forward).clamp(0, 1)
        return {"reconstructions": make_grid(torch.cat([target, recon]), nrow=len(images))}
