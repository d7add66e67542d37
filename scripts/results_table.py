"""Run experiments through train.py and print a markdown results table from what they wrote.

    python scripts/results_table.py                              # every experiment on the MNIST sample
    python scripts/results_table.py --experiments quickstart --data digits --seeds 0,1,2
    python scripts/results_table.py --root ./data --experiments mnist_grid   # full MNIST, when present

Each row: experiment, parameters, epochs, wall time, machine, test accuracy (mean ± std over seeds),
and the exact command. Runs go to outputs/results/<experiment>-<data>-s<seed>/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_EXPERIMENTS = [
    "quickstart", "cnn_baseline", "mnist_grid", "mnist_keypoints", "mnist_knn", "knyazev_pixels", "knyazev_learned_edges",
]


def machine() -> str:
    import torch

    from interconnects.engine.device import describe_machine

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else describe_machine()


def parameters(ckpt: Path) -> int:
    from interconnects.engine.checkpoint import load_checkpoint

    state = load_checkpoint(ckpt)["model"]
    # buffers (BatchNorm statistics) are not parameters
    return sum(v.numel() for k, v in state.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default=",".join(SAMPLE_EXPERIMENTS))
    parser.add_argument("--data", default="mnist", help="data= option for every run")
    parser.add_argument("--root", default="../shared/datasets/mnist-sample", help="data.root= for every run")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()

    rows = []
    for name in args.experiments.split(","):
        accs, walls, params, epochs, command = [], [], None, None, None
        for seed in args.seeds.split(","):
            run = ROOT / "outputs" / "results" / f"{name}-{args.data}-s{seed}"
            over = [f"experiment={name}", f"data={args.data}", f"data.root={args.root}", f"seed={seed}",
                    "trainer.progress=false", *args.overrides]
            command = "python train.py " + " ".join(over)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "train.py", *over, f"hydra.run.dir={run}"], cwd=ROOT,
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(f"{name} (seed {seed}) failed: {proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
                continue
            metrics = json.loads((run / "metrics.json").read_text())
            accs.append(100 * metrics["test/acc"])
            walls.append(wall)
            epochs = metrics["epochs"]
            params = parameters(run / "checkpoints" / "best.ckpt")
            print(f"{name} seed {seed}: test/acc {accs[-1]:.2f}%  {wall:.0f} s", file=sys.stderr, flush=True)
        if not accs:
            continue
        spread = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
        rows.append((name, f"{params:,}", epochs, f"{statistics.mean(walls):.0f} s", f"{statistics.mean(accs):.2f}{spread}",
                     len(accs), f"`{command.replace(f'seed={seed}', 'seed=S') if len(accs) > 1 else command}`"))
    print(f"\nMachine: {machine()}; data: {args.data} in {args.root}\n")
    print("| experiment | parameters | epochs | wall time (per run) | test acc % | seeds | command |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
