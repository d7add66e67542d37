"""Datasets and loaders: torchvision datasets, a bundled MNIST sample, reproducible order and augmentation."""

from __future__ import annotations

import gzip
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .tensors import ImageTensors, as_tensors, keep_batch

DATASETS = ("mnist", "mnist_sample", "fashion_mnist", "cifar10", "cifar100")
AUGMENT = ("none", "crop", "crop_flip", "affine")
SAMPLE_ROOT = Path(__file__).parent / "sample"

# name: (torchvision class, channels, image size, classes, mean, std, folder under root)
_SPECS = {
    "mnist": ("MNIST", 1, (28, 28), 10, (0.1307,), (0.3081,), "MNIST/raw"),
    "mnist_sample": ("MNIST", 1, (28, 28), 10, (0.1307,), (0.3081,), "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", 1, (28, 28), 10, (0.2860,), (0.3530,), "FashionMNIST/raw"),
    "cifar10": ("CIFAR10", 3, (32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", 3, (32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "cifar-100-python"),
}


class DataMissingError(RuntimeError):
    """The dataset is not on disk and cannot be downloaded; the message says where to put it."""


@dataclass
class DataInfo:
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
    its name): channels, image size, classes and their names, normalisation."""
    name = cfg if isinstance(cfg, str) else cfg.name
    if name not in _SPECS:
        raise ValueError(f"data.name={name!r} is not supported; choose one of {', '.join(DATASETS)}")
    _, channels, size, classes, mean, std, _ = _SPECS[name]
    return DataInfo(channels, size, classes, mean, std)


def resolve_root(name: str, root: str | None) -> Path:
    """``data.root``; for ``mnist_sample`` a null root is the sample bundled with the package."""
    if root is None:
        if name != "mnist_sample":
            raise ValueError(f"data.root is null; give the folder that holds (or will hold) {name}")
        return SAMPLE_ROOT
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
        f"put {files} in {root}/{folder}, or set data.root=DIR to a folder laid out that way"
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
        if not download or name == "mnist_sample":
            raise DataMissingError(_missing_message(name, base, "data.download=false" if not download else "sample files missing")) from None
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
    data_info(cfg.name)
    if cfg.augment not in AUGMENT:
        raise ValueError(f"data.augment={cfg.augment!r} is not supported; choose one of {', '.join(AUGMENT)}")
    for key in ("batch_size", "eval_batch_size"):
        value = cfg.get(key)
        if value is not None and value < 1:
            raise ValueError(f"data.{key}={value} is out of range; it must be an integer ≥ 1")
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers={cfg.num_workers} is out of range; it must be ≥ 0")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} is out of range; it must be in [0, 1)")


def build_data(cfg, seed: int) -> DataBundle:
    """Loaders for ``cfg`` (the ``data`` config). The validation split is carved from the training
    set with its own seed ``data.split_seed``; training order and augmentation follow ``seed``.

    Images are decoded once by torchvision into uint8 tensors and served a batch at a time
    (:class:`ImageTensors`), normalised with the dataset's mean and std.
    """
    check_data_config(cfg)
    info = data_info(cfg)
    train_images, train_labels = as_tensors(load_split(cfg.name, cfg.root, True, cfg.download))
    test_images, test_labels = as_tensors(load_split(cfg.name, cfg.root, False, cfg.download))
    n = len(train_labels)
    n_val = int(round(n * cfg.val_fraction))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    stats = (info.mean, info.std)
    train_view = ImageTensors(train_images[train_idx], train_labels[train_idx], *stats, cfg.augment, cfg.crop_padding, seed)
    val = ImageTensors(train_images[val_idx], train_labels[val_idx], *stats)
    test = ImageTensors(test_images, test_labels, *stats)
    batches = EpochBatches(len(train_view), cfg.batch_size, seed)
    eval_bs = cfg.eval_batch_size or max(cfg.batch_size, 256)
    # own generators: creating a loader's iterator then draws nothing from the global torch RNG
    common = dict(num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, generator=torch.Generator(),
                  collate_fn=keep_batch)
    return DataBundle(
        info=info,
        train=DataLoader(train_view, batch_sampler=batches, **common),
        val=DataLoader(val, batch_size=eval_bs, shuffle=False, **common),
        test=DataLoader(test, batch_size=eval_bs, shuffle=False, **common),
        train_view=train_view,
        train_batches=batches,
    )
