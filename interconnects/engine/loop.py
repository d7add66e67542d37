"""The training engine: one loop that owns devices, precision, checkpoints, signals and logging.

A task (:class:`interconnects.tasks.base.Task`) owns what a step computes and which networks it
trains; the engine never assumes one network, an image batch or a metric's name. ``Trainer.fit``
reads in one sitting: set up, then per epoch :meth:`Trainer.train_epoch` and
:meth:`Trainer.end_epoch` (validate, pictures, best, save), then :meth:`Trainer.test` with the best
weights.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import signal
import time
from pathlib import Path

import torch

from ..config import EXIT_BAD_SETTING, EXIT_NONFINITE, EXIT_WRITE_FAILED, first_line, flatten
from .checkpoint import (FORMAT, VERSION, CheckpointError, check_structure, load_checkpoint,
                         remove_stale_temp_files, rng_state, save_atomic, set_rng_state, write_json_atomic)
from . import distributed
from .device import PRECISION, cpu_lacks_bf16_units, move, resolve_device, resolve_precision
from .logger import build_logger
from .lookahead import Lookahead

log = logging.getLogger(__name__)


class TrainingStopped(RuntimeError):
    """Training stopped early (signal or non-finite loss); ``exit_code`` is the process's status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def check_trainer_config(cfg) -> None:
    """One-line ``ValueError`` for a bad ``trainer.*`` value, before any work starts."""
    if cfg.max_epochs < 1:
        raise ValueError(f"trainer.max_epochs={cfg.max_epochs} is out of range; it must be an integer ≥ 1")
    if str(cfg.precision) not in PRECISION:
        raise ValueError(f"trainer.precision={cfg.precision!r} is not supported; choose auto, 32, bf16 or 16")
    if cfg.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"trainer.on_nonfinite={cfg.on_nonfinite!r} is not supported; choose stop or skip")
    for key in ("checkpoint_every_n_steps", "log_every_n_steps", "log_images", "picture_every_n_epochs",
                "picture_images"):
        if cfg.get(key, 0) < 0:
            raise ValueError(f"trainer.{key}={cfg[key]} is out of range; it must be ≥ 0")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        if cfg[key] is not None and cfg[key] < 1:
            raise ValueError(f"trainer.{key}={cfg[key]} is out of range; it must be null or ≥ 1")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        raise ValueError(f"trainer.grad_clip={cfg.grad_clip} is out of range; it must be null or > 0")
    if cfg.get("lookahead_every", 0) < 0:
        raise ValueError(f"trainer.lookahead_every={cfg.lookahead_every} is out of range; it must be an integer ≥ 0 "
                         "(0: no lookahead)")
    if not 0 <= cfg.get("lookahead_decay", 0.95) < 1:
        raise ValueError(f"trainer.lookahead_decay={cfg.lookahead_decay} is out of range; it must be in [0, 1)")
    resolve_device(cfg.device)


class OneCycleLR(torch.optim.lr_scheduler.OneCycleLR):
    """torch's one-cycle schedule for any number of steps. torch interpolates each phase over its
    length in steps and divides by zero when a phase spans none (5 steps with ``pct_start=0.2``
    warm up in zero steps, 1 step in none at all; ``pct_start=1`` leaves no annealing): such a
    phase is complete at its first step. Every other step's learning rate and momentum are torch's."""

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if step > self.total_steps:
            raise ValueError(f"Tried to step {step} times. The specified number of total steps is {self.total_steps}")
        lrs = []
        for group in self.optimizer.param_groups:
            start = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end = phase["end_step"]
                if step <= end or i == len(self._schedule_phases) - 1:
                    pct = (step - start) / (end - start) if end != start else 1.0
                    break
                start = end
            lrs.append(self._anneal_func(group[phase["start_lr"]], group[phase["end_lr"]], pct))
            if self.cycle_momentum:
                momentum = self._anneal_func(group[phase["start_momentum"]], group[phase["end_momentum"]], pct)
                if self.use_beta1:
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum
        return lrs


