"""The training engine: one readable loop that owns devices, precision, checkpoints and logging.

A task owns what one step computes (see :class:`interconnects.tasks.classify.ClassificationTask`).
"""

from __future__ import annotations

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

from .checkpoint import FORMAT, VERSION, CheckpointError, load_checkpoint, rng_state, save_atomic, set_rng_state

log = logging.getLogger(__name__)
PRECISION = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}


class TrainingStopped(RuntimeError):
    """Training stopped early (signal or non-finite loss); ``exit_code`` is the process's status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
    """Write ``values`` as JSON via a temporary file, fsync and rename (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(values, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _put(batch, device):
    return [t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch]


class Trainer:
    """Fits a task: ``fit(task, data, optimizer_factory, scheduler_factory, ckpt_path) -> metrics``.

    Writes ``checkpoints/last.ckpt`` (every ``checkpoint_every_n_steps`` steps and at each epoch end),
    ``checkpoints/best.ckpt`` (best value of the task's monitored validation metric) and
    ``metrics.json`` into ``run_dir``. Resuming from a step-level checkpoint continues mid-epoch with
    the same data order, augmentation and RNG states as an uninterrupted run.

    Stops cleanly (:class:`TrainingStopped`, last good checkpoint untouched) on SIGINT / SIGTERM
    (after the current step, writing ``last.ckpt``), on a non-finite loss or gradient
    (``on_nonfinite=stop``; ``skip`` drops the step instead) and when a checkpoint cannot be
    written (disk full, output folder removed).
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
        self._step_skipped = False

    # ---- the step ---------------------------------------------------------------------------
    def forward(self, module, inputs):
        """Runs ``module(inputs)`` under the configured precision (and torch.compile)."""
        if self.cfg.compile:
            module = self._compiled.setdefault(id(module), torch.compile(module))
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return module(inputs)

    def _where(self) -> str:
        """The step being computed, 1-based: ``step S (epoch E, batch B of N)``."""
        return f"step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch_in_epoch + 1} of {self.per_epoch})"

    def _kept(self) -> str:
        """What the last good checkpoint on disk is, for stop messages."""
        if self.last_saved is None:
            return f"no checkpoint written yet in {self.ckpt_dir}"
        return f"last good checkpoint {self.ckpt_dir / 'last.ckpt'} (step {self.last_saved}) kept"

    def _nonfinite(self, opt, what: str) -> None:
        if self.cfg.on_nonfinite == "stop":
            opt.zero_grad(set_to_none=True)
            raise TrainingStopped(
                f"{what} at {self._where()}; stopped (trainer.on_nonfinite=stop), {self._kept()}. "
                "Lower optimizer.lr or set trainer.grad_clip; trainer.on_nonfinite=skip drops such steps", 3)
        log.warning("%s at %s; step skipped (trainer.on_nonfinite=skip)", what, self._where())
        opt.zero_grad(set_to_none=True)
        self.skipped += 1
        self._step_skipped = True

    def _optimize(self, name, loss):
        opt = self.optimizers[name]
        if not torch.isfinite(loss):
            return self._nonfinite(opt, f"loss is {loss.item()}")
        self.scaler.scale(loss).backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.cfg.grad_clip:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if not self.scaler.is_enabled():  # (the fp16 scaler skips steps with inf gradients itself)
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):  # one fused reduction
                return self._nonfinite(opt, f"gradient norm of the {name!r} optimizer is not finite")
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

    def _save(self, name: str) -> None:
        """Write ``checkpoints/<name>`` atomically. Weights that are no longer finite are never
        written, and a failed write leaves the previous file as it was."""
        path = self.ckpt_dir / name
        if not all(bool(torch.isfinite(p).all()) for p in self.task.parameters()):
            raise TrainingStopped(
                f"the weights are no longer finite after step {self.step} (epoch {self.epoch + 1}); "
                f"{name} not written, {self._kept()}. Lower optimizer.lr or set trainer.grad_clip", 3)
        if not self.ckpt_dir.is_dir():
            raise TrainingStopped(
                f"cannot write {path}: the folder {self.ckpt_dir} was removed or renamed during the run "
                f"(step {self.step}); restore it, then resume with: {self.resume_hint or 'ckpt_path=.../last.ckpt'}", 4)
        try:
            save_atomic(self._state(), path, mkdir=False)
            if name == "last.ckpt":
                self.last_saved = self.step
        except OSError as exc:
            reason = exc.strerror or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if not self.ckpt_dir.is_dir():
                reason = f"the folder {self.ckpt_dir} was removed or renamed during the run"
            raise TrainingStopped(
                f"cannot write {path} at step {self.step}: {reason}; the previous {name} was left as it was. "
                f"Fix that, then resume with: {self.resume_hint or 'ckpt_path=.../last.ckpt'}", 4) from None

    def _restore(self, path, state: dict | None = None) -> None:
        state = load_checkpoint(path) if state is None else state
        try:
            self.task.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ValueError(
                f"{path}: its weights do not fit the model built from this config "
                f"({str(exc).splitlines()[0][:160]}); pass the same overrides as the run that wrote it"
            ) from None
        for key, sched in self.schedulers.items():
            saved = (state.get("schedulers") or {}).get(key) or {}
            for length in ("total_steps", "T_max"):
                if length in saved and saved[length] != getattr(sched, length, saved[length]):
                    raise ValueError(
                        f"{path}: its LR schedule spans {saved[length]} steps but this run's spans "
                        f"{getattr(sched, length)} (trainer.max_epochs or limit_train_batches changed); "
                        "resume with the run's own values, or use scheduler=constant"
                    )
        try:
            for key, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizers"][key])
            for key, sched in self.schedulers.items():
                sched.load_state_dict(state["schedulers"][key])
            self.scaler.load_state_dict(state["scaler"])
            self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
            self.best, self.acc = dict(state["best"]), dict(state["accumulators"])
            set_rng_state(state["rng"])
            if Path(path).resolve() == (self.ckpt_dir / "last.ckpt").resolve():
                self.last_saved = self.step
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ValueError(
                f"{path}: its optimizer, scheduler or loop state does not fit this config ({type(exc).__name__}: {first}); "
                "pass the same optimizer=, scheduler= and trainer.* overrides as the run that wrote it"
            ) from None
        if self.batch_in_epoch > self.per_epoch:
            raise ValueError(
                f"{path} was written at batch {self.batch_in_epoch} of an epoch, but this config has "
                f"{self.per_epoch} batches per epoch; pass the same data.batch_size and trainer.limit_train_batches")
        log.info("resumed from %s at epoch %d, batch %d (step %d)", path, self.epoch, self.batch_in_epoch, self.step)

    def _adopt_best(self, source: Path) -> None:
        """Resuming into a folder without the run's best.ckpt: take it from beside the checkpoint
        resumed from, or else track the best afresh from here."""
        try:
            save_atomic(load_checkpoint(source), self.ckpt_dir / "best.ckpt", mkdir=False)
            log.info("copied %s into %s", source, self.ckpt_dir)
        except (CheckpointError, OSError):
            log.warning("%s not found beside the checkpoint resumed from; the best epoch is tracked afresh", source.name)
            self.best = {"metric": self.task.monitor, "value": None, "epoch": None}

    def _on_signal(self, signum, frame):
        if self._signal is not None:  # a second signal: stop now
            signal.default_int_handler(signum, frame)
        self._signal = signum  # (no I/O here: the signal may have interrupted a write to stderr)

    def _stop_for_signal(self, where: str) -> None:
        name = signal.Signals(self._signal).name
        raise TrainingStopped(
            f"stopped by {name} {where}; last.ckpt written. Resume with: {self.resume_hint}", 128 + self._signal)

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
    def fit(self, task, data, optimizer_factory, scheduler_factory=None, ckpt_path=None,
            state: dict | None = None) -> dict[str, float]:
        """Train, validate each epoch, test with the best weights. ``ckpt_path`` resumes (``state``:
        that checkpoint, already loaded with :func:`load_checkpoint`)."""
        from tqdm.auto import tqdm

        from .checkpoint import remove_stale_temp_files
        from .logger import build_logger

        cfg = self.cfg
        self.task = task.to(self.device)
        self.optimizers = {k: optimizer_factory(p) for k, p in task.optimizer_groups().items()}
        full = data.train_batches.per_epoch
        per_epoch = self.per_epoch = min(full, cfg.limit_train_batches or full)
        self.schedulers = {k: s for k, o in self.optimizers.items()
                           if (s := make_scheduler(scheduler_factory, o, per_epoch * cfg.max_epochs)) is not None}
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        self.epoch = self.step = self.batch_in_epoch = self.skipped = 0
        self.last_saved = None  # the step of the last.ckpt this run wrote (or resumed from)
        self.best = {"metric": task.monitor, "value": None, "epoch": None}
        self.acc: dict[str, float] = {}
        if ckpt_path:
            self._restore(ckpt_path, state)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        if ckpt_path and self.best["value"] is not None and not (self.ckpt_dir / "best.ckpt").is_file():
            self._adopt_best(Path(ckpt_path).with_name("best.ckpt"))
        for stale in remove_stale_temp_files(self.ckpt_dir):
            log.info("removed %s, left by a run that was killed while writing it", stale.name)
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
                    self._step_skipped = False
                    # a skipped step must leave the model as it was: its forward pass also moved
                    # the BatchNorm running statistics, so keep a copy of the buffers to put back
                    buffers = ([(b, b.detach().clone()) for b in task.buffers()]
                               if cfg.on_nonfinite == "skip" else [])
                    metrics = task.training_step(batch, self.forward, self._optimize)
                    if self._step_skipped:
                        with torch.no_grad():
                            for b, saved in buffers:
                                b.copy_(saved)
                    for sched in self.schedulers.values():
                        sched.step()
                    self.step += 1
                    self.batch_in_epoch += 1
                    if not self._step_skipped:  # a skipped step's non-finite loss stays out of the epoch means
                        for k, v in metrics.items():
                            self.acc[k] = self.acc.get(k, 0.0) + float(v)
                        self.acc["n"] = self.acc.get("n", 0.0) + 1
                    bar.set_postfix({k: f"{float(v):.4f}" for k, v in metrics.items()}, refresh=False)
                    if cfg.log_every_n_steps and self.step % cfg.log_every_n_steps == 0:
                        lrs = {("lr" if k == "model" else f"lr/{k}"): o.param_groups[0]["lr"] for k, o in self.optimizers.items()}
                        logger.scalars({**{f"train/{k}": float(v) for k, v in metrics.items()}, **lrs}, self.step)
                    if self._signal is not None:
                        self._save("last.ckpt")
                        self._stop_for_signal(f"at epoch {self.epoch + 1}, step {self.step}")
                    # (the epoch's last batch is saved at the epoch end, just below)
                    if (cfg.checkpoint_every_n_steps and self.step % cfg.checkpoint_every_n_steps == 0
                            and self.batch_in_epoch < per_epoch):
                        self._save("last.ckpt")
                bar.close()
                n = max(1.0, self.acc.pop("n", 1.0))
                train = {f"train/{k}_epoch": v / n for k, v in self.acc.items()}
                val = self.evaluate(task, data.val, "val", cfg.limit_val_batches)
                self.epoch, self.batch_in_epoch, self.acc = self.epoch + 1, 0, {}
                logger.scalars({**train, **val, "epoch": self.epoch}, self.step)
                log.info("epoch %d/%d: %s", self.epoch, cfg.max_epochs,
                         "  ".join(f"{k}={v:.4f}" for k, v in {**train, **val}.items()))
                value = val[task.monitor]
                previous = self.best["value"]
                if previous is None or previous != previous or better(value, previous):  # (NaN never stays best)
                    self.best = {"metric": task.monitor, "value": value, "epoch": self.epoch, **val, **train}
                    self._save("best.ckpt")
                self._save("last.ckpt")
                if self._signal is not None:
                    self._stop_for_signal(f"after epoch {self.epoch} (step {self.step})")
            if self.skipped:
                log.warning("%d step(s) skipped for a non-finite loss or gradient", self.skipped)
            # test with the best checkpoint's weights
            best_path = self.ckpt_dir / "best.ckpt"
            if not best_path.is_file():
                raise TrainingStopped(f"cannot test: {best_path} is missing (removed, or no epoch has finished)", 2)
            best = load_checkpoint(best_path)
            task.load_state_dict(best["model"])
            test = self.evaluate(task, data.test, "test", cfg.limit_test_batches)
            metrics = {k: v for k, v in self.best.items() if "/" in k and k != "metric"}
            metrics.update(test)
            metrics.update({"best_epoch": self.best["epoch"], "epochs": self.epoch, "steps": self.step})
            logger.scalars(test, self.step)
            logger.hparams(flatten(self.config), {k: v for k, v in metrics.items() if "/" in k})
            try:
                write_json_atomic(metrics, self.run_dir / "metrics.json")
            except OSError as exc:
                raise TrainingStopped(f"cannot write {self.run_dir / 'metrics.json'}: {exc.strerror or exc}; "
                                      f"the checkpoints in {self.ckpt_dir} are complete", 4) from None
            return metrics
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            try:
                logger.close()
            except Exception as exc:  # noqa: BLE001 - never hide why the run ended
                log.warning("could not close the logger: %s", exc)


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
