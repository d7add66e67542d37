"""The job record and failure handling of a run: ``guarded`` turns known failures into one line and
an exit status, :class:`SweepJob` keeps ``job.json`` (and ``error.txt``) of every run and sweep job,
and ``entry`` gives Hydra's composition errors the status of a bad setting."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import EXIT_BAD_SETTING, was_composed
from .build import task_class

log = logging.getLogger("interconnects")


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
            job.check_keys(cfg)
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


def env_rank() -> int:
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
        if self.path is None or env_rank() != 0:  # under torchrun, rank 0 keeps the record
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

    def check_keys(self, cfg: DictConfig) -> None:
        """A key this job's overrides add (``+interconect=knn``) that the schema does not know fails the
        job, naming the close match (a single run is refused before Hydra writes anything)."""
        from hydra.core.hydra_config import HydraConfig

        from ..config import ConfigError, unknown_key_error

        message = unknown_key_error(cfg, str(HydraConfig.get().job.config_name), self.overrides)
        if message:
            raise ConfigError(message)

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
        if env_rank() != 0:
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


def entry(main) -> None:
    """Call the Hydra ``main`` of an entry point. A command line Hydra cannot compose (an unknown
    group option or key, a wrong type) ends with Hydra's status 1; here it is 2, like every other
    bad setting. A failure after composition keeps its own status."""
    try:
        main()
    except SystemExit as exc:
        if exc.code == 1 and not was_composed():
            raise SystemExit(EXIT_BAD_SETTING) from None
        raise

