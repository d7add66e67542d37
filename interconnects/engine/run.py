"""What ``train.py`` and ``evaluate.py`` do once Hydra has composed the config."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("interconnects")
# torch_geometric scripts a few helpers at import; the deprecation notice says nothing to our users
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)


def guarded(fn, cfg: DictConfig):
    """Run ``fn(cfg)``; known failures print one line and exit non-zero (full traceback with
    ``HYDRA_FULL_ERROR=1``). Exit status: 2 a bad setting, checkpoint or dataset; 3 a non-finite
    loss; 4 a checkpoint that could not be written; 128 + N stopped by signal N (130 Ctrl-C)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ..data import DataMissingError
    from .checkpoint import CheckpointError
    from .loop import TrainingStopped

    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        return fn(cfg)
    except TrainingStopped as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if full:
            raise
        print("error: interrupted; checkpoints already on disk are complete (resume from last.ckpt with ckpt_path=)",
              file=sys.stderr)
        sys.exit(130)
    except (ValueError, CheckpointError, DataMissingError, OSError, OmegaConfBaseException, HydraException) as exc:
        if full:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and exc.filename:
            message = f"{exc.filename}: {exc.strerror}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


_started = False  # set once Hydra has composed the config and handed it to train / evaluate


def entry(main) -> None:
    """Call the Hydra ``main`` of an entry point. A command line Hydra cannot compose (an unknown
    group option or key, a wrong type) ends with Hydra's status 1; here it is 2, like every other
    bad setting. A failure after composition keeps its own status."""
    try:
        main()
    except SystemExit as exc:
        if exc.code == 1 and not _started:
            raise SystemExit(2) from None
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

    from ..models.hybrid import ConfigError
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

    model = getattr(task, "model", None)
    gnn = getattr(model, "gnn", None) if isinstance(model, HybridModel) else None
    interconnect = getattr(model, "interconnect", None)
    nodes = getattr(interconnect, "num_nodes", None)
    if gnn is None or interconnect is None or getattr(gnn, "layer", None) not in ("gat", "gatedgcn", "maxrel"):
        return
    if type(interconnect).__name__ == "DenseGrid" and nodes and nodes > 256:
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
    try:
        prepared = _prepare_training(cfg, run_dir)
    except BaseException:
        if not resuming:
            _remove_if_untouched(run_dir)
        raise
    if prepared is None:
        return None
    task, data, trainer, optimizers, schedulers, state = prepared
    if resuming:
        _save_record(cfg, run_dir)
    metrics = trainer.fit(task, data, optimizers, schedulers, cfg.ckpt_path, state=state)
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
    """Everything ``train`` checks and builds before any work; ``None`` when there is nothing to do
    (the checkpoint's run already finished)."""
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
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    info = data_info(cfg.data)
    task = build_task(cfg, info)
    optimizers, schedulers = build_factories(cfg, list(task.optimizer_groups()))
    _check_factories(task, optimizers, schedulers)
    if state is not None:
        _check_resume(task, state, config, cfg.ckpt_path)
        if state["epoch"] >= cfg.trainer.max_epochs and state.get("batch_in_epoch", 0) == 0:
            print(f"{cfg.ckpt_path}: this run already finished (epoch {state['epoch']} of {cfg.trainer.max_epochs}); "
                  f"nothing was changed. Re-test it with: python evaluate.py ckpt_path={cfg.ckpt_path}")
            return None
    elif cfg.get("init_from"):
        _init_from(task, cfg.init_from)
    _warn_costs(task)
    data = build_data(cfg.data, cfg.seed)
    trainer = Trainer(cfg.trainer, run_dir, config, cfg.logger.name, _resume_hint(run_dir))
    log.info("parameters: " + ", ".join(f"{name} {count:,}" for name, count in task.parameter_table()))
    log.info("data: %s, %d train / %d val / %d test images, device %s", cfg.data.name,
             len(data.train_view), len(data.val.dataset), len(data.test.dataset), trainer.device)
    return task, data, trainer, optimizers, schedulers, state


# What evaluate.py builds from the config stored in a checkpoint: only the project's own classes,
# so a crafted config cannot make it construct (and so run) anything else.
_EVAL_GROUPS = ("backbone", "interconnect", "gnn", "decoder", "task")
_EVAL_TARGET_PREFIX = "interconnects."


def _check_targets(config: dict, ckpt_path) -> None:
    from ..config import flatten

    for key, value in flatten({g: config.get(g) for g in _EVAL_GROUPS if isinstance(config.get(g), dict)}).items():
        if key.endswith("_target_") and value is not None and not (
                isinstance(value, str) and value.startswith(_EVAL_TARGET_PREFIX)):
            raise ValueError(
                f"refusing to build {key}={value!r} from the config in {ckpt_path}: only "
                f"{_EVAL_TARGET_PREFIX}* classes are built from a checkpoint")


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
    _check_targets(state["config"], ckpt_path)
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
    data = build_data(run_cfg.data, run_cfg.seed)
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
