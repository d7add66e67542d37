"""Benchmark the CNN ↔ graph interconnects against per-sample-loop references and a bare floor.

For each feature-map size and each mode it times forward + backward (median of ``--repeats`` runs
after warm-up) of

* **ours**: the batched module(s) of :mod:`interconnects`;
* **reference**: a straightforward per-sample implementation producing the same results, written the
  way published interconnect code usually is (Python loops over the images, and over keypoints
  where such code does);
* **floor**: the bare data movement the mode cannot avoid: a gather of the node features and a
  scatter-add back into the map (for graph → CNN alone, a bare ``index_add_`` of the node rows).

Before timing, the reference's node features, edges and output map are checked against ours.

    python scripts/bench_interconnects.py                 # batch 64, C = 64, maps 7², 14², 28²
    python scripts/bench_interconnects.py --quick         # a small smoke run
    python scripts/bench_interconnects.py --device cuda   # the GPU table
    python scripts/bench_interconnects.py --only superpixels   # batched SLIC against skimage, image by image
    python scripts/bench_interconnects.py --only learned_edges # the learned-edge MLP over all 784² pixel pairs

The superpixel rows segment 128 MNIST digits and 128 CIFAR-10 images (read in place from
``../shared/datasets``) with :class:`interconnects.Superpixels`'s batched SLIC and with
``skimage.segmentation.slic`` called image by image (a development dependency), and say how well the
two agree: boundary recall (the share of skimage's boundary pixels that ours has within one pixel)
and achievable segmentation accuracy (the share of pixels whose region of ours lies mostly in the same
skimage region), also for each of our iteration counts; ``--superpixels-baseline FILE`` times another
version of ``interconnects/superpixels.py`` in the same rows. A last table times one training step of
``experiment=mnist_superpixels`` and ``cifar10_superpixels`` with their GatedGCN layers on the flat
edge list, on the fixed-degree view, and on the latter under ``torch.compile``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interconnects import DenseGrid, GraphToCNN, Keypoints, KNNGraph, Superpixels  # noqa: E402
from interconnects._edges import grid_positions  # noqa: E402
from interconnects.engine.device import describe_machine  # noqa: E402
from interconnects.knn import knn_indices  # noqa: E402
from interconnects.models.gnn import GNNHead  # noqa: E402
from interconnects.console import run_script  # noqa: E402

KNN_K = 8
DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
#: (dataset, regions asked for, compactness): the superpixel benchmark's settings
SUPERPIXEL_ROWS = (("MNIST", 75, 0.25), ("CIFAR-10", 150, 10.0))


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_group(fns, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Median wall times in ms of each ``fn()`` (forward + backward).

    The functions take turns within each repeat, so that a machine whose load changes over the run
    slows them alike and their ratios stay meaningful.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            record.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(record) for record in times]


# ---------------------------------------------------------------------------------------------
# per-sample references (the same results, one image at a time)
# ---------------------------------------------------------------------------------------------
def ref_grid(fmap: torch.Tensor):
    """Per image: node features, the inverse-distance adjacency, and the map written back."""
    b, c, h, w = fmap.shape
    xs, adjs, outs = [], [], []
    for i in range(b):
        x = fmap[i].reshape(c, h * w).t()
        rows = torch.arange(h, device=fmap.device).repeat_interleave(w)
        cols = torch.arange(w, device=fmap.device).repeat(h)
        pos = torch.stack([rows, cols], 1).float()
        adj = 1.0 / (1.0 + torch.cdist(pos, pos))
        xs.append(x)
        adjs.append(adj)
        outs.append(x.t().reshape(c, h, w))
    return torch.stack(xs), adjs, torch.stack(outs)


def ref_keypoints(fmap: torch.Tensor, score_conv: torch.nn.Module, k: int):
    """Per image and per keypoint: top-k cells of the learned score, gated features, written back cell by cell."""
    b, c, h, w = fmap.shape
    scores = score_conv(fmap)  # the CNN's score head runs batched in published code too
    xs, adjs, outs = [], [], []
    for i in range(b):
        idx = scores[i, 0].detach().flatten().topk(k).indices.tolist()
        nodes, pos = [], []
        for cell in idx:
            r, col = divmod(cell, w)
            nodes.append(fmap[i, :, r, col] * torch.sigmoid(scores[i, 0, r, col]))
            pos.append((r, col))
        x = torch.stack(nodes)
        p = torch.tensor(pos, dtype=torch.float32, device=fmap.device)
        xs.append(x)
        adjs.append(1.0 / (1.0 + torch.cdist(p, p)))
        out = torch.zeros(c, h, w, dtype=fmap.dtype, device=fmap.device)
        for j, (r, col) in enumerate(pos):
            out[:, r, col] = x[j]
        outs.append(out)
    return torch.stack(xs), torch.stack(adjs), torch.stack(outs)


def ref_image_neighbors(x: torch.Tensor, k: int) -> torch.Tensor:
    """One image's ``[N, k]`` nearest other nodes of ``x [N, C]``: its own ``cdist`` and ``topk``."""
    with torch.no_grad():
        dist = torch.cdist(x, x)
        dist.fill_diagonal_(float("inf"))
        return dist.topk(k, dim=1, largest=False).indices


