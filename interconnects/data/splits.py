"""Training, validation and test splits: validation carved from the training set by
``data.split_seed``, the digits' fixed test draw, torchvision's and image folders' splits as uint8
tensors (or, for an image folder larger than ``data.max_memory_gb``, read from disk)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import torch

from .digits import digits_images, digits_test_split
from .image_folder import FolderImages, ImageReader, cached_mean_std, decode_samples, scan_folder, streamed_mean_std
from .tensors import ImageTensors, as_tensors, channel_mean_std, fit_channels, resize_images
from .torchvision_sets import load_split

if TYPE_CHECKING:
    from .catalog import DataInfo

log = logging.getLogger("interconnects")


def split_keys(cfg) -> tuple[int, float]:
    return (0, 0.1) if isinstance(cfg, str) else (cfg.split_seed, cfg.val_fraction)


@functools.lru_cache(maxsize=2)
def digits_splits(size: tuple[int, int], channels: int, split_seed: int, val_fraction: float):
    """``(train, val, test)`` of the digits as ``(images uint8 [N, C, H, W], labels [N])`` pairs:
    the stratified test draw, then validation carved from the rest; cached because
    :func:`data_info` and :func:`build_data` both need it (nothing writes into these tensors)."""
    images, labels = digits_images(size)
    images = fit_channels(images, channels)
    rest, test = digits_test_split(labels, split_seed)
    train, val = carve((images[rest], labels[rest]), val_fraction, split_seed)
    return train, val, (images[test], labels[test])


def carve(train, val_fraction: float, split_seed: int):
    """``(train, val)``: a ``val_fraction`` of the pairs ``train = (images, labels)`` held out by a
    permutation fixed by ``split_seed``."""
    images, labels = train
    n = len(labels)
    n_val = int(round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def torchvision_splits(cfg, info: DataInfo):
    """``(train, val, test)`` pairs ``(images uint8 [N, C, H, W], labels [N])`` of a torchvision
    dataset, converted to ``info``'s channels and size."""
    pairs = []
    for train in (True, False):
        images, labels = as_tensors(load_split(cfg.name, cfg.root, train, cfg.download))
        pairs.append((resize_images(fit_channels(images, info.in_channels), info.image_size), labels))
    return (*carve(pairs[0], cfg.val_fraction, cfg.split_seed), pairs[1])


def folder_views(cfg, info: DataInfo, seed: int):
    """Training, validation and test datasets of an image folder, in memory when all of it fits in
    ``data.max_memory_gb``, else read from disk a batch at a time; fills ``info``'s mean and std."""
    scan = scan_folder(cfg)
    reader = ImageReader(scan.channels, scan.size)
    train, val = scan.train, scan.val
    if val is None:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.split_seed))
        n_val = int(round(len(train) * cfg.val_fraction))
        val, train = [train[i] for i in perm[:n_val].tolist()], [train[i] for i in perm[n_val:].tolist()]
    splits = (train, val, scan.test)
    nbytes = sum(map(len, splits)) * scan.channels * scan.size[0] * scan.size[1]
    if nbytes <= cfg.max_memory_gb * 2**30:
        log.info("image_folder: decoding %d images into memory (%.1f MB)", sum(map(len, splits)), nbytes / 2**20)
        decoded = [decode_samples(samples, reader, scan.channels, cfg.num_workers) for samples in splits]
        info.mean, info.std = cached_mean_std(scan, train, lambda: channel_mean_std(decoded[0][0]))
        return [ImageTensors(*pair, info.mean, info.std) for pair in decoded]
    log.info("image_folder: %.1f GB of images exceed data.max_memory_gb=%g; reading them from disk with "
             "data.num_workers=%d", nbytes / 2**30, cfg.max_memory_gb, cfg.num_workers)
    info.mean, info.std = cached_mean_std(scan, train,
                                          lambda: streamed_mean_std(train, reader, scan.channels, cfg.num_workers))
    return [FolderImages(samples, reader, info.mean, info.std) for samples in splits]
