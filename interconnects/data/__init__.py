"""Datasets and loaders: torchvision datasets, scikit-learn's embedded digits, the user's own image
folders; reproducible order and augmentation."""

from __future__ import annotations

import functools
import gzip
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .digits import digits_images, digits_test_split
from .image_folder import (FolderImages, ImageReader, cached_mean_std, decode_samples, scan_folder,
                           streamed_mean_std)
from .tensors import ImageTensors, as_tensors, channel_mean_std, fit_channels, keep_batch, resize_images

log = logging.getLogger("interconnects")

AUGMENT = ("none", "crop", "crop_flip", "affine")

# name: (torchvision class, channels, image size, classes, mean, std, folder under root)
_SPECS = {
    "mnist": ("MNIST", 1, (28, 28), 10, (0.1307,), (0.3081,), "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", 1, (28, 28), 10, (0.2860,), (0.3530,), "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", 3, (32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar-100-python"),
}
# every data.name: the torchvision datasets above, then the two that need no download
DATASETS = (*_SPECS, "digits", "image_folder")


class DataMissingError(RuntimeError):
    """The dataset is not on disk and cannot be downloaded; the message says where to put it."""


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
        scan = scan_folder(cfg)
        return DataInfo(scan.channels, scan.size, len(scan.classes), (), (), scan.classes)
    if name == "digits":
        size = (size_key, size_key) if size_key else (8, 8)
        channels = channels_key or 1
        train, _, _ = _digits_splits(size, channels, *_split_keys(cfg))
        return DataInfo(channels, size, 10, *channel_mean_std(train[0]))
    _, channels, size, classes, mean, std, _ = _SPECS[name]
    if channels_key and channels_key != channels:
        channels, mean, std = channels_key, (), ()
    return DataInfo(channels, (size_key, size_key) if size_key else size, classes, mean, std)


def _split_keys(cfg) -> tuple[int, float]:
    return (0, 0.1) if isinstance(cfg, str) else (cfg.split_seed, cfg.val_fraction)


@functools.lru_cache(maxsize=2)
def _digits_splits(size: tuple[int, int], channels: int, split_seed: int, val_fraction: float):
    """``(train, val, test)`` of the digits as ``(images uint8 [N, C, H, W], labels [N])`` pairs:
    the stratified test draw, then validation carved from the rest; cached because
    :func:`data_info` and :func:`build_data` both need it (nothing writes into these tensors)."""
    images, labels = digits_images(size)
    images = fit_channels(images, channels)
    rest, test = digits_test_split(labels, split_seed)
    train, val = _carve((images[rest], labels[rest]), val_fraction, split_seed)
    return train, val, (images[test], labels[test])


def _carve(train, val_fraction: float, split_seed: int):
    """``(train, val)``: a ``val_fraction`` of the pairs ``train = (images, labels)`` held out by a
    permutation fixed by ``split_seed``."""
    images, labels = train
    n = len(labels)
    n_val = int(round(n * val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def resolve_root(name: str, root: str | None) -> Path:
    """``data.root`` as a path; null is refused with what to set."""
    if root is None:
        raise ValueError(f"data.root is null; give the folder that holds (or will hold) {name}")
    return Path(root).expanduser()


def _unpack_gzip_raw(raw: Path) -> Path:
    """Decompress ``*.gz`` IDX files next to themselves (what torchvision's MNIST reads with
    ``download=False``); a read-only folder is mirrored into a cache folder instead. Returns the
    root that holds the decompressed ``<name>/raw`` folder."""
    root = raw.parent.parent
    archives = sorted(raw.glob("*-ubyte.gz"))
    missing = [a for a in archives if not a.with_suffix("").exists()]
    if not missing:
        return root
    try:
        for archive in missing:
            _gunzip(archive, archive.with_suffix(""))
        return root
    except OSError:
        cache = Path.home() / ".cache" / "interconnects" / f"{root.resolve().as_posix().strip('/').replace('/', '_')}"
        target = cache / raw.relative_to(root)
        target.mkdir(parents=True, exist_ok=True)
        for archive in archives:
            if not (target / archive.with_suffix("").name).exists():
                _gunzip(archive, target / archive.with_suffix("").name)
        return cache


def _gunzip(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".part")
    with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout)
    tmp.replace(dst)


def _missing_message(name: str, root: Path, cause: str) -> str:
    cls, *_, folder = _SPECS[name]
    files = {
        "MNIST": "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
        "FashionMNIST": "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz",
        "CIFAR10": "the extracted cifar-10-python.tar.gz (data_batch_1..5, test_batch, batches.meta)",
        "CIFAR100": "the extracted cifar-100-python.tar.gz (train, test, meta)",
    }[cls]
    return (
        f"dataset {name!r} is not under {root}/{folder} and could not be downloaded ({cause}); "
        f"put {files} in {root}/{folder}, or set data.root=DIR to a folder laid out that way; "
        "data=digits runs offline with nothing to download"
    )


# Downloads: a quick reachability probe first, so an offline machine fails in seconds instead of
# waiting on each mirror; then every socket operation of the download has this timeout (seconds).
PROBE_TIMEOUT = 5.0
DOWNLOAD_TIMEOUT = 30.0


def _download_urls(cls) -> list[str]:
    return list(getattr(cls, "mirrors", None) or [getattr(cls, "url", "")])


def _unreachable(urls: list[str], timeout: float = PROBE_TIMEOUT) -> str | None:
    """``None`` if a TCP connection to one of ``urls`` (or to the proxy the environment sets for
    it) opens within ``timeout`` seconds, else why not. Runs in daemon threads: a hanging name
    lookup cannot hold the process."""
    import socket
    import threading
    import time
    import urllib.parse
    import urllib.request

    proxies = urllib.request.getproxies()
    targets = []
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if not parts.hostname:
            continue
        proxy = proxies.get(parts.scheme) if not urllib.request.proxy_bypass(parts.hostname) else None
        via = urllib.parse.urlsplit(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else parts
        default = 443 if via.scheme == "https" else 80
        targets.append((via.hostname, via.port or default))
    if not targets:
        return None
    done, errors = threading.Event(), []

    def probe(host, port):
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            done.set()
        except OSError as exc:
            errors.append(f"{host}:{port}: {exc.strerror or exc}")

    threads = [threading.Thread(target=probe, args=t, daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while not done.is_set() and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        done.wait(0.05)
    if done.is_set():
        return None
    host, port = targets[0]
    return f"no network: {errors[0]}" if errors else f"no network: no connection to {host}:{port} within {timeout:g} s"


def load_split(name: str, root: str | None, train: bool, download: bool):
    """The torchvision dataset ``name`` (train or test split) under ``root``.

    Raises :class:`DataMissingError` with where to put the files when it is absent and cannot be
    downloaded (offline machines).
    """
    import torchvision.datasets as tvd

    info = _SPECS[name]
    cls = getattr(tvd, info[0])
    base = resolve_root(name, root)
    if info[0] in ("MNIST", "FashionMNIST"):
        raw = base / info[6]
        if raw.is_dir():
            base = _unpack_gzip_raw(raw)
    try:
        return cls(str(base), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataMissingError(_missing_message(name, base, "data.download=false")) from None
    cause = _unreachable(_download_urls(cls))
    if cause:
        raise DataMissingError(_missing_message(name, base, cause))
    import socket

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        return cls(str(base), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        cause = str(exc).strip().splitlines()[-1][:120] if str(exc).strip() else type(exc).__name__
        raise DataMissingError(_missing_message(name, base, cause)) from None
    finally:
        socket.setdefaulttimeout(previous)


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


def check_data_config(cfg) -> None:
    """One-line ``ValueError`` for a bad ``data.*`` value, before anything is loaded."""
    if cfg.name not in DATASETS:
        raise ValueError(f"data.name={cfg.name!r} is not supported; choose one of {', '.join(DATASETS)}")
    if cfg.augment not in AUGMENT:
        raise ValueError(f"data.augment={cfg.augment!r} is not supported; choose one of {', '.join(AUGMENT)}")
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


def _torchvision_splits(cfg, info: DataInfo):
    """``(train, val, test)`` pairs ``(images uint8 [N, C, H, W], labels [N])`` of a torchvision
    dataset, converted to ``info``'s channels and size."""
    pairs = []
    for train in (True, False):
        images, labels = as_tensors(load_split(cfg.name, cfg.root, train, cfg.download))
        pairs.append((resize_images(fit_channels(images, info.in_channels), info.image_size), labels))
    return (*_carve(pairs[0], cfg.val_fraction, cfg.split_seed), pairs[1])


def _folder_views(cfg, info: DataInfo, seed: int):
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
    info = data_info(cfg)
    if cfg.name == "image_folder":
        train_view, val, test = _folder_views(cfg, info, seed)
        train_view.augment, train_view.padding, train_view.seed = cfg.augment, cfg.crop_padding, seed
    else:
        if cfg.name == "digits":
            splits = _digits_splits(info.image_size, info.in_channels, cfg.split_seed, cfg.val_fraction)
        else:
            splits = _torchvision_splits(cfg, info)
        if not info.mean:
            info.mean, info.std = channel_mean_std(splits[0][0])
        stats = (info.mean, info.std)
        train_view = ImageTensors(*splits[0], *stats, cfg.augment, cfg.crop_padding, seed)
        val, test = (ImageTensors(*pair, *stats) for pair in splits[1:])
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
