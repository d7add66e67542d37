"""Image datasets held as one uint8 tensor, served a batch at a time with vectorised augmentation.

MNIST, Fashion-MNIST and CIFAR fit in memory many times over; decoding them once and cropping,
flipping and normalising whole batches with tensor ops is much faster than per-image PIL transforms,
and the randomness of each batch is fixed by ``(seed, epoch, batch)`` so a run resumed mid-epoch sees
exactly the augmentation an uninterrupted run would have.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torch.utils.data import Dataset


def as_tensors(dataset) -> tuple[Tensor, Tensor]:
    """``(images uint8 [N, C, H, W], labels long [N])`` of a torchvision MNIST-like or CIFAR dataset."""
    data = dataset.data
    images = torch.from_numpy(np.asarray(data)) if not isinstance(data, Tensor) else data
    if images.dim() == 3:  # MNIST: [N, H, W]
        images = images.unsqueeze(1)
    elif images.shape[-1] in (1, 3):  # CIFAR: [N, H, W, C]
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(dataset.targets), dtype=torch.long)
    return images.contiguous(), labels


def resize_images(images: Tensor, size: tuple[int, int], chunk: int = 4096) -> Tensor:
    """uint8 ``images [N, C, H, W]`` resized to ``size = (H', W')`` with bilinear interpolation
    (antialiased when shrinking), rounded back to uint8 ``[N, C, H', W']``; unchanged when the size
    already agrees. Works through ``chunk`` images at a time to bound the float copy."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = torch.empty((*images.shape[:2], *size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].float()
        part = torch.nn.functional.interpolate(part, size=tuple(size), mode="bilinear", align_corners=False,
                                               antialias=True)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def fit_channels(images: Tensor, channels: int) -> Tensor:
    """uint8 ``images [N, C, H, W]`` as ``channels`` (1 or 3) channels: grey repeated into RGB, or
    RGB to grey by luminance."""
    if images.shape[1] == channels:
        return images
    if channels == 3:
        return TF.grayscale_to_rgb(images)
    return TF.rgb_to_grayscale(images, num_output_channels=1)


