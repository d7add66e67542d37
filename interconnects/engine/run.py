"""What ``train.py`` and ``evaluate.py`` do once Hydra has composed the config: the orchestration of
a training run and of an evaluation. The job record lives in :mod:`.jobs`, the resume and trust checks
in :mod:`.resume`, the run directory in :mod:`.rundir`, the builders in :mod:`.build`."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import first_line, mark_composed
from .build import build_factories, build_task, check_factories
from .costs import warn_costs
from .jobs import RunFinished
from .resume import check_resume, check_trusted, init_from_weights, resolve_checkpoint
from .rundir import HeldLogFile, current_run_dir, remove_if_untouched, resume_hint, save_record

log = logging.getLogger("interconnects")
# torch_geometric scripts a few helpers at import; the deprecation notice says nothing to our users
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)


def _limits_note(trainer_cfg, data, batch_size: int) -> str:
    """What the ``trainer.limit_*_batches`` in effect measured: batches count in each split's own
    batch size (validation and test: ``data.eval_batch_size``), so the note says how many images."""
    limits = []
    for key, split, size in (("limit_train_batches", "training", batch_size),
                             ("limit_val_batches", "validation", data.val.batch_size),
                             ("limit_test_batches", "test", data.test.batch_size)):
        if trainer_cfg.get(key):
            limits.append(f"trainer.{key}={trainer_cfg[key]} (batches of {size}: at most "
                          f"{trainer_cfg[key] * size:,} {split} images)")
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
    mark_composed()
    run_dir = current_run_dir()
    resuming = bool(cfg.ckpt_path)
    held = HeldLogFile(run_dir) if resuming else None
    try:
        task, data, trainer, optimizers, schedulers, state = _prepare_training(cfg, run_dir)

        def accepted() -> None:  # the resume passed every check: now it may write to the run
            save_record(cfg, run_dir)
            held.release()

        metrics = trainer.fit(task, data, optimizers, schedulers, cfg.ckpt_path, state=state,
                              on_ready=accepted if resuming else None)
    except BaseException:
        # a run continued in place keeps its directory; a new one (a ckpt_path outside a run
        # directory makes one too) that holds nothing yet is removed
        if not resuming or Path(cfg.ckpt_path).resolve().parent.parent != run_dir.resolve():
            remove_if_untouched(run_dir)
        raise
    finally:
        if held is not None:
            held.drop()
    shown = {k: v for k, v in metrics.items() if k.startswith("test/") and k.count("/") == 1}
    if task.monitor in metrics:
        shown[task.monitor] = metrics[task.monitor]
    log.info("%s%s", "  ".join(f"{k}={v:.4f}" for k, v in shown.items()), _limits_note(cfg.trainer, data, cfg.data.batch_size))
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
    check_factories(task, optimizers, schedulers)
    if state is not None:
        check_resume(task, state, config, cfg.ckpt_path)
        if state["epoch"] >= cfg.trainer.max_epochs and state.get("batch_in_epoch", 0) == 0:
            raise RunFinished(f"{cfg.ckpt_path}: this run already finished (epoch {state['epoch']} of "
                              f"{cfg.trainer.max_epochs}); nothing was changed. Re-test it with: "
                              f"python evaluate.py ckpt_path={cfg.ckpt_path}")
    elif cfg.get("init_from"):
        init_from_weights(task, cfg.init_from)
    # (a batch of one image: refused here, before anything is logged; an epoch's last such batch once
    # the training split's size is known)
    single_norm = _single_image_norm(task, info)
    _refuse_single_image_batches(single_norm, cfg.data.batch_size)
    warn_costs(task, info.in_channels, tuple(info.image_size), cfg.data.batch_size,
               cfg.data.get("eval_batch_size") or max(cfg.data.batch_size, 256))
    trainer = Trainer(cfg.trainer, run_dir, config, cfg.logger.name, resume_hint(run_dir))
    data = build_data(cfg.data, cfg.seed, trainer.device)
    _refuse_single_image_batches(single_norm, cfg.data.batch_size, len(data.train_view), cfg.trainer.limit_train_batches)
    log.info("parameters: " + ", ".join(f"{name} {count:,}" for name, count in task.parameter_table()))
    log.info("data: %s, %d train / %d val / %d test images, device %s", cfg.data.name,
             len(data.train_view), len(data.val.dataset), len(data.test.dataset), trainer.device)
    if len(data.train_view) < len(data.val.dataset):  # (more images validate than train)
        log.warning("data.val_fraction=%g leaves %d images to train on (%d validate); a few percent usually "
                    "suffices (the default is 0.1)", cfg.data.val_fraction, len(data.train_view), len(data.val.dataset))
    return task, data, trainer, optimizers, schedulers, state


def _single_image_norm(task, info) -> str | None:
    """The first BatchNorm layer of the task's networks that a training batch of one image would give a
    single value per channel (training mode cannot normalise it): ``"network.layer (input [1, C, 1, 1])"``,
    or ``None``."""
    from ..models.hybrid import HybridModel, single_value_norms

    for network, model in task.networks().items():
        if isinstance(model, HybridModel):
            norms = single_value_norms(model, info.in_channels, tuple(info.image_size))
            if norms:
                return f"{network}.{norms[0][0]} (input {list(norms[0][1])})"
    return None


def _refuse_single_image_batches(norm: str | None, batch_size: int, num_train: int | None = None,
                                 limit: int | None = None) -> None:
    """Refuse ``data.batch_size=1`` (``num_train=None``), or a batch size whose epoch of ``num_train``
    images ends in a batch of one image that the run reaches, when ``norm`` (see
    :func:`_single_image_norm`) would see one value per channel in it."""
    import math

    from ..config import ConfigError

    if norm is None or batch_size < 1:
        return
    if num_train is None:
        if batch_size != 1:
            return
        what, accepted = "a training batch of one image", 2
    else:
        full = math.ceil(num_train / batch_size)
        if batch_size == 1 or num_train - (full - 1) * batch_size != 1 or (limit and limit < full):
            return
        what = f"a last training batch of one image ({num_train} training images = {full - 1} batches of {batch_size} + 1)"
        accepted = min((b for b in range(max(2, batch_size - 3), batch_size + 8) if num_train % b != 1),
                       key=lambda b: (abs(b - batch_size), b))
    raise ConfigError(f"data.batch_size={batch_size} leaves {what}, in which BatchNorm layer {norm} sees one value per "
                      f"channel and cannot train; use a batch size that leaves no single image over, e.g. "
                      f"data.batch_size={accepted}, or a larger data.image_size")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate a checkpoint with the model rebuilt from the config stored inside it; the report goes
    to the console and ``evaluate.log``. An evaluation that fails before writing its metrics leaves no
    directory behind."""
    mark_composed()
    run_dir = current_run_dir()
    try:
        return _evaluate(cfg, run_dir)
    except BaseException:
        remove_if_untouched(run_dir, "evaluate.log")
        raise


