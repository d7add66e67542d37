"""The training engine: one readable loop that owns devices, precision, checkpoints and logging.

A task owns what one step computes (see :class:`interconnects.tasks.classify.ClassificationTask`).
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import logging
import os
import random
import signal
from pathlib import Path

import numpy as np
import torch

from .checkpoint import FORMAT, VERSION, load_checkpoint, rng_state, save_atomic, set_rng_state

log = logging.getLogger(__name__)
PRECISION = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class TrainingStopped(RuntimeError):
    """Training stopped early (signal or non-finite loss); ``exit_code`` is the process's status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def resolve_device(spec: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` as given, if available."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ValueError(f"trainer.device={spec!r} but CUDA is not available on this machine; use auto or cpu")
        index = int(spec[5:]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise ValueError(f"trainer.device={spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(spec)
    raise ValueError(f"trainer.device={spec!r} is not supported; use auto, cpu, cuda or cuda:N")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def check_trainer_config(cfg) -> None:
    """One-line ``ValueError`` for a bad ``trainer.*`` value, before any work starts."""
    if cfg.max_epochs < 1:
        raise ValueError(f"trainer.max_epochs={cfg.max_epochs} is out of range; it must be an integer ≥ 1")
    if str(cfg.precision) not in PRECISION:
        raise ValueError(f"trainer.precision={cfg.precision!r} is not supported; choose 32, bf16 or 16")
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"trainer.on_nonfinite={cfg.on_nonfinite!r} is not supported; choose stop or skip")
    for key in ("checkpoint_every_n_steps", "log_every_n_steps", "log_images"):
        if cfg[key] < 0:
            raise ValueError(f"trainer.{key}={cfg[key]} is out of range; it must be ≥ 0")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        if cfg[key] is not None and cfg[key] < 1:
            raise ValueError(f"trainer.{key}={cfg[key]} is out of range; it must be null or ≥ 1")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        raise ValueError(f"trainer.grad_clip={cfg.grad_clip} is out of range; it must be null or > 0")
    resolve_device(cfg.device)


def make_scheduler(factory, optimizer, total_steps: int):
    """Build a step-interval LR scheduler from a ``_partial_`` factory, passing the run's total
    steps to whichever of ``total_steps`` / ``T_max`` / ``total_iters`` it takes and is not set."""
    if factory is None:
        return None
    params = inspect.signature(factory.func).parameters
    given = set(factory.keywords)
    extra = {k: total_steps for k in ("total_steps", "T_max") if k in params and k not in given}
    return factory(optimizer, **extra)


def write_json_atomic(values: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _put(batch, device):
    return [t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch]


class Trainer:
    """Fits a task: ``fit(task, data, optimizer_factory, scheduler_factory, ckpt_path) -> metrics``.

    Writes ``checkpoints/last.ckpt`` (every ``checkpoint_every_n_steps`` steps and at each epoch end),
    ``checkpoints/best.ckpt`` (best value of the task's monitored validation metric) and
    ``metrics.json`` into ``run_dir``. Resuming from a step-level checkpoint continues mid-epoch with
    the same data order, augmentation and RNG states as an uninterrupted run.
    """

    def __init__(self, cfg, run_dir: str | Path, config: dict, logger_name: str = "tensorboard",
                 resume_hint: str = "") -> None:
        check_trainer_config(cfg)
        self.cfg, self.run_dir, self.config = cfg, Path(run_dir), config
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.device = resolve_device(cfg.device)
        self.dtype = PRECISION[str(cfg.precision)]
        self.logger_name, self.resume_hint = logger_name, resume_hint
        self._signal = None
        self._compiled = {}

    # ---- the step ---------------------------------------------------------------------------
    def forward(self, module, inputs):
        """Runs ``module(inputs)`` under the configured precision (and torch.compile)."""
        if self.cfg.compile:
            module = self._compiled.setdefault(id(module), torch.compile(module))
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return module(inputs)

    def _optimize(self, name, loss):
        opt = self.optimizers[name]
        if not torch.isfinite(loss):
            where = f"step {self.step + 1} (epoch {self.epoch}, batch {self.batch_in_epoch})"
            if self.cfg.on_nonfinite == "stop":
                raise TrainingStopped(
                    f"loss is {loss.item()} at {where}; stopped, last good checkpoint kept in {self.ckpt_dir}", 3
                )
            log.warning("loss is %s at %s; step skipped", loss.item(), where)
            opt.zero_grad(set_to_none=True)
            self.skipped += 1
            return
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], self.cfg.grad_clip)
        self.scaler.step(opt)
        self.scaler.update()
        opt.zero_grad(set_to_none=True)

    # ---- checkpoints ------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION,
            "model": self.task.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
            "rng": rng_state(), "best": dict(self.best), "accumulators": dict(self.acc),
            "config": self.config,
        }

    def _restore(self, path) -> None:
        state = load_checkpoint(path)
        try:
            self.task.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ValueError(
                f"{path}: its weights do not fit the model built from this config "
                f"({str(exc).splitlines()[0][:160]}); pass the same overrides as the run that wrote it"
            ) from None
        for key, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][key])
        for key, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][key])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.best, self.acc = dict(state["best"]), dict(state["accumulators"])
        set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d, batch %d (step %d)", path, self.epoch, self.batch_in_epoch, self.step)

    def _on_signal(self, signum, frame):
        if self._signal is not None:  # a second signal: stop now
            signal.default_int_handler(signum, frame)
        self._signal = signum

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, task, loader, prefix: str, limit: int | None = None) -> dict[str, float]:
        """``{prefix/loss, prefix/acc}`` of ``task`` over ``loader`` (the first ``limit`` batches)."""
        task.to(self.device).eval()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for batch in itertools.islice(loader, limit):
                out = task.evaluation_step(_put(batch, self.device), self.forward)
                for k, v in out.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        return {f"{prefix}/{k}": v for k, v in task.summarize(sums).items()}

    # ---- the loop ---------------------------------------------------------------------------
    def fit(self, task, data, optimizer_factory, scheduler_factory=None, ckpt_path=None) -> dict[str, float]:
        from tqdm.auto import tqdm

        from .logger import build_logger

        cfg = self.cfg
        self.task = task.to(self.device)
        self.optimizers = {k: optimizer_factory(p) for k, p in task.optimizer_groups().items()}
        full = data.train_batches.per_epoch
        per_epoch = min(full, cfg.limit_train_batches or full)
        self.schedulers = {k: s for k, o in self.optimizers.items()
                           if (s := make_scheduler(scheduler_factory, o, per_epoch * cfg.max_epochs)) is not None}
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        self.epoch = self.step = self.batch_in_epoch = self.skipped = 0
        self.best = {"metric": task.monitor, "value": None, "epoch": None}
        self.acc: dict[str, float] = {}
        if ckpt_path:
            self._restore(ckpt_path)
        logger = build_logger(self.logger_name, self.run_dir / "tensorboard", purge_step=self.step if ckpt_path else None)
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        better = (lambda a, b: a > b) if task.monitor_mode == "max" else (lambda a, b: a < b)
        try:
            while self.epoch < cfg.max_epochs:
                data.set_epoch(self.epoch, self.batch_in_epoch)
                task.train()
                batches = itertools.islice(data.train, max(0, per_epoch - self.batch_in_epoch))
                bar = tqdm(batches, total=per_epoch, initial=self.batch_in_epoch, disable=not cfg.progress,
                           desc=f"epoch {self.epoch + 1}/{cfg.max_epochs}", leave=False, mininterval=1.0, dynamic_ncols=True)
                for batch in bar:
                    batch = _put(batch, self.device)
                    if self.step == 0 and cfg.log_images:
                        logger.images("inputs", batch[0][: cfg.log_images], 0)
                    metrics = task.training_step(batch, self.forward, self._optimize)
                    for sched in self.schedulers.values():
                        sched.step()
                    self.step += 1
                    self.batch_in_epoch += 1
                    for k, v in metrics.items():
                        self.acc[k] = self.acc.get(k, 0.0) + float(v)
                    self.acc["n"] = self.acc.get("n", 0.0) + 1
                    bar.set_postfix({k: f"{float(v):.4f}" for k, v in metrics.items()}, refresh=False)
                    if cfg.log_every_n_steps and self.step % cfg.log_every_n_steps == 0:
                        lrs = {("lr" if k == "model" else f"lr/{k}"): o.param_groups[0]["lr"] for k, o in self.optimizers.items()}
                        logger.scalars({**{f"train/{k}": float(v) for k, v in metrics.items()}, **lrs}, self.step)
                    if self._signal is not None:
                        save_atomic(self._state(), self.ckpt_dir / "last.ckpt")
                        name = signal.Signals(self._signal).name
                        raise TrainingStopped(
                            f"stopped by {name} at epoch {self.epoch + 1}, step {self.step}; last.ckpt written. "
                            f"Resume with: {self.resume_hint}", 128 + self._signal)
                    if cfg.checkpoint_every_n_steps and self.step % cfg.checkpoint_every_n_steps == 0:
                        save_atomic(self._state(), self.ckpt_dir / "last.ckpt")
                bar.close()
                n = max(1.0, self.acc.pop("n", 1.0))
                train = {f"train/{k}_epoch": v / n for k, v in self.acc.items()}
                val = self.evaluate(task, data.val, "val", cfg.limit_val_batches)
                self.epoch, self.batch_in_epoch, self.acc = self.epoch + 1, 0, {}
                logger.scalars({**train, **val, "epoch": self.epoch}, self.step)
                log.info("epoch %d/%d: %s", self.epoch, cfg.max_epochs,
                         "  ".join(f"{k}={v:.4f}" for k, v in {**train, **val}.items()))
                value = val[task.monitor]
                if self.best["value"] is None or better(value, self.best["value"]):
                    self.best = {"metric": task.monitor, "value": value, "epoch": self.epoch, **val, **train}
                    save_atomic(self._state(), self.ckpt_dir / "best.ckpt")
                save_atomic(self._state(), self.ckpt_dir / "last.ckpt")
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        # test with the best checkpoint's weights
        best = load_checkpoint(self.ckpt_dir / "best.ckpt")
        task.load_state_dict(best["model"])
        test = self.evaluate(task, data.test, "test", cfg.limit_test_batches)
        metrics = {k: v for k, v in self.best.items() if "/" in k and k != "metric"}
        metrics.update(test)
        metrics.update({"best_epoch": self.best["epoch"], "epochs": self.epoch, "steps": self.step})
        logger.scalars(test, self.step)
        logger.hparams(flatten(self.config), {k: v for k, v in metrics.items() if "/" in k})
        logger.close()
        write_json_atomic(metrics, self.run_dir / "metrics.json")
        return metrics


def flatten(config: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}} -> {"a.b": 1}`` (lists become strings)."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out
