"""Building what a run trains from its config: the task with its networks, and the optimizer and
scheduler factories of the task's optimizer groups (checked on throwaway copies before any work)."""

from __future__ import annotations

from omegaconf import DictConfig

from ..config import first_line


def task_class(node):
    """The :class:`~interconnects.tasks.base.Task` subclass named by ``node._target_`` (``task``)."""
    from hydra.utils import get_class

    from ..config import ConfigError
    from ..tasks.base import Task

    target = node.get("_target_") if node is not None else None
    try:
        cls = get_class(target)
    except Exception as exc:  # noqa: BLE001 - any import failure becomes one line
        raise ConfigError(f"task._target_={target!r} cannot be imported ({first_line(exc)})") from None
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task._target_={target!r} is not a task: it must subclass interconnects.tasks.base.Task")
    return cls


def build_task(cfg: DictConfig, info):
    """The task described by ``cfg.task`` with all its networks, for data described by ``info``."""
    return task_class(cfg.task).from_config(cfg, info)


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


def check_factories(task, optimizers: dict, schedulers: dict) -> None:
    """Build a throwaway optimizer and scheduler for each group on the task's parameters: a bad
    ``optimizer.*`` or ``scheduler.*`` value fails now, naming its group, not after the data is loaded."""
    from .loop import make_scheduler

    for group, params in task.optimizer_groups().items():
        for key, build in (("optimizer", lambda: optimizers[group](list(params))),
                           ("scheduler", lambda: make_scheduler(schedulers[group], optimizers[group](list(params)), 10))):
            try:
                build()
            except (ValueError, TypeError, KeyError) as exc:
                raise ValueError(f"{key}: {first_line(exc)}") from None

