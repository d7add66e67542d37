"""Where and how a run computes: the device, the precision, and the seeds."""

from __future__ import annotations

import os
import platform
import random

import numpy as np
import torch

#: ``trainer.precision`` → the autocast dtype (``None``: full float32); ``auto`` is resolved by device.
PRECISION = {"auto": None, "32": None, "bf16": torch.bfloat16, "16": torch.float16}


def resolve_precision(spec: str, device: torch.device):
    """The autocast dtype for ``trainer.precision=spec`` on ``device``: ``auto`` is bf16 on a GPU
    that supports it, fp16 (with loss scaling) on an older GPU, and full float32 on the CPU."""
    if str(spec) != "auto":
        return PRECISION[str(spec)]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def cpu_lacks_bf16_units() -> bool:
    """True on an x86 CPU with neither AVX512-BF16 nor AMX: bf16 matrix products there are emulated
    (a step measured 11× slower than in float32 on such a CPU). Other CPUs are given the benefit of
    the doubt."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is None for probe in probes):
        return False
    return not any(probe() for probe in probes)


def resolve_device(spec: str, key: str = "trainer.device") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` as given, if available.
    ``key`` names the setting in error messages."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={spec!r} but CUDA is not available on this machine; use auto or cpu")
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"{key}={spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(spec)
    raise ValueError(f"{key}={spec!r} is not supported; use auto, cpu, cuda or cuda:N")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def move(batch, device: torch.device):
    """``batch`` (a tuple or list of tensors and other values) on ``device``; tensors in pinned
    memory are copied without blocking."""
    return [t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch]


def describe_machine(device: torch.device | None = None) -> str:
    """One line naming the CPU, its cores, torch and its threads (and the GPU of ``device``), for
    benchmark tables and results."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"CPU: {cpu} ({os.cpu_count()} logical cores); torch {torch.__version__}; {torch.get_num_threads()} threads"
    if device is not None and device.type == "cuda":
        text += f"; GPU: {torch.cuda.get_device_name(device)}"
    return text + (f"; device: {device}" if device is not None else "")
