"""The checks before a checkpoint's contents are used: a resume continues only the model that wrote
the checkpoint, ``init_from`` takes weights that fit, and a checkpoint's stored config builds only
trusted classes."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import first_line

log = logging.getLogger("interconnects")


#: The settings that define a model: a checkpoint resumes only under the same values.
MODEL_KEYS = ("data.name", "data.image_size", "data.channels", "backbone.", "interconnect.", "gnn.", "decoder.", "task.")


_NO_DEFAULT = object()


def _constructor_default(flat: dict, key: str):
    """The default of the argument ``key`` names in its group's ``_target_`` (``interconnect.edge_shift``:
    ``DenseGrid``'s ``edge_shift=0.0``), or a sentinel when there is none to find."""
    import inspect

    from hydra.utils import get_object

    group, _, name = key.rpartition(".")
    target = flat.get(f"{group}._target_")
    if not isinstance(target, str):
        return _NO_DEFAULT
    try:
        parameter = inspect.signature(get_object(target)).parameters.get(name)
    except (ImportError, AttributeError, TypeError, ValueError):
        return _NO_DEFAULT
    return _NO_DEFAULT if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def model_differences(config: dict, saved: dict) -> list[str]:
    """``key=value`` of the model-defining settings where ``config`` differs from ``saved``.

    A key the checkpoint's config lacks (written before the key existed) is no difference while its
    value here is the default its class takes without it: the model built is the same.
    """
    from ..config import flatten

    ours, theirs = flatten(config), flatten(saved or {})
    keys = sorted(k for k in set(ours) | set(theirs) if k.startswith(MODEL_KEYS))

    def differs(k: str) -> bool:
        if k in ours and k not in theirs and ours[k] == _constructor_default(ours, k):
            return False
        return ours.get(k) != theirs.get(k)

    return [f"{k}={ours.get(k)!r} here but {theirs.get(k)!r} in the checkpoint" for k in keys if differs(k)]


#: Settings the restored state would silently override: the RNG states, the data order and the
#: position in it (``seed``, the validation split, the batches of an epoch). The optimizer's and the
#: schedule's settings are compared too (see :func:`resume_differences`); the schedule's length
#: (``trainer.max_epochs``, ``trainer.limit_train_batches``) is checked in steps when it is restored.
RUN_KEYS = ("seed", "data.batch_size", "data.val_fraction", "data.split_seed")


def _constant_rate(flat: dict) -> bool:
    """Whether ``flat`` (a flattened config) trains at a constant rate (``scheduler=constant``)."""
    targets = [v for k, v in flat.items() if k.startswith("scheduler.") and k.endswith("_target_")]
    return all(t is None for t in targets)


def resume_differences(config: dict, saved: dict) -> list[str]:
    """``key=value`` of the settings where ``config`` differs from the checkpoint's ``saved`` config
    and the restored state would override this run's value: :data:`RUN_KEYS`, every ``optimizer.*``
    key (its state holds the rates, betas, weight decay) and, while a schedule is kept, every
    ``scheduler.*`` key. With ``scheduler=constant`` the schedule is dropped and ``optimizer.lr``
    applies as configured."""
    from ..config import flatten

    ours, theirs = flatten(config), flatten(saved or {})
    constant = _constant_rate(ours)

    def compared(key: str) -> bool:
        if key in RUN_KEYS:
            return True
        if key.startswith("optimizer."):
            return not (constant and key.rsplit(".", 1)[-1] == "lr")
        return not constant and key.startswith("scheduler.")

    keys = sorted(k for k in set(ours) | set(theirs) if compared(k))
    return [f"{k}={ours.get(k)!r} here but {theirs.get(k)!r} in the checkpoint" for k in keys if ours.get(k) != theirs.get(k)]


def check_resume(task, state: dict, config: dict, ckpt_path) -> None:
    """A checkpoint resumes only the model that wrote it: the model-defining settings must equal the
    checkpoint's own (``interconnect=knn`` on a grid run is refused, naming the keys), so must the
    settings its restored state would override (:func:`resume_differences`), and its weights must
    load into the model built here."""
    diffs = model_differences(config, state.get("config") or {})
    if diffs:
        raise ValueError(f"ckpt_path={ckpt_path} was written by another model ({'; '.join(diffs[:3])}); "
                         "resume with the run's own settings, or start a new run from its weights with init_from=")
    diffs = resume_differences(config, state.get("config") or {})
    if diffs:
        raise ValueError(
            f"ckpt_path={ckpt_path}: a resume continues the checkpoint's own optimizer, schedule and data order, "
            f"which would override {'; '.join(diffs[:4])}; resume with the run's own values, train on at a "
            "constant rate with scheduler=constant (optimizer.lr and trainer.max_epochs then apply), or start a "
            "new run from its weights with init_from=")
    try:
        task.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"ckpt_path={ckpt_path}: its weights do not fit the model built from this config "
                         f"({first_line(exc)}); resume with the overrides of the run that wrote it") from None


def init_from_weights(task, path) -> None:
    """Start from the weights of the checkpoint ``path`` (fine-tuning): a fresh optimizer, schedule and step."""
    from .checkpoint import load_checkpoint

    state = load_checkpoint(path)
    try:
        task.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"init_from={path}: its weights do not fit the model built from this config "
                         f"({first_line(exc)}); keep the model settings of the run that wrote it") from None
    log.info("weights from %s (epoch %s, step %s); optimizer and schedule start afresh", path, state.get("epoch"), state.get("step"))


# What evaluate.py (from the config stored in a checkpoint) and a resume build: the project's own
# classes, and those of the modules the user names as trusted with trust=[module, ...], so that a
# crafted config cannot make them construct (and so run) anything else.
_MODEL_GROUPS = ("backbone", "interconnect", "gnn", "decoder", "task")
_OWN_PACKAGE = "interconnects"


def outside_classes(config: dict) -> list[tuple[str, str]]:
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
    for key, target in outside_classes(config):
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

