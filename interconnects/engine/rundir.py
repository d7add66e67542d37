"""A run's directory: where it is, its ``.hydra/`` record, the command that resumes it, the log file
held back while a resume is checked, and the removal of a directory that a refused run left empty."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("interconnects")


def current_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def resume_hint(run_dir: Path) -> str:
    overrides = [o for o in task_overrides() if not o.startswith(("ckpt_path=", "init_from="))]
    overrides.append(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    return "python train.py " + " ".join(shlex.quote(o) for o in overrides)


def save_record(cfg: DictConfig, run_dir: Path) -> None:
    """Write the run's ``.hydra/`` record (config, overrides, Hydra's own config), as Hydra does for
    a new run. A resume writes it only once every check has passed, so a refused resume leaves the
    record of the run as it was."""
    from hydra.core.hydra_config import HydraConfig

    from .checkpoint import write_atomic

    folder = run_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    hydra_cfg = OmegaConf.create({"hydra": OmegaConf.to_container(HydraConfig.get())})
    for name, node in (("config.yaml", cfg), ("hydra.yaml", hydra_cfg),
                       ("overrides.yaml", OmegaConf.create(task_overrides()))):
        text = OmegaConf.to_yaml(node)
        write_atomic(folder / name, lambda f, text=text: f.write(text), "w")


def is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def remove_if_untouched(run_dir: Path, log_name: str = "train.log") -> None:
    """A new run (or an evaluation) that failed before any work leaves no run directory behind (in
    a sweep it stays: it holds the job's error). Untouched: nothing but Hydra's ``.hydra/`` and the
    log file ``log_name``, whatever the log holds (the lines before the failure say no more than
    the error line does); a checkpoint, a TensorBoard folder or metrics mean work was done."""
    import shutil

    if is_multirun() or not run_dir.is_dir():
        return
    if {p.name for p in run_dir.iterdir()} <= {".hydra", log_name}:
        shutil.rmtree(run_dir, ignore_errors=True)


class HeldLogFile:
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