def channel_mean_std(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 ``images [N, C, H, W]`` scaled to [0, 1],
    accumulated in float64 over ``chunk`` images at a time."""
    moments = ChannelMoments()
    for start in range(0, len(images), chunk):
        moments.update(images[start:start + chunk])
    return moments.result()


class ChannelMoments:
    """Running per-channel sums of uint8 batches ``[B, C, H, W]``, for a mean and standard deviation
    in [0, 1] units over images that are seen a batch at a time."""

    def __init__(self) -> None:
        self.count, self.total, self.squares = 0, None, None

    def update(self, images: Tensor) -> None:
        x = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
        total, squares = x.sum(1), x.square().sum(1)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += x.shape[1]

    def result(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(mean, std)`` per channel; std is at least 1e-3 so a constant channel still normalises."""
        mean = self.total / self.count
        std = (self.squares / self.count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
        return tuple(mean.tolist()), tuple(std.tolist())


def random_crop_flip(images: Tensor, padding: int, flip: bool | Tensor, generator: torch.Generator,
                     pad_mode: str = "zeros") -> Tensor:
    """Random crops of ``images [B, C, H, W]`` after padding by ``padding`` (``pad_mode``: ``zeros``
    or ``reflect``), then horizontal flips: ``flip=True`` mirrors a random half (one draw per image),
    a bool tensor ``[B]`` mirrors the images it marks. All in a few tensor ops."""
    b, c, h, w = images.shape
    device = images.device  # (the draws come from the CPU generator: the same on every device)
    out = images
    if padding:
        padded = torch.nn.functional.pad(images, (padding,) * 4, mode="constant" if pad_mode == "zeros" else pad_mode)
        dy = torch.randint(0, 2 * padding + 1, (b, 1, 1), generator=generator).to(device)
        dx = torch.randint(0, 2 * padding + 1, (b, 1, 1), generator=generator).to(device)
        rows = (dy + torch.arange(h, device=device).view(1, h, 1)).expand(b, h, w)
        cols = (dx + torch.arange(w, device=device).view(1, 1, w)).expand(b, h, w)
        out = padded[torch.arange(b, device=device).view(b, 1, 1), :, rows, cols].permute(0, 3, 1, 2)
    if isinstance(flip, Tensor):
        out = torch.where(flip.to(device).view(b, 1, 1, 1), out.flip(-1), out)
    elif flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(device)
        out = torch.where(mask.view(b, 1, 1, 1), out.flip(-1), out)
    return out.contiguous()


def alternating_flips(index: Tensor, seed: int, epoch: int) -> Tensor:
    """Which of the images at dataset ``index [B]`` are mirrored in ``epoch`` (bool ``[B]``) under
    airbench's alternating flip: a fixed random half of the dataset (drawn from ``seed`` and each
    image's index alone) in even epochs, the other half in odd ones, so every image is seen both
    ways round in any two epochs in a row."""
    # a per-index hash (splitmix64's finaliser, in 63-bit arithmetic), vectorised and the same on every device
    mask = (1 << 62) - 1  # (the products wrap in int64; the masks keep the shifts' inputs positive)
    z = (index.to(torch.long) * 0x1E3779B97F4A7C15 + ((seed * 0x3F58476D1CE4E5B9 + 0x14D049BB133111EB) & mask)) & mask
    z = ((z ^ (z >> 31)) * 0x2545F4914F6CDD1D) & mask
    z = z ^ (z >> 29)
    return ((z >> 17) & 1).bool() ^ bool(epoch % 2)


def random_affine(images: Tensor, generator: torch.Generator, degrees: float = 10.0,
                  scale: tuple[float, float] = (0.9, 1.1), translate: float = 0.1) -> Tensor:
    """Random rotation (±``degrees``), zoom (``scale``) and shift (± ``translate`` of the size) of
    float ``images [B, C, H, W]``, one draw per image, as one batched ``grid_sample``; uncovered
    pixels are 0."""
    b = images.shape[0]
    angle = (torch.rand(b, generator=generator) * 2 - 1) * degrees * torch.pi / 180
    zoom = scale[0] + torch.rand(b, generator=generator) * (scale[1] - scale[0])
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * translate * 2  # grid units span 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    theta = theta.to(images.device)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, padding_mode="zeros", align_corners=False)


class ImageTensors(Dataset):
    """``(images uint8 [N, C, H, W], labels [N])`` served normalised, with optional augmentation:
    ``crop`` (pad by ``padding``, zeros or ``pad_mode="reflect"``, random crop), ``crop_flip`` (and
    a random horizontal flip), ``crop_altflip`` (and airbench's alternating flip: each image mirrored
    in every other epoch, :func:`alternating_flips`) or ``affine`` (random rotation ±10°, zoom
    0.9–1.1, shift ±10%).

    ``__getitems__`` returns a whole batch ``(float images [B, C, H, W], labels [B])``; the random
    draws of a batch depend only on ``(seed, epoch, first index of the batch)``.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean, std, augment: str = "none",
                 padding: int = 0, seed: int = 0, pad_mode: str = "zeros") -> None:
        self.images, self.labels = images, labels
        self.pad_mode = pad_mode
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augment, self.padding, self.seed, self.epoch = augment, padding, seed, 0

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device) -> "ImageTensors":
        """Keep the images (and the normalisation) on ``device``: batches are then cut, augmented
        and normalised there (``data.on_device``); the random draws stay those of the CPU."""
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def load(self, index: Tensor) -> Tensor:
        """The uint8 images ``[B, C, H, W]`` at ``index [B]``."""
        return self.images[index]

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, dtype=torch.long).to(self.labels.device)
        images = self.load(index)
        generator = None
        if self.augment != "none":
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + int(indices[0]))
        if self.augment in ("crop", "crop_flip", "crop_altflip"):
            flip = alternating_flips(index, self.seed, self.epoch) if self.augment == "crop_altflip" \
                else self.augment == "crop_flip"
            images = random_crop_flip(images, self.padding, flip, generator, self.pad_mode)
        images = images.float().div_(255)
        if self.augment == "affine":
            images = random_affine(images, generator)
        return (images - self.mean) / self.std, self.labels[index]

    def __getitem__(self, index: int):
        images, labels = self.__getitems__([index])
        return images[0], labels[0]


def keep_batch(batch):
    """``collate_fn`` for :class:`ImageTensors`: the batch comes ready-made from ``__getitems__``."""
    return batch
