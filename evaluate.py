"""Evaluate a checkpoint: ``python evaluate.py ckpt_path=PATH [split=test|val] [data.root=DIR]``."""

import hydra
from omegaconf import DictConfig

from interconnects.config import register

register()


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig):
    from interconnects.engine.jobs import guarded
    from interconnects.engine.run import evaluate

    guarded(evaluate, cfg)


if __name__ == "__main__":
    from interconnects.engine.jobs import entry

    entry(main)
