"""Training-step throughput of the CIFAR-10 recipe's network (``experiment=cifar10_baseline``, or a
hybrid with ``--experiment``), with and without channels-last memory, on random 32×32 images.

The model and its optimizer are built as ``train.py`` builds them (the ``train`` config composed with
``experiment=<name> backbone.width=<width>``). Timed: forward, cross-entropy, backward and the
optimizer's step of a batch of ``--batch`` images; a figure is the batch divided by the best of
``--steps`` steps after one warm-up, both in wall time and in this process's CPU time (CPU seconds
divided by ``--threads`` give what the step would take on an idle machine, so the CPU-time figure
holds on a machine that others share). ``--precision bf16`` runs the forward under bf16 autocast, as
``trainer.precision=bf16`` does (fast on CPUs with bf16 units such as AMX, slow on those without).

    python scripts/bench_airbench.py --width 32 --batch 256 --threads 1
    python scripts/bench_airbench.py --width 32 --batch 256 --threads 1 --precision bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(experiment: str, width: int):
    from hydra import compose, initialize_config_dir

    from interconnects.config import register
    from interconnects.data import DataInfo
    from interconnects.engine.build import build_factories, build_task

    register()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"backbone.width={width}"])
    task = build_task(cfg, DataInfo(3, (32, 32), 10, (0.5,) * 3, (0.25,) * 3))
    optimizers, _ = build_factories(cfg, list(task.optimizer_groups()))
    return task, optimizers["model"](task.optimizer_groups()["model"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="cifar10_baseline")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=["32", "bf16"], default="32",
                        help="bf16: the forward under torch.autocast (trainer.precision=bf16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.experiment}, backbone.width={args.width}, batch {args.batch}, {args.threads} thread(s), "
          f"precision {args.precision}")
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bf16")
    for channels_last in (False, True):
        torch.manual_seed(0)
        task, opt = build(args.experiment, args.width)
        model = task.model.train()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=fmt)
        images = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=fmt)
        labels = torch.randint(0, 10, (args.batch,))
        walls, cpus = [], []
        for step in range(args.steps + 1):
            wall, cpu = time.perf_counter(), time.process_time()
            with autocast:
                logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=0.2)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step:  # (the first step warms up)
                walls.append(time.perf_counter() - wall)
                cpus.append((time.process_time() - cpu) / args.threads)
        print(f"  channels_last={str(channels_last).lower():5}  {args.batch / min(walls):7.0f} images/s wall, "
              f"{args.batch / min(cpus):7.0f} images/s of CPU time a thread")


if __name__ == "__main__":
    main()
