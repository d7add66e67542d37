"""Train a hybrid CNN + GNN model: ``python train.py [group=option ...] [key=value ...]``."""

import hydra
from omegaconf import DictConfig

from interconnects.config import register

register()


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig):
    from interconnects.engine.jobs import guarded
    from interconnects.engine.run import train

    return guarded(train, cfg)


if __name__ == "__main__":
    from interconnects.engine.jobs import entry

    entry(main)
