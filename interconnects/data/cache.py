"""What the data package keeps between runs, under ``$XDG_CACHE_HOME/interconnects`` (default
``~/.cache/interconnects``), so that a dataset folder may be read-only.

:class:`DecodedCache` holds the decoded images of a list of files as one uint8 array: its file is
named by the decode settings and the files' paths and labels, and is valid only while every file's
byte size and modification time are those it was written from. Each file is written to a temporary
name and renamed (a reader never sees a partial file), and carries its shape and a CRC-32 of its
pixels: a truncated, overwritten or foreign file is detected on reading and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("interconnects")

MAGIC = b"interconnects decoded images v1\n"
_LENGTH = struct.Struct("<Q")


def cache_dir(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/interconnects/<parts>`` (``~/.cache`` when the variable is unset or empty)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").joinpath("interconnects", *parts)


def files_stamp(paths) -> str:
    """A digest of every file's path, byte size and modification time (what a changed, added or
    removed file changes)."""
    lines = []
    for path in paths:
        stat = os.stat(path)
        lines.append(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


class DecodedCache:
    """The cached uint8 images ``[N, C, H, W]`` of ``samples`` (``(path, label)`` pairs) decoded with
    ``settings`` (a JSON-able description of the decoding: mode, size, library version...); the
    paths are taken as given (absolute ones name the same files from any working directory)."""

    def __init__(self, samples: list[tuple[str, int]], settings: dict) -> None:
        self.samples, self.settings = samples, settings
        name = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for path, label in samples:
            name.update(f"{path}\0{label}\n".encode())
        self.path = cache_dir("decoded") / f"{name.hexdigest()[:32]}.bin"
        self.stamp = files_stamp(path for path, _ in samples)

    def load(self, shape: tuple[int, ...]) -> Tensor | None:
        """The cached images of ``shape`` ``[N, C, H, W]``, or ``None`` when there is no valid
        entry (none yet, the files changed, or the entry is partial or corrupt: then said)."""
        try:
            with open(self.path, "rb") as f:
                problem = self._read(f, tuple(shape))
        except FileNotFoundError:
            return None
        except OSError as exc:
            problem = f"unreadable: {exc.strerror or exc}"
        if isinstance(problem, Tensor):
            return problem
        if problem:
            log.warning("decoded-image cache %s is %s; decoding the images again", self.path, problem)
        return None

    def _read(self, f, shape: tuple[int, ...]):
        """The images, ``""`` for an entry of files that changed since, or what is wrong with it."""
        if f.read(len(MAGIC)) != MAGIC:
            return "not a decoded-image cache file"
        raw = f.read(_LENGTH.size)
        if len(raw) != _LENGTH.size:
            return "partial (its header is cut short)"
        (length,) = _LENGTH.unpack(raw)
        if length > 1 << 20:
            return "corrupt (its header length is implausible)"
        try:
            header = json.loads(f.read(length))
            stamp, stored_shape, crc = header["stamp"], tuple(header["shape"]), int(header["crc32"])
        except (ValueError, KeyError, TypeError):
            return "corrupt (its header does not parse)"
        if stamp != self.stamp:
            log.info("the image files changed since %s was written; decoding them again", self.path)
            return ""
        if stored_shape != shape:
            return f"of another shape ({stored_shape}, expected {shape})"
        size = 1
        for n in shape:
            size *= n
        payload = bytearray(size)
        if f.readinto(payload) != size or f.read(1):
            return f"partial or overlong (expected {size} bytes of pixels)"
        if zlib.crc32(payload) != crc:
            return "corrupt (its checksum does not match its pixels)"
        return torch.frombuffer(payload, dtype=torch.uint8).view(shape)

    def store(self, images: Tensor) -> None:
        """Write ``images`` (uint8 ``[N, C, H, W]``, on the CPU) atomically; an unwritable cache only
        costs the decoding next time (a warning says so)."""
        pixels = images.contiguous().numpy()
        header = json.dumps({"stamp": self.stamp, "shape": list(images.shape), "crc32": zlib.crc32(pixels),
                             "settings": self.settings, "first": self.samples[0][0] if self.samples else None})
        part = self.path.with_name(f"{self.path.name}.{os.getpid()}.part")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as f:
                f.write(MAGIC + _LENGTH.pack(len(header.encode())) + header.encode())
                f.write(memoryview(pixels).cast("B"))
                f.flush()
                os.fsync(f.fileno())
            part.replace(self.path)
        except OSError as exc:
            log.warning("could not cache the decoded images in %s (%s)", self.path.parent, exc.strerror or exc)
            part.unlink(missing_ok=True)
