"""The user's own images: ``DIR/train/<class>/*``, ``DIR/test/<class>/*`` and optionally ``DIR/val/<class>/*``.

Classes are the folder names (sorted), found and read through torchvision's ``ImageFolder`` (PIL).
The channel count (grey or RGB) and the image size are taken from the first training image unless
``data.channels`` / ``data.image_size`` say otherwise; every image is converted to that mode and
resized (bilinear, antialiased) when its size differs. Mean and standard deviation come from the
training images and are cached under ``~/.cache/interconnects/image_folder`` (``$XDG_CACHE_HOME``
honoured), keyed by the files' paths, sizes and modification times, so the data folder may be
read-only and a changed file invalidates the figures.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .tensors import ChannelMoments, ImageTensors

log = logging.getLogger("interconnects")

GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
EXTENSIONS = ", ".join(e.lstrip(".") for e in IMG_EXTENSIONS)
DECODE_BATCH = 256


class ImageReader:
    """``path -> uint8 [C, H, W]``: the image at ``path`` as grey (``channels=1``) or RGB, resized to
    ``size = (H, W)`` when it differs. A file PIL cannot read raises a one-line ``ValueError`` naming it."""

    def __init__(self, channels: int, size: tuple[int, int]) -> None:
        self.mode = "L" if channels == 1 else "RGB"
        self.size = tuple(size)

    def __call__(self, path: str) -> Tensor:
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"data.root: cannot read image {path} ({reason}); remove or replace it") from None
        if (image.height, image.width) != self.size:
            image = TF.resize(image, list(self.size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.pil_to_tensor(image)


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


def _list_split(root: Path, split: str) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """Classes and samples of ``root/split``; a missing folder, no class folders, no images or an
    empty class folder raises a one-line ``ValueError`` naming the folder."""
    folder = root / split
    if not folder.is_dir():
        raise ValueError(f"data.root={root}: {folder} is missing; put the images in {folder}/<class>/*.png (or .jpg)")
    try:
        listing = ImageFolder(str(folder), allow_empty=True)
    except FileNotFoundError:
        raise ValueError(f"data.root={root}: {folder} has no class folders; put the images in {folder}/<class>/") from None
    counts = torch.bincount(torch.as_tensor(listing.targets, dtype=torch.long), minlength=len(listing.classes))
    if int(counts.sum()) == 0:
        raise ValueError(f"data.root={root}: no images in {folder}/<class>/ (looked for {EXTENSIONS})")
    empty = [name for name, count in zip(listing.classes, counts.tolist()) if count == 0]
    if empty:
        raise ValueError(f"data.root={root}: class folder {folder / empty[0]} has no images "
                         f"(looked for {EXTENSIONS}); add images or remove the folder")
    return tuple(listing.classes), list(listing.samples)


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


class _DecodeItems(Dataset):
    """``i -> (uint8 [C, H, W], error)`` over ``samples``: a file that cannot be read gives zeros
    and the one-line reason, so a worker process reports it without a traceback."""

    def __init__(self, samples: list[tuple[str, int]], reader: ImageReader, channels: int) -> None:
        self.samples, self.reader = samples, reader
        self.blank = torch.zeros((channels, *reader.size), dtype=torch.uint8)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        try:
            return self.reader(self.samples[index][0]), ""
        except ValueError as exc:
            return self.blank, str(exc)


def _stack_decoded(items):
    return torch.stack([image for image, _ in items]), [error for _, error in items if error]


def _decoded_batches(samples, reader: ImageReader, channels: int, num_workers: int):
    """Batches ``uint8 [B, C, H, W]`` of ``samples`` in order, decoded by ``num_workers`` processes;
    the first unreadable file raises its one-line ``ValueError``."""
    loader = DataLoader(_DecodeItems(samples, reader, channels), batch_size=DECODE_BATCH, num_workers=num_workers,
                        collate_fn=_stack_decoded)
    for images, errors in loader:
        if errors:
            raise ValueError(errors[0])
        yield images


def decode_samples(samples, reader: ImageReader, channels: int, num_workers: int = 0) -> tuple[Tensor, Tensor]:
    """``(images uint8 [N, C, H, W], labels long [N])`` of ``samples``, decoded once."""
    images = torch.empty((len(samples), channels, *reader.size), dtype=torch.uint8)
    start = 0
    for batch in _decoded_batches(samples, reader, channels, num_workers):
        images[start:start + len(batch)] = batch
        start += len(batch)
    return images, torch.as_tensor([label for _, label in samples], dtype=torch.long)


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


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "interconnects" / "image_folder"


def _stats_key(scan: FolderScan, samples) -> str:
    """A digest of what the statistics depend on: the folder, channels, size and every training
    file's path, byte size and modification time."""
    digest = hashlib.sha256(json.dumps([str(scan.root.resolve()), scan.channels, list(scan.size)]).encode())
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cached_mean_std(scan: FolderScan, samples, compute) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel ``(mean, std)`` of the training ``samples``: read from the cache, or
    ``compute()``-d and stored there (an unwritable cache only costs the recomputation next time)."""
    path = _cache_dir() / f"{_stats_key(scan, samples)}.json"
    try:
        stored = json.loads(path.read_text())
        return tuple(stored["mean"]), tuple(stored["std"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    mean, std = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f"{path.name}.{os.getpid()}.part")
        part.write_text(json.dumps({"root": str(scan.root.resolve()), "images": len(samples), "mean": mean, "std": std}))
        part.replace(path)
    except OSError as exc:
        log.warning("could not cache the image statistics in %s (%s)", path.parent, exc.strerror or exc)
    return mean, std


def streamed_mean_std(samples, reader: ImageReader, channels: int, num_workers: int):
    """Per-channel ``(mean, std)`` of ``samples`` read batch by batch, never all in memory."""
    moments = ChannelMoments()
    for batch in _decoded_batches(samples, reader, channels, num_workers):
        moments.update(batch)
    return moments.result()

