"""Typed schemas for the Hydra configs, and the resolvers they use.

The schemas make Hydra reject a wrong type or an unknown key at composition, with its own message;
a key added with ``+`` (which Hydra lets past the schema) is refused by :func:`unknown_key_error`
before the run starts, naming the close match. Model parts (backbone, interconnect, gnn, decoder, task, optimizer, scheduler) are ``_target_`` nodes
checked by the classes they build. This module imports no torch, so ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import MISSING, OmegaConf


class ConfigError(ValueError):
    """A configuration value that cannot be built; the message names the key as written on the
    command line (``group.key=value``) and what is accepted."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none), at most 160
    characters: what a one-line error quotes of the exception behind it."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


#: Exit statuses of train.py and evaluate.py (128 + N: stopped by signal N).
EXIT_BAD_SETTING = 2  # a bad setting, checkpoint or dataset
EXIT_NONFINITE = 3  # a non-finite loss, gradient or weight
EXIT_WRITE_FAILED = 4  # a checkpoint or metrics file that could not be written
EXIT_SWEEP_JOB_FAILED = 1  # a multirun ran, and some of its jobs failed (each job's error is in its directory)


@dataclass
class DataConfig:
    name: str = MISSING  # mnist | fashion_mnist | cifar10 | cifar100 | digits | image_folder
    root: Optional[str] = "./data"  # digits: unused; image_folder: DIR with train/<class>/, test/<class>/
    download: bool = True
    batch_size: int = 128
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    pin_memory: Optional[bool] = None  # null: pinned batches (copied without blocking) when training on CUDA
    on_device: bool = False  # keep the in-memory dataset on the training GPU and augment it there
    val_fraction: float = 0.1
    split_seed: int = 0
    augment: str = "none"  # none | crop | crop_flip | crop_altflip (the flip alternates by epoch) | affine
    crop_padding: int = 2
    crop_pad_mode: str = "zeros"  # zeros | reflect: how crop* pads before cutting
    image_size: Optional[int] = None  # resize to image_size × image_size (null: the dataset's own size)
    channels: Optional[int] = None  # 1 (grey) or 3 (RGB); null: as stored (image_folder: the first image's)
    max_memory_gb: float = 4.0  # image_folder: decode into memory up to this size, else read from disk


@dataclass
class TrainerConfig:
    max_epochs: int = 10
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on GPUs that have it, else fp16 with loss scaling; 32 on the CPU) | 32 | bf16 | 16
    channels_last: bool = False  # channels-last memory format for the CNN parts (faster convolutions on GPUs)
    deterministic: bool = False
    compile: bool = False
    grad_clip: Optional[float] = None
    checkpoint_every_n_steps: int = 100  # step-level last.ckpt (0: at epoch ends only)
    limit_train_batches: Optional[int] = None  # batches of data.batch_size an epoch trains on (null: all)
    # batches of data.eval_batch_size (null: max(data.batch_size, 256) images a batch), not of data.batch_size:
    # limit_val_batches=3 with data.batch_size=1 still validates up to 768 images (the run's last line says so)
    limit_val_batches: Optional[int] = None
    limit_test_batches: Optional[int] = None  # batches of data.eval_batch_size, as limit_val_batches
    on_nonfinite: str = "stop"  # stop | skip
    log_every_n_steps: int = 10
    progress: bool = True
    log_images: int = 16
    picture_every_n_epochs: int = 1  # task pictures (graphs, reconstructions, samples); 0: never
    picture_images: int = 4  # fixed validation images the pictures are drawn from
    log_graph: bool = True  # the task's network in TensorBoard's graph tab, traced once at the start (best effort)
    sync_batchnorm: bool = False  # under torchrun: BatchNorm statistics over the global batch
    lookahead_every: int = 0  # every N steps the weights are pulled to a slow copy of them (airbench's lookahead); 0: off
    lookahead_decay: float = 0.95  # the slow copy's decay per step at the run's end (it rises as (step / steps)³)


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
    trust: list = field(default_factory=list)  # modules outside the package a resume may build classes from
    optimized_metric: Optional[str] = None  # null: the task's monitored metric (val/acc, val/psnr, val/fid)
    tags: list = field(default_factory=list)
    overwrite: bool = False  # a new run may replace the run already in its hydra.run.dir


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
    trust: list = field(default_factory=list)  # modules outside the package the checkpoint may build classes from
    # test-time augmentation of the evaluated split (classification): null keeps the checkpoint's own
    # task.tta, which applies to the test split only; false | flip | shift | true applies to `split`
    tta: Any = None


