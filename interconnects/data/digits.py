"""scikit-learn's embedded handwritten digits (``load_digits``): real digits that need no download.

1,797 images of 8×8 pixels with 17 grey levels (0..16), from 43 writers. They are scaled to uint8
0..255 and upsampled once (bilinear) to the configured size, so models built for 28×28 MNIST apply
unchanged. The test split is a fixed, class-stratified draw of :data:`TEST_SIZE` images chosen by
``data.split_seed``; training and validation share the rest.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor

from .tensors import resize_images

NUM_IMAGES = 1797
TEST_SIZE = 360  # 20% of the 1,797 images
LEVELS = 16  # pixel values run 0..16


def digits_images(image_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``(images uint8 [1797, 1, H, W], labels long [1797])`` with
    ``(H, W) = image_size``: 0..16 scaled to 0..255, then bilinear upsampling."""
    bunch = load_digits()
    scaled = np.rint(bunch.images * (255.0 / LEVELS)).astype(np.uint8)
    images = torch.from_numpy(scaled).unsqueeze(1)
    return resize_images(images, image_size).contiguous(), torch.as_tensor(bunch.target, dtype=torch.long)


def digits_test_split(labels: Tensor, split_seed: int) -> tuple[Tensor, Tensor]:
    """``(train indices, test indices)`` into the 1,797 digits: :data:`TEST_SIZE` test images drawn
    per class in proportion (stratified) by ``split_seed``; the two sets never overlap."""
    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=TEST_SIZE, stratify=labels.numpy(), random_state=split_seed)
    return torch.as_tensor(np.sort(train)), torch.as_tensor(np.sort(test))
