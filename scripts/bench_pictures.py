"""What the epoch-end pictures cost, against one training epoch, per interconnect: a markdown table.

    python scripts/bench_pictures.py data.root=../shared/datasets/mnist-sample     # the MNIST sample
    python scripts/bench_pictures.py data=digits trainer.picture_images=8

For each interconnect the training engine is set up as ``train.py`` sets it up (default settings plus
the overrides given) and one whole epoch is timed without its pictures: the training steps, then
the epoch's end (validation, logging, ``best.ckpt`` and ``last.ckpt``). Then the engine's picture
call (the task's pictures of ``trainer.picture_images`` fixed validation images, drawn and written
to TensorBoard) is timed ``--repeats`` times; the table gives the median and its share of the
epoch, and of the training steps alone. Everything is written into a temporary folder that is
removed afterwards.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from interconnects.config import register  # noqa: E402
from interconnects.console import run_script  # noqa: E402
from interconnects.data import build_data, data_info  # noqa: E402
from interconnects.engine.device import seed_everything  # noqa: E402
from interconnects.engine.loop import Trainer  # noqa: E402
from interconnects.engine.build import build_factories, build_task  # noqa: E402


def measure(overrides: list[str], repeats: int) -> tuple[float, float, float, int]:
    """``(training seconds, whole-epoch seconds, median picture seconds, pictures per call)`` for the
    config ``overrides``."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["trainer.progress=false", *overrides])
    seed_everything(cfg.seed)
    info = data_info(cfg.data)
    task = build_task(cfg, info)
    optimizers, schedulers = build_factories(cfg, list(task.optimizer_groups()))
    data = build_data(cfg.data, cfg.seed)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg.trainer, run_dir, OmegaConf.to_container(cfg, resolve=True), cfg.logger.name)
        trainer.setup(task, data, optimizers, schedulers, None, None)
        every = trainer.cfg.picture_every_n_epochs
        trainer.cfg.picture_every_n_epochs = 0  # the epoch's end without its pictures
        start = time.perf_counter()
        train = trainer.train_epoch(data)
        steps = time.perf_counter() - start
        trainer.end_epoch(data, train)
        epoch = time.perf_counter() - start
        trainer.cfg.picture_every_n_epochs = every
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            trainer.pictures(trainer.step)
            times.append(time.perf_counter() - start)
        with torch.no_grad():
            count = len(task.pictures(trainer.picture_batch, trainer.forward)) if trainer.picture_batch is not None else 0
        trainer.logger.close()
    return steps, epoch, statistics.median(times), count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interconnects", default="grid,keypoints,knn", help="comma-separated interconnect options")
    parser.add_argument("--repeats", type=int, default=5, help="timed picture calls per interconnect")
    parser.add_argument("overrides", nargs="*", help="train.py overrides applied to every row")
    args = parser.parse_args()
    register()
    print(f"overrides: {' '.join(args.overrides) or '(none)'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| interconnect | pictures per call | training steps (s) | whole epoch (s) | pictures (ms, median) | "
          "share of the epoch | share of the training steps |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.interconnects.split(","):
        steps, epoch, pictures, count = measure([f"interconnect={name}", *args.overrides], args.repeats)
        print(f"| {name} | {count} | {steps:.2f} | {epoch:.2f} | {pictures * 1000:.0f} | {pictures / epoch:.2%} | "
              f"{pictures / steps:.2%} |", flush=True)
    return 0


if __name__ == "__main__":
    run_script(main)
