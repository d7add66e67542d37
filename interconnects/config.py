"""Typed schemas for the Hydra configs, and the resolvers they use.

The schemas make Hydra reject a wrong type or an unknown key at composition, with its own message.
Model parts (backbone, interconnect, gnn, decoder, task, optimizer, scheduler) are ``_target_`` nodes
checked by the classes they build. This module imports no torch, so ``--help`` stays fast.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import sys

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, OmegaConf


@dataclass
class DataConfig:
    name: str = MISSING  # mnist | mnist_sample | fashion_mnist | cifar10 | cifar100
    root: Optional[str] = "./data"  # mnist_sample: null means the sample bundled with the package
    download: bool = True
    batch_size: int = 128
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    pin_memory: bool = False
    val_fraction: float = 0.1
    split_seed: int = 0
    augment: str = "none"  # none | crop | crop_flip | affine
    crop_padding: int = 2


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "32"  # 32 | bf16 | 16
    deterministic: bool = False
    compile: bool = False
    grad_clip: Optional[float] = None
    checkpoint_every_n_steps: int = 100  # step-level last.ckpt (0: at epoch ends only)
    limit_train_batches: Optional[int] = None
    limit_val_batches: Optional[int] = None
    limit_test_batches: Optional[int] = None
    on_nonfinite: str = "stop"  # stop | skip
    log_every_n_steps: int = 10
    progress: bool = True
    log_images: int = 16
    picture_every_n_epochs: int = 1  # task pictures (graphs, reconstructions, samples); 0: never
    picture_images: int = 4  # fixed validation images the pictures are drawn from


@dataclass
class LoggerConfig:
    name: str = "tensorboard"  # tensorboard | none


@dataclass
class TrainConfig:
    data: DataConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    backbone: Any = MISSING
    interconnect: Any = MISSING
    gnn: Any = MISSING
    decoder: Any = MISSING
    task: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    seed: int = 42
    ckpt_path: Optional[str] = None
    init_from: Optional[str] = None
    optimized_metric: Optional[str] = None  # null: the task's monitored metric (val/acc, val/psnr, val/fid)
    tags: list = field(default_factory=list)


@dataclass
class EvalDataOverrides:
    """Changes to the checkpoint's own data config (null keeps the checkpoint's value)."""

    root: Optional[str] = None
    download: Optional[bool] = None
    eval_batch_size: Optional[int] = None
    num_workers: Optional[int] = None


@dataclass
class EvaluateConfig:
    ckpt_path: str = MISSING
    split: str = "test"  # test | val | train
    data: EvalDataOverrides = field(default_factory=EvalDataOverrides)
    device: str = "auto"
    limit_batches: Optional[int] = None


def _unique_suffix() -> str:
    # time, process id and a random tag: two runs started in the same second never collide
    return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}_{secrets.token_hex(2)}"


def _resumed_run(ckpt_path: Optional[str]) -> Optional[Path]:
    """``RUN`` when ``ckpt_path`` is ``RUN/checkpoints/<name>.ckpt`` of a run directory, else ``None``."""
    if ckpt_path:
        run = Path(ckpt_path).parent.parent
        if Path(ckpt_path).parent.name == "checkpoints" and (run / ".hydra").is_dir():
            return run
    return None


def _run_dir(ckpt_path: Optional[str], tags=(), base: str = "outputs/train") -> str:
    """Resuming from ``RUN/checkpoints/last.ckpt`` continues in ``RUN``; otherwise a new directory,
    named by time, process, a random tag and the run's ``tags``."""
    run = _resumed_run(ckpt_path)
    if run is not None:
        return str(run)
    suffix = "".join(f"_{t}" for t in (tags or ()) if str(t).strip())
    return f"{base}/{_unique_suffix()}{suffix}"


def _output_subdir(ckpt_path: Optional[str]) -> Optional[str]:
    """Where Hydra writes the run's record: ``.hydra``; nowhere when resuming in place (the engine
    rewrites the record itself once the resume is accepted, so a refused one leaves it untouched)."""
    return None if _resumed_run(ckpt_path) is not None else ".hydra"


class OutputDirCheck(Callback):
    """Makes the run (or sweep) directory before Hydra does, so that an unwritable one stops the
    run with one line instead of a traceback."""

    @staticmethod
    def _make(key: str, path: str) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            probe = Path(path) / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            print(f"error: output directory {path} is not writable ({exc.strerror}); set {key}=DIR", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config, **kwargs) -> None:
        self._make("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._make("hydra.sweep.dir", config.hydra.sweep.dir)


def register() -> None:
    """Register the schemas and resolvers (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    if not OmegaConf.has_resolver("ic_unique"):
        OmegaConf.register_new_resolver("ic_unique", _unique_suffix, use_cache=True)
    if not OmegaConf.has_resolver("ic_run_dir"):
        OmegaConf.register_new_resolver("ic_run_dir", _run_dir, use_cache=True)
    if not OmegaConf.has_resolver("ic_output_subdir"):
        OmegaConf.register_new_resolver("ic_output_subdir", _output_subdir, use_cache=True)


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists become strings): configs as HParams and as the
    ``key=value`` pairs compared when resuming."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
