"""The checks before a checkpoint's contents are used: a resume continues only the model that wrote
the checkpoint, ``init_from`` takes weights that fit, and a checkpoint's stored config builds only
trusted classes."""

from __future__ import annotations

import logging
from pathlib import Path

from .build import first_line

log = logging.getLogger("interconnects")


#: The settings that define a model: a checkpoint resumes only under the same values.
MODEL_KEYS = ("data.name", "data.image_size", "data.channels", "backbone.", "interconnect.", "gnn.", "decoder.", "task.")


def model_differences(config: dict, saved: dict) -> list[str]:
    """``key=value`` of the model-defining settings where ``config`` differs from ``saved``."""
    from ..config import flatten

    ours, theirs = flatten(config), flatten(saved or {})
    keys = sorted(k for k in set(ours) | set(theirs) if k.startswith(MODEL_KEYS))
    return [f"{k}={ours.get(k)!r} here but {theirs.get(k)!r} in the checkpoint" for k in keys if ours.get(k) != theirs.get(k)]


def check_resume(task, state: dict, config: dict, ckpt_path) -> None:
    """A checkpoint resumes only the model that wrote it: the model-defining settings must equal the
    checkpoint's own (``interconnect=knn`` on a grid run is refused, naming the keys), and its
    weights must load into the model built here."""
    diffs = model_differences(config, state.get("config") or {})
    if diffs:
        raise ValueError(f"ckpt_path={ckpt_path} was written by another model ({'; '.join(diffs[:3])}); "
                         "resume with the run's own settings, or start a new run from its weights with init_from=")
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