def ref_knn(fmap: torch.Tensor, k: int):
    """Per image: the distance matrix and its top-k, node features, and the map written back."""
    b, c, h, w = fmap.shape
    n = h * w
    xs, nbrs, outs = [], [], []
    for i in range(b):
        x = fmap[i].reshape(c, n).t()
        nbr = ref_image_neighbors(x, k)
        xs.append(x)
        nbrs.append(nbr)
        outs.append(x.t().reshape(c, h, w))
    return torch.stack(xs), torch.stack(nbrs), torch.stack(outs)


def ref_knn_gcn(fmap: torch.Tensor, k: int, conv: torch.nn.Module, head: GNNHead):
    """The per-image recipe: each image's neighbours found alone, each image a ``Data`` through
    torch_geometric's ``GCNConv`` (self-loops and normalisation its own), then the head's norm,
    activation and residual on the stacked nodes."""
    from torch_geometric.data import Data

    b, c, h, w = fmap.shape
    n = h * w
    outs, xs = [], []
    for i in range(b):
        x = fmap[i].reshape(c, n).t()
        nbr = ref_image_neighbors(x, k)
        dst = torch.arange(n, device=x.device).repeat_interleave(k)
        data = Data(x=x, edge_index=torch.stack([nbr.flatten(), dst]))
        outs.append(conv(data.x, data.edge_index))
        xs.append(x)
    out, x = torch.stack(outs), torch.stack(xs)
    return head.act(head.norms[0](out)) + x


def floor_knn_gcn(fmap: torch.Tensor, k: int, lin: torch.nn.Module) -> torch.Tensor:
    """The least a kNN + GCN layer does: batched distances + top-k, one gather of ``[B·N·k, C]`` rows
    summed over k, and the linear layer."""
    b, c, h, w = fmap.shape
    n = h * w
    x = fmap.flatten(2).transpose(1, 2)
    nbr = knn_indices(x, k)
    ids = (nbr + torch.arange(b, device=x.device).view(b, 1, 1) * n).flatten()
    agg = x.reshape(b * n, c).index_select(0, ids).view(b * n, k, c).sum(1)
    return lin(agg).view(b, n, -1)


def ref_to_cnn(x: torch.Tensor, cells: torch.Tensor, h: int, w: int):
    """Per image: sum the nodes into their cells and divide by the count (mean)."""
    b, n, c = x.shape
    outs = []
    for i in range(b):
        total = torch.zeros(h * w, c, dtype=x.dtype, device=x.device).index_add(0, cells[i], x[i])
        count = torch.bincount(cells[i], minlength=h * w).clamp_min(1).to(x.dtype)
        outs.append((total / count[:, None]).t().reshape(c, h, w))
    return torch.stack(outs)


