"""Checkpoints: written atomically, loaded safely.

A checkpoint holds only tensors and plain Python values (dicts, lists, tuples, strings, numbers,
booleans, None), so it is loaded with ``torch.load(weights_only=True)``: a file crafted to run code
when unpickled is refused before anything in it runs. What comes out is then checked against the
allow-list of what the project writes (the top-level entries, their kinds, and the value types
anywhere inside), so a file that merely unpickles cleanly is still not taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

FORMAT = "interconnects-checkpoint"
VERSION = 1
# The allow-list: the top-level entries a checkpoint may hold, and the ones it must hold.
ALLOWED_KEYS = {
    "format", "version", "model", "optimizers", "schedulers", "scaler", "epoch", "step",
    "batch_in_epoch", "rng", "best", "accumulators", "config", "lookahead",
}
REQUIRED_KEYS = {"format", "version", "model", "config"}
# The only value types the project writes, at any depth.
ALLOWED_TYPES = (dict, OrderedDict, list, tuple, str, int, float, bool, type(None), torch.Tensor)
# What each top-level entry must be.
_ENTRY_TYPES = {
    "format": str, "version": int, "model": dict, "optimizers": dict, "schedulers": dict, "scaler": dict,
    "epoch": int, "step": int, "batch_in_epoch": int, "rng": dict, "best": dict, "accumulators": dict,
    "config": dict, "lookahead": dict,
}
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why in one line."""


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: str | Path, write, mode: str = "wb", mkdir: bool = True) -> None:
    """Write ``path`` through ``write(file)`` via a temporary file, fsync and rename: a crash at any
    moment leaves either the old file or the new one, never a half-written one. A failed write (disk
    full, folder gone) removes the temporary file, leaves ``path`` as it was and raises ``OSError``.
    ``mkdir=False``: the folder must exist (a folder removed during a run is an error, not re-made)."""
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_atomic(state: dict, path: str | Path, mkdir: bool = True) -> None:
    """``torch.save(state)`` into ``path`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: torch.save(state, f), "wb", mkdir)


def write_json_atomic(values: dict, path: str | Path) -> None:
    """``values`` as JSON into ``path`` atomically (see :func:`write_atomic`)."""
    text = json.dumps(values, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda f: f.write(text), "w", mkdir=False)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temporary files of :func:`save_atomic` that a killed process left in ``folder``
    (those whose writer is no longer running); returns what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if not match or int(match["pid"]) == os.getpid():
            continue
        try:
            os.kill(int(match["pid"]), 0)
            continue  # its writer is still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, OSError):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _foreign_value(value, where: str, depth: int = 0) -> str | None:
    """Where ``value`` holds something outside :data:`ALLOWED_TYPES` (``None`` if nowhere)."""
    if type(value) not in ALLOWED_TYPES and not isinstance(value, torch.Tensor):
        return f"{type(value).__module__}.{type(value).__qualname__} at {where}"
    if depth > 32:
        return f"nesting deeper than 32 levels at {where}"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                return f"a {type(key).__qualname__} key at {where}"
            found = _foreign_value(item, f"{where}.{key}", depth + 1)
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _foreign_value(item, f"{where}[{i}]", depth + 1)
            if found:
                return found
    return None


def check_structure(state, path: str | Path = "checkpoint") -> dict:
    """Raise :class:`CheckpointError` unless ``state`` is what the project writes: the format
    marker and version, the allowed top-level entries of the right kinds, a ``model`` of tensors,
    and nothing but tensors and plain values anywhere inside. Returns ``state``."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an interconnects checkpoint (no '{FORMAT}' marker)")
    extra = set(state) - ALLOWED_KEYS
    missing = REQUIRED_KEYS - set(state)
    if extra or missing:
        raise CheckpointError(f"{path} has unexpected entries {sorted(extra)} or lacks {sorted(missing)}")
    if state["version"] != VERSION:
        raise CheckpointError(f"{path} is checkpoint format version {state['version']}; this version reads {VERSION}")
    for key, kind in _ENTRY_TYPES.items():
        if key in state and (not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool))):
            raise CheckpointError(f"{path} is not a usable checkpoint: '{key}' is a {type(state[key]).__name__}, not a {kind.__name__}")
    for key in ("epoch", "step", "batch_in_epoch"):
        if key in state and state[key] < 0:
            raise CheckpointError(f"{path} is not a usable checkpoint: '{key}' is {state[key]}")
    bad = [k for k, v in state["model"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a usable checkpoint: model entry {bad[0]!r} is not a tensor")
    found = _foreign_value(state, "checkpoint")
    if found:
        raise CheckpointError(f"{path} holds {found}; a checkpoint holds only tensors and plain values")
    return state


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely. Raises :class:`CheckpointError` (one line) for a missing,
    truncated or foreign file, and for one holding anything outside the allow-list; nothing
    in a refused file is run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={str(path)!r} does not exist (or is not a file)")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not magic:
        raise CheckpointError(f"{path} is empty (a truncated checkpoint?)")
    if magic != b"PK\x03\x04":
        raise CheckpointError(f"{path} is not a checkpoint (not a torch zip archive)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated or corrupt (its zip archive has no end record)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects outside the checkpoint allow-list "
            "(tensors and plain values); nothing in it was run"
        ) from None
    except Exception as exc:  # noqa: BLE001 - every failure of an untrusted file becomes one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
        raise CheckpointError(f"{path} is truncated or corrupt ({first})") from None
    return check_structure(state, path)


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as plain values and tensors."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