def make_scheduler(factory, optimizer, total_steps: int):
    """Build a step-interval LR scheduler from a ``_partial_`` factory, passing the run's total
    steps (the training steps that will happen, whatever their count) to whichever of
    ``total_steps`` / ``T_max`` it takes and is not set, and ``max_lr`` (the optimizer's own
    learning rates) to a scheduler that takes it and is not given one. torch's ``OneCycleLR`` is
    built as :class:`OneCycleLR`, which takes any step count."""
    if factory is None:
        return None
    if factory.func is torch.optim.lr_scheduler.OneCycleLR:
        factory = functools.partial(OneCycleLR, *factory.args, **factory.keywords)
    params = inspect.signature(factory.func).parameters
    given = set(factory.keywords)
    extra = {k: total_steps for k in ("total_steps", "T_max") if k in params and k not in given}
    if "max_lr" in params and "max_lr" not in given:
        extra["max_lr"] = [group["lr"] for group in optimizer.param_groups]
    return factory(optimizer, **extra)


def _duration(seconds: float) -> str:
    """``12.3 s``, ``4.5 min`` or ``1.2 h``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _take(batch, n: int):
    """The first ``n`` items of every tensor in ``batch``."""
    return [t[:n] if isinstance(t, torch.Tensor) else t for t in batch]


class CompiledOrEager(torch.nn.Module):
    """``module`` under ``torch.compile``, until its backend fails to compile a graph (a C++ or CUDA
    compile error from inductor, at the first call or at a recompilation for new shapes): then one
    warning line naming ``trainer.compile``, and ``module`` runs uncompiled (eager) for the rest of the
    run, starting with the call that failed. Same inputs and outputs as ``module``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.compiled = torch.compile(module)  # (a plain attribute of the same parameters: no second copy)
        self.failed = False

    def __setattr__(self, name, value):
        if name == "compiled":  # (an OptimizedModule would register as a submodule)
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, *args, **kwargs):
        if not self.failed:
            from torch._dynamo.exc import BackendCompilerFailed

            try:
                return self.compiled(*args, **kwargs)
            except BackendCompilerFailed as exc:
                self.failed = True
                reason = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
                log.warning("trainer.compile=true: torch.compile could not compile %s (%s: %s); it runs uncompiled "
                            "for the rest of the run (trainer.compile=false skips the attempt)",
                            type(self.module).__name__, type(exc).__name__, reason[:200])
        return self.module(*args, **kwargs)


