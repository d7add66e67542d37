"""FFT aggregation of distance grids: equal to the dense adjacency in values and gradients."""

from __future__ import annotations

import pytest
import torch

from interconnects import DenseGrid
from interconnects.fft import GridConvolution, fast_fft_size
from interconnects.grid import FFT_MIN_NODES
from interconnects.models.gnn import GNNHead

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")

SCHEMES = {
    "inverse_distance": {"edges": "inverse_distance"},
    "gaussian": {"edges": "gaussian", "sigma": 1.5},
    "gaussian_cutoff_wide": {"edges": "gaussian", "sigma": 4.0, "cutoff": 0.05},
    "gaussian_unsquared_scaled": {"edges": "gaussian", "sigma": 0.157, "squared": False, "coord_scale": 1 / 7},
}
SELF_LOOPS = [None, 0.0, 0.5, 2.0]
SIZES = [(4, 4), (5, 5), (4, 6), (7, 3), (1, 5)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pair(scheme: str, **kwargs) -> tuple[DenseGrid, DenseGrid]:
    options = {**SCHEMES[scheme], **kwargs}
    return DenseGrid(aggregate="dense", **options), DenseGrid(aggregate="fft", **options)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("self_loop", SELF_LOOPS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_fft_equals_dense(scheme, size, self_loop, normalize):
    dense, fft = pair(scheme, self_loop_weight=self_loop, normalize=normalize)
    torch.manual_seed(0)
    fmap = torch.randn(3, 5, *size)
    gd, gf = dense(fmap), fft(fmap)
    assert gf.aggregator is not None and gd.aggregator is None
    # the lazily built matrix is the dense path's adjacency (diagonal, cutoff and normalisation included)
    torch.testing.assert_close(gf.adj, gd.adj, rtol=1e-5, atol=1e-6)
    xd = gd.x.detach().clone().requires_grad_(True)
    xf = gd.x.detach().clone().requires_grad_(True)
    out_d = torch.matmul(gd.adj, xd)
    out_f = gf.aggregator.matmul(xf)
    torch.testing.assert_close(out_f, out_d, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out_d)
    (out_d * grad).sum().backward()
    (out_f * grad).sum().backward()
    torch.testing.assert_close(xf.grad, xd.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", ["gcn", "graphconv", "sage", "gin", "propagate", "gat", "gatedgcn", "maxrel"])
@pytest.mark.parametrize("scheme", ["inverse_distance", "gaussian"])
def test_layers_on_fft_grid_equal_dense(layer, scheme):
    """Layers that aggregate with A use the operator; the per-edge layers get its matrix."""
    dense, fft = pair(scheme, self_loop_weight=0.0)
    torch.manual_seed(0)
    fmap = torch.randn(2, 4, 5, 6)
    head = GNNHead(4, layer, hidden_channels=6, num_layers=2)
    outs, grads = [], []
    for grid in (dense, fft):
        x = fmap.clone().requires_grad_(True)
        out = head(grid(x)).x
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append(x.grad)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scheme", ["inverse_distance", "gaussian"])
def test_fft_bfloat16(scheme):
    dense, fft = pair(scheme)
    torch.manual_seed(0)
    fmap = torch.randn(2, 4, 6, 5, dtype=torch.bfloat16)
    gd, gf = dense(fmap), fft(fmap)
    x = gd.x.detach().clone().requires_grad_(True)
    out = gf.aggregator.matmul(x)
    assert out.dtype == torch.bfloat16
    reference = torch.matmul(gd.adj.float(), gd.x.float())
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), gd.adj.float().sum(1).view(1, -1, 1).expand_as(x), rtol=2e-2, atol=2e-2)


def test_auto_picks_by_the_measured_crossover():
    grid = DenseGrid(edges="gaussian", aggregate="auto")
    side = int(FFT_MIN_NODES**0.5)
    assert side * side == FFT_MIN_NODES
    small = grid(torch.randn(1, 2, side - 1, side))
    large = grid(torch.randn(1, 2, side, side))
    assert small.aggregator is None and small.adj is not None
    assert large.aggregator is not None
    assert DenseGrid(edges="grid8", aggregate="auto")(torch.randn(1, 2, side, side)).aggregator is None
    assert DenseGrid(edges="gaussian", aggregate="dense")(torch.randn(1, 2, side, side)).aggregator is None


def test_fft_size_and_reach():
    assert [fast_fft_size(n) for n in (1, 7, 13, 127)] == [1, 8, 15, 128]
    # a Gaussian whose weights vanish past 2 cells needs no more padding than that reach
    grid = DenseGrid(edges="gaussian", sigma=1.0, cutoff=0.01, aggregate="fft")
    op = grid(torch.randn(1, 1, 20, 20)).aggregator
    assert op.fft_size == (fast_fft_size(22), fast_fft_size(22))


def test_bad_aggregate_values():
    with pytest.raises(ValueError, match=r"aggregate='fft' needs edges in 'inverse_distance', 'gaussian'.*grid4"):
        DenseGrid(edges="grid4", aggregate="fft")
    with pytest.raises(ValueError, match=r"aggregate='sparse' is not supported; choose one of 'auto', 'dense', 'fft'"):
        DenseGrid(aggregate="sparse")
    with pytest.raises(ValueError, match="non-negative"):
        GridConvolution(-torch.ones(3, 3), (2, 2))
