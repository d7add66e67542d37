"""The dataset table: every ``data.name``, what a model needs to know of each (:class:`DataInfo`),
and the checks of the ``data`` config's values."""

from __future__ import annotations

from dataclasses import dataclass

from .image_folder import FolderScan, scan_folder
from .splits import digits_splits, split_keys
from .tensors import channel_mean_std
from .torchvision_sets import CLASS_NAMES, SPECS

AUGMENT = ("none", "crop", "crop_flip", "crop_altflip", "affine")
#: ``data.crop_pad_mode``: how ``crop*`` pads before cutting
PAD_MODES = ("zeros", "reflect")

# every data.name: the torchvision datasets, then the two that need no download
DATASETS = (*SPECS, "digits", "image_folder")


@dataclass
class DataInfo:
    """What a model needs to know of a dataset. ``mean``/``std`` are per channel in [0, 1] units;
    they are empty in :func:`data_info`'s answer where only the training images can tell them
    (``image_folder``, forced ``data.channels``) and filled in :class:`DataBundle`'s ``info``."""

    in_channels: int
    image_size: tuple[int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = tuple(str(i) for i in range(self.num_classes))


def data_info(cfg) -> DataInfo:
    """What a model needs to know of the dataset described by the ``data`` config ``cfg`` (or by
    its name): channels, image size, classes and their names, normalisation. Cheap: for
    ``image_folder`` a directory listing and one image (class names are the folder names); for
    ``digits`` the statistics of its training split."""
    name = cfg if isinstance(cfg, str) else cfg.name
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r} is not supported; choose one of {', '.join(DATASETS)}")
    size_key = None if isinstance(cfg, str) else cfg.get("image_size")
    channels_key = None if isinstance(cfg, str) else cfg.get("channels")
    if name == "image_folder":
        if isinstance(cfg, str):
            raise ValueError("data=image_folder needs data.root=DIR, a folder with train/<class>/ and test/<class>/")
        return folder_info(scan_folder(cfg))
    if name == "digits":
        size = (size_key, size_key) if size_key else (8, 8)
        channels = channels_key or 1
        train, _, _ = digits_splits(size, channels, *split_keys(cfg))
        return DataInfo(channels, size, 10, *channel_mean_std(train[0]))
    _, channels, size, classes, mean, std, _ = SPECS[name]
    if channels_key and channels_key != channels:
        channels, mean, std = channels_key, (), ()
    names = CLASS_NAMES[name] if name.startswith("cifar") else ()
    return DataInfo(channels, (size_key, size_key) if size_key else size, classes, mean, std, names)


def folder_info(scan: FolderScan) -> DataInfo:
    """:class:`DataInfo` of an image folder's listing (mean and std still empty)."""
    return DataInfo(scan.channels, scan.size, len(scan.classes), (), (), scan.classes)


def check_data_config(cfg) -> None:
    """One-line ``ValueError`` for a bad ``data.*`` value, before anything is loaded."""
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name={cfg.name!r} is not supported; choose one of {', '.join(DATASETS)}")
    if cfg.augment not in AUGMENT:
        raise ValueError(f"data.augment={cfg.augment!r} is not supported; choose one of {', '.join(AUGMENT)}")
    if cfg.get("crop_padding", 0) < 0:
        raise ValueError(f"data.crop_padding={cfg.crop_padding} is out of range; it must be an integer ≥ 0")
    if cfg.get("crop_pad_mode", "zeros") not in PAD_MODES:
        raise ValueError(f"data.crop_pad_mode={cfg.crop_pad_mode!r} is not supported; choose one of {', '.join(PAD_MODES)}")
    for key in ("batch_size", "eval_batch_size", "image_size"):
        value = cfg.get(key)
        if value is not None and value < 1:
            raise ValueError(f"data.{key}={value} is out of range; it must be an integer ≥ 1")
    if cfg.get("channels") not in (None, 1, 3):
        raise ValueError(f"data.channels={cfg.channels} is not supported; choose 1 (grey), 3 (RGB) or null (as stored)")
    if cfg.get("max_memory_gb", 0) < 0:
        raise ValueError(f"data.max_memory_gb={cfg.max_memory_gb} is out of range; it must be ≥ 0")
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers={cfg.num_workers} is out of range; it must be ≥ 0")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} is out of range; it must be in [0, 1)")
