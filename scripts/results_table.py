"""Run experiments through train.py and print a markdown results table from what they wrote.

    python scripts/results_table.py                              # the classifiers on the MNIST sample
    python scripts/results_table.py --experiments quickstart --data digits --seeds 0,1,2
    python scripts/results_table.py --experiments mnist_autoencoder_keypoints --metrics test/psnr,test/ssim,test/baseline_psnr
    python scripts/results_table.py --experiments mnist_gan_knn --metrics test/fid,test/kid,test/sample_confidence
    python scripts/results_table.py --root ./data --experiments mnist_grid   # full MNIST, when present

Each row: experiment, trainable parameters, epochs, wall time per run, the ``--metrics`` (mean ± std
over seeds; accuracies in %), and the exact command. Runs go to
``outputs/results/<experiment>-<data>-s<seed>/``; the machine is printed above the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from interconnects.console import run_script

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_EXPERIMENTS = ["cnn_baseline", "mnist_grid", "mnist_keypoints", "mnist_knn", "knyazev_pixels", "knyazev_learned_edges"]
#: Checkpoint entries that are not trained parameters: batch-norm statistics, spectral-norm vectors, a GAN's EMA copy and noise.
NOT_TRAINED = ("running_mean", "running_var", "num_batches_tracked", "n_averaged", "fixed_noise", "._u", "._v")


def machine() -> str:
    import torch

    from interconnects.engine.device import describe_machine

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else describe_machine()


def parameters(ckpt: Path) -> int:
    """Trained parameters in a checkpoint (every network of the task, without buffers or EMA copies)."""
    from interconnects.engine.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt)["model"]
    return sum(v.numel() for k, v in state.items() if not k.endswith(NOT_TRAINED) and not k.startswith("generator_ema."))


def shown(metric: str, values: list[float]) -> str:
    """``mean ± std`` of a metric over seeds; accuracies in %, values below 10 with three decimals."""
    scale = 100 if metric.rsplit("/", 1)[-1] == "acc" else 1
    values = [scale * v for v in values]
    digits = 3 if abs(statistics.mean(values)) < 10 else 2
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default=",".join(SAMPLE_EXPERIMENTS))
    parser.add_argument("--data", default="mnist", help="data= option for every run")
    parser.add_argument("--root", default="../shared/datasets/mnist-sample",
                        help="data.root= for every run (not passed with --data digits, which needs none)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--metrics", default="test/acc", help="metrics.json keys to tabulate, comma-separated")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()
    metrics_shown = args.metrics.split(",")

    rows = []
    for name in args.experiments.split(","):
        values: dict[str, list[float]] = {m: [] for m in metrics_shown}
        walls, params, epochs, command = [], None, None, None
        for seed in args.seeds.split(","):
            run = ROOT / "outputs" / "results" / f"{name}-{args.data}-s{seed}"
            root = [] if args.data == "digits" else [f"data.root={args.root}"]
            over = [f"experiment={name}", f"data={args.data}", *root, f"seed={seed}", "trainer.progress=false",
                    *args.overrides]
            command = "python train.py " + " ".join(over)
            if (run / "metrics.json").is_file() or (run / ".hydra").is_dir():
                shutil.rmtree(run)  # this script's own earlier run of the row: measured afresh
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "train.py", *over, f"hydra.run.dir={run}"], cwd=ROOT,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(f"{name} (seed {seed}) failed: {proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                continue
            metrics = json.loads((run / "metrics.json").read_text())
            for m in metrics_shown:
                values[m].append(float(metrics[m]))
            walls.append(wall)
            epochs = metrics["epochs"]
            params = parameters(run / "checkpoints" / "best.ckpt")
            print(f"{name} seed {seed}: " + "  ".join(f"{m} {metrics[m]:.4f}" for m in metrics_shown) + f"  {wall:.0f} s",
                  file=sys.stderr, flush=True)
        if not walls:
            continue
        many = len(walls) > 1
        rows.append((name, f"{params:,}", epochs, f"{statistics.mean(walls):.0f} s",
                     *(shown(m, values[m]) for m in metrics_shown), len(walls),
                     f"`{command.replace(f'seed={seed}', 'seed=S') if many else command}`"))
    root = "" if args.data == "digits" else f" in {args.root}"
    print(f"\nMachine: {machine()}; data: {args.data}{root}\n")
    names = [f"{m} %" if m.rsplit("/", 1)[-1] == "acc" else m for m in metrics_shown]
    print("| experiment | parameters | epochs | wall time (per run) | " + " | ".join(names) + " | seeds | command |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " | ---: | --- |")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    run_script(main)
