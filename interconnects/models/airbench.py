"""An airbench-style CIFAR backbone: a frozen patch-whitening convolution, then three conv blocks.

After the fastest published CIFAR-10 trainers (airbench94, Keller Jordan, 2024), written for this
project: the first layer is a 2×2 convolution whose weights are the eigenvectors of the training
images' 2×2 patch covariance, scaled to unit variance, and their negation (so that GELU keeps both
signs); it is fitted once from training images before the first step and never trained (its bias
is, for the first epochs). Each block is conv3×3 → 2×2 max-pool → BN → GELU → conv3×3 → BN → GELU,
with bias-free, identity-initialised convolutions and batch norms of frozen scale and learned bias.

A module that needs training images before training declares it with ``fit_to_data(images,
num_train)`` and a ``fitted`` buffer; :func:`fit_to_data` calls every such module of a network once
(the classification task does so in its ``setup``). What it fitted lives in buffers and frozen
parameters, so a checkpoint holds it and ``evaluate.py`` rebuilds the same network.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..checks import check_int
from .backbones import chain
from .decoders import ScatterDecoder


class Whitening(nn.Module):
    """Frozen ``kernel_size``² patch whitening: ``[B, C, H, W] -> [B, 2·C·k², H-k+1, W-k+1]``.

    The first ``C·k²`` output channels are the patches projected on the eigenvectors of their
    covariance, divided by ``sqrt(eigenvalue + eps)`` (so their covariance is ~identity on the
    patches fitted on); the others are their negation. The bias is trained for the first
    ``bias_epochs`` epochs (counted in training images seen, from the training-set size given to
    :meth:`fit_to_data`), then frozen.
    """

    def __init__(self, in_channels: int, kernel_size: int = 2, eps: float = 5e-4, bias_epochs: float = 3.0) -> None:
        super().__init__()
        check_int("in_channels", in_channels)
        check_int("kernel_size", kernel_size)
        if eps <= 0:
            raise ValueError(f"whiten_eps={eps} is out of range; it must be > 0")
        if bias_epochs < 0:
            raise ValueError(f"whiten_bias_epochs={bias_epochs} is out of range; it must be ≥ 0")
        self.kernel_size, self.eps, self.bias_epochs = kernel_size, eps, float(bias_epochs)
        self.out_channels = 2 * in_channels * kernel_size**2
        # before fitting: a plain conv's random filters and their negation (a usable network, fitted or not)
        filters = torch.empty(self.out_channels // 2, in_channels, kernel_size, kernel_size)
        nn.init.kaiming_uniform_(filters, a=5**0.5)
        self.weight = nn.Parameter(torch.cat([filters, -filters]), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_channels))
        self.register_buffer("fitted", torch.tensor(False))
        # training images seen, and how many the bias trains for (set from the training-set size)
        self.register_buffer("seen", torch.tensor(0, dtype=torch.long))
        self.register_buffer("bias_images", torch.tensor(-1, dtype=torch.long))

    @torch.no_grad()
    def fit_to_data(self, images: Tensor, num_train: int | None = None) -> None:
        """Set the weights from training ``images [N, C, H, W]`` (normalised as the network sees
        them); ``num_train``: training images an epoch, for the bias's training span."""
        k = self.kernel_size
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # [N, C, H', W', k, k]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k).double()
        patches = patches - patches.mean(0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        scaled = (eigenvectors / (eigenvalues.clamp(min=0) + self.eps).sqrt()).T  # rows: one filter each
        filters = scaled.flip(0).reshape(-1, images.shape[1], k, k).to(self.weight)
        self.weight.copy_(torch.cat([filters, -filters]))
        self.bias.zero_()
        self.fitted.fill_(True)
        if num_train is not None:
            self.bias_images.fill_(int(round(self.bias_epochs * num_train)))

    def bias_trains(self) -> bool:
        """Whether the bias is still trained (``bias_images < 0``: no training-set size was given)."""
        limit = int(self.bias_images)
        return limit < 0 or int(self.seen) < limit

    def forward(self, image: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, 2·C·k², H-k+1, W-k+1]``."""
        bias = self.bias
        if self.training and torch.is_grad_enabled():
            if not self.bias_trains():
                bias = bias.detach()  # no gradient: the optimizer leaves it (and its momentum) alone
            self.seen += image.shape[0]
        return F.conv2d(image, self.weight, bias)


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """Batch norm whose scale stays 1 (not trained); its bias is learned, with its learning rate
    multiplied by ``bias_lr_scale`` under :func:`scaled_sgd` (``optimizer=airbench``)."""

    def __init__(self, num_features: int, momentum: float = 0.4, eps: float = 1e-12,
                 bias_lr_scale: float = 64.0) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)
        self.bias.lr_scale = bias_lr_scale


class ConvBlock(nn.Module):
    """conv3×3 → 2×2 max-pool → BN → GELU → conv3×3 → BN → GELU: ``[B, C, H, W] -> [B, C', H/2, W/2]``
    (floor), convolutions without bias, identity-initialised (the first ``min(C, C')`` output
    channels pass their input channel through)."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float = 0.4,
                 bias_lr_scale: float = 64.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(out_channels, bn_momentum, bias_lr_scale=bias_lr_scale)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = FrozenScaleBatchNorm(out_channels, bn_momentum, bias_lr_scale=bias_lr_scale)
        self.act = nn.GELU()
        for conv in (self.conv1, self.conv2):
            n = min(conv.in_channels, conv.out_channels)
            with torch.no_grad():
                nn.init.dirac_(conv.weight[:n, :n])

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C', H // 2, W // 2]``."""
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class Airbench(nn.Module):
    """Whitening → GELU → ``depth`` conv blocks of widths ``width``, ``4·width``, ``4·width`` (each
    halves the map): ``[B, C, 32, 32] -> [B, 4·width, 3, 3]`` (``depth=3``; ``depth=2`` stops at
    ``[B, 4·width, 7, 7]``, a map with room for a graph).

    ``width``: the first block's width; the others follow it, so one key scales the whole network
    (64: airbench94's 64 / 256 / 256, about 1.9 M parameters).
    """

    def __init__(self, in_channels: int, width: int = 64, depth: int = 3, whiten_kernel: int = 2,
                 whiten_eps: float = 5e-4, whiten_bias_epochs: float = 3.0, bn_momentum: float = 0.4) -> None:
        super().__init__()
        check_int("width", width)
        if depth not in (1, 2, 3):
            raise ValueError(f"depth={depth!r} is out of range; it must be 1, 2 or 3")
        if not 0 < bn_momentum <= 1:
            raise ValueError(f"bn_momentum={bn_momentum} is out of range; it must be in (0, 1]")
        self.whiten = Whitening(in_channels, whiten_kernel, whiten_eps, whiten_bias_epochs)
        self.act = nn.GELU()
        widths = (width, 4 * width, 4 * width)[:depth]
        self.blocks, self.out_channels = chain(lambda c_in, c_out: ConvBlock(c_in, c_out, bn_momentum),
                                               self.whiten.out_channels, widths)

    def forward(self, image: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, out_channels, h, w]`` (32×32: h = w = 15, 7, 3 after 1, 2, 3 blocks)."""
        return self.blocks(self.act(self.whiten(image)))


class AirbenchDecoder(ScatterDecoder):
    """Graph → CNN (as :class:`~interconnects.models.decoders.ScatterDecoder`: scattered back to the
    cells, fused with the backbone's map), then ``num_blocks`` airbench conv blocks of ``channels``
    (null: the map's channels), each halving the map. With no graph it is the blocks on the
    backbone's map, so ``Airbench(depth=2)`` + this decoder is the whole airbench network, and a
    hybrid differs from it only by the graph at the 7×7 map.

    ``(graph with x [B, N, C_g] | None, fmap [B, C_f, h, w]) -> [B, channels, h / 2^num_blocks, w / 2^num_blocks]``.
    """

    def __init__(self, graph_channels: int, fmap_channels: int, channels: int | None = None, num_blocks: int = 1,
                 fuse: str = "add", empty: str = "zero", reduce: str = "mean", bn_momentum: float = 0.4) -> None:
        super().__init__(graph_channels, fmap_channels, num_convs=0, fuse=fuse, empty=empty, reduce=reduce)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks={num_blocks!r} is out of range; it must be an integer ≥ 0")
        in_ch = self.out_channels
        channels = channels or fmap_channels
        self.convs, self.out_channels = chain(lambda c_in, c_out: ConvBlock(c_in, c_out, bn_momentum), in_ch,
                                              [channels] * num_blocks)


def fit_to_data(network: nn.Module, images: Tensor, num_train: int | None = None) -> list[str]:
    """Call ``fit_to_data(images, num_train)`` of every submodule of ``network`` that declares it
    and is not ``fitted`` yet (weights loaded from a checkpoint are kept); ``images [N, C, H, W]``
    are training images, normalised, on any device. Returns the names of the modules fitted."""
    fitted = []
    for name, module in network.named_modules():
        if module is network or not hasattr(module, "fit_to_data") or bool(getattr(module, "fitted", True)):
            continue
        param = next(module.parameters(), None)
        module.fit_to_data(images.to(param.device) if param is not None else images, num_train)
        fitted.append(name)
    return fitted


def scaled_sgd(params, lr: float, momentum: float = 0.85, nesterov: bool = True, weight_decay: float = 0.0,
               **kwargs) -> torch.optim.SGD:
    """SGD whose parameters marked ``p.lr_scale = s`` (the frozen-scale batch norms' biases) form a
    group of learning rate ``lr·s`` and weight decay ``weight_decay / s``, as airbench trains its
    batch-norm biases; every other parameter takes ``lr`` and ``weight_decay``."""
    groups: dict[float, list] = {}
    for p in params:
        groups.setdefault(float(getattr(p, "lr_scale", 1.0)), []).append(p)
    return torch.optim.SGD([{"params": ps, "lr": lr * s, "weight_decay": weight_decay / s}
                            for s, ps in sorted(groups.items())],
                           lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, **kwargs)
