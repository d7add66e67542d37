"""Datasets and loaders: torchvision datasets, scikit-learn's embedded digits, the user's own image
folders; reproducible order and augmentation.

One module a concern: :mod:`.catalog` (the dataset table, :class:`DataInfo`, the config checks),
:mod:`.torchvision_sets` (torchvision's files, downloads, the offline message), :mod:`.splits`
(validation carving and each source's splits), :mod:`.loaders` (:class:`EpochBatches`,
:class:`DataBundle`, :func:`build_data`); :mod:`.digits`, :mod:`.image_folder` and :mod:`.tensors`
read and serve the images.
"""

from __future__ import annotations

from .catalog import AUGMENT, DATASETS, DataInfo, check_data_config, data_info
from .image_folder import FolderImages, ImageReader
from .loaders import DataBundle, EpochBatches, build_data
from .tensors import ImageTensors, channel_mean_std
from .torchvision_sets import DOWNLOAD_TIMEOUT, PROBE_TIMEOUT, DataMissingError, load_split, resolve_root

__all__ = [
    "AUGMENT", "DATASETS", "DOWNLOAD_TIMEOUT", "PROBE_TIMEOUT", "DataBundle", "DataInfo", "DataMissingError",
    "EpochBatches", "FolderImages", "ImageReader", "ImageTensors", "build_data", "channel_mean_std",
    "check_data_config", "data_info", "load_split", "resolve_root",
]