def _evaluate(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    from ..data import build_data, data_info
    from ..tasks.classify import ClassificationTask, check_tta
    from .checkpoint import load_checkpoint, write_json_atomic
    from .device import resolve_device
    from .loop import Trainer

    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ValueError("ckpt_path is missing: python evaluate.py ckpt_path=RUN_DIR (or RUN/checkpoints/best.ckpt)")
    if cfg.split not in ("test", "val", "train"):
        raise ValueError(f"split={cfg.split!r} is not supported; choose test, val or train")
    if cfg.limit_batches is not None and cfg.limit_batches < 1:
        raise ValueError(f"limit_batches={cfg.limit_batches} is out of range; it must be null or ≥ 1")
    if cfg.tta is not None:
        check_tta(cfg.tta, ", or null for the checkpoint's own")
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
    task = build_task(run_cfg, data_info(run_cfg.data))
    try:
        task.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"{ckpt_path}: its weights do not fit the model built from its own config ({first_line(exc)})") from None
    if cfg.tta is not None:
        if not isinstance(task, ClassificationTask):
            raise ValueError(f"tta={cfg.tta!r} applies to classification checkpoints; {ckpt_path} holds a "
                             f"{type(task).__name__}")
        task.set_tta(cfg.tta, cfg.split)
    data = build_data(run_cfg.data, run_cfg.seed, device)
    run_cfg.trainer.device = str(device)
    run_cfg.trainer.compile = False
    trainer = Trainer(run_cfg.trainer, run_dir, state["config"], "none")
    task.to(trainer.device)
    task.setup(data)
    loader = {"test": data.test, "val": data.val}.get(cfg.split) or _unaugmented_train(data)
    metrics, sums = trainer.evaluate(task, loader, cfg.split, cfg.limit_batches)
    width = max(len(k) for k in metrics)
    table = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    table += [f"{key:<{width}}  {value:.4f}" for key, value in metrics.items()]
    log.info("checkpoint: %s (epoch %s, step %s), split=%s\n%s", ckpt_path, state.get("epoch"), state.get("step"),
             cfg.split, "\n".join(table))
    run_dir.mkdir(parents=True, exist_ok=True)
    if "confusion" in sums:
        confusion = sums["confusion"].cpu()
        log.info("confusion matrix (%s; rows: true class, columns: predicted):\n%s", cfg.split, confusion.numpy())
        metrics[f"{cfg.split}/confusion"] = confusion.tolist()
    _save_pictures(task, trainer, data.val if len(data.val.dataset) else data.test, sums, run_dir, cfg.split)
    write_json_atomic(metrics, run_dir / "metrics.json")
    log.info("metrics written to %s", run_dir / "metrics.json")
    return metrics


def _unaugmented_train(data):
    """The training split in a fixed order, without augmentation (``evaluate.py split=train``)."""
    import copy

    from torch.utils.data import DataLoader

    view = copy.copy(data.train_view)
    view.augment = "none"
    return DataLoader(view, batch_size=data.val.batch_size, shuffle=False, collate_fn=data.val.collate_fn,
                      num_workers=data.val.num_workers)


def _save_pictures(task, trainer, loader, sums: dict, run_dir: Path, split: str) -> None:
    """The task's pictures (a GAN's samples, reconstructions, graphs, the confusion matrix) as PNG
    files in the evaluation's directory; those of the evaluated split are named by it
    (``val_confusion.png`` for ``split=val``)."""
    import torch
    from torchvision.utils import save_image

    from .device import move

    batch = move([t[:8] if isinstance(t, torch.Tensor) else t for t in next(iter(loader))], trainer.device)
    task.eval()
    with torch.no_grad():
        # (test_pictures draws whatever split was summed: its "test/" tags take the evaluated split's name)
        of_split = {f"{split}/{tag.split('/', 1)[1]}" if tag.startswith("test/") else tag: picture
                    for tag, picture in task.test_pictures(sums).items()}
        pictures = {**task.pictures(batch, trainer.forward), **of_split}
    folder = run_dir / "pictures"
    for tag, picture in pictures.items():
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (tag.replace("/", "_") + ".png")
        if isinstance(picture, torch.Tensor):
            save_image(picture.detach().float().cpu().clamp(0, 1), path)
        else:
            picture.savefig(path, dpi=100, bbox_inches="tight")
        log.info("picture written to %s", path)