def _unique_suffix() -> str:
    # time, process id and a random tag: two runs started in the same second never collide.
    # Under torchrun every rank must name the same directory: torchrun's run id (one per launch,
    # shared by all ranks and nodes) replaces what differs between them.
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "TORCHELASTIC_RUN_ID" in os.environ:
        run_id = os.environ["TORCHELASTIC_RUN_ID"]
        # (without --standalone or --rdzv-id it is "none": then the launching torchrun's process id)
        return f"{time.strftime('%Y-%m-%d')}_torchrun_{run_id if run_id not in ('', 'none') else os.getppid()}"
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
    if int(os.environ.get("RANK", "0") or 0) != 0:  # torchrun: rank 0 writes the record of the shared directory
        return None
    return None if _resumed_run(ckpt_path) is not None else ".hydra"


#: The schema of each entry point's config (``hydra.job.config_name``).
SCHEMAS = {"train": TrainConfig, "evaluate": EvaluateConfig}


def unknown_keys(config: dict, schema) -> list[tuple[str, list[str]]]:
    """``[(dotted key, the keys its parent accepts)]`` for each key of ``config`` (a plain dict) that
    the dataclass ``schema`` does not declare. The groups typed ``Any`` (the ``_target_`` parts:
    backbone, interconnect, gnn, ...) take any key; the classes they build check them."""
    hints = get_type_hints(schema)
    found = []
    for key, value in config.items():
        if key not in hints:
            found.append((str(key), sorted(hints)))
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            found += [(f"{key}.{k}", names) for k, names in unknown_keys(value, hints[key])]
    return found


def unknown_key_error(config, config_name: str, overrides: list[str]) -> Optional[str]:
    """One line naming the first key of the composed ``config`` (Hydra's own node left out) that the
    schema of ``config_name`` does not know, as written on the command line (``+interconect=knn``),
    with the close match (``interconnect=knn``); ``None`` when every key is known."""
    schema = SCHEMAS.get(config_name)
    if schema is None:
        return None
    plain = OmegaConf.to_container(config, resolve=False)
    plain.pop("hydra", None)
    found = unknown_keys(plain, schema)
    if not found:
        return None
    key, names = found[0]
    parent, _, leaf = key.rpartition(".")
    written = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), key)
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = ""
    if close:
        fixed = f"{parent}.{close[0]}" if parent else close[0]
        hint = f"; did you mean {written.lstrip('+~').replace(key, fixed, 1)}?"
    return (f"{written}: {'the config' if not parent else parent} has no key {leaf!r}{hint} "
            f"(its keys: {', '.join(names)})")


#: What a training run writes into its directory (``overwrite=true`` removes these, nothing else).
RUN_OUTPUTS = (".hydra", "checkpoints", "tensorboard", "pictures", "metrics.json", "job.json", "error.txt", "train.log")


def held_run(path: str | Path) -> list[str]:
    """The names of ``path``'s entries that show it holds a run (empty: a new run may use it)."""
    folder = Path(path)
    found = [name for name in (".hydra", "checkpoints", "metrics.json", "job.json") if (folder / name).exists()]
    log_file = folder / "train.log"
    if log_file.is_file() and log_file.stat().st_size > 0:
        found.append("train.log")
    return found


