"""What ``train.py`` and ``evaluate.py`` do once Hydra has composed the config."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("interconnects")
# torch_geometric scripts a few helpers at import; the deprecation notice says nothing to our users
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)


def guarded(fn, cfg: DictConfig):
    """Run ``fn(cfg)``; known failures print one line and exit non-zero (full traceback with
    ``HYDRA_FULL_ERROR=1``)."""
    from ..data import DataMissingError
    from .checkpoint import CheckpointError
    from .loop import TrainingStopped

    try:
        return fn(cfg)
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except (ValueError, CheckpointError, DataMissingError, OSError) as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.filename:
            message = f"cannot write {exc.filename}: {exc.strerror}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _check_writable(run_dir: Path) -> None:
    probe = run_dir / "checkpoints" / ".write-test"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output directory {run_dir} is not writable ({exc.strerror}); set hydra.run.dir=DIR") from None


def _resume_hint(run_dir: Path) -> str:
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("ckpt_path=")]
    overrides.append(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    return "python train.py " + " ".join(shlex.quote(o) for o in overrides)


def build_task(cfg: DictConfig, info):
    """The task (and its model) described by ``cfg``, for data described by ``info``."""
    from ..models.hybrid import build_model, build_part

    model = build_model(cfg, info.in_channels, info.image_size, info.num_classes)
    return build_part("task", cfg.task, model=model)


def _factories(cfg: DictConfig):
    from hydra.utils import instantiate

    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") and cfg.scheduler.get("_target_") else None
    return optimizer, scheduler


def train(cfg: DictConfig) -> float | None:
    """Build, fit, test; returns ``metrics[cfg.optimized_metric]`` for sweepers."""
    from ..data import build_data, check_data_config, data_info
    from ..models.hybrid import parameter_table
    from .checkpoint import load_checkpoint
    from .loop import Trainer, seed_everything

    run_dir = _run_dir()
    config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.seed < 0:
        raise ValueError(f"seed={cfg.seed} is out of range; it must be an integer ≥ 0")
    check_data_config(cfg.data)
    if cfg.ckpt_path:
        load_checkpoint(cfg.ckpt_path)  # a missing, foreign or truncated file stops us before any work
    trainer = Trainer(cfg.trainer, run_dir, config, cfg.logger.name, _resume_hint(run_dir))
    _check_writable(run_dir)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    info = data_info(cfg.data.name)
    task = build_task(cfg, info)
    optimizer, scheduler = _factories(cfg)
    rows = parameter_table(task.model)
    log.info("parameters: " + ", ".join(f"{name} {count:,}" for name, count in rows))
    data = build_data(cfg.data, cfg.seed)
    log.info("data: %s, %d train / %d val / %d test images, device %s", cfg.data.name,
             len(data.train_view), len(data.val.dataset), len(data.test.dataset), trainer.device)
    metrics = trainer.fit(task, data, optimizer, scheduler, cfg.ckpt_path)
    summary = "  ".join(f"{k}={metrics[k]:.4f}" for k in ("test/acc", "test/loss", "val/acc") if k in metrics)
    print(f"\n{summary}")
    print(f"run directory: {run_dir}")
    print(f"checkpoints:   {run_dir / 'checkpoints' / 'best.ckpt'} (best), last.ckpt beside it")
    if cfg.logger.name == "tensorboard":
        print(f"TensorBoard:   tensorboard --logdir {run_dir / 'tensorboard'}  (then open http://localhost:6006)")
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a checkpoint with the model rebuilt from the config stored inside it."""
    from ..data import build_data, data_info
    from .checkpoint import load_checkpoint
    from .loop import Trainer, resolve_device, write_json_atomic

    if cfg.split not in ("test", "val"):
        raise ValueError(f"split={cfg.split!r} is not supported; choose test or val")
    state = load_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(state["config"])
    for key, value in cfg.data.items():
        if value is not None:
            run_cfg.data[key] = value
    device = resolve_device(cfg.device)
    run_dir = _run_dir()
    info = data_info(run_cfg.data.name)
    task = build_task(run_cfg, info)
    try:
        task.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(
            f"{cfg.ckpt_path}: its weights do not fit the model built from its own config "
            f"({str(exc).splitlines()[0][:160]})"
        ) from None
    data = build_data(run_cfg.data, run_cfg.seed)
    run_cfg.trainer.device = str(device)
    run_cfg.trainer.compile = False
    trainer = Trainer(run_cfg.trainer, run_dir, state["config"], "none")
    loader = data.test if cfg.split == "test" else data.val
    metrics = trainer.evaluate(task, loader, cfg.split, cfg.limit_batches)
    width = max(len(k) for k in metrics)
    print(f"\ncheckpoint: {cfg.ckpt_path} (epoch {state.get('epoch')}, step {state.get('step')})")
    print(f"{'metric':<{width}}  value\n{'-' * width}  ------")
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(metrics, run_dir / "metrics.json")
    print(f"metrics written to {run_dir / 'metrics.json'}")
    return metrics

