"""Training, validation and test splits: validation carved from the training set by
``data.split_seed``, the digits' fixed test draw, torchvision's and image folders' splits as uint8
tensors (or, for an image folder larger than ``data.max_memory_gb``, read from disk)."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .digits import digits_images, digits_test_split
from .image_folder import (FolderImages, FolderScan, ImageReader, ImageSizeError, cached_mean_std, decode_workers,
                           decoded_stats_key, files_stats_key, load_decoded, scan_class_folders, streamed_mean_std)
from .tensors import ImageTensors, as_tensors, channel_mean_std, fit_channels, resize_images
from .torchvision_sets import CLASS_NAMES, SPECS, load_split, reads_class_folders, torchvision_layout

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


def carve_indices(n: int, val_fraction: float, split_seed: int) -> tuple[Tensor, Tensor]:
    """``(train indices, val indices)`` into ``n`` training items: a ``val_fraction`` of them held
    out by a permutation fixed by ``split_seed``."""
    n_val = int(round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return perm[n_val:], perm[:n_val]


def carve(train, val_fraction: float, split_seed: int):
    """``(train, val)``: a ``val_fraction`` of the pairs ``train = (images, labels)`` held out by a
    permutation fixed by ``split_seed``."""
    images, labels = train
    train_idx, val_idx = carve_indices(len(labels), val_fraction, split_seed)
    return tuple((images.index_select(0, idx), labels.index_select(0, idx)) for idx in (train_idx, val_idx))


def torchvision_splits(cfg, info: DataInfo):
    """``((train, val, test), note)``: the pairs ``(images uint8 [N, C, H, W], labels [N])`` of a
    torchvision dataset, converted to ``info``'s channels and size, read from torchvision's files or
    from class folders of its images (:func:`reads_class_folders`); ``note`` says where from."""
    if reads_class_folders(cfg.name, cfg.root):
        pairs, note = _class_folder_pairs(cfg)
    else:
        pairs, note = [as_tensors(load_split(cfg.name, cfg.root, train, cfg.download)) for train in (True, False)], ""
    pairs = [(resize_images(fit_channels(images, info.in_channels), info.image_size), labels)
             for images, labels in pairs]
    return (*carve(pairs[0], cfg.val_fraction, cfg.split_seed), pairs[1]), note


def _class_folder_pairs(cfg):
    """``([train, test], note)`` of a known dataset laid out as class folders, at its own size and
    channels; decoded once, then read from the decoded-image cache."""
    _, channels, size, *_ = SPECS[cfg.name]
    samples = scan_class_folders(cfg.root, cfg.name, CLASS_NAMES[cfg.name], size,
                                 torchvision_layout(cfg.name, cfg.root))
    reader = ImageReader(channels, size, resize=False)
    pairs, notes = [], []
    for split in ("train", "test"):
        try:
            decoded, note = _decoded(samples[split], reader, cfg.num_workers)
        except ValueError as exc:
            hint = (f"; {cfg.name} expects {size[0]}×{size[1]} images (data=image_folder resizes other sizes)"
                    if isinstance(exc, ImageSizeError) else "")
            raise ValueError(f"data.root={cfg.root} (data={cfg.name}): {str(exc).removeprefix('data.root: ')}{hint}") \
                from None
        pairs.append((decoded.images, decoded.labels))
        notes.append(note)
    return pairs, _joined(notes)


def _decoded(samples, reader: ImageReader, num_workers: int):
    """``(decoded, note)``: :func:`load_decoded`'s answer and how it came, in words."""
    workers = decode_workers(num_workers, len(samples))
    decoded = load_decoded(samples, reader, workers)
    how = "cached" if decoded.cached else f"decoded with {workers} processes" if workers else "decoded"
    return decoded, how


def _joined(notes: list[str]) -> str:
    """The splits' distinct notes, in order: ``"cached"`` when every split came from the cache."""
    return ", ".join(dict.fromkeys(notes))


def folder_views(cfg, info: DataInfo, scan: FolderScan):
    """``([train, val, test], note)``: the datasets of the image folder ``scan``, in memory when all of
    it fits in ``data.max_memory_gb`` (decoded once, then from the decoded-image cache), else read
    from disk a batch at a time; fills ``info``'s mean and std. Validation is the folder's ``val/``,
    else a ``data.val_fraction`` of ``train/`` held out by ``data.split_seed``."""
    reader = ImageReader(scan.channels, scan.size)
    carved = [cfg.val_fraction, cfg.split_seed] if scan.val is None else "val/"
    if scan.val is None:
        train_idx, val_idx = carve_indices(len(scan.train), cfg.val_fraction, cfg.split_seed)
        train, val = [scan.train[i] for i in train_idx.tolist()], [scan.train[i] for i in val_idx.tolist()]
    else:
        train, val = scan.train, scan.val
    count = len(train) + len(val) + len(scan.test)
    nbytes = count * scan.channels * scan.size[0] * scan.size[1]
    if nbytes > cfg.max_memory_gb * 2**30:
        log.info("image_folder: %.1f GB of images exceed data.max_memory_gb=%g; reading them from disk with "
                 "data.num_workers=%d", nbytes / 2**30, cfg.max_memory_gb, cfg.num_workers)
        workers = decode_workers(cfg.num_workers, len(train))
        info.mean, info.std = cached_mean_std(files_stats_key(scan, train), scan, len(train),
                                              lambda: streamed_mean_std(train, reader, workers))
        return [FolderImages(samples, reader, info.mean, info.std) for samples in (train, val, scan.test)], "from disk"
    log.info("image_folder: %d images in memory (%.1f MB)", count, nbytes / 2**20)
    # whole folders are decoded (and cached), so another validation draw reuses the cache
    decoded = [_decoded(samples, reader, cfg.num_workers) for samples in (scan.train, scan.val, scan.test)
               if samples is not None]
    pairs = [(d.images, d.labels) for d, _ in decoded]
    if scan.val is None:
        pairs[:1] = carve(pairs[0], cfg.val_fraction, cfg.split_seed)
    info.mean, info.std = cached_mean_std(decoded_stats_key(scan, decoded[0][0], carved), scan, len(train),
                                          lambda: channel_mean_std(pairs[0][0]))
    return [ImageTensors(*pair, info.mean, info.std) for pair in pairs], _joined([note for _, note in decoded])
