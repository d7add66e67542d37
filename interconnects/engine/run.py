"""What ``train.py`` and ``evaluate.py`` do once Hydra has composed the config."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import socket
import sys
import time
import traceback
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("interconnects")
# torch_geometric scripts a few helpers at import; the deprecation notice says nothing to our users
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)


def guarded(fn, cfg: DictConfig):
    """Run ``fn(cfg)``; known failures print one line and exit non-zero (full traceback with
    ``HYDRA_FULL_ERROR=1``). Exit status: 2 a bad setting, checkpoint or dataset; 3 a non-finite
    loss; 4 a checkpoint that could not be written; 128 + N stopped by signal N (130 Ctrl-C).

    Every run directory gets ``job.json`` (overrides, status, wall time, exit code, error, threads,
    device). In a multirun (``-m``) a failed job does not end the sweep: its one-line error goes to
    ``error.txt`` in its directory and to stderr with its overrides, ``fn`` returns ``None`` (a failed
    trial for sweepers) and the sweep goes on; :class:`interconnects.config.SweepReport` makes the
    sweep exit 1 at its end. Only a signal (Ctrl-C, SIGTERM) still stops the whole sweep. A sweep job
    whose directory already holds its own finished run returns that run's metric, and one that holds
    its own ``checkpoints/last.ckpt`` (interrupted, preempted or requeued) resumes from it.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..data import DataMissingError
    from .checkpoint import CheckpointError
    from .loop import TrainingStopped

    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    job = SweepJob.from_hydra()
    if job.multirun:
        # a job that finished in an earlier launch of this sweep is not trained again
        done = job.previous_result(cfg)
        if done is not None:
            return done[0]
    try:
        if job.multirun:
            job.share_machine(cfg)
            job.resume_from_own_checkpoint(cfg)
            job.save_before_requeue()
        job.start(cfg)
        result = fn(cfg)
    except TrainingStopped as exc:
        code, message = exc.exit_code, str(exc)
        if job.preempted is not None:  # last.ckpt is written: now let submitit requeue the job
            job.finish(code, f"preempted; requeued ({message})")
            job.preempted()
    except KeyboardInterrupt:
        job.finish(130, "interrupted")
        if full:
            raise
        print("error: interrupted; checkpoints already on disk are complete (resume from last.ckpt with ckpt_path=)",
              file=sys.stderr)
        sys.exit(130)
    except (ValueError, CheckpointError, DataMissingError, OSError, OmegaConfBaseException, HydraException) as exc:
        code, message = 2, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror}"
        if full:
            job.finish(code, message)
            raise
    except Exception as exc:  # noqa: BLE001 - in a sweep one job's crash (a bug, out of memory) must not end the others
        code, message = 1, f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        job.traceback = traceback.format_exc()
        job.finish(code, message)
        if not job.multirun or full:
            raise
        print(f"error: job {job.num} ({' '.join(job.overrides)}) crashed: {message} (traceback in error.txt)",
              file=sys.stderr)
        return None
    else:
        job.finish(0, None)
        return result
    job.finish(code, message)
    if job.multirun and code < 128:
        print(f"error: job {job.num} ({' '.join(job.overrides)}) failed (exit {code}): {message}", file=sys.stderr)
        return None
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class SweepJob:
    """The bookkeeping of one run in its Hydra output directory: ``job.json`` (and ``error.txt``
    when it failed), its place in a sweep, and its share of the machine."""

    def __init__(self, run_dir: Path | None, multirun: bool, num: int, overrides: list[str], launcher: dict) -> None:
        self.run_dir, self.multirun, self.num, self.overrides, self.launcher = run_dir, multirun, num, overrides, launcher
        self.record: dict = {}
        self.traceback: str | None = None
        self.preempted = None  # set by the preemption signal: requeues the job
        self._t0 = time.monotonic()

    @classmethod
    def from_hydra(cls) -> "SweepJob":
        """The current Hydra job (a bare object outside Hydra, e.g. when ``guarded`` is called from Python)."""
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return cls(None, False, 0, [], {})
        hc = HydraConfig.get()
        launcher = OmegaConf.to_container(hc.launcher, resolve=False) if hc.get("launcher") is not None else {}
        return cls(Path(hc.runtime.output_dir), hc.mode == RunMode.MULTIRUN, int(hc.job.get("num") or 0),
                   list(hc.overrides.task), launcher)

    @property
    def path(self) -> Path | None:
        return self.run_dir / "job.json" if self.run_dir is not None else None

    def _write(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".job.json.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.record, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:  # bookkeeping must never hide the run's own outcome
            tmp.unlink(missing_ok=True)
            log.warning("could not write %s: %s", self.path, exc.strerror or exc)

    def _previous(self) -> dict | None:
        try:
            previous = json.loads(self.path.read_text()) if self.path is not None else None
        except (OSError, ValueError):
            return None
        return previous if isinstance(previous, dict) else None

    def previous_result(self, cfg: DictConfig) -> tuple | None:
        """``(metric,)`` when this job's directory holds a run of the same overrides that finished."""
        previous = self._previous()
        if not previous or previous.get("status") != "ok" or previous.get("overrides") != self.overrides:
            return None
        try:
            metrics = json.loads((self.run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            return None
        metric = cfg.get("optimized_metric")
        log.info("job %d finished in an earlier launch of this sweep (%s); not trained again", self.num, self.run_dir)
        return (metrics.get(metric) if metric else None,)

    def resume_from_own_checkpoint(self, cfg: DictConfig) -> None:
        """A job restarted in its own directory (requeued after preemption, or a sweep launched again
        with the same ``hydra.sweep.dir``) continues from its own ``checkpoints/last.ckpt``."""
        last = self.run_dir / "checkpoints" / "last.ckpt"
        if cfg.get("ckpt_path") or not last.is_file():
            return
        previous = self._previous()
        if previous is not None and previous.get("overrides") != self.overrides:
            raise ValueError(
                f"hydra.sweep.dir: job {self.num}'s directory {self.run_dir} holds a run of other overrides "
                f"({' '.join(previous.get('overrides') or [])}); launch the same sweep again, or use a new hydra.sweep.dir")
        cfg.ckpt_path = str(last)
        log.info("job %d resumes from its own %s", self.num, last)

    def share_machine(self, cfg: DictConfig) -> None:
        """Jobs run side by side by ``hydra/launcher=joblib`` share the machine: on the CPU each takes
        its share of the cores for torch's threads; with several GPUs job i takes device i mod n."""
        import torch

        target = str(self.launcher.get("_target_", ""))
        if not target.endswith("JoblibLauncher"):
            return
        cores = os.cpu_count() or 1
        n_jobs = int(self.launcher.get("n_jobs") or -1)
        parallel = n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's meaning of negative n_jobs
        torch.set_num_threads(max(1, cores // min(parallel, cores)))
        gpus = torch.cuda.device_count()
        if gpus > 1 and cfg.trainer.device in ("auto", "cuda"):
            cfg.trainer.device = f"cuda:{self.num % gpus}"

    def save_before_requeue(self) -> None:
        """In a submitit job, the preemption / time-limit signal (USR2) first makes the engine finish
        its step and write ``last.ckpt`` (as for SIGTERM); then submitit's own handler requeues the
        job (see ``preempted``), which on restart resumes from that checkpoint."""
        if "submitit_launcher" not in str(self.launcher.get("_target_", "")):
            return
        from submitit import JobEnvironment

        usr_sig = JobEnvironment._usr_sig()
        requeue, outside_loop = signal.getsignal(usr_sig), signal.getsignal(signal.SIGTERM)
        if not callable(requeue):
            return

        def on_preemption(signum, frame):
            self.preempted = lambda: requeue(signum, None)
            if signal.getsignal(signal.SIGTERM) is outside_loop:  # not training yet (or any more): requeue now
                requeue(signum, frame)
            else:  # the training loop's handler saves after the current step (no I/O in a signal handler)
                os.kill(os.getpid(), signal.SIGTERM)

        signal.signal(usr_sig, on_preemption)

    def start(self, cfg: DictConfig) -> None:
        """Record that the job runs (``job.json`` with status ``running``, its process and resources)."""
        import torch

        previous = self._previous() or {}
        self.record = {
            "overrides": self.overrides, "job_num": self.num, "status": "running", "pid": os.getpid(),
            "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_threads": torch.get_num_threads(),
            "device": OmegaConf.select(cfg, "trainer.device", default=None) or cfg.get("device"),
            "launches": int(previous.get("launches", 0)) + 1 if previous.get("overrides") == self.overrides else 1,
            "wall_time_s_before": (float(previous.get("wall_time_s", 0.0))
                                   if previous.get("overrides") == self.overrides else 0.0),
        }
        self._t0 = time.monotonic()
        if self.multirun:  # (a single run that is refused must leave no directory behind: no record yet)
            self._write()

    def finish(self, code: int, error: str | None) -> None:
        """Record how the job ended; a failed job's directory also gets ``error.txt``. A run whose
        directory was removed (refused before any work) stays without one."""
        if self.run_dir is None or not self.run_dir.is_dir():
            return
        if not self.record:  # failed before start() (e.g. a foreign job directory)
            self.record = {"overrides": self.overrides, "job_num": self.num, "pid": os.getpid(),
                           "host": socket.gethostname(), "wall_time_s_before": 0.0}
        spent = time.monotonic() - self._t0
        self.record.update({
            "status": "ok" if code == 0 else ("interrupted" if code >= 128 else "failed"),
            "exit_code": code, "error": error,
            "wall_time_s": round(self.record.pop("wall_time_s_before") + spent, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        self._write()
        if code != 0 and self.run_dir is not None:
            try:
                (self.run_dir / "error.txt").write_text(f"{error}\n" + (f"\n{self.traceback}" if self.traceback else ""))
            except OSError:
                pass
        elif self.run_dir is not None:
            (self.run_dir / "error.txt").unlink(missing_ok=True)


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


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


def _check_factories(task, optimizer, scheduler) -> None:
    """Build a throwaway optimizer and scheduler on ``task``'s parameters: a bad ``optimizer.*`` or
    ``scheduler.*`` value fails now, naming its group, not after the data is loaded."""
    from .loop import make_scheduler

    for group, build in (("optimizer", lambda: optimizer(list(task.parameters()))),
                         ("scheduler", lambda: make_scheduler(scheduler, optimizer(list(task.parameters())), 10))):
        try:
            build()
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{group}: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None


def _check_fits(task, state: dict, config: dict, ckpt_path) -> None:
    """Load the checkpoint's weights into ``task`` now: one that does not fit the model built from
    this config fails before any work, naming the settings that differ from the checkpoint's."""
    from .loop import flatten

    try:
        task.load_state_dict(state["model"])
    except RuntimeError as exc:
        groups = ("data.name", "backbone.", "interconnect.", "gnn.", "decoder.", "task.")
        ours, theirs = flatten(config), flatten(state.get("config") or {})
        diffs = [f"{k}={ours.get(k)!r} here but {theirs.get(k)!r} in the checkpoint"
                 for k in sorted(set(ours) | set(theirs)) if k.startswith(groups) and ours.get(k) != theirs.get(k)]
        detail = "; ".join(diffs[:3]) if diffs else str(exc).strip().splitlines()[0][:160]
        raise ValueError(
            f"ckpt_path={ckpt_path}: the checkpoint does not fit the model built from this config ({detail}); "
            "resume with the overrides of the run that wrote it"
        ) from None


def train(cfg: DictConfig) -> float | None:
    """Build, fit, test; returns ``metrics[cfg.optimized_metric]`` for sweepers.

    Every check runs before any work or output: config values, the checkpoint to resume from,
    the model (impossible settings fail in its dummy forward pass), optimizer and scheduler, the
    dataset (the output folder was checked before Hydra made it). Only then does training write anything.
    """
    from ..data import build_data, check_data_config, data_info
    from ..models.hybrid import parameter_table
    from .checkpoint import load_checkpoint
    from .loop import Trainer, check_trainer_config, seed_everything

    run_dir = _run_dir()
    config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.seed < 0:
        raise ValueError(f"seed={cfg.seed} is out of range; it must be an integer ≥ 0")
    check_data_config(cfg.data)
    check_trainer_config(cfg.trainer)
    if cfg.logger.name not in ("tensorboard", "none"):
        raise ValueError(f"logger.name={cfg.logger.name!r} is not supported; choose tensorboard or none")
    # a missing, foreign, truncated or unsafe file stops us before any work
    state = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    info = data_info(cfg.data)
    task = build_task(cfg, info)
    optimizer, scheduler = _factories(cfg)
    _check_factories(task, optimizer, scheduler)
    if state is not None:
        _check_fits(task, state, config, cfg.ckpt_path)
    data = build_data(cfg.data, cfg.seed)
    trainer = Trainer(cfg.trainer, run_dir, config, cfg.logger.name, _resume_hint(run_dir))
    rows = parameter_table(task.model)
    log.info("parameters: " + ", ".join(f"{name} {count:,}" for name, count in rows))
    log.info("data: %s, %d train / %d val / %d test images, device %s", cfg.data.name,
             len(data.train_view), len(data.val.dataset), len(data.test.dataset), trainer.device)
    metrics = trainer.fit(task, data, optimizer, scheduler, cfg.ckpt_path, state=state)
    summary = "  ".join(f"{k}={metrics[k]:.4f}" for k in ("test/acc", "test/loss", "val/acc") if k in metrics)
    print(f"\n{summary}")
    print(f"run directory: {run_dir}")
    print(f"checkpoints:   {run_dir / 'checkpoints' / 'best.ckpt'} (best), last.ckpt beside it")
    if cfg.logger.name == "tensorboard":
        print(f"TensorBoard:   tensorboard --logdir {run_dir / 'tensorboard'}  (then open http://localhost:6006)")
    metric = cfg.get("optimized_metric")
    return metrics.get(metric) if metric else None


# What evaluate.py builds from the config stored in a checkpoint: only the project's own classes,
# so a crafted config cannot make it construct (and so run) anything else.
_EVAL_GROUPS = ("backbone", "interconnect", "gnn", "decoder", "task")
_EVAL_TARGET_PREFIX = "interconnects."


def _check_targets(config: dict, ckpt_path) -> None:
    from .loop import flatten

    for key, value in flatten({g: config.get(g) for g in _EVAL_GROUPS if isinstance(config.get(g), dict)}).items():
        if key.endswith("_target_") and value is not None and not (
                isinstance(value, str) and value.startswith(_EVAL_TARGET_PREFIX)):
            raise ValueError(
                f"refusing to build {key}={value!r} from the config in {ckpt_path}: only "
                f"{_EVAL_TARGET_PREFIX}* classes are built from a checkpoint")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a checkpoint with the model rebuilt from the config stored inside it."""
    from ..data import build_data, data_info
    from .checkpoint import load_checkpoint
    from .loop import Trainer, resolve_device, write_json_atomic

    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ValueError("ckpt_path is missing: python evaluate.py ckpt_path=RUN/checkpoints/best.ckpt")
    if cfg.split not in ("test", "val"):
        raise ValueError(f"split={cfg.split!r} is not supported; choose test or val")
    if cfg.limit_batches is not None and cfg.limit_batches < 1:
        raise ValueError(f"limit_batches={cfg.limit_batches} is out of range; it must be null or ≥ 1")
    device = resolve_device(cfg.device, "device")
    state = load_checkpoint(cfg.ckpt_path)
    _check_targets(state["config"], cfg.ckpt_path)
    try:
        run_cfg = OmegaConf.create(state["config"])
        for key, value in cfg.data.items():
            if value is not None:
                run_cfg.data[key] = value
    except Exception as exc:  # noqa: BLE001 - a config the checkpoint holds, not one we composed
        raise ValueError(f"{cfg.ckpt_path}: its stored config is not usable ({str(exc).splitlines()[0][:120]})") from None
    run_dir = _run_dir()
    info = data_info(run_cfg.data)
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