# ---------------------------------------------------------------------------------------------
# floors: the bare gather / index_add_ of the same data
# ---------------------------------------------------------------------------------------------
def floor_gather_scatter(fmap: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Gather ``cells [B, K]`` of fmap into nodes and scatter-add them back into a zero map.

    Both along the contiguous cell axis of ``[B, C, h·w]``: the least data movement there is.
    """
    b, c, h, w = fmap.shape
    index = cells.unsqueeze(1).expand(-1, c, -1)
    nodes = fmap.flatten(2).gather(2, index)
    return nodes.new_zeros(b, c, h * w).scatter_add_(2, index, nodes).view(b, c, h, w)


def floor_index_add(x: torch.Tensor, ids: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    c = x.shape[-1]
    return x.new_zeros(b * h * w, c).index_add_(0, ids, x.reshape(-1, c)).view(b, h, w, c).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# the rows
# ---------------------------------------------------------------------------------------------
_GRAD: dict = {}


def backward(out: torch.Tensor) -> None:
    """Backward from a fixed contiguous ``[B, C, h, w]`` gradient, as a following conv layer gives."""
    key = (tuple(out.shape), out.dtype, out.device)
    if key not in _GRAD:
        _GRAD[key] = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    out.backward(_GRAD[key])


def check_knn(ours_nbr: torch.Tensor, ref_nbr: torch.Tensor, x: torch.Tensor) -> None:
    """Neighbours equal, except where float rounding reorders (near-)equidistant candidates."""
    if torch.equal(ours_nbr, ref_nbr):
        return
    xd = x.double()

    def distances(nbr):
        b, n, k = nbr.shape
        picked = xd.gather(1, nbr.reshape(b, n * k, 1).expand(-1, -1, x.shape[-1])).view(b, n, k, -1)
        return (xd.unsqueeze(2) - picked).norm(dim=-1).sort(-1).values

    torch.testing.assert_close(distances(ours_nbr), distances(ref_nbr), rtol=1e-5, atol=1e-5)


def bench_size(size: int, batch: int, channels: int, device: torch.device, repeats: int, warmup: int, only=None):
    h = w = size
    n = h * w
    gen = torch.Generator().manual_seed(size)
    base = torch.randn(batch, channels, h, w, generator=gen).to(device)
    back = GraphToCNN()
    rows = []

    def leaf():
        return base.clone().requires_grad_()

    if only is None:
        # ---- grid --------------------------------------------------------------------------------
        grid = DenseGrid(edges="inverse_distance")
        g = grid(base)
        xr, adjr, outr = ref_grid(base)
        torch.testing.assert_close(g.x, xr, rtol=0, atol=0)
        for a in adjr:
            torch.testing.assert_close(g.adj[0], a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back(g), outr, rtol=0, atol=0)
        all_cells = torch.arange(n, device=device).expand(batch, n)
        rows.append(
            (
                "grid",
                *time_group(
                    [
                        lambda: backward(back(grid(leaf()))),
                        lambda: backward(ref_grid(leaf())[2]),
                        lambda: backward(floor_gather_scatter(leaf(), all_cells)),
                    ],
                    device,
                    repeats,
                    warmup,
                ),
            )
        )

        # ---- keypoints ---------------------------------------------------------------------------
        k = max(1, n // 4)
        kp = Keypoints(num_keypoints=k, select="topk", in_channels=channels).to(device)
        g = kp(base)
        xr, adjr, outr = ref_keypoints(base, kp.score, k)
        torch.testing.assert_close(g.x, xr, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g.adj, adjr, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back(g), outr, rtol=1e-6, atol=1e-6)
        kp_cells = (g.pos[..., 0] * w + g.pos[..., 1]).long()
        rows.append(
            (
                f"keypoints (topk, K={k})",
                *time_group(
                    [
                        lambda: backward(back(kp(leaf()))),
                        lambda: backward(ref_keypoints(leaf(), kp.score, k)[2]),
                        lambda: backward(floor_gather_scatter(leaf(), kp_cells)),
                    ],
                    device,
                    repeats,
                    warmup,
                ),
            )
        )

        # ---- knn ---------------------------------------------------------------------------------
        knn = KNNGraph(k=KNN_K)
        g = knn(base)
        xr, nbrr, outr = ref_knn(base, KNN_K)
        ours_nbr = g.edge_index[0].view(batch, n, KNN_K) - torch.arange(batch, device=device).view(-1, 1, 1) * n
        check_knn(ours_nbr, nbrr, xr)
        torch.testing.assert_close(back(g), outr, rtol=0, atol=0)
        rows.append(
            (
                f"knn (k={KNN_K})",
                *time_group(
                    [
                        lambda: backward(back(knn(leaf()))),
                        lambda: backward(ref_knn(leaf(), KNN_K)[2]),
                        lambda: backward(floor_gather_scatter(leaf(), all_cells)),
                    ],
                    device,
                    repeats,
                    warmup,
                ),
            )
        )

    # ---- knn + one GCN layer -----------------------------------------------------------------
    knn = KNNGraph(k=KNN_K)
    head = GNNHead(channels, "gcn", hidden_channels=channels, num_layers=1).to(device)
    from torch_geometric.nn import GCNConv

    ref_conv = GCNConv(channels, channels).to(device)  # its own self-loops and normalisation
    ref_conv.load_state_dict(head.convs[0].conv.state_dict())
    head.eval()  # the check compares in eval mode (batch norm with running statistics)
    g = knn(base)
    _, ref_nbr, _ = ref_knn(base, KNN_K)
    check_knn(g.neighbors, ref_nbr, g.x)
    # a node's output depends on its own neighbours only (every in-degree is k + 1): compare the nodes
    # whose neighbour sets agree; the others are float ties between equidistant candidates (checked above)
    same = (g.neighbors.sort(-1).values == ref_nbr.sort(-1).values).all(-1)
    assert same.float().mean() > 0.999, f"{int((~same).sum())} nodes with other neighbours"
    torch.testing.assert_close(head(g).x[same], ref_knn_gcn(base, KNN_K, ref_conv, head)[same], rtol=1e-4, atol=1e-4)
    head.train()
    rows.append(
        (
            f"knn (k={KNN_K}) + GCN layer",
            *time_group(
                [
                    lambda: backward(head(knn(leaf())).x),
                    lambda: backward(ref_knn_gcn(leaf(), KNN_K, ref_conv, head)),
                    lambda: backward(floor_knn_gcn(leaf(), KNN_K, head.convs[0].conv.lin)),
                ],
                device,
                repeats,
                warmup,
            ),
        )
    )

    if only is None:
        # ---- graph → CNN alone -------------------------------------------------------------------
        # N = h·w nodes at random cells: some cells shared (averaged), some empty
        cells = torch.randint(0, n, (batch, n), generator=gen).to(device)
        pos = torch.stack([cells // w, cells % w], -1).float()
        x0 = torch.randn(batch, n, channels, generator=gen).to(device)
        ids = (cells + torch.arange(batch, device=device).unsqueeze(1) * n).flatten()
        torch.testing.assert_close(back(x0, pos, (h, w)), ref_to_cnn(x0, cells, h, w), rtol=1e-6, atol=1e-6)

        def xleaf():
            return x0.clone().requires_grad_()

        rows.append(
            (
                "graph→CNN (mean)",
                *time_group(
                    [
                        lambda: backward(back(xleaf(), pos, (h, w))),
                        lambda: backward(ref_to_cnn(xleaf(), cells, h, w)),
                        lambda: backward(floor_index_add(xleaf(), ids, batch, h, w)),
                    ],
                    device,
                    repeats,
                    warmup,
                ),
            )
        )
    return rows


def bench_topk(size: int, batch: int, device: torch.device, repeats: int, warmup: int) -> None:
    """Top-k selection of the kNN search on rows of N = size² distances against alternatives."""
    n = size * size
    dist = torch.randn(batch, n, n, generator=torch.Generator().manual_seed(0)).to(device)
    ref = dist.topk(KNN_K, dim=-1, largest=False).indices.sort(-1).values

    def repeated_min():
        d = dist.clone()
        picks = []
        for _ in range(KNN_K):
            i = d.argmin(-1, keepdim=True)
            picks.append(i)
            d.scatter_(-1, i, float("inf"))
        return torch.cat(picks, -1)

    fns = {
        "topk (sorted)": lambda: dist.topk(KNN_K, dim=-1, largest=False).indices,
        "topk (unsorted)": lambda: dist.topk(KNN_K, dim=-1, largest=False, sorted=False).indices,
        "sort, first k": lambda: dist.sort(dim=-1).indices[..., :KNN_K],
        f"argmin k={KNN_K} times": repeated_min,
    }
    for name, fn in fns.items():
        assert torch.equal(fn().sort(-1).values, ref), name
    times = time_group(list(fns.values()), device, repeats, warmup)
    print(f"\nk = {KNN_K} smallest of each row of [{batch}, {n}, {n}] distances (ms):\n")
    print("| selection | ms |")
    print("|---|---:|")
    for name, t in zip(fns, times):
        print(f"| {name} | {t:.2f} |")


# ---------------------------------------------------------------------------------------------
# superpixels: batched SLIC against skimage, image by image
# ---------------------------------------------------------------------------------------------
def load_mnist(root: Path, count: int) -> torch.Tensor:
    """The first ``count`` test digits of ``root/mnist/MNIST/raw`` (else the sample's): ``[count, 1, 28, 28]`` in [0, 1]."""
    import gzip

    import numpy as np

    for folder in ("mnist", "mnist-sample"):
        path = root / folder / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
        if path.exists():
            with gzip.open(path) as f:
                data = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
            return torch.tensor(data.astype(np.float32) / 255).unsqueeze(1)
    raise SystemExit(f"error: no MNIST IDX files under {root}/mnist or {root}/mnist-sample; set --data-root DIR")


def load_cifar(root: Path, count: int) -> torch.Tensor:
    """``count`` CIFAR-10 test JPEGs of ``root/cifar10-jpeg/test`` (the first of each class in turn): ``[count, 3, 32, 32]``."""
    import numpy as np
    from PIL import Image

    classes = sorted(p for p in (root / "cifar10-jpeg" / "test").glob("*") if p.is_dir())
    if not classes:
        raise SystemExit(f"error: no CIFAR-10 JPEG folders under {root}/cifar10-jpeg/test; set --data-root DIR")
    files = [sorted(c.glob("*.jpg")) for c in classes]
    picked = [files[i % len(files)][i // len(files)] for i in range(count)]
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in picked])
    return torch.tensor(images.astype(np.float32) / 255).permute(0, 3, 1, 2).contiguous()


def boundary(regions: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` bool: pixels whose right or lower neighbour lies in another region."""
    edge = torch.zeros(regions.shape, dtype=torch.bool)
    edge[:, :, :-1] |= regions[:, :, 1:] != regions[:, :, :-1]
    edge[:, :-1] |= regions[:, 1:] != regions[:, :-1]
    return edge


def agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float, float]:
    """(boundary recall on the pixel, within one pixel, achievable segmentation accuracy) of ``ours``
    against ``theirs`` (both ``[B, H, W]`` region ids)."""
    ours, theirs = ours.cpu().long(), theirs.cpu().long()
    edge = boundary(ours)
    near = torch.nn.functional.max_pool2d(edge.float().unsqueeze(1), 3, 1, 1).squeeze(1) > 0
    truth = boundary(theirs)
    exact = float((edge & truth).sum()) / max(1, int(truth.sum()))
    recall = float((near & truth).sum()) / max(1, int(truth.sum()))
    b = ours.shape[0]
    so, st = int(ours.max()) + 1, int(theirs.max()) + 1
    flat = (torch.arange(b).view(b, 1) * so * st + ours.flatten(1) * st + theirs.flatten(1)).flatten()
    overlap = torch.bincount(flat, minlength=b * so * st).view(b, so, st)
    return exact, recall, float(overlap.amax(2).sum()) / ours.numel()


def load_baseline(path: Path):
    """The ``Superpixels`` class of another version of ``interconnects/superpixels.py`` (e.g. from
    ``git show REV:interconnects/superpixels.py > old.py``), imported inside the package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("interconnects._baseline_superpixels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module.Superpixels


def bench_superpixels(root: Path, batch: int, device: torch.device, repeats: int, warmup: int,
                      baseline: Path | None = None, sweep: tuple[int, ...] = (1, 2, 3, 4, 5, 10)) -> None:
    import numpy as np
    from skimage.segmentation import slic

    iterations = Superpixels().iterations
    old = load_baseline(baseline) if baseline else None
    print(f"\nSuperpixels: {batch} images, batched SLIC (ours, {device.type}, {iterations} iterations) against "
          "skimage.segmentation.slic image by image on the CPU (10 iterations, its default), both with "
          f"connectivity enforced, median of {repeats} after {warmup} warm-up, taking turns (ms):\n")
    extra = f" {baseline.name} (ms) | {baseline.name}/ours |" if old else ""
    print(f"| images | regions asked | nodes | regions (ours / skimage, mean) | ours (ms) |{extra} skimage (ms) "
          "| skimage/ours | boundary recall (exact / 1 px) | ASA |")
    print("|---|---:|---:|---:|---:|" + ("---:|---:|" if old else "") + "---:|---:|---:|---:|")
    sweeps = []
    for name, segments, compactness in SUPERPIXEL_ROWS:
        images = load_mnist(root, batch) if name == "MNIST" else load_cifar(root, batch)
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        images = (images - low) / (high - low).clamp_min(1e-12)  # both see the same [0, 1] images
        arrays = [im.permute(1, 2, 0).double().numpy() for im in images]
        channel_axis = None if images.shape[1] == 1 else -1
        arrays = [a[..., 0] for a in arrays] if channel_axis is None else arrays
        sp = Superpixels(num_segments=segments, compactness=compactness).to(device)
        on_device = images.to(device)

        def theirs():
            return np.stack([slic(a, n_segments=segments, compactness=compactness, channel_axis=channel_axis,
                                  start_label=0, max_num_iter=10) for a in arrays])

        fns = [lambda: sp.segment(on_device), theirs]
        if old:
            before = old(num_segments=segments, compactness=compactness, iterations=10).to(device)
            fns.append(lambda: before.segment(on_device))
        times = time_group(fns, device, repeats, warmup)
        t_ours, t_theirs = times[:2]
        ours_regions = sp.segment(on_device).cpu()
        their_regions = torch.from_numpy(theirs())
        exact, recall, asa = agreement(ours_regions, their_regions)
        count = lambda r: float(np.mean([len(torch.unique(x)) for x in r]))  # noqa: E731
        nodes = sp(on_device).num_nodes
        extra = f" {times[2]:.1f} | {times[2] / t_ours:.1f}× |" if old else ""
        print(f"| {batch} {name} | {segments} | {nodes} | {count(ours_regions):.1f} / {count(their_regions):.1f} "
              f"| {t_ours:.1f} |{extra} {t_theirs:.1f} | {t_theirs / t_ours:.1f}× | {exact:.3f} / {recall:.3f} "
              f"| {asa:.3f} |", flush=True)
        for its in sweep:
            regions = Superpixels(num_segments=segments, compactness=compactness, iterations=its).to(device)
            sweeps.append((name, its, agreement(regions.segment(on_device).cpu(), their_regions)))
    print("\nAgreement with skimage (10 iterations) by our iteration count (boundary recall exact / 1 px, ASA):\n")
    print("| images | " + " | ".join(f"{its} it." for its in sweep) + " |")
    print("|---|" + "---:|" * len(sweep))
    for name, _, _ in SUPERPIXEL_ROWS:
        cells = [f"{e:.3f} / {r:.3f}, {a:.3f}" for n, _, (e, r, a) in sweeps if n == name]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def superpixel_model(experiment: str, batch: int, flat_edges: bool, channels: int, size: tuple[int, int]):
    """The model of ``experiment`` as ``train.py`` builds it for ``channels``-channel images of ``size``
    (10 classes); with ``flat_edges`` its GNN layers are given the flat edge list instead of the
    fixed-degree view."""
    from hydra import compose, initialize_config_dir

    from interconnects.config import register
    from interconnects.models.hybrid import build_model

    register()
    configs = Path(__file__).resolve().parents[1] / "configs"
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", f"data.batch_size={batch}"])
    torch.manual_seed(0)
    model = build_model(cfg, channels, size, 10)
    if flat_edges:
        for head in model.modules():
            if isinstance(head, GNNHead):
                head.flags = {**head.flags, "supports_neighbors": False}
    return model, float(cfg.optimizer.lr)


def bench_superpixel_step(root: Path, batch: int, device: torch.device, repeats: int, warmup: int) -> None:
    """One training step of ``experiment=mnist_superpixels`` and ``cifar10_superpixels``
    (segmentation in the forward, Adam) on ``batch`` test images, their GatedGCN layers on the flat
    edge list, on the fixed-degree view, and the latter under ``torch.compile`` (``trainer.compile=true``;
    the segmentation stays eager)."""
    from interconnects.data.torchvision_sets import SPECS

    print(f"\nTraining step, {batch} test images ({device.type}, forward with the segmentation + backward + "
          f"Adam), median of {repeats} after {warmup} warm-up (ms); the compiled row's first step (its "
          "compilation) is not timed:\n")
    print("| experiment | GatedGCN edges | step (ms) | of which SLIC (ms) | speed-up |")
    print("|---|---|---:|---:|---:|")
    for experiment, load, spec in (("mnist_superpixels", load_mnist, "mnist"),
                                   ("cifar10_superpixels", load_cifar, "cifar10")):
        images = load(root, batch).to(device)
        mean, std = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in SPECS[spec][4:6])
        images = (images - mean) / std
        labels = torch.arange(batch, device=device) % 10
        rows = []
        for flat, compiled in ((True, False), (False, False), (False, True)):
            model, lr = superpixel_model(experiment, batch, flat, images.shape[1], tuple(images.shape[-2:]))
            model.to(device).train()
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            run = torch.compile(model) if compiled else model

            def step(run=run, optimizer=optimizer):
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(run(images), labels).backward()
                optimizer.step()

            rows.append((model, run, step))
        with torch.no_grad():  # the same function on all three
            for model, _, _ in rows:
                model.eval()
            ref = rows[1][0](images)
            for _, run, _ in (rows[0], rows[2]):
                torch.testing.assert_close(run(images), ref, rtol=1e-4, atol=1e-5)
            for model, _, _ in rows:
                model.train()
        rows[2][2]()  # the compilation of the training graphs, untimed
        segment = rows[0][0].interconnect.segment
        t_flat, t_gather, t_compiled, t_seg = time_group([r[2] for r in rows] + [lambda: segment(images)],
                                                         device, repeats, warmup)
        for name, t in (("flat edge list (ResGatedGraphConv, per edge)", t_flat),
                        ("fixed-degree view (per node, then a gather)", t_gather),
                        ("fixed-degree view, torch.compile", t_compiled)):
            print(f"| {experiment} | {name} | {t:.1f} | {t_seg:.1f} | {t_flat / t:.1f}× |", flush=True)


def bench_learned_edges(batch: int, device: torch.device, repeats: int, warmup: int, size: int = 28) -> None:
    """``DenseGrid(edges="learned")`` (the edge MLP's first layer split into its source and target halves,
    broadcast-added) against the published formulation (every [source, target] pair of standardised
    coordinates as a ``[N, N, 4]`` tensor through the MLP): forward, ``A·x`` over a batch of grey images,
    backward."""
    grid = DenseGrid(edges="learned", normalize=False, self_loop_weight=None).to(device)
    images = torch.randn(batch, 1, size, size, device=device)
    n = size * size

    def published():
        xy = grid_positions(size, size, device, torch.float32).flip(-1)
        xy = (xy - xy.mean(0)) / (xy.std(0, unbiased=False) + 1e-5)
        pairs = torch.cat([xy.unsqueeze(0).expand(n, n, 2), xy.unsqueeze(1).expand(n, n, 2)], dim=-1)
        return grid.edge_mlp(pairs).squeeze(-1).unsqueeze(0)

    with torch.no_grad():
        torch.testing.assert_close(grid(images).adj, published(), rtol=0, atol=1e-6)
    x = images.flatten(2).transpose(1, 2)
    t_ours, t_pub = time_group(
        [lambda: backward(grid(images).adj @ x), lambda: backward(published() @ x)], device, repeats, warmup
    )
    print(f"\nLearned edges over the {n} cells of a {size}×{size} map, batch {batch} ({device.type}; forward, A·x, "
          f"backward), median of {repeats} after {warmup} warm-up (ms):\n")
    print("| edge MLP | ms | speed-up |")
    print("|---|---:|---:|")
    print(f"| published: a [N, N, 4] pair tensor through the MLP | {t_pub:.1f} | 1.0× |")
    print(f"| ours: source and target halves of the first layer, broadcast-added | {t_ours:.1f} | {t_pub / t_ours:.2f}× |",
          flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: batch 4, maps 7² and 14², 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2; 1 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 64; 4 with --quick)")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="feature-map sides (default 7 14 28)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--only", choices=["knn_gcn", "superpixels", "learned_edges"], default=None,
                        help="only the kNN + GCN row (and the top-k table), only the superpixel rows, or only "
                             "the learned-edge table")
    parser.add_argument("--data-root", type=Path, default=DATASETS,
                        help="the shared datasets folder the superpixel rows read (default ../shared/datasets)")
    parser.add_argument("--superpixel-images", type=int, default=128, help="images per superpixel row (default 128)")
    parser.add_argument("--superpixels-baseline", type=Path, default=None, metavar="FILE",
                        help="another version of interconnects/superpixels.py (git show REV:interconnects/superpixels.py "
                             "> FILE), timed at 10 iterations in the same rows")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch.cuda.is_available() is False")
    repeats = args.repeats or (1 if args.quick else 5)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    batch = args.batch or (4 if args.quick else 64)
    sizes = args.sizes or ([7, 14] if args.quick else [7, 14, 28])
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(describe_machine(device))
    if args.only == "superpixels":
        bench_superpixels(args.data_root, args.superpixel_images, device, repeats, warmup, args.superpixels_baseline)
        bench_superpixel_step(args.data_root, args.superpixel_images, device, repeats, warmup)
        return
    if args.only == "learned_edges":
        bench_learned_edges(batch, device, repeats, warmup)
        return
    print(
        f"batch {batch}, C = {args.channels}, forward + backward, median of {repeats} after {warmup} warm-up "
        "(ours, reference and floor taking turns); "
        "times in ms; ref/ours = speed-up over the per-sample reference, ours/floor = cost over the bare "
        "gather + scatter_add_ (a bare index_add_ for graph→CNN)"
    )
    print()
    print("| map | mode | ours (ms) | reference (ms) | floor (ms) | ref/ours | ours/floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for size in sizes:
        for mode, ours, ref, floor in bench_size(size, batch, args.channels, device, repeats, warmup, args.only):
            print(
                f"| {size}×{size} | {mode} | {ours:.2f} | {ref:.2f} | {floor:.2f} | {ref / ours:.1f}× | {ours / floor:.2f}× |",
                flush=True,
            )
    bench_topk(14 if 14 in sizes else sizes[0], batch, device, repeats, warmup)
    if args.only is None:
        bench_learned_edges(batch, device, repeats, warmup)
        bench_superpixels(args.data_root, args.superpixel_images, device, repeats, warmup)


if __name__ == "__main__":
    run_script(main)
