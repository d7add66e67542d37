"""Backbones: image ``[B, C, H, W]`` → feature map ``[B, C', h, w]``.

Every backbone has ``out_channels`` so that the next stage is built without matching numbers by hand.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ..checks import check_int


class Pixels(nn.Module):
    """No CNN: the image itself is the feature map, so every pixel becomes a node."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.out_channels = in_channels

    def forward(self, image: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, C, H, W]``."""
        return image


def conv_block(in_channels: int, out_channels: int, batch_norm: bool = True, stride: int = 1) -> nn.Sequential:
    """3×3 conv (stride ``stride``) → batch norm → ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not batch_norm),
        nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity(),
        nn.ReLU(inplace=True),
    )


def chain(make_block, in_channels: int, widths) -> tuple[nn.Sequential, int]:
    """``make_block(c_in, c_out)`` for each width in ``widths``, each block taking the previous one's
    output: ``(the blocks as one nn.Sequential, the last width)`` (``in_channels`` when empty)."""
    blocks = []
    for width in widths:
        blocks.append(make_block(in_channels, width))
        in_channels = width
    return nn.Sequential(*blocks), in_channels


class SimpleCNN(nn.Module):
    """A plain CNN of ``depth`` 3×3 conv blocks; width doubles at each of the ``log2(output_stride)``
    downsamplings (2×2 max-pool), which are placed after the first blocks.

    ``[B, C, H, W] -> [B, out_channels, H / output_stride, W / output_stride]``.
    """

    def __init__(
        self, in_channels: int, depth: int = 3, width: int = 32, batch_norm: bool = True, output_stride: int = 4
    ) -> None:
        super().__init__()
        check_int("depth", depth)
        check_int("width", width)
        check_int("output_stride", output_stride)
        downsamples = int(math.log2(output_stride))
        if 2**downsamples != output_stride or downsamples > depth:
            raise ValueError(
                f"output_stride={output_stride} is not supported; it must be a power of 2 with log2 ≤ depth={depth}"
            )
        layers, channels = [], in_channels
        for i in range(depth):
            out = width * 2 ** min(i, downsamples)
            layers.append(conv_block(channels, out, batch_norm))
            if i < downsamples:
                layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, image: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, out_channels, H / output_stride, W / output_stride]``."""
        return self.features(image)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 adapted to 32×32 inputs (3×3 stride-1 stem, no max-pool), cut after
    ``stage`` (1–4). Output stride 1, 2, 4, 8 and channels 64, 128, 256, 512 for stages 1–4.
    """

    def __init__(self, in_channels: int, stage: int = 4) -> None:
        super().__init__()
        if stage not in (1, 2, 3, 4):
            raise ValueError(f"stage={stage!r} is out of range; it must be 1, 2, 3 or 4")
        from torchvision.models import resnet18

        net = resnet18(weights=None)
        net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        stages = [net.layer1, net.layer2, net.layer3, net.layer4][:stage]
        self.features = nn.Sequential(net.conv1, net.bn1, net.relu, *stages)
        self.out_channels = 64 * 2 ** (stage - 1)

    def forward(self, image: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, out_channels, H / 2^(stage-1), W / 2^(stage-1)]``."""
        return self.features(image)
