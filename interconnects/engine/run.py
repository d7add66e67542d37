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

from ..config import EXIT_BAD_SETTING

log = logging.getLogger("interconnects")
# torch_geometric scripts a few helpers at import; the deprecation notice says nothing to our users
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)


def guarded(fn, cfg: DictConfig):
    """Run ``fn(cfg)``; known failures print one line and exit non-zero (full traceback with
    ``HYDRA_FULL_ERROR=1``). Exit status: 2 a bad setting, checkpoint or dataset; 3 a non-finite
    loss; 4 a checkpoint that could not be written; 128 + N stopped by signal N (130 Ctrl-C).

    A finished run's directory gets ``job.json`` (overrides, status, wall time, the optimised metric
    and its value, threads, device), and so does every job of a sweep, failed or not. In a multirun (``-m``) a failed job does not end the sweep: its one-line error goes to
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

    from . import distributed

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
        if distributed.env_world_size() > 1 and cfg.get("trainer") is not None:  # started by torchrun
            cfg.trainer.device = distributed.init(cfg.trainer.device, bool(cfg.trainer.get("sync_batchnorm")))
            if not distributed.is_primary():  # rank 0 reports; the others speak only of trouble
                logging.getLogger("interconnects").setLevel(logging.WARNING)
        job.start(cfg)
        result = fn(cfg)
    except RunFinished as exc:  # the run's own record stays as it is
        print(exc)
        return None
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
        code, message = EXIT_BAD_SETTING, (str(exc).strip().splitlines() or [type(exc).__name__])[0]
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
        job.finish(0, None, value=result)
        return result
    finally:
        distributed.cleanup()
    job.finish(code, message)
    if job.multirun and code < 128:
        print(f"error: job {job.num} ({' '.join(job.overrides)}) failed (exit {code}): {message}", file=sys.stderr)
        return None
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _env_rank() -> int:
    """This process's torchrun rank (0 without torchrun); read from the environment, so that no
    torch import is needed to know it."""
    return int(os.environ.get("RANK", "0") or 0)


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
        if self.path is None or _env_rank() != 0:  # under torchrun, rank 0 keeps the record
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
        metric = previous.get("optimized_metric")
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

    @staticmethod
    def objective(cfg: DictConfig) -> dict:
        """``{optimized_metric, mode}``: the metric ``train`` returns to sweepers (``optimized_metric``,
        else the task's monitored metric) and whether higher (``max``) or lower (``min``) is better."""
        if cfg.get("task") is None:
            return {}
        metric = cfg.get("optimized_metric")
        try:
            cls = task_class(cfg.task)
        except ValueError:
            return {"optimized_metric": metric} if metric else {}
        if metric is None or metric == cls.monitor:
            return {"optimized_metric": cls.monitor, "mode": cls.monitor_mode}
        return {"optimized_metric": metric}

    def start(self, cfg: DictConfig) -> None:
        """Record that the job runs (``job.json`` with status ``running``, its process and resources)."""
        import torch

        previous = self._previous() or {}
        self.record = {
            "overrides": self.overrides, "job_num": self.num, "status": "running", "pid": os.getpid(),
            "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_threads": torch.get_num_threads(),
            "device": OmegaConf.select(cfg, "trainer.device", default=None) or cfg.get("device"),
            **self.objective(cfg),
            "launches": int(previous.get("launches", 0)) + 1 if previous.get("overrides") == self.overrides else 1,
            "wall_time_s_before": (float(previous.get("wall_time_s", 0.0))
                                   if previous.get("overrides") == self.overrides else 0.0),
        }
        self._t0 = time.monotonic()
        if self.multirun:  # (a single run that is refused must leave no directory behind: no record yet)
            self._write()

    def finish(self, code: int, error: str | None, value=None) -> None:
        """Record how the job ended; a failed sweep job's directory also gets ``error.txt``. A single
        run records only its success."""
        if self.run_dir is None or not self.run_dir.is_dir() or (code != 0 and not self.multirun):
            return  # (a single run's failure is its exit status and error line; its directory stays as the engine left it)
        if not self.record:  # failed before start() (e.g. a foreign job directory)
            self.record = {"overrides": self.overrides, "job_num": self.num, "pid": os.getpid(),
                           "host": socket.gethostname(), "wall_time_s_before": 0.0}
        spent = time.monotonic() - self._t0
        self.record.update({
            "status": "ok" if code == 0 else ("interrupted" if code >= 128 else "failed"),
            "exit_code": code, "error": error, "value": value if isinstance(value, (int, float)) else None,
            "wall_time_s": round(self.record.pop("wall_time_s_before") + spent, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        self._write()
        if _env_rank() != 0:
            return
        if code != 0 and self.run_dir is not None:
            try:
                (self.run_dir / "error.txt").write_text(f"{error}\n" + (f"\n{self.traceback}" if self.traceback else ""))
            except OSError:
                pass
        elif self.run_dir is not None:
            (self.run_dir / "error.txt").unlink(missing_ok=True)


class RunFinished(Exception):
    """Resuming a run that already finished: nothing to do, nothing written (exit status 0)."""


_started = False  # set once Hydra has composed the config and handed it to train / evaluate


def entry(main) -> None:
    """Call the Hydra ``main`` of an entry point. A command line Hydra cannot compose (an unknown
    group option or key, a wrong type) ends with Hydra's status 1; here it is 2, like every other
    bad setting. A failure after composition keeps its own status."""
    try:
        main()
    except SystemExit as exc:
        if exc.code == 1 and not _started:
            raise SystemExit(EXIT_BAD_SETTING) from None
        raise


def _mark_started() -> None:
    global _started
    _started = True


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def _resume_hint(run_dir: Path) -> str:
    overrides = [o for o in _task_overrides() if not o.startswith(("ckpt_path=", "init_from="))]
    overrides.append(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    return "python train.py " + " ".join(shlex.quote(o) for o in overrides)


def _save_record(cfg: DictConfig, run_dir: Path) -> None:
    """Write the run's ``.hydra/`` record (config, overrides, Hydra's own config), as Hydra does for
    a new run. A resume writes it only once every check has passed, so a refused resume leaves the
    record of the run as it was."""
    from hydra.core.hydra_config import HydraConfig

    from .checkpoint import write_atomic

    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    hydra_cfg = OmegaConf.create({"hydra": OmegaConf.to_container(HydraConfig.get())})
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", OmegaConf.create(_task_overrides()))):
        text = OmegaConf.to_yaml(node)
        write_atomic(folder / name, lambda f, text=text: f.write(text), "w")


def task_class(node):
    """The :class:`~interconnects.tasks.base.Task` subclass named by ``node._target_`` (``task``)."""
    from hydra.utils import get_class

    from ..config import ConfigError
    from ..tasks.base import Task

    target = node.get("_target_") if node is not None else None
    try:
        cls = get_class(target)
    except Exception as exc:  # noqa: BLE001 - any import failure becomes one line
        raise ConfigError(f"task._target_={target!r} cannot be imported ({_first_line(exc)})") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task._target_={target!r} is not a task: it must subclass interconnects.tasks.base.Task")
    return cls


def build_task(cfg: DictConfig, info):
    """The task described by ``cfg.task`` with all its networks, for data described by ``info``."""
    return task_class(cfg.task).from_config(cfg, info)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def build_factories(cfg: DictConfig, groups) -> tuple[dict, dict]:
    """``({group: optimizer factory}, {group: scheduler factory or None})`` for the task's optimizer
    ``groups``. ``optimizer`` (and ``scheduler``) is one ``_partial_`` factory used for every group,
    or a mapping ``{group: factory}`` naming each group (``optimizer.generator.lr=...``)."""
    from hydra.utils import instantiate

    def per_group(key: str) -> dict:
        node = cfg.get(key)
        if node is None or "_target_" in node:
            factory = instantiate(node) if node is not None and node.get("_target_") else None
            return {g: factory for g in groups}
        names = set(node.keys())
        if names != set(groups):
            raise ValueError(
                f"{key}: the task trains {', '.join(sorted(groups))} but {key}.<group> names "
                f"{', '.join(sorted(names)) or 'nothing'}; give one {key} config for all, or one for each group")
        return {g: instantiate(node[g]) if node[g] is not None and node[g].get("_target_") else None for g in groups}

    return per_group("optimizer"), per_group("scheduler")


def _check_factories(task, optimizers: dict, schedulers: dict) -> None:
    """Build a throwaway optimizer and scheduler for each group on the task's parameters: a bad
    ``optimizer.*`` or ``scheduler.*`` value fails now, naming its group, not after the data is loaded."""
    from .loop import make_scheduler

    for group, params in task.optimizer_groups().items():
        for key, build in (("optimizer", lambda: optimizers[group](list(params))),
                           ("scheduler", lambda: make_scheduler(schedulers[group], optimizers[group](list(params)), 10))):
            try:
                build()
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{key}: {_first_line(exc)}") from None


#: The settings that define a model: a checkpoint resumes only under the same values.
MODEL_KEYS = ("data.name", "data.image_size", "data.channels", "backbone.", "interconnect.", "gnn.", "decoder.", "task.")


def _model_differences(config: dict, saved: dict) -> list[str]:
    """``key=value`` of the model-defining settings where ``config`` differs from ``saved``."""
    from ..config import flatten

    ours, theirs = flatten(config), flatten(saved or {})
    keys = sorted(k for k in set(ours) | set(theirs) if k.startswith(MODEL_KEYS))
    return [f"{k}={ours.get(k)!r} here but {theirs.get(k)!r} in the checkpoint" for k in keys if ours.get(k) != theirs.get(k)]


def _check_resume(task, state: dict, config: dict, ckpt_path) -> None:
    """A checkpoint resumes only the model that wrote it: the model-defining settings must equal the
    checkpoint's own (``interconnect=knn`` on a grid run is refused, naming the keys), and its
    weights must load into the model built here."""
    diffs = _model_differences(config, state.get("config") or {})
    if diffs:
        raise ValueError(f"ckpt_path={ckpt_path} was written by another model ({'; '.join(diffs[:3])}); "
                         "resume with the run's own settings, or start a new run from its weights with init_from=")
    try:
        task.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"ckpt_path={ckpt_path}: its weights do not fit the model built from this config "
                         f"({_first_line(exc)}); resume with the overrides of the run that wrote it") from None


def _init_from(task, path) -> None:
    """Start from the weights of the checkpoint ``path`` (fine-tuning): a fresh optimizer, schedule and step."""
    from .checkpoint import load_checkpoint

    state = load_checkpoint(path)
    try:
        task.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"init_from={path}: its weights do not fit the model built from this config "
                         f"({_first_line(exc)}); keep the model settings of the run that wrote it") from None
    log.info("weights from %s (epoch %s, step %s); optimizer and schedule start afresh", path, state.get("epoch"), state.get("step"))


def _warn_costs(task) -> None:
    """Say before training when a layer that builds a tensor per edge meets a large complete graph."""
    from ..models.hybrid import HybridModel

    for model in task.networks().values():
        gnn = getattr(model, "gnn", None) if isinstance(model, HybridModel) else None
        nodes = getattr(model, "graph_nodes", None)
        per_edge = getattr(gnn, "flags", {}).get("per_edge")  # (a user's own head may not say)
        if gnn is None or not model.graph_dense or not nodes or nodes <= 256 or not per_edge:
            continue
        log.warning("gnn.layer=%s on a complete graph of %d nodes builds a [B, %d, %d, C] tensor per layer: "
                    "expect slow steps; cheaper: gnn=gcn (one matrix product), or interconnect=knn (k edges a node)",
                    gnn.layer, nodes, nodes, nodes)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _remove_if_untouched(run_dir: Path) -> None:
    """A new run that failed before any work leaves no run directory behind (in a sweep it stays:
    it holds the job's error)."""
    import shutil

    if _is_multirun() or not run_dir.is_dir():
        return
    if {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
        log_file = run_dir / "train.log"
        if not log_file.exists() or log_file.stat().st_size == 0:
            shutil.rmtree(run_dir, ignore_errors=True)


class _HeldLogFile:
    """Holds back what is logged into the run directory's log file while a resume is checked: a
    refused resume leaves the run's ``train.log`` as it was, an accepted one gets every line."""

    def __init__(self, run_dir: Path) -> None:
        import logging.handlers

        root = logging.getLogger()
        folder = str(run_dir.resolve())
        self.files = [h for h in root.handlers if isinstance(h, logging.FileHandler)
                      and os.path.dirname(os.path.abspath(h.baseFilename)) == folder]
        self.buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 10)
        for handler in self.files:
            root.removeHandler(handler)
        if self.files:
            self.buffer.setLevel(min(h.level for h in self.files))
            self.buffer.setFormatter(self.files[0].formatter)
            root.addHandler(self.buffer)

    def release(self) -> None:
        root = logging.getLogger()
        root.removeHandler(self.buffer)
        for handler in self.files:
            for record in self.buffer.buffer:
                if record.levelno >= handler.level:
                    handler.handle(record)
            root.addHandler(handler)
        self.buffer.buffer.clear()
        self.files = []

    def drop(self) -> None:
        logging.getLogger().removeHandler(self.buffer)
        self.buffer.buffer.clear()


def _limits_note(trainer_cfg) -> str:
    limits = [f"trainer.{k}={trainer_cfg[k]}" for k in ("limit_train_batches", "limit_val_batches", "limit_test_batches")
              if trainer_cfg.get(k)]
    return f"  (from a few batches only: {', '.join(limits)})" if limits else ""


def train(cfg: DictConfig) -> float | None:
    """Build, fit, test; returns ``metrics[optimized_metric]`` (the task's monitored metric unless
    ``optimized_metric`` is set) for sweepers.

    Every check runs before any work or output: config values, the checkpoint to resume from
    (the same model, a run not already finished), the model (impossible settings fail in its dummy
    forward pass), optimizers and schedulers, the dataset, and what an epoch's end runs. Only then
    does training write anything; a refused run leaves nothing behind, and a refused resume leaves
    its run directory as it was.
    """
    _mark_started()
    run_dir = _run_dir()
    resuming = bool(cfg.ckpt_path)
    held = _HeldLogFile(run_dir) if resuming else None
    try:
        task, data, trainer, optimizers, schedulers, state = _prepare_training(cfg, run_dir)

        def accepted() -> None:  # the resume passed every check: now it may write to the run
            _save_record(cfg, run_dir)
            held.release()

        metrics = trainer.fit(task, data, optimizers, schedulers, cfg.ckpt_path, state=state,
                              on_ready=accepted if resuming else None)
    except BaseException:
        if not resuming:
            _remove_if_untouched(run_dir)
        raise
    finally:
        if held is not None:
            held.drop()
    shown = {k: v for k, v in metrics.items() if k.startswith("test/") and k.count("/") == 1}
    if task.monitor in metrics:
        shown[task.monitor] = metrics[task.monitor]
    log.info("%s%s", "  ".join(f"{k}={v:.4f}" for k, v in shown.items()), _limits_note(cfg.trainer))
    log.info("run directory: %s", run_dir)
    log.info("checkpoints:   %s (best), last.ckpt beside it", run_dir / "checkpoints" / "best.ckpt")
    if cfg.logger.name == "tensorboard":
        log.info("TensorBoard:   tensorboard --logdir %s  (then open http://localhost:6006)", run_dir / "tensorboard")
    metric = cfg.get("optimized_metric") or task.monitor
    return metrics.get(metric)


def _prepare_training(cfg: DictConfig, run_dir: Path):
    """Everything ``train`` checks and builds before any work; :class:`RunFinished` when there is
    nothing to do (the checkpoint's run already finished)."""
    from ..data import build_data, check_data_config, data_info
    from .checkpoint import load_checkpoint
    from .device import seed_everything
    from .loop import Trainer, check_trainer_config

    config = OmegaConf.to_container(cfg, resolve=True)
    if cfg.seed < 0:
        raise ValueError(f"seed={cfg.seed} is out of range; it must be an integer ≥ 0")
    if cfg.ckpt_path and cfg.get("init_from"):
        raise ValueError("ckpt_path= (resume a run exactly) and init_from= (a new run from a checkpoint's weights) "
                         "exclude each other; give one")
    check_data_config(cfg.data)
    check_trainer_config(cfg.trainer)
    if cfg.logger.name not in ("tensorboard", "none"):
        raise ValueError(f"logger.name={cfg.logger.name!r} is not supported; choose tensorboard or none")
    # a missing, foreign, truncated or unsafe file stops us before any work
    state = load_checkpoint(cfg.ckpt_path) if cfg.ckpt_path else None
    if state is not None:
        check_trusted(config, cfg.ckpt_path, cfg.trust)
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    info = data_info(cfg.data)
    task = build_task(cfg, info)
    optimizers, schedulers = build_factories(cfg, list(task.optimizer_groups()))
    _check_factories(task, optimizers, schedulers)
    if state is not None:
        _check_resume(task, state, config, cfg.ckpt_path)
        if state["epoch"] >= cfg.trainer.max_epochs and state.get("batch_in_epoch", 0) == 0:
            raise RunFinished(f"{cfg.ckpt_path}: this run already finished (epoch {state['epoch']} of "
                              f"{cfg.trainer.max_epochs}); nothing was changed. Re-test it with: "
                              f"python evaluate.py ckpt_path={cfg.ckpt_path}")
    elif cfg.get("init_from"):
        _init_from(task, cfg.init_from)
    _warn_costs(task)
    trainer = Trainer(cfg.trainer, run_dir, config, cfg.logger.name, _resume_hint(run_dir))
    data = build_data(cfg.data, cfg.seed, trainer.device)
    log.info("parameters: " + ", ".join(f"{name} {count:,}" for name, count in task.parameter_table()))
    log.info("data: %s, %d train / %d val / %d test images, device %s", cfg.data.name,
             len(data.train_view), len(data.val.dataset), len(data.test.dataset), trainer.device)
    return task, data, trainer, optimizers, schedulers, state


# What evaluate.py (from the config stored in a checkpoint) and a resume build: the project's own
# classes, and those of the modules the user names as trusted with trust=[module, ...], so that a
# crafted config cannot make them construct (and so run) anything else.
_MODEL_GROUPS = ("backbone", "interconnect", "gnn", "decoder", "task")
_OWN_PACKAGE = "interconnects"


def _outside_classes(config: dict) -> list[tuple[str, str]]:
    """``[(key, dotted class path)]`` of the classes the model groups of ``config`` name: every
    ``_target_`` and a GNN layer given by dotted path."""
    from ..config import flatten

    found = []
    for key, value in flatten({g: config.get(g) for g in _MODEL_GROUPS if isinstance(config.get(g), dict)}).items():
        is_class = key.endswith("_target_") or (key == "gnn.layer" and isinstance(value, str) and "." in value)
        if is_class and value is not None:
            found.append((key, str(value)))
    return found


def check_trusted(config: dict, source, trust) -> None:
    """Refuse (one line) to build a class outside the package from ``config`` unless its module is
    in ``trust``. ``source`` names where the config comes from (a checkpoint)."""
    trusted = [_OWN_PACKAGE, *[str(t) for t in (trust or [])]]
    for key, target in _outside_classes(config):
        if not any(target == m or target.startswith(m + ".") for m in trusted):
            module = target.rsplit(".", 1)[0]
            raise ValueError(
                f"refusing to build {key}={target!r} from {source}: only {_OWN_PACKAGE}.* classes are built "
                f"from a checkpoint unless their module is trusted; add trust=[{module.split('.')[0]}] if you trust it")


def resolve_checkpoint(path: str) -> Path:
    """``ckpt_path`` as given: a checkpoint file, or a run directory (its ``checkpoints/best.ckpt``)."""
    given = Path(path)
    if given.is_dir():
        best = given / "checkpoints" / "best.ckpt"
        if not best.is_file():
            raise ValueError(f"ckpt_path={path} is a folder without checkpoints/best.ckpt; give a run directory or a .ckpt file")
        return best
    return given


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a checkpoint with the model rebuilt from the config stored inside it."""
    _mark_started()
    from ..data import build_data, data_info
    from .checkpoint import load_checkpoint, write_json_atomic
    from .device import resolve_device
    from .loop import Trainer

    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ValueError("ckpt_path is missing: python evaluate.py ckpt_path=RUN_DIR (or RUN/checkpoints/best.ckpt)")
    if cfg.split not in ("test", "val", "train"):
        raise ValueError(f"split={cfg.split!r} is not supported; choose test, val or train")
    if cfg.limit_batches is not None and cfg.limit_batches < 1:
        raise ValueError(f"limit_batches={cfg.limit_batches} is out of range; it must be null or ≥ 1")
    device = resolve_device(cfg.device, "device")
    ckpt_path = resolve_checkpoint(cfg.ckpt_path)
    state = load_checkpoint(ckpt_path)
    check_trusted(state["config"], ckpt_path, cfg.trust)
    try:
        run_cfg = OmegaConf.create(state["config"])
        for key, value in cfg.data.items():
            if value is not None:
                run_cfg.data[key] = value
    except Exception as exc:  # noqa: BLE001 - a config the checkpoint holds, not one we composed
        raise ValueError(f"{ckpt_path}: its stored config is not usable ({str(exc).splitlines()[0][:120]})") from None
    run_dir = _run_dir()
    task = build_task(run_cfg, data_info(run_cfg.data))
    try:
        task.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"{ckpt_path}: its weights do not fit the model built from its own config ({_first_line(exc)})") from None
    data = build_data(run_cfg.data, run_cfg.seed, device)
    run_cfg.trainer.device = str(device)
    run_cfg.trainer.compile = False
    trainer = Trainer(run_cfg.trainer, run_dir, state["config"], "none")
    task.to(trainer.device)
    task.setup(data)
    loader = {"test": data.test, "val": data.val}.get(cfg.split) or _unaugmented_train(data)
    metrics, sums = trainer.evaluate(task, loader, cfg.split, cfg.limit_batches)
    width = max(len(k) for k in metrics)
    print(f"\ncheckpoint: {ckpt_path} (epoch {state.get('epoch')}, step {state.get('step')})")
    print(f"{'metric':<{width}}  value\n{'-' * width}  ------")
    for key, value in metrics.items():
        print(f"{key:<{width}}  {value:.4f}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if "confusion" in sums:
        confusion = sums["confusion"].cpu()
        print(f"confusion matrix ({cfg.split}; rows: true class, columns: predicted):\n{confusion.numpy()}")
        metrics[f"{cfg.split}/confusion"] = confusion.tolist()
    _save_pictures(task, trainer, data.val if len(data.val.dataset) else data.test, sums, run_dir)
    write_json_atomic(metrics, run_dir / "metrics.json")
    print(f"metrics written to {run_dir / 'metrics.json'}")
    return metrics


def _unaugmented_train(data):
    """The training split in a fixed order, without augmentation (``evaluate.py split=train``)."""
    import copy

    from torch.utils.data import DataLoader

    view = copy.copy(data.train_view)
    view.augment = "none"
    return DataLoader(view, batch_size=data.val.batch_size, shuffle=False, collate_fn=data.val.collate_fn,
                      num_workers=data.val.num_workers)


def _save_pictures(task, trainer, loader, sums: dict, run_dir: Path) -> None:
    """The task's pictures (a GAN's samples, reconstructions, graphs, the confusion matrix) as PNG
    files in the evaluation's directory."""
    import torch
    from torchvision.utils import save_image

    from .device import move

    batch = move([t[:8] if isinstance(t, torch.Tensor) else t for t in next(iter(loader))], trainer.device)
    task.eval()
    with torch.no_grad():
        pictures = {**task.pictures(batch, trainer.forward), **task.test_pictures(sums)}
    folder = run_dir / "pictures"
    for tag, picture in pictures.items():
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (tag.replace("/", "_") + ".png")
        if isinstance(picture, torch.Tensor):
            save_image(picture.detach().float().cpu().clamp(0, 1), path)
        else:
            picture.savefig(path, dpi=100, bbox_inches="tight")
        print(f"picture written to {path}")
