"""Checkpoints: written atomically, loaded safely.

A checkpoint holds only tensors and plain Python values (dicts, lists, tuples, strings, numbers,
booleans, None), so it is loaded with ``torch.load(weights_only=True)``: a file crafted to run code
when unpickled is refused before anything in it runs.
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

FORMAT = "interconnects-checkpoint"
VERSION = 1
# The allow-list: the top-level entries a checkpoint may hold, and the ones it must hold.
ALLOWED_KEYS = {
    "format", "version", "model", "optimizers", "schedulers", "scaler", "epoch", "step",
    "batch_in_epoch", "rng", "best", "accumulators", "config",
}
REQUIRED_KEYS = {"format", "version", "model", "config"}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says why in one line."""


def save_atomic(state: dict, path: str | Path) -> None:
    """Write ``state`` to ``path`` via a temporary file, fsync and rename: a crash at any moment
    leaves either the old file or the new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint safely. Raises :class:`CheckpointError` (one line) for a missing,
    truncated or foreign file, and for one holding anything outside the allow-list."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path={str(path)!r} does not exist (or is not a file)")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise CheckpointError(f"{path} is not a checkpoint (not a torch zip archive)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"refusing to load {path}: it holds Python objects outside the checkpoint allow-list "
            "(tensors and plain values); nothing in it was run"
        ) from None
    except Exception as exc:  # noqa: BLE001 - every failure of an untrusted file becomes one line
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:100]
        raise CheckpointError(f"{path} is truncated or corrupt ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an interconnects checkpoint (no '{FORMAT}' marker)")
    extra = set(state) - ALLOWED_KEYS
    missing = REQUIRED_KEYS - set(state)
    if extra or missing:
        raise CheckpointError(f"{path} has unexpected entries {sorted(extra)} or lacks {sorted(missing)}")
    if state["version"] != VERSION:
        raise CheckpointError(f"{path} is checkpoint format version {state['version']}; this version reads {VERSION}")
    return state


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