class OutputDirCheck(Callback):
    """Before Hydra writes anything: refuses a key the schema does not know (added with ``+``) and a
    new run pointed at a directory that holds a run (``overwrite=true`` replaces it); then makes the
    run (or sweep) directory, so that an unwritable one stops the run with one line instead of a
    traceback."""

    @staticmethod
    def _refuse(message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_SETTING)

    def _check_keys(self, config) -> None:
        overrides = list(config.hydra.overrides.task)
        message = unknown_key_error(config, str(config.hydra.job.config_name), overrides)
        if message:
            self._refuse(message)

    def _check_reuse(self, config) -> None:
        """A new run (no ``ckpt_path``) in a directory that holds a run would replace its checkpoints
        and append to its log: refused, unless ``overwrite=true`` (then the old run's files go first)."""
        if "overwrite" not in config or config.get("ckpt_path") or int(os.environ.get("RANK", "0") or 0) != 0:
            return
        run_dir = Path(str(config.hydra.run.dir))
        found = held_run(run_dir)
        if not found:
            return
        if not config.overwrite:
            self._refuse(f"hydra.run.dir={run_dir} already holds a run ({', '.join(found)}); resume it with "
                         f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}, choose another hydra.run.dir, "
                         "or replace it with overwrite=true")
        for name in RUN_OUTPUTS:
            target = run_dir / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        print(f"overwrite=true: the run in {run_dir} was removed; a new run starts there")

    @staticmethod
    def _make(key: str, path: str) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
            probe = Path(path) / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            print(f"error: output directory {path} is not writable ({exc.strerror}); set {key}=DIR", file=sys.stderr)
            sys.exit(EXIT_BAD_SETTING)

    def on_run_start(self, config, **kwargs) -> None:
        self._check_keys(config)
        self._check_reuse(config)
        self._make("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config, **kwargs) -> None:
        self._check_keys(config)  # (each job's own overrides are checked as the job starts)
        self._make("hydra.sweep.dir", config.hydra.sweep.dir)


def sweep_jobs(sweep_dir: str | Path) -> list[tuple[Path, dict]]:
    """``(job directory, its job.json)`` for every job under ``sweep_dir``, in job-number order."""
    jobs = []
    for path in Path(sweep_dir).rglob("job.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {"status": "unreadable", "error": f"{path} is not readable JSON"}
        jobs.append((path.parent, record if isinstance(record, dict) else {}))
    return sorted(jobs, key=lambda job: (int(job[1].get("job_num", 0) or 0), str(job[0])))


class SweepReport(Callback):
    """At the end of a multirun: one line per failed job (its overrides and error), the count, and
    the summary command; exits 1 when any job failed, so the sweep's status tells."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        jobs = sweep_jobs(sweep_dir)
        failed = [(d, r) for d, r in jobs if r.get("status") != "ok"]
        print(f"\nsweep {sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} job(s) finished, {len(failed)} failed",
              file=sys.stderr if failed else sys.stdout)
        for job_dir, record in failed:
            overrides = " ".join(record.get("overrides") or [])
            print(f"  failed {job_dir.relative_to(sweep_dir)} ({overrides}) [{record.get('status')}, exit "
                  f"{record.get('exit_code')}]: {record.get('error')}", file=sys.stderr)
        print(f"summary: python scripts/summarize_sweep.py {sweep_dir}", file=sys.stderr if failed else sys.stdout)
        if failed:
            # the sweep ran: its status is 1 ("some jobs failed"), not the 2 of a config that did not compose
            mark_composed()
            sys.exit(EXIT_SWEEP_JOB_FAILED)


_composed = False  # set once Hydra has composed the config and handed it to train / evaluate (or a sweep ran)


def mark_composed() -> None:
    """Record that Hydra composed the command line: a later exit status 1 is the run's own, not
    Hydra's refusal of the command line (which the entry points report as a bad setting, 2)."""
    global _composed
    _composed = True


def was_composed() -> bool:
    """Whether :func:`mark_composed` was called in this process."""
    return _composed


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
