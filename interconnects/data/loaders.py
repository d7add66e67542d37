"""Loaders: the epoch's batches in an order fixed by ``(seed, epoch)`` (:class:`EpochBatches`), and
:func:`build_data`, which assembles a dataset's splits into the run's :class:`DataBundle`."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from .catalog import DataInfo, check_data_config, data_info, folder_info
from .image_folder import scan_folder
from .splits import digits_splits, folder_views, torchvision_splits
from .tensors import ImageTensors, channel_mean_std, keep_batch

log = logging.getLogger("interconnects")


class EpochBatches:
    """Batches of one epoch in a random order fixed by ``(seed, epoch)``, starting at batch ``start``."""

    def __init__(self, num_items: int, batch_size: int, seed: int, drop_last: bool = False) -> None:
        self.num_items, self.batch_size, self.seed, self.drop_last = num_items, batch_size, seed, drop_last
        self.epoch, self.start = 0, 0

    @property
    def per_epoch(self) -> int:
        """Batches in a whole epoch."""
        return self.num_items // self.batch_size if self.drop_last else math.ceil(self.num_items / self.batch_size)

    def __len__(self) -> int:
        return max(0, self.per_epoch - self.start)

    def __iter__(self):
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch))
        batches = order.split(self.batch_size)
        if self.drop_last and len(batches) and len(batches[-1]) < self.batch_size:
            batches = batches[:-1]
        for batch in batches[self.start :]:
            yield batch.tolist()


@dataclass
class DataBundle:
    info: DataInfo
    train: DataLoader
    val: DataLoader
    test: DataLoader
    train_view: ImageTensors
    train_batches: EpochBatches

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and augmentation, resuming after ``start_batch`` batches."""
        self.train_view.epoch = epoch
        self.train_batches.epoch, self.train_batches.start = epoch, start_batch


def build_data(cfg, seed: int, device: torch.device | None = None) -> DataBundle:
    """Loaders for ``cfg`` (the ``data`` config). The validation split is carved from the training
    set with its own seed ``data.split_seed`` (``image_folder``: its ``val/`` folder when present);
    training order and augmentation follow ``seed``. Test images never enter training.

    Images are decoded once into uint8 tensors and served a batch at a time
    (:class:`ImageTensors`), normalised with the dataset's mean and std (computed from the training
    split for ``digits``, ``image_folder`` and forced ``data.channels``). An image folder larger than
    ``data.max_memory_gb`` is read from disk a batch at a time instead (:class:`FolderImages`).

    ``device``: where the run trains. On CUDA, batches come in pinned memory (``data.pin_memory``
    null or true), or with ``data.on_device=true`` the in-memory splits live on the GPU and batches
    are cut, augmented and normalised there, with the same random draws as on the CPU.
    """
    check_data_config(cfg)
    started = time.perf_counter()
    if cfg.name == "image_folder":
        scan = scan_folder(cfg)
        info = folder_info(scan)
        (train_view, val, test), note = folder_views(cfg, info, scan)
        train_view.augment, train_view.padding, train_view.seed = cfg.augment, cfg.crop_padding, seed
        train_view.pad_mode = cfg.get("crop_pad_mode", "zeros")
    else:
        info = data_info(cfg)
        if cfg.name == "digits":
            splits, note = digits_splits(info.image_size, info.in_channels, cfg.split_seed, cfg.val_fraction), ""
        else:
            splits, note = torchvision_splits(cfg, info)
        if not info.mean:
            info.mean, info.std = channel_mean_std(splits[0][0])
        stats = (info.mean, info.std)
        train_view = ImageTensors(*splits[0], *stats, cfg.augment, cfg.crop_padding, seed,
                                  cfg.get("crop_pad_mode", "zeros"))
        val, test = (ImageTensors(*pair, *stats) for pair in splits[1:])
    if cfg.augment.startswith("crop") and cfg.get("crop_pad_mode") == "reflect" \
            and cfg.crop_padding >= min(info.image_size):
        raise ValueError(f"data.crop_padding={cfg.crop_padding} is too large for data.crop_pad_mode=reflect on "
                         f"{info.image_size[0]}×{info.image_size[1]} images; it must be below "
                         f"{min(info.image_size)} (or use crop_pad_mode=zeros)")
    cuda = device is not None and torch.device(device).type == "cuda"
    on_device = cuda and bool(cfg.get("on_device"))
    if on_device:
        views = (train_view, val, test)
        if not all(isinstance(v, ImageTensors) for v in views):
            log.warning("data.on_device=true: the image folder is read from disk (larger than "
                        "data.max_memory_gb), so its batches stay on the CPU")
            on_device = False
        else:
            for view in views:
                view.to(device)
    log.info("data ready in %.1f s%s", time.perf_counter() - started, f" ({note})" if note else "")
    pin = cfg.get("pin_memory")
    pin = cuda and not on_device if pin is None else bool(pin) and not on_device
    batches = EpochBatches(len(train_view), cfg.batch_size, seed)
    eval_bs = cfg.eval_batch_size or max(cfg.batch_size, 256)
    # own generators: creating a loader's iterator then draws nothing from the global torch RNG
    common = dict(num_workers=0 if on_device else cfg.num_workers, pin_memory=pin, generator=torch.Generator(),
                  collate_fn=keep_batch)
    return DataBundle(
        info=info,
        train=DataLoader(train_view, batch_sampler=batches, **common),
        val=DataLoader(val, batch_size=eval_bs, shuffle=False, **common),
        test=DataLoader(test, batch_size=eval_bs, shuffle=False, **common),
        train_view=train_view,
        train_batches=batches,
    )
