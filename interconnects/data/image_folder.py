"""The user's own images: ``DIR/train/<class>/*``, ``DIR/test/<class>/*`` and optionally ``DIR/val/<class>/*``;
and the known datasets (CIFAR-10, CIFAR-100, MNIST, Fashion-MNIST) laid out the same way.

Classes are the folder names (sorted), listed as torchvision's ``ImageFolder`` lists them and read
with PIL. The channel count (grey or RGB) and the image size are taken from the first training image
unless ``data.channels`` / ``data.image_size`` say otherwise; every image is converted to that mode
and resized (bilinear, antialiased) when its size differs. A known dataset's folders must hold its
classes at its size instead (:func:`scan_class_folders`).

A folder that fits in memory is decoded once, by a process per core, into a uint8 array kept in the
decoded-image cache (:class:`~interconnects.data.cache.DecodedCache`), so later runs read it back in
about a second. Mean and standard deviation of the training images are cached under
``~/.cache/interconnects/image_folder`` (``$XDG_CACHE_HOME`` honoured). Both are keyed by the files'
paths, sizes and modification times, so the data folder may be read-only and a changed file
invalidates them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS

from .cache import DecodedCache, cache_dir
from .tensors import ChannelMoments, ImageTensors

log = logging.getLogger("interconnects")

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
EXTENSIONS = ", ".join(e.lstrip(".") for e in IMG_EXTENSIONS)
DECODE_CHUNK = 512  # images a decoding task reads
PARALLEL_FROM = 2048  # folders with fewer images decode with data.num_workers (starting processes costs more)


class ImageSizeError(ValueError):
    """An image of another size than the one a reader with ``resize=False`` expects."""


class ImageReader:
    """``path -> uint8 [C, H, W]``: the image at ``path`` as grey (``channels=1``) or RGB, resized to
    ``size = (H, W)`` when it differs (with ``resize=False`` a differing size is refused instead). A
    file PIL cannot read raises a one-line ``ValueError`` naming it."""

    def __init__(self, channels: int, size: tuple[int, int], resize: bool = True) -> None:
        self.channels, self.mode = channels, "L" if channels == 1 else "RGB"
        self.size, self.resize = tuple(size), resize

    def settings(self) -> dict:
        """What the decoded pixels depend on besides the files (the key of their cache)."""
        return {"mode": self.mode, "size": list(self.size), "resize": "bilinear-antialias" if self.resize else None,
                "pillow": PIL.__version__, "torchvision": torchvision.__version__}

    def array(self, path: str) -> np.ndarray:
        """The image at ``path`` as uint8 ``[H, W, C]``."""
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"data.root: cannot read image {path} ({reason}); remove or replace it") from None
        if (image.height, image.width) != self.size:
            if not self.resize:
                raise ImageSizeError(f"image {path} is {image.height}×{image.width} pixels, "
                                 f"not {self.size[0]}×{self.size[1]}")
            image = TF.resize(image, list(self.size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        pixels = np.array(image)
        return pixels[..., None] if pixels.ndim == 2 else pixels

    def __call__(self, path: str) -> Tensor:
        return torch.from_numpy(self.array(path)).permute(2, 0, 1).contiguous()


@dataclass
class FolderScan:
    """What a listing of the folder (and one image) tells: the classes, the ``(path, label)`` samples
    of each split (``val`` is ``None`` without a ``val/`` folder), channels and image size."""

    root: Path
    classes: tuple[str, ...]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]] | None
    test: list[tuple[str, int]]
    channels: int
    size: tuple[int, int]


def _listing(folder: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """``(classes, samples)`` of ``folder/<class>/**`` as torchvision's ``ImageFolder`` lists them
    (sorted class folders, image files by extension, subfolders followed), with absolute paths (the
    keys of the caches); ``FileNotFoundError`` when there is no class folder."""
    folder = folder.absolute()
    classes = tuple(sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()))
    if not classes:
        raise FileNotFoundError(folder)
    samples = []
    for label, name in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(folder / name, followlinks=True)):
            prefix = dirpath + os.sep
            samples.extend((prefix + file, label) for file in sorted(names) if file.lower().endswith(IMG_EXTENSIONS))
    return classes, samples


def _list_split(root: Path, split: str) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """Classes and samples of ``root/split``; a missing folder, no class folders, no images or an
    empty class folder raises a one-line ``ValueError`` naming the folder."""
    folder = root / split
    if not folder.is_dir():
        raise ValueError(f"data.root={root}: {folder} is missing; put the images in {folder}/<class>/*.png (or .jpg)")
    try:
        classes, samples = _listing(folder)
    except FileNotFoundError:
        raise ValueError(f"data.root={root}: {folder} has no class folders; put the images in {folder}/<class>/") from None
    counts = torch.bincount(torch.as_tensor([label for _, label in samples], dtype=torch.long), minlength=len(classes))
    if int(counts.sum()) == 0:
        raise ValueError(f"data.root={root}: no images in {folder}/<class>/ (looked for {EXTENSIONS})")
    empty = [name for name, count in zip(classes, counts.tolist()) if count == 0]
    if empty:
        raise ValueError(f"data.root={root}: class folder {folder / empty[0]} has no images "
                         f"(looked for {EXTENSIONS}); add images or remove the folder")
    return classes, samples


def scan_folder(cfg) -> FolderScan:
    """Check and list the folder ``cfg.root`` (the ``data`` config) without decoding it: directory
    listings and the first training image only. Raises a one-line ``ValueError`` naming the problem."""
    if cfg.root is None:
        raise ValueError("data.root is null; set data.root=DIR, a folder with DIR/train/<class>/ and DIR/test/<class>/")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise ValueError(f"data.root={cfg.root} does not exist; it must hold train/<class>/ and test/<class>/ image folders")
    classes, train = _list_split(root, "train")
    splits = {"test": None, "val": None}
    for split in ("test", "val"):
        if split == "val" and not (root / "val").is_dir():
            continue
        split_classes, splits[split] = _list_split(root, split)
        if split_classes != classes:
            extra = sorted(set(split_classes) - set(classes))
            missing = sorted(set(classes) - set(split_classes))
            detail = "; ".join(part for part in (f"only in {split}/: {', '.join(extra)}" if extra else "",
                                                  f"missing from {split}/: {', '.join(missing)}" if missing else "") if part)
            raise ValueError(f"data.root={cfg.root}: the class folders of {root / split} differ from those of "
                             f"{root / 'train'} ({detail})")
    first = train[0][0]
    try:
        with Image.open(first) as image:
            mode, (width, height) = image.mode, image.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"data.root={cfg.root}: cannot read image {first} ({str(exc).strip() or type(exc).__name__}); "
                         "remove or replace it") from None
    channels = cfg.channels or (1 if mode in GREY_MODES else 3)
    size = (cfg.image_size, cfg.image_size) if cfg.image_size else (height, width)
    return FolderScan(root, classes, train, splits["val"], splits["test"], channels, size)


def decode_workers(num_workers: int, count: int) -> int:
    """Processes that decode ``count`` images: every core of the machine for a large folder (at least
    ``data.num_workers``), ``data.num_workers`` for a small one (0: in this process)."""
    if count < PARALLEL_FROM:
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = max(num_workers, cores)
    return 0 if workers == 1 else workers


def _decode_paths(reader: ImageReader, paths: list[str]) -> tuple[np.ndarray, ValueError | None]:
    """``(uint8 [B, H, W, C], error)`` of ``paths``; ``error`` is the first unreadable file's one-line
    ``ValueError`` (``None`` when all were read), so a worker process reports it without a traceback."""
    out = np.empty((len(paths), *reader.size, reader.channels), np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = reader.array(path)
        except ValueError as exc:
            return out, exc
    return out, None


def decoded_chunks(samples, reader: ImageReader, workers: int = 0):
    """Chunks ``uint8 [B, C, H, W]`` of ``samples`` in order, decoded by ``workers`` processes (0: in
    this one); the first unreadable file raises its one-line ``ValueError``."""
    paths = [path for path, _ in samples]
    chunks = [paths[start:start + DECODE_CHUNK] for start in range(0, len(paths), DECODE_CHUNK)]
    decode = functools.partial(_decode_paths, reader)
    pool = None
    if workers > 0 and len(chunks) > 1:
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else None)
        pool = ProcessPoolExecutor(min(workers, len(chunks)), mp_context=context)
    try:
        for pixels, error in (pool.map(decode, chunks) if pool else map(decode, chunks)):
            if error is not None:
                raise error
            yield torch.from_numpy(pixels).permute(0, 3, 1, 2)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


def decode_samples(samples, reader: ImageReader, workers: int = 0) -> tuple[Tensor, Tensor]:
    """``(images uint8 [N, C, H, W], labels long [N])`` of ``samples``, decoded once."""
    images = torch.empty((len(samples), reader.channels, *reader.size), dtype=torch.uint8)
    start = 0
    for chunk in decoded_chunks(samples, reader, workers):
        images[start:start + len(chunk)] = chunk
        start += len(chunk)
    return images, torch.as_tensor([label for _, label in samples], dtype=torch.long)


@dataclass
class Decoded:
    """Decoded images ``uint8 [N, C, H, W]`` with their ``labels [N]``; ``cached``: they came from
    the decoded-image cache; ``key``: what they were decoded from (files, stamp, settings)."""

    images: Tensor
    labels: Tensor
    cached: bool
    key: str


def load_decoded(samples, reader: ImageReader, workers: int = 0) -> Decoded:
    """The decoded images of ``samples`` from the decoded-image cache, else decoded by ``workers``
    processes and stored there for the next run."""
    cache = DecodedCache(samples, reader.settings())
    labels = torch.as_tensor([label for _, label in samples], dtype=torch.long)
    key = f"{cache.path.stem}:{cache.stamp}"
    images = cache.load((len(samples), reader.channels, *reader.size))
    if images is not None:
        return Decoded(images, labels, True, key)
    images, _ = decode_samples(samples, reader, workers)
    cache.store(images)
    return Decoded(images, labels, False, key)


def _preview(names, most: int = 10) -> str:
    shown = ", ".join(names[:most])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > most else shown


def scan_class_folders(root_key: str, name: str, classes: tuple[str, ...], size: tuple[int, int],
                       alternative: str) -> dict[str, list[tuple[str, int]]]:
    """The ``(path, label)`` samples of ``train`` and ``test`` of a known dataset laid out as class
    folders (``root/<split>/<class>/*``): the class folders must be exactly ``classes`` (labels are
    their index there, the dataset's official order) and the first training image ``size = (H, W)``.
    A missing split, other classes or another size raise one line saying what was found and what
    ``data=name`` expects (``alternative``: the other layout it reads)."""
    root = Path(root_key).expanduser()
    where = f"data.root={root_key} (data={name})"
    layout = (f"data={name} reads {root}/train/<class>/* and {root}/test/<class>/* with the {len(classes)} "
              f"class folders {_preview(classes, 3)}, or {alternative}")
    index = {label: i for i, label in enumerate(classes)}
    samples = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise ValueError(f"{where}: {root / split} is missing; {layout}")
        found, listed = _list_split(root, split)
        if set(found) != set(classes):
            missing = [c for c in classes if c not in found]
            extra = [c for c in found if c not in index]
            detail = "; ".join(part for part in (f"missing: {_preview(missing, 5)}" if missing else "",
                                                  f"not of {name}: {_preview(extra, 5)}" if extra else "") if part)
            raise ValueError(f"{where}: {root / split} holds {len(found)} class folders ({_preview(list(found), 5)}); "
                             f"{name} expects its {len(classes)} classes ({detail}); "
                             "data=image_folder reads any classes")
        samples[split] = [(path, index[found[label]]) for path, label in listed]
    first = samples["train"][0][0]
    try:
        with Image.open(first) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"{where}: cannot read image {first} ({str(exc).strip() or type(exc).__name__}); "
                         "remove or replace it") from None
    if (height, width) != tuple(size):
        raise ValueError(f"{where}: {first} is {height}×{width} pixels; {name} expects {size[0]}×{size[1]} images "
                         "(data=image_folder resizes other sizes)")
    return samples


class FolderImages(ImageTensors):
    """:class:`ImageTensors` whose images stay on disk: each batch is read, converted and resized
    (``uint8 [B, C, H, W]``) when it is served, then augmented and normalised like the in-memory ones.
    Meant for a ``DataLoader`` with worker processes."""

    def __init__(self, samples: list[tuple[str, int]], reader: ImageReader, mean, std, augment: str = "none",
                 padding: int = 0, seed: int = 0) -> None:
        labels = torch.as_tensor([label for _, label in samples], dtype=torch.long)
        super().__init__(None, labels, mean, std, augment, padding, seed)
        self.paths, self.reader = [path for path, _ in samples], reader

    def load(self, index: Tensor) -> Tensor:
        """The uint8 images ``[B, C, H, W]`` at ``index [B]``, read from their files."""
        return torch.stack([self.reader(self.paths[i]) for i in index.tolist()])


def files_stats_key(scan: FolderScan, samples) -> str:
    """The key of the statistics of the training ``samples`` read from disk: the folder, channels,
    size and every training file's path, label, byte size and modification time."""
    digest = hashlib.sha256(json.dumps([str(scan.root.resolve()), scan.channels, list(scan.size)]).encode())
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def decoded_stats_key(scan: FolderScan, decoded: Decoded, carve: list) -> str:
    """The key of the statistics of training images drawn from ``decoded`` (the whole ``train/``
    folder, its files' stamp included) by ``carve`` (what picks the training images among them)."""
    return hashlib.sha256(json.dumps([str(scan.root.resolve()), decoded.key, carve]).encode()).hexdigest()


def cached_mean_std(key: str, scan: FolderScan, count: int, compute) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel ``(mean, std)`` of ``count`` training images: read from the cache under
    ``key``, or ``compute()``-d and stored there (an unwritable cache only costs the recomputation
    next time)."""
    path = cache_dir("image_folder") / f"{key}.json"
    try:
        stored = json.loads(path.read_text())
        return tuple(stored["mean"]), tuple(stored["std"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mean, std = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        part.write_text(json.dumps({"root": str(scan.root.resolve()), "images": count, "mean": mean, "std": std}))
        part.replace(path)
    except OSError as exc:
        log.warning("could not cache the image statistics in %s (%s)", path.parent, exc.strerror or exc)
    return mean, std


def streamed_mean_std(samples, reader: ImageReader, workers: int = 0):
    """Per-channel ``(mean, std)`` of ``samples`` read chunk by chunk, never all in memory."""
    moments = ChannelMoments()
    for chunk in decoded_chunks(samples, reader, workers):
        moments.update(chunk)
    return moments.result()

