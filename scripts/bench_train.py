"""Benchmark whole training and inference steps of the MNIST hybrids against the CNN baseline, and
the dense-grid GCN layer's dense and FFT aggregation as the map grows.

**Throughput.** The four models of the experiments ``cnn_baseline``, ``mnist_grid``,
``mnist_keypoints`` and ``mnist_knn`` (the same ``simple_cnn`` backbone and ``scatter`` decoder;
the hybrids add their interconnect and two GCN layers) are built exactly as ``train.py`` builds
them: the ``train`` config composed with ``experiment=<name> data=digits``, ``build_task`` and the
optimizers of ``build_factories`` on the task's optimizer groups. They all get the same batch of
``--batch`` real digits images (scikit-learn's digits, upsampled to 28×28; repeated when the
training split is smaller than the batch) on the device. Timed are

* **training**: ``--steps`` calls of the task's own ``training_step``, with ``forward`` = the module
  under autocast at the precision ``trainer.precision=auto`` gives (full float32 on the CPU, bf16 on
  a GPU that has it) and ``optimize(group, loss)`` = ``zero_grad(set_to_none=True)`` of every
  optimizer, ``loss.backward()``, the group's optimizer step (through a grad scaler only for fp16,
  as the engine does); the engine's non-finite checks and the scheduler step are left out;
* **inference**: ``--steps`` calls of ``evaluation_step`` in eval mode under ``torch.no_grad()``.

The four models take turns within each of ``--repeats`` timed runs (after ``--warmup`` untimed
ones), so that a machine whose load changes slows them alike; a figure is ``batch × steps`` divided
by the median time of a run, in images per second, and the ratios divide a hybrid's figure by the
baseline's (below 1: slower than the CNN alone).

**Dense-grid scaling.** One GCN layer (``GCNLayer(64, 64)``: ``D^-1/2 Â D^-1/2 X W + b``, given the
graph's edges as ``GNNHead`` gives them; the head's norm, activation and residual are the same for
both paths and left out, and so is a ReLU's kink, which would make the gradients' comparison ill-posed)
over ``DenseGrid(edges=E, aggregate=A)`` for maps h = w = 8, 16, 32, 64 (N = h·w nodes, C = 64,
batch 8), E = ``gaussian`` (σ = 4 cells) or ``inverse_distance``, A = ``dense`` (the ``[1, N, N]``
matrix) or ``fft`` (the same adjacency as a convolution through ``torch.fft``). Timed: forward and
backward from a random fmap ``[8, 64, h, w]`` that requires grad (median ms, dense and FFT taking
turns). Before timing, the FFT's output and the fmap's gradient are checked against the dense ones,
same weights and inputs (relative error ``max|fft − dense| / max|dense|``, at most 1e-4). Memory:
the **step's peak**, the most bytes allocated at once during one forward + backward above what was
allocated before it (the grid's adjacency built in the step; on CUDA ``max_memory_allocated``, on the
CPU the running total of the profiler's allocation events), and the **adjacency's own** bytes (the
dense ``[1, N, N]`` matrix against the FFT operator's kernel spectrum and scale vectors). The
step's peak includes the layer's activations (a few ``[8, N, 64]`` tensors), the same for both
paths, so its ratio stays far below the adjacency's until ``N²`` outgrows ``8·64·N``.

The last line gives the hybrids' training throughput relative to the baseline.

    python scripts/bench_train.py                   # batch 128, maps 8² to 64², on CUDA when present
    python scripts/bench_train.py --device cpu      # the CPU table
    python scripts/bench_train.py --quick           # a smoke run in seconds: batch 8, maps 8² and 16², 1 thread
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
# torch_geometric scripts a few helpers at import; the deprecation notice says nothing here
warnings.filterwarnings("ignore", message=".*torch.jit.script.*is deprecated", category=FutureWarning)

from bench_interconnects import sync, time_group  # noqa: E402
from interconnects import DenseGrid  # noqa: E402
from interconnects.console import run_script  # noqa: E402
from interconnects.engine.device import describe_machine, resolve_device, resolve_precision  # noqa: E402
from interconnects.models.gnn import layer_inputs  # noqa: E402
from interconnects.models.layers import GCNLayer, layer_flags  # noqa: E402

#: Row name → experiment; the first is the baseline the others are compared with.
MODELS = {"cnn_baseline": "cnn_baseline", "grid": "mnist_grid", "keypoints": "mnist_keypoints", "knn": "mnist_knn"}
#: The dense-grid edge schemes of the scaling table and their DenseGrid settings.
GRID_EDGES = {"gaussian": {"edges": "gaussian", "sigma": 4.0}, "inverse_distance": {"edges": "inverse_distance"}}
AGGREGATES = ("dense", "fft")
GRID_CHANNELS = 64
GRID_BATCH = 8
MAX_REL_ERROR = 1e-4


# ---------------------------------------------------------------------------------------------
# training and inference throughput
# ---------------------------------------------------------------------------------------------
def compose_experiments(batch: int) -> dict:
    """``{row name: composed train config}`` for each experiment, as the command line builds it."""
    from hydra import compose, initialize_config_dir

    from interconnects.config import register

    register()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return {name: compose("train", overrides=[f"experiment={exp}", "data=digits", f"data.batch_size={batch}"])
                for name, exp in MODELS.items()}


def training_batch(cfg, batch: int, device: torch.device):
    """``(images [batch, 1, 28, 28], labels [batch])``: the first training batch of the digits
    (normalised as training sees them), repeated when the split holds fewer than ``batch`` images."""
    from interconnects.data import build_data

    data = build_data(cfg.data, cfg.seed)
    images, labels = next(iter(data.train))
    if len(labels) < batch:
        reps = math.ceil(batch / len(labels))
        images, labels = torch.cat([images] * reps)[:batch], torch.cat([labels] * reps)[:batch]
    return data, (images.to(device), labels.to(device))


def build_model(cfg, data, device: torch.device):
    """``(task, {group: optimizer})`` of ``cfg`` as ``train.py`` builds them, on ``device``."""
    from interconnects.data import data_info
    from interconnects.engine.device import seed_everything
    from interconnects.engine.build import build_factories, build_task

    seed_everything(cfg.seed)
    task = build_task(cfg, data_info(cfg.data))
    factories, _ = build_factories(cfg, list(task.optimizer_groups()))
    task.to(device)
    optimizers = {group: factories[group](params) for group, params in task.optimizer_groups().items()}
    task.setup(data)
    return task, optimizers


def step_functions(task, optimizers: dict, batch, device: torch.device, dtype, steps: int):
    """``(train, infer)``: ``steps`` training steps, and ``steps`` evaluation steps, of ``task`` on ``batch``."""
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    def forward(module, *args, **kwargs):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            return module(*args, **kwargs)

    def optimize(group: str, loss: torch.Tensor) -> None:
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizers[group])

    def train() -> None:
        task.train()
        for _ in range(steps):
            task.training_step(batch, forward, optimize)
            scaler.update()

    def infer() -> None:
        task.eval()
        with torch.no_grad():
            for _ in range(steps):
                task.evaluation_step(batch, forward)

    return train, infer


def bench_throughput(batch: int, device: torch.device, repeats: int, warmup: int, steps: int) -> list[tuple]:
    """``[(row name, trainable parameters, training images/s, inference images/s)]``, baseline first."""
    cfgs = compose_experiments(batch)
    data, images = training_batch(next(iter(cfgs.values())), batch, device)
    dtype = resolve_precision("auto", device)
    names, params, trains, infers = [], [], [], []
    for name, cfg in cfgs.items():
        task, optimizers = build_model(cfg, data, device)
        train, infer = step_functions(task, optimizers, images, device, dtype, steps)
        names.append(name)
        params.append(sum(p.numel() for ps in task.optimizer_groups().values() for p in ps))
        trains.append(train)
        infers.append(infer)
    train_ms = time_group(trains, device, repeats, warmup)
    infer_ms = time_group(infers, device, repeats, warmup)
    per_run = batch * steps * 1e3
    return [(n, p, per_run / t, per_run / i) for n, p, t, i in zip(names, params, train_ms, infer_ms)]


# ---------------------------------------------------------------------------------------------
# dense-grid scaling
# ---------------------------------------------------------------------------------------------
def grid_inputs(size: int, device: torch.device):
    """``(fmap [8, 64, size, size], layer, output gradient [8, size², 64])``, fixed by ``size`` alone,
    so that every measurement and both aggregations see the same inputs and weights."""
    gen = torch.Generator().manual_seed(size)
    fmap = torch.randn(GRID_BATCH, GRID_CHANNELS, size, size, generator=gen).to(device)
    grad = torch.randn(GRID_BATCH, size * size, GRID_CHANNELS, generator=gen).to(device)
    torch.manual_seed(size)
    return fmap, GCNLayer(GRID_CHANNELS, GRID_CHANNELS).to(device), grad


def grid_step(grid: DenseGrid, layer: GCNLayer, fmap: torch.Tensor, grad: torch.Tensor):
    """Forward + backward of one GCN layer over ``grid(fmap)``: ``(node features, fmap's gradient)``."""
    layer.zero_grad(set_to_none=True)
    leaf = fmap.clone().requires_grad_()
    graph = grid(leaf)
    adj, edge_index, edge_weight, view = layer_inputs(layer_flags(GCNLayer), graph)
    out = layer(graph.x, adj, edge_index, edge_weight, **view)
    out.backward(grad)
    return out.detach(), leaf.grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a − b| / max|b|`` (in float64)."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@contextlib.contextmanager
def quiet_stderr():
    """The profiler's own start / stop notices go to the process's stderr: hide them meanwhile."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn, device: torch.device) -> int:
    """The most bytes allocated at once while ``fn()`` runs, above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    total = peak = 0
    for event in events:  # allocations add their size, frees subtract it
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def adjacency_bytes(graph) -> int:
    """Bytes of the graph's adjacency: the dense ``adj``, or the FFT operator's spectrum and scale vectors."""
    if graph.aggregator is None:
        return graph.adj.nbytes
    op = graph.aggregator
    return op.spectrum.nbytes + sum(t.nbytes for t in (op.left, op.right, op.extra) if t is not None)


def measure_memory(size: int, edges: str, aggregate: str, device: torch.device) -> tuple[int, int]:
    """``(step's peak bytes, adjacency bytes)`` of one forward + backward (see the docstring)."""
    fmap, layer, grad = grid_inputs(size, device)
    # code paths, FFT plans and library workspaces come from a 2×2 step of the same kind first
    warm = DenseGrid(aggregate=aggregate, **GRID_EDGES[edges])
    grid_step(warm, layer, fmap[..., :2, :2].contiguous(), grad[:, :4].contiguous())
    grid = DenseGrid(aggregate=aggregate, **GRID_EDGES[edges])  # fresh: its adjacency is built in the step
    peak = peak_bytes(lambda: grid_step(grid, layer, fmap, grad), device)
    return peak, adjacency_bytes(grid(fmap))


def bench_grid(sizes: list[int], device: torch.device, repeats: int, warmup: int) -> list[tuple]:
    """``[(size, edges, dense ms, fft ms, dense bytes, fft bytes, relative error)]``."""
    memory = {(s, e, a): measure_memory(s, e, a, device) for s in sizes for e in GRID_EDGES for a in AGGREGATES}
    rows = []
    for size in sizes:
        fmap, layer, grad = grid_inputs(size, device)
        for edges, options in GRID_EDGES.items():
            dense, fft = (DenseGrid(aggregate=a, **options) for a in AGGREGATES)
            (out_d, grad_d), (out_f, grad_f) = grid_step(dense, layer, fmap, grad), grid_step(fft, layer, fmap, grad)
            error = max(relative_error(out_f, out_d), relative_error(grad_f, grad_d))
            if not error <= MAX_REL_ERROR:
                raise SystemExit(f"error: {size}×{size} {edges}: fft differs from dense by {error:.2e} "
                                 f"(relative), more than {MAX_REL_ERROR:g}")
            dense_ms, fft_ms = time_group([lambda g=g: grid_step(g, layer, fmap, grad) for g in (dense, fft)],
                                          device, repeats, warmup)
            rows.append((size, edges, dense_ms, fft_ms, memory[size, edges, "dense"], memory[size, edges, "fft"], error))
    return rows


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------
def print_grid(rows: list[tuple], device: torch.device, repeats: int, warmup: int) -> None:
    how = "max_memory_allocated" if device.type == "cuda" else "the profiler's allocation events"
    print(f"Dense grid, one GCN layer (GCNLayer, C = {GRID_CHANNELS} → {GRID_CHANNELS}, batch {GRID_BATCH}), forward + backward "
          f"from fmap [{GRID_BATCH}, {GRID_CHANNELS}, h, w]: median ms of {repeats} after {warmup} warm-up "
          "(dense and fft taking turns); dense/fft = speed-up of the FFT; step peak = the most MiB allocated at "
          f"once during the step above what was allocated before it ({how}; the adjacency is built in the step "
          "and the layer's activations count too); adjacency = MiB of the dense matrix or of the FFT operator's "
          "spectrum and scales; error = max|fft − dense| / max|dense| of the output and of the fmap's gradient "
          "(the larger)")
    print()
    print("| map | N | edges | dense (ms) | fft (ms) | dense/fft | dense step peak (MiB) | fft step peak (MiB) | "
          "dense/fft step peak | dense adjacency (MiB) | fft adjacency (MiB) | dense/fft adjacency | fft vs dense error |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, edges, dense_ms, fft_ms, (dense_peak, dense_adj), (fft_peak, fft_adj), error in rows:
        print(f"| {size}×{size} | {size * size} | {edges} | {dense_ms:.2f} | {fft_ms:.2f} | {dense_ms / fft_ms:.2f}× | "
              f"{dense_peak / 2**20:.1f} | {fft_peak / 2**20:.1f} | {dense_peak / max(fft_peak, 1):.1f}× | "
              f"{dense_adj / 2**20:.3f} | {fft_adj / 2**20:.3f} | {dense_adj / max(fft_adj, 1):.0f}× | {error:.1e} |",
              flush=True)


def print_throughput(rows: list[tuple]) -> None:
    base_train, base_infer = rows[0][2], rows[0][3]
    print("| model | trainable parameters | training (images/s) | inference (images/s) | "
          "training vs cnn_baseline | inference vs cnn_baseline |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, params, train, infer in rows:
        print(f"| {MODELS[name]} | {params:,} | {train:,.0f} | {infer:,.0f} | {train / base_train:.2f}× | "
              f"{infer / base_infer:.2f}× |")
    print()
    ratios = ", ".join(f"{name} {train / base_train:.2f}x" for name, _, train, _ in rows[1:])
    print(f"training images/s vs cnn_baseline: {ratios}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds: batch 8, maps 8² and 16², 1 repeat, 1 warm-up, 1 step, 1 thread")
    parser.add_argument("--batch", type=int, default=None, help="images per training batch (default 128; 8 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training (or inference) steps per timed run (default 5; 1 with --quick)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="dense-grid map sides (default 8 16 32 64; 8 16 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice; 1 with --quick)")
    args = parser.parse_args(argv)

    try:
        device = resolve_device(args.device, key="--device")
    except ValueError as exc:
        parser.error(str(exc))
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    repeats = args.repeats or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps or (1 if args.quick else 5)
    batch = args.batch or (8 if args.quick else 128)
    sizes = args.sizes or ([8, 16] if args.quick else [8, 16, 32, 64])

    print(describe_machine(device))
    print(f"batch {batch}, median of {repeats} timed runs after {warmup} warm-up, {steps} step(s) per run; "
          f"command: {shlex.join(['python', 'scripts/bench_train.py', *argv])}")
    print()
    print_grid(bench_grid(sizes, device, repeats, warmup), device, repeats, warmup)
    print()
    precision = resolve_precision("auto", device)
    print(f"Training and inference of the MNIST models (data=digits, 28×28, batch {batch}, "
          f"precision {str(precision).replace('torch.', '') if precision else 'float32'}): images/s = "
          f"batch × steps / median time of a run (the four models taking turns); ratios = model ÷ cnn_baseline")
    print()
    print_throughput(bench_throughput(batch, device, repeats, warmup, steps))


if __name__ == "__main__":
    run_script(main)