class Trainer:
    """Fits a task: ``fit(task, data, optimizers, schedulers, ckpt_path) -> metrics``.

    Writes ``checkpoints/last.ckpt`` (every ``checkpoint_every_n_steps`` steps and at each epoch end),
    ``checkpoints/best.ckpt`` (best value of the task's monitored validation metric; with no
    validation split, the last epoch) and ``metrics.json`` into ``run_dir``. Resuming from a
    step-level checkpoint continues mid-epoch with the same data order, augmentation and RNG states
    as an uninterrupted run.

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
        self.dtype = resolve_precision(cfg.precision, self.device)
        if self.dtype is torch.float16 and self.device.type == "cpu":
            log.warning("trainer.precision=16 on the CPU: float16 with loss scaling runs slower there than "
                        "trainer.precision=bf16 or 32 (the CPU has few float16 kernels; a grad scaler adds work to every step)")
        if self.dtype is torch.bfloat16 and self.device.type == "cpu" and cpu_lacks_bf16_units():
            log.warning("trainer.precision=bf16 on a CPU without bf16 units (no AVX512-BF16 or AMX): its bf16 "
                        "products are emulated and steps may be many times slower than with trainer.precision=32")
        self.memory_format = torch.channels_last if cfg.get("channels_last") else torch.preserve_format
        self.logger_name, self.resume_hint = logger_name, resume_hint
        self.primary = distributed.is_primary()  # the process that logs and writes files
        self._signal = None
        self._wrapped: dict[int, torch.nn.Module] = {}
        self._eager: set[int] = set()  # the task's networks that trainer.compile leaves uncompiled
        self._ddp: dict[int, torch.nn.Module] = {}  # DistributedDataParallel wrappers, under torchrun
        self._step_skipped = False
        self.lookahead: Lookahead | None = None

    # ---- the step ---------------------------------------------------------------------------
    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """What ``forward`` calls for ``module``: itself, or its ``torch.compile`` form; under torchrun,
        for a training forward pass, wrapped in DistributedDataParallel (evaluation, without
        gradients, runs the bare network on each rank's shard)."""
        if self.cfg.compile and id(module) not in self._eager:
            if id(module) not in self._wrapped:
                self._wrapped[id(module)] = CompiledOrEager(module)
            module = self._wrapped[id(module)]
        if distributed.is_distributed() and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            if id(module) not in self._ddp:
                self._ddp[id(module)] = distributed.wrap(module, self.device)
            module = self._ddp[id(module)]
        return module

    def leave_uncompiled(self, task) -> None:
        """Under ``trainer.compile=true``, the networks of ``task.uncompiled()`` run uncompiled, each
        said in one warning line."""
        if not self.cfg.compile:
            return
        networks = task.networks()
        for name, why in task.uncompiled().items():
            self._eager.add(id(networks[name]))
            log.warning("trainer.compile=true: the %s runs uncompiled: %s", name, why)

    def forward(self, module, *args, **kwargs):
        """Runs ``module(*args, **kwargs)`` under the configured precision (and torch.compile)."""
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.wrap(module)(*args, **kwargs)

    def _where(self) -> str:
        """The step being computed, 1-based: ``step S (epoch E, batch B of N)``."""
        return f"step {self.step + 1} (epoch {self.epoch + 1}, batch {self.batch_in_epoch + 1} of {self.per_epoch})"

    def _position(self) -> str:
        """Where the run stands after its last finished step, counted one way in every message
        (the interrupt, the resume): ``after step S (epoch E, batch B of N)``, or ``after step S
        (epoch E complete)`` at an epoch's end; epochs are counted from 1."""
        if self.batch_in_epoch == 0 and self.epoch > 0:
            return f"after step {self.step} (epoch {self.epoch} complete)"
        return f"after step {self.step} (epoch {self.epoch + 1}, batch {self.batch_in_epoch} of {self.per_epoch})"

    def _kept(self) -> str:
        """What the last good checkpoint on disk is, for stop messages."""
        if self.last_saved is None:
            return f"no checkpoint written yet in {self.ckpt_dir}"
        return f"last good checkpoint {self.ckpt_dir / 'last.ckpt'} (step {self.last_saved}) kept"

    def _zero_grad(self) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)

    def _nonfinite(self, what: str) -> None:
        self._zero_grad()
        if self.cfg.on_nonfinite == "stop":
            raise TrainingStopped(
                f"{what} at {self._where()}; stopped (trainer.on_nonfinite=stop), {self._kept()}. "
                "Lower optimizer.lr or set trainer.grad_clip; trainer.on_nonfinite=skip drops such steps", EXIT_NONFINITE)
        log.warning("%s at %s; step skipped (trainer.on_nonfinite=skip)", what, self._where())
        self._step_skipped = True

    def _optimize(self, name: str, loss) -> None:
        """The ``optimize`` callback of a training step: clear every gradient of the task, backward
        ``loss``, clip, check, step the optimizer of group ``name``."""
        if self._step_skipped:  # an earlier network of this step already failed
            return
        opt = self.optimizers[name]
        if not torch.isfinite(loss):
            owner = "" if len(self.optimizers) == 1 else f"{name} "
            return self._nonfinite(f"{owner}loss is {loss.item()}")
        self._zero_grad()  # a generator's backward through the discriminator leaves gradients there
        self.scaler.scale(loss).backward()
        params = [p for g in opt.param_groups for p in g["params"]]
        if self.cfg.grad_clip:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if not self.scaler.is_enabled():  # (the fp16 scaler skips steps with inf gradients itself)
            grads = [p.grad for p in params if p.grad is not None]
            if grads and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):  # one fused reduction
                return self._nonfinite(f"gradient norm of the {name!r} optimizer is not finite")
        self.scaler.step(opt)

    def _to_device(self, batch):
        batch = move(batch, self.device)
        if self.memory_format is torch.channels_last:
            batch = [t.contiguous(memory_format=torch.channels_last) if isinstance(t, torch.Tensor) and t.dim() == 4
                     else t for t in batch]
        return batch

    def train_step(self, batch) -> dict:
        """One training step of the task; the scaler is updated once, all gradients cleared."""
        self._step_skipped = False
        # a skipped step must leave the model as it was: its forward pass also moved
        # the BatchNorm running statistics, so keep a copy of the buffers to put back
        buffers = [(b, b.detach().clone()) for b in self.task.buffers()] if self.cfg.on_nonfinite == "skip" else []
        metrics = self.task.training_step(batch, self.forward, self._optimize)
        if self._step_skipped:
            self.skipped += 1
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        if self.scaler.is_enabled():
            self.scaler.update()
        self._zero_grad()
        for sched in self.schedulers.values():
            sched.step()
        self.step += 1
        self.batch_in_epoch += 1
        if self.lookahead is not None:
            self.lookahead.after_step(self.step)
        return metrics

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
            **({"lookahead": self.lookahead.state_dict()} if self.lookahead is not None else {}),
        }

    def _save(self, name: str) -> None:
        """Write ``checkpoints/<name>`` atomically. Weights that are no longer finite are never
        written, and a failed write leaves the previous file as it was."""
        if not self.primary:
            return
        path = self.ckpt_dir / name
        if not all(bool(torch.isfinite(p).all()) for p in self.task.parameters()):
            raise TrainingStopped(
                f"the weights are no longer finite after step {self.step} (epoch {self.epoch + 1}); "
                f"{name} not written, {self._kept()}. Lower optimizer.lr or set trainer.grad_clip", EXIT_NONFINITE)
        if not self.ckpt_dir.is_dir():
            raise TrainingStopped(
                f"cannot write {path}: the folder {self.ckpt_dir} was removed or renamed during the run "
                f"(step {self.step}); restore it, then resume with: {self.resume_hint or 'ckpt_path=.../last.ckpt'}", EXIT_WRITE_FAILED)
        try:
            save_atomic(self._state(), path, mkdir=False)
            if name == "last.ckpt":
                self.last_saved = self.step
        except OSError as exc:
            reason = exc.strerror or first_line(exc)
            if not self.ckpt_dir.is_dir():
                reason = f"the folder {self.ckpt_dir} was removed or renamed during the run"
            raise TrainingStopped(
                f"cannot write {path} at step {self.step}: {reason}; the previous {name} was left as it was. "
                f"Fix that, then resume with: {self.resume_hint or 'ckpt_path=.../last.ckpt'}", EXIT_WRITE_FAILED) from None

    def _restore(self, path, state: dict | None = None) -> None:
        state = load_checkpoint(path) if state is None else state
        try:
            self.task.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ValueError(
                f"{path}: its weights do not fit the model built from this config ({first_line(exc)}); "
                "pass the same overrides as the run that wrote it") from None
        if self.lookahead is not None:
            if state.get("lookahead") is None:
                self.lookahead.reset()
                log.info("%s holds no lookahead copy of the weights; it starts from the checkpoint's weights", path)
            else:
                try:
                    self.lookahead.load_state_dict(state["lookahead"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"{path}: {first_line(exc)}; pass the same overrides as the run that wrote it") from None
        elif state.get("lookahead") is not None:
            log.info("%s holds a lookahead copy of the weights; this run has trainer.lookahead_every=0 and drops it", path)
        saved_scheds = state.get("schedulers") or {}
        for group, sched in self.schedulers.items():
            if group not in saved_scheds:
                raise ValueError(
                    f"{path} holds no LR scheduler state for {group!r} (it was written with scheduler=constant); "
                    "resume with scheduler=constant, or start a new run from its weights with init_from=")
            for length in ("total_steps", "T_max"):
                saved = saved_scheds[group].get(length)
                if saved is not None and saved != getattr(sched, length, saved):
                    raise ValueError(
                        f"{path}: its LR schedule spans {saved} steps but this run's spans "
                        f"{getattr(sched, length)} ({self._length_change(state)}); resume with the run's own "
                        "values, train on at a constant rate with scheduler=constant, or start a new run from its "
                        "weights with init_from=")
        missing = sorted(set(self.optimizers) - set(state.get("optimizers") or {}))
        if missing:
            raise ValueError(f"{path} holds no optimizer state for {', '.join(map(repr, missing))}; "
                             "resume with the task= and optimizer= of the run that wrote it")
        try:
            for key, opt in self.optimizers.items():
                opt.load_state_dict(state["optimizers"][key])
            for key, sched in self.schedulers.items():
                sched.load_state_dict(saved_scheds[key])
            for key in sorted(set(self.optimizers) - set(self.schedulers)):
                # scheduler=constant: train on at the configured rate (the restored state holds the
                # checkpoint's last rate); the resume check let only optimizer.lr differ here
                configured, opt = self.optimizers[key].defaults["lr"], self.optimizers[key]
                restored = opt.param_groups[0]["lr"]
                for group in opt.param_groups:
                    group["lr"] = configured
                name = "optimizer.lr" if key == "model" else f"optimizer.{key}.lr"
                if key in saved_scheds:
                    log.warning("%s: its LR schedule for %r is dropped (scheduler=constant); the learning rate is "
                                "now the configured %s=%g (it was %g)", path, key, name, configured, restored)
                elif restored != configured:
                    log.warning("%s: the learning rate is now the configured %s=%g (the checkpoint trained at %g)",
                                path, name, configured, restored)
            self.scaler.load_state_dict(state["scaler"])
            self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
            self.best, self.acc = dict(state["best"]), dict(state["accumulators"])
            set_rng_state(state["rng"])
            if Path(path).resolve() == (self.ckpt_dir / "last.ckpt").resolve():
                self.last_saved = self.step
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise ValueError(
                f"{path}: its optimizer, scheduler or loop state does not fit this config "
                f"({type(exc).__name__}: {first_line(exc)}); "
                "pass the same optimizer=, scheduler= and trainer.* overrides as the run that wrote it") from None
        if self.batch_in_epoch > self.per_epoch:
            raise ValueError(
                f"{path} was written at batch {self.batch_in_epoch} of an epoch, but this config has "
                f"{self.per_epoch} batches per epoch; pass the same data.batch_size and trainer.limit_train_batches")
        log.info("resumed from %s %s", path, self._position())

    def _length_change(self, state: dict) -> str:
        """Which setting makes this run's schedule another length than the checkpoint's."""
        ours, theirs = flatten(self.config), flatten(state.get("config") or {})
        changed = [f"{k}={ours.get(k)} here but {theirs.get(k)} in the checkpoint"
                   for k in ("trainer.max_epochs", "trainer.limit_train_batches", "data.batch_size")
                   if ours.get(k) != theirs.get(k)]
        return "; ".join(changed) or f"an epoch is {self.per_epoch} batches here: the training set changed size"

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

    def _stop_for_signal(self) -> None:
        name = signal.Signals(self._signal).name
        raise TrainingStopped(
            f"stopped by {name} {self._position()}; last.ckpt written. Resume with: {self.resume_hint}", 128 + self._signal)

    # ---- evaluation -------------------------------------------------------------------------
    def reduce(self, sums: dict) -> dict:
        """Evaluation sums added up over the processes of a distributed run."""
        return distributed.reduce_sums(sums)

    def evaluate(self, task, loader, split: str, limit: int | None = None) -> tuple[dict[str, float], dict]:
        """``({split/metric: value}, sums)`` of ``task`` over ``loader`` (its first ``limit`` batches)."""
        task.to(self.device).eval()
        task.start_evaluation(split)
        sums: dict = {}
        with torch.no_grad():
            for batch in itertools.islice(loader, limit):
                for k, v in task.evaluation_step(self._to_device(distributed.shard(batch)), self.forward).items():
                    v = torch.as_tensor(v).detach()
                    sums[k] = sums[k] + v if k in sums else v.clone()
        sums = self.reduce(sums)
        return {f"{split}/{k}": float(v) for k, v in task.summarize(sums, split).items()}, sums

    def _log_pictures(self, pictures: dict, step: int) -> None:
        for tag, picture in pictures.items():
            if isinstance(picture, torch.Tensor):
                self.logger.image(tag, picture, step)
            else:
                self.logger.figure(tag, picture, step)

    def pictures(self, step: int) -> None:
        """Log the task's pictures of the fixed picture images (train mode is restored after)."""
        if self.picture_batch is None:
            return
        self.task.eval()
        with torch.no_grad():
            pictures = self.task.pictures(self.picture_batch, self.forward)
        self.task.train()
        if self.primary:
            self._log_pictures(pictures, step)

    # ---- the phases -------------------------------------------------------------------------
    def fit(self, task, data, optimizers: dict, schedulers: dict | None = None, ckpt_path=None,
            state: dict | None = None, on_ready=None) -> dict[str, float]:
        """Train, validate each epoch, test with the best weights. ``optimizers``: ``{group:
        factory}`` for each of the task's optimizer groups (``schedulers`` likewise, ``None`` for
        a constant LR); ``ckpt_path`` resumes (``state``: that checkpoint, already loaded).
        ``on_ready()`` is called once every check has passed, before the first step."""
        self.setup(task, data, optimizers, schedulers or {}, ckpt_path, state)
        if on_ready is not None:
            on_ready()
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.epoch < self.cfg.max_epochs:
                train = self.train_epoch(data)
                self.end_epoch(data, train)
            if self.skipped:
                log.warning("%d step(s) skipped for a non-finite loss or gradient", self.skipped)
            return self.test(data)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            try:
                self.logger.close()
            except Exception as exc:  # noqa: BLE001 - never hide why the run ended
                log.warning("could not close the logger: %s", exc)

    def setup(self, task, data, optimizers: dict, schedulers: dict, ckpt_path, state) -> None:
        """Optimizers, schedulers and scaler for ``task``; restore ``ckpt_path``; check that what
        an epoch's end runs works (before any training); open the logger."""
        cfg = self.cfg
        if distributed.is_distributed() and cfg.get("sync_batchnorm"):
            distributed.sync_batchnorm(task)  # (in place: the task's networks keep their parameters)
        self.task = task.to(self.device, memory_format=self.memory_format)
        self.leave_uncompiled(task)
        groups = task.optimizer_groups()
        self.optimizers = {k: optimizers[k](params) for k, params in groups.items()}
        full = self.full_per_epoch = data.train_batches.per_epoch
        self.per_epoch = min(full, cfg.limit_train_batches or full)
        total_steps = self.per_epoch * cfg.max_epochs
        self.schedulers = {k: s for k, o in self.optimizers.items()
                           if (s := make_scheduler(schedulers.get(k), o, total_steps)) is not None}
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        every = cfg.get("lookahead_every", 0)
        self.lookahead = Lookahead(task.networks(), every, cfg.get("lookahead_decay", 0.95), total_steps) \
            if every else None
        self.epoch = self.step = self.batch_in_epoch = self.skipped = 0
        self.last_saved = None  # the step of the last.ckpt this run wrote (or resumed from)
        self.best = {"metric": task.monitor, "value": None, "epoch": None}
        self.acc: dict[str, float] = {}
        self.has_val = len(data.val.dataset) > 0
        self.better = (lambda a, b: a > b) if task.monitor_mode == "max" else (lambda a, b: a < b)
        task.setup(data)
        if ckpt_path:
            self._restore(ckpt_path, state)
        self.first_step = self.step
        self._step_ends: list[float] | None = []  # when each of this process's first steps ended (None: reported)
        source = data.val if self.has_val else data.test
        self.picture_batch = None
        if cfg.picture_every_n_epochs and cfg.picture_images:
            self.picture_batch = move(_take(next(iter(source)), cfg.picture_images), self.device)
        self.preflight(source)
        if self.primary:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if ckpt_path and self.best["value"] is not None and not (self.ckpt_dir / "best.ckpt").is_file():
                self._adopt_best(Path(ckpt_path).with_name("best.ckpt"))
            for stale in remove_stale_temp_files(self.ckpt_dir):
                log.info("removed %s, left by a run that was killed while writing it", stale.name)
        self.logger = build_logger(self.logger_name if self.primary else "none", self.run_dir / "tensorboard",
                                   purge_step=self.step if ckpt_path else None)
        if not ckpt_path:
            table = ["| stage | trainable parameters |", "| --- | ---: |"]
            table += [f"| {name} | {count:,} |" for name, count in task.parameter_table()]
            self.logger.text("parameters", "\n".join(table), 0)
            if cfg.get("log_graph") and self.primary:
                graph = task.graph_input(self.picture_batch or move(_take(next(iter(source)), 2), self.device))
                if graph is not None:
                    self.logger.graph(*graph)

    def preflight(self, loader) -> None:
        """Run what an epoch's end runs (an evaluation step, the summary, the pictures, a
        checkpoint's serialisation) on one batch before any training, so that a configuration
        cannot fail only after an epoch of work. RNG states and the model are left as they were."""
        saved = rng_state()
        task = self.task
        try:
            task.eval()
            task.start_evaluation("val")
            with torch.no_grad():
                batch = move(next(iter(loader)), self.device)
                sums = {k: torch.as_tensor(v).detach() for k, v in task.evaluation_step(batch, self.forward).items()}
                metrics = task.summarize(sums, "val")
                if self.has_val and task.monitor.split("/", 1)[-1] not in metrics:
                    raise ValueError(f"the task monitors {task.monitor!r} but its validation metrics are "
                                     f"{', '.join(sorted(metrics))}")
                if self.picture_batch is not None:
                    task.pictures(self.picture_batch, self.forward)
            check_structure(self._state(), "the checkpoint this run would write")
        finally:
            task.train()
            set_rng_state(saved)

    def train_epoch(self, data) -> dict[str, float]:
        """One epoch of training steps (from ``batch_in_epoch`` when resuming); returns the epoch's
        mean training metrics ``{train/<name>_epoch: value}``."""
        from tqdm.auto import tqdm

        cfg, task = self.cfg, self.task
        epoch_started = time.perf_counter()
        data.set_epoch(self.epoch, self.batch_in_epoch)
        task.train()
        batches = itertools.islice(data.train, max(0, self.per_epoch - self.batch_in_epoch))
        bar = tqdm(batches, total=self.per_epoch, initial=self.batch_in_epoch, disable=not (cfg.progress and self.primary),
                   desc=f"epoch {self.epoch + 1}/{cfg.max_epochs}", leave=False, mininterval=1.0, dynamic_ncols=True)
        for batch in bar:
            batch = self._to_device(distributed.shard(batch))  # this rank's part of the global batch
            if self.step == 0 and cfg.log_images:
                self.logger.images("inputs", batch[0][: cfg.log_images], 0)
            started = time.perf_counter()
            metrics = self.train_step(batch)
            if not self._step_skipped:  # a skipped step's non-finite loss stays out of the epoch means
                for k, v in metrics.items():
                    self.acc[k] = self.acc.get(k, 0.0) + float(v)  # (float() waits for the step's kernels)
                self.acc["n"] = self.acc.get("n", 0.0) + 1
            if self._step_ends is not None:
                self._time_step(started)
            bar.set_postfix({k: f"{float(v):.4f}" for k, v in metrics.items()}, refresh=False)
            if cfg.log_every_n_steps and self.step % cfg.log_every_n_steps == 0:
                lrs = {("lr" if k == "model" else f"lr/{k}"): o.param_groups[0]["lr"] for k, o in self.optimizers.items()}
                self.logger.scalars({**{f"train/{k}": float(v) for k, v in metrics.items()}, **lrs}, self.step)
            if self._signal is not None:
                self._save("last.ckpt")
                self._stop_for_signal()
            # (the epoch's last batch is saved at the epoch end)
            if cfg.checkpoint_every_n_steps and self.step % cfg.checkpoint_every_n_steps == 0 \
                    and self.batch_in_epoch < self.per_epoch:
                self._save("last.ckpt")
        bar.close()
        self._train_seconds = time.perf_counter() - epoch_started
        acc = distributed.reduce_sums(self.acc)  # (the epoch means over every rank's shards)
        n = max(1.0, acc.pop("n", 1.0))
        return {f"train/{k}_epoch": v / n for k, v in acc.items()}

    #: The projection skips the first steps (lazy initialisation, cuDNN's autotuning, the allocator's
    #: growth: on full MNIST the first step took up to 30× a later one), then times up to
    #: ``SPEED_STEPS`` steps or ``SPEED_SECONDS`` of them, or what the first epoch has when it is shorter.
    SPEED_WARMUP, SPEED_STEPS, SPEED_SECONDS = 2, 10, 3.0

    def _time_step(self, started: float) -> None:
        """Note when this step ended (from the loop's view: data loading and logging included);
        report the projection once enough steps after warm-up are timed."""
        ends = self._step_ends
        ends.append(time.perf_counter())
        if len(ends) == 1:
            self._first_step_seconds = ends[0] - started
        timed = len(ends) - self.SPEED_WARMUP
        if timed >= self.SPEED_STEPS or self.batch_in_epoch >= self.per_epoch or (
                timed > 0 and ends[-1] - ends[self.SPEED_WARMUP - 1] >= self.SPEED_SECONDS):
            self._report_speed()
            self._step_ends = None

    def _report_speed(self) -> None:
        """The time of a step after warm-up and what it projects: the epoch as run (and the full
        epoch when ``limit_train_batches`` shortens it) and the run's remaining training steps, so
        that a setting that makes steps slow is seen at once, not after an hour."""
        ends, cfg = self._step_ends, self.cfg
        n, first = len(ends), self.first_step + 1
        skip = min(self.SPEED_WARMUP, n - 1)
        if skip == 0:  # an epoch of one step: nothing but the first step to go by
            per_step, timed = self._first_step_seconds, "no later step to time, so from the first one"
        else:
            per_step = (ends[-1] - ends[skip - 1]) / (n - skip)
            steps = f"step {first + skip}" if n - skip == 1 else f"steps {first + skip}-{first + n - 1}"
            timed = f"{steps} after warm-up: {per_step:.3g} s a step"
        epoch = f"{_duration(per_step * self.per_epoch)} per epoch of {self.per_epoch:,} steps"
        if self.per_epoch < self.full_per_epoch:
            epoch += (f" (trainer.limit_train_batches={cfg.limit_train_batches}; the full epoch of "
                      f"{self.full_per_epoch:,} steps: {_duration(per_step * self.full_per_epoch)})")
        left = self.per_epoch * cfg.max_epochs - self.first_step
        run = (f"{_duration(per_step * left)} for the run's {cfg.max_epochs} epoch(s)" if self.first_step == 0 else
               f"{_duration(per_step * left)} for the {left:,} steps left of {cfg.max_epochs} epoch(s)")
        log.info("first training step: %.2f s (warm-up included); %s; projected %s, %s (training steps only; "
                 "validation comes on top)", self._first_step_seconds, timed, epoch, run)

    def end_epoch(self, data, train: dict[str, float]) -> None:
        """Validate, log, draw the pictures, keep the best checkpoint, save ``last.ckpt``."""
        cfg, task = self.cfg, self.task
        started = time.perf_counter()
        val = self.evaluate(task, data.val, "val", cfg.limit_val_batches)[0] if self.has_val else {}
        val_seconds = time.perf_counter() - started
        self.epoch, self.batch_in_epoch, self.acc = self.epoch + 1, 0, {}
        task.train()
        self.logger.scalars({**train, **val, "epoch": self.epoch}, self.step)
        # (per-class values such as val/acc/<class> go to TensorBoard and metrics.json, not this line)
        log.info("epoch %d/%d (training %s, validation %s): %s", self.epoch, cfg.max_epochs,
                 _duration(self._train_seconds), _duration(val_seconds), "  ".join(f"{k}={v:.4f}" for k, v in {**train, **val}.items() if k.count("/") == 1))
        if cfg.picture_every_n_epochs and self.epoch % cfg.picture_every_n_epochs == 0:
            self.pictures(self.step)
        value = val.get(task.monitor)
        previous = self.best["value"]
        # with no validation split every epoch is the best so far; NaN never stays best
        if not self.has_val or previous is None or previous != previous or self.better(value, previous):
            self.best = {"metric": task.monitor, "value": value, "epoch": self.epoch, **val, **train}
            self._save("best.ckpt")
        self._save("last.ckpt")
        if self._signal is not None:
            self._stop_for_signal()

    def test(self, data) -> dict[str, float]:
        """Test with the best checkpoint's weights; write ``metrics.json``; return the metrics."""
        best_path = self.ckpt_dir / "best.ckpt"
        distributed.barrier()  # every rank reads the best.ckpt that rank 0 wrote
        if not best_path.is_file():
            raise TrainingStopped(f"cannot test: {best_path} is missing (removed, or no epoch has finished)", EXIT_BAD_SETTING)
        self.task.load_state_dict(load_checkpoint(best_path)["model"])
        test, sums = self.evaluate(self.task, data.test, "test", self.cfg.limit_test_batches)
        metrics = {k: v for k, v in self.best.items() if "/" in k and k != "metric"}
        metrics.update(test)
        metrics.update({"best_epoch": self.best["epoch"], "epochs": self.epoch, "steps": self.step})
        if not self.primary:
            return metrics
        self.logger.scalars(test, self.step)
        self._log_pictures(self.task.test_pictures(sums), self.step)
        self.logger.hparams(flatten(self.config), {k: v for k, v in metrics.items() if "/" in k})
        try:
            write_json_atomic(metrics, self.run_dir / "metrics.json")
        except OSError as exc:
            raise TrainingStopped(f"cannot write {self.run_dir / 'metrics.json'}: {exc.strerror or exc}; "
                                  f"the checkpoints in {self.ckpt_dir} are complete", EXIT_WRITE_FAILED) from None
        return metrics
