"""Rank awareness for ``torchrun``: which process this is, how many there are, and the few
collectives the engine needs. Everything answers for a single process (rank 0 of 1) when torchrun
did not start the run, so the engine asks these helpers unconditionally.

``torchrun --nproc_per_node=N train.py ...`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` / ``MASTER_PORT`` and ``TORCHELASTIC_RUN_ID`` for each process; :func:`init` joins
them into one process group (gloo on the CPU, nccl on CUDA).
"""

from __future__ import annotations

import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def env_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def is_distributed() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_primary() -> bool:
    """The process that logs and writes files (rank 0)."""
    return rank() == 0


def init(device_spec: str, sync_bn: bool = False) -> str:
    """Join torchrun's processes into one process group when ``WORLD_SIZE`` > 1; returns the device
    this process trains on (``cuda:<LOCAL_RANK>`` when ``device_spec`` is ``auto``/``cuda`` and CUDA
    is present, else ``device_spec`` unchanged). Gloo on the CPU, nccl on CUDA. ``sync_bn``
    (``trainer.sync_batchnorm``) needs CUDA: refused on the CPU before any work."""
    if env_world_size() <= 1 or is_distributed():
        return device_spec
    cuda = device_spec.startswith("cuda") or (device_spec == "auto" and torch.cuda.is_available())
    if sync_bn and not cuda:
        raise ValueError("trainer.sync_batchnorm=true needs CUDA devices (SyncBatchNorm runs on GPUs only); on the "
                         "CPU use trainer.sync_batchnorm=false, or turn batch norm off (backbone.batch_norm=false, ...)")
    if device_spec.startswith("cuda:"):
        raise ValueError(f"trainer.device={device_spec!r}: under torchrun each process takes the GPU of its "
                         "LOCAL_RANK; use auto or cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', '?')} processes on this node but it "
                             f"has {torch.cuda.device_count()} CUDA device(s); use --nproc_per_node ≤ that")
        torch.cuda.set_device(local)
        device_spec = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return device_spec


def cleanup() -> None:
    """Leave the process group (no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch):
    """This rank's part of a global batch: each tensor of ``batch`` ([B, ...]) split along dim 0 into
    ``world_size()`` contiguous parts ([≈B/W, ...]); other items as they are. Every rank computes the
    same global batch (same seed, epoch and batch index), so the data order stays that of a single
    process and resumes like it."""
    if not is_distributed():
        return batch
    r, w = rank(), world_size()
    return type(batch)(t.tensor_split(w)[r] if isinstance(t, torch.Tensor) else t for t in batch)


def reduce_sums(sums: dict) -> dict:
    """``sums`` ({name: tensor or number}) added up over all ranks, in one all-reduce; tensors keep
    their shape and dtype, numbers come back as floats."""
    if not is_distributed() or not sums:
        return sums
    keys = list(sums)
    values = [torch.as_tensor(sums[k]) for k in keys]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = torch.cat([v.detach().reshape(-1).to(device, torch.float64) for v in values])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out, start = {}, 0
    for key, value in zip(keys, values):
        part = flat[start:start + value.numel()].reshape(value.shape)
        start += value.numel()
        out[key] = float(part) if not isinstance(sums[key], torch.Tensor) else part.to(value.device, value.dtype)
    return out


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` in DistributedDataParallel: gradients averaged over the ranks in ``backward``."""
    # the 1×1 convolutions' gradients come in another memory layout than DDP's buckets: a speed note, not an error
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every BatchNorm layer replaced (in place, same parameters) by SyncBatchNorm,
    whose statistics are computed over the global batch."""
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a checkpoint the others read)."""
    if is_distributed():
        dist.barrier()
