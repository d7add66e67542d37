"""Specification tests of the CNN ↔ graph interconnects (tiny tensors; a few seconds in all)."""

from __future__ import annotations

import ast
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from interconnects import DenseGrid, GraphBatch, GraphToCNN, Keypoints, KNNGraph

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.cuda.is_available() is False")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fmap_of(b=2, c=3, h=4, w=5, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, h, w, generator=g).to(device=device, dtype=dtype)


def cell_distances(h, w):
    """``[h·w, h·w]`` float64 Euclidean distances between row-major cells, by hand."""
    r, c = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    p = torch.stack([r.flatten(), c.flatten()], -1)
    return ((p[:, None] - p[None]) ** 2).sum(-1).sqrt()


def edge_set(edge_index, edge_weight=None):
    """Edges as a set of (src, dst[, weight]) tuples, for order-free comparison."""
    cols = edge_index.tolist()
    if edge_weight is None:
        return set(zip(*cols))
    return set(zip(*cols, [round(v, 5) for v in edge_weight.tolist()]))


# ---------------------------------------------------------------------------------------------
# GraphBatch
# ---------------------------------------------------------------------------------------------
def test_graphbatch_fields_and_validation():
    x, pos = torch.randn(2, 3, 4), torch.rand(2, 3, 2)
    g = GraphBatch(x=x, pos=pos, size=(2, 2), adj=torch.rand(1, 3, 3))
    assert (g.batch_size, g.num_nodes, g.num_channels) == (2, 3, 4)
    assert torch.equal(g.flat_x(), x.reshape(6, 4))
    assert g.batch_vector().tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match=r"x must be \[B, N, C\]"):
        GraphBatch(x=torch.randn(3, 4), pos=pos, size=(2, 2), adj=torch.rand(1, 3, 3))
    with pytest.raises(ValueError, match=r"pos must be \[B, N, 2\]"):
        GraphBatch(x=x, pos=torch.rand(2, 3), size=(2, 2), adj=torch.rand(1, 3, 3))
    with pytest.raises(ValueError, match="adj .*edge_index"):
        GraphBatch(x=x, pos=pos, size=(2, 2))
    with pytest.raises(ValueError, match=r"adj must be \[B, N, N\] or \[1, N, N\]"):
        GraphBatch(x=x, pos=pos, size=(2, 2), adj=torch.rand(3, 3, 3))
    with pytest.raises(ValueError, match=r"edge_index must be \[2, E\]"):
        GraphBatch(x=x, pos=pos, size=(2, 2), edge_index=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"edge_weight must be \[E\] = \(4,\)"):
        GraphBatch(x=x, pos=pos, size=(2, 2), edge_index=torch.zeros(2, 4, dtype=torch.long), edge_weight=torch.ones(5))


def test_dense_sparse_round_trip_per_image_adjacency():
    b, n = 3, 5
    adj = torch.rand(b, n, n) * (torch.rand(b, n, n) > 0.5)
    g = GraphBatch(x=torch.randn(b, n, 2), pos=torch.rand(b, n, 2), size=(3, 3), adj=adj)
    edge_index, edge_weight = g.sparse_edges()
    assert edge_index.shape == (2, int((adj != 0).sum())) and edge_weight.shape == (edge_index.shape[1],)
    # flat ids b·N + n, adj[b, i, j] is the edge j → i
    src, dst = edge_index
    assert torch.equal(src // n, dst // n)
    assert torch.equal(edge_weight, adj[dst // n, dst % n, src % n])
    back = GraphBatch(x=g.x, pos=g.pos, size=g.size, edge_index=edge_index, edge_weight=edge_weight)
    assert torch.equal(back.dense_adj(), adj)
    # and sparse → dense → sparse gives the same edges
    again = GraphBatch(x=g.x, pos=g.pos, size=g.size, adj=back.dense_adj()).sparse_edges()
    assert edge_set(*again) == edge_set(edge_index, edge_weight)


def test_dense_sparse_round_trip_shared_adjacency():
    b, n = 3, 4
    shared = torch.rand(1, n, n) * (torch.rand(1, n, n) > 0.3)
    g = GraphBatch(x=torch.randn(b, n, 2), pos=torch.rand(b, n, 2), size=(2, 2), adj=shared)
    assert g.dense_adj() is shared
    edge_index, edge_weight = g.sparse_edges()
    per_graph = int((shared != 0).sum())
    assert edge_index.shape == (2, b * per_graph)  # the shared graph is expanded to every image
    dense = GraphBatch(x=g.x, pos=g.pos, size=g.size, edge_index=edge_index, edge_weight=edge_weight).dense_adj()
    assert torch.equal(dense, shared.expand(b, n, n))


def test_sparse_edges_without_weight_and_duplicate_edges():
    x, pos = torch.randn(2, 3, 1), torch.rand(2, 3, 2)
    edge_index = torch.tensor([[0, 0, 4], [1, 1, 5]])  # 0 → 1 twice in graph 0, 1 → 2 in graph 1
    g = GraphBatch(x=x, pos=pos, size=(2, 2), edge_index=edge_index)
    ei, ew = g.sparse_edges()
    assert torch.equal(ei, edge_index) and torch.equal(ew, torch.ones(3))
    dense = g.dense_adj()
    expected = torch.zeros(2, 3, 3)
    expected[0, 1, 0], expected[1, 2, 1] = 2.0, 1.0  # duplicates summed
    assert torch.equal(dense, expected)


def test_to_pyg_batch():
    from torch_geometric.data import Batch

    fmap = fmap_of(b=3, c=2, h=2, w=3)
    g = KNNGraph(k=2)(fmap)
    pyg = g.to_pyg()
    assert isinstance(pyg, Batch)
    assert torch.equal(pyg.x, g.x.reshape(-1, 2))
    assert torch.equal(pyg.pos, g.pos.reshape(-1, 2))
    assert torch.equal(pyg.batch, torch.arange(3).repeat_interleave(6))
    assert torch.equal(pyg.edge_index, g.edge_index) and torch.equal(pyg.edge_weight, g.edge_weight)
    assert pyg.num_graphs == 3
    one = pyg[1]  # a graph of the batch, node ids back to 0..N-1
    assert torch.equal(one.x, g.x[1]) and one.edge_index.max() < 6 and one.edge_index.shape[1] == 6 * 2
    # a shared dense adjacency becomes one copy of the edges per image
    dense = DenseGrid()(fmap).to_pyg()
    assert dense.edge_index.shape == (2, 3 * 36) and dense.edge_weight.shape == (3 * 36,)
    assert len(dense.to_data_list()) == 3


# ---------------------------------------------------------------------------------------------
# DenseGrid
# ---------------------------------------------------------------------------------------------
def test_dense_grid_nodes():
    fmap = fmap_of(b=2, c=3, h=3, w=4)
    g = DenseGrid()(fmap)
    assert g.x.shape == (2, 12, 3) and g.pos.shape == (2, 12, 2) and g.size == (3, 4)
    for n in range(12):
        assert torch.equal(g.x[:, n], fmap[:, :, n // 4, n % 4])
        assert g.pos[0, n].tolist() == [n // 4, n % 4]


def test_dense_grid_inverse_distance():
    g = DenseGrid(edges="inverse_distance")(fmap_of(h=3, w=4))
    assert g.adj.shape == (1, 12, 12)  # shared, complete
    expected = 1.0 / (1.0 + cell_distances(3, 4))
    torch.testing.assert_close(g.adj[0].double(), expected, rtol=1e-6, atol=1e-7)
    assert bool((g.adj > 0).all())


def test_dense_grid_gaussian_with_cutoff():
    sigma, cutoff = 1.5, 0.05
    g = DenseGrid(edges="gaussian", sigma=sigma, cutoff=cutoff)(fmap_of(h=4, w=4))
    d = cell_distances(4, 4)
    expected = torch.exp(-(d**2) / sigma**2)
    expected[expected < cutoff] = 0.0
    torch.testing.assert_close(g.adj[0].double(), expected, rtol=1e-6, atol=1e-7)
    assert bool((g.adj == 0).any()) and bool((g.adj > 0).any())


@pytest.mark.parametrize("edges, degree", [("grid4", {2, 3, 4}), ("grid8", {3, 5, 8})])
def test_dense_grid_neighbour_edges(edges, degree):
    b, h, w = 3, 3, 4
    g = DenseGrid(edges=edges, self_loop_weight=None)(fmap_of(b=b, h=h, w=w))
    n = h * w
    src, dst = g.edge_index
    assert g.adj is None and torch.equal(g.edge_weight, torch.ones_like(g.edge_weight))
    # one copy of the same edges per image
    per = src.numel() // b
    for i in range(b):
        assert torch.equal(src[i * per : (i + 1) * per] - i * n, src[:per])
        assert torch.equal(dst[i * per : (i + 1) * per] - i * n, dst[:per])
    dr = (src[:per] // w - dst[:per] // w).abs()
    dc = (src[:per] % w - dst[:per] % w).abs()
    if edges == "grid4":
        assert bool(((dr + dc) == 1).all())
    else:
        assert bool((torch.maximum(dr, dc) == 1).all())
    assert set(torch.bincount(dst[:per], minlength=n).tolist()) == degree
    assert edge_set(g.edge_index[:, :per]) == {(j, i) for i, j in edge_set(g.edge_index[:, :per])}  # symmetric


def test_dense_grid_edges_built_once_per_size():
    grid = DenseGrid()
    a = grid(fmap_of(b=2, h=3, w=3)).adj
    b = grid(fmap_of(b=5, h=3, w=3)).adj
    assert a is b and a.shape == (1, 9, 9)  # shared by every image and every batch
    assert grid(fmap_of(b=2, h=2, w=3)).adj.shape == (1, 6, 6)
    g4 = DenseGrid(edges="grid4")
    first = g4(fmap_of(b=1, h=3, w=3)).edge_index
    again = g4(fmap_of(b=4, h=3, w=3)).edge_index
    assert len(g4._cache) == 1 and torch.equal(again[:, : first.shape[1]], first)


@pytest.mark.parametrize("edges", ["inverse_distance", "gaussian", "grid8"])
def test_dense_grid_edges_cached_under_inference_mode_serve_autograd(edges):
    grid = DenseGrid(edges=edges)
    with torch.inference_mode():
        grid(fmap_of(b=2, h=3, w=3))  # e.g. a validation pass before training
    fmap = fmap_of(b=2, h=3, w=3).requires_grad_()
    g = grid(fmap)
    mixed = g.dense_adj().expand(2, -1, -1) @ g.x
    GraphToCNN()(g.replace(x=mixed)).sum().backward()
    assert fmap.grad is not None and bool(fmap.grad.abs().sum() > 0)


def test_dense_grid_learned_edges_get_gradient():
    grid = DenseGrid(edges="learned", hidden=8)
    fmap = fmap_of(b=2, c=3, h=3, w=3).requires_grad_()
    g = grid(fmap)
    assert g.adj.shape == (1, 9, 9)
    out = GraphToCNN()(g.replace(x=g.adj @ g.x))
    out.square().sum().backward()
    for p in grid.edge_mlp.parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)
    assert bool(fmap.grad.abs().sum() > 0)


@pytest.mark.parametrize("edges", ["inverse_distance", "gaussian", "learned"])
def test_dense_grid_self_loop_weight(edges):
    diag = DenseGrid(edges=edges, self_loop_weight=0.25)(fmap_of(h=3, w=3)).adj[0].diagonal()
    assert torch.equal(diag, torch.full((9,), 0.25))
    zero = DenseGrid(edges=edges, self_loop_weight=0.0)(fmap_of(h=3, w=3)).adj[0].diagonal()
    assert torch.equal(zero, torch.zeros(9))


@pytest.mark.parametrize("normalize", [False, True])
def test_dense_grid_edge_shift_moves_the_weights_above_the_threshold(normalize):
    """``edge_shift`` adds to every built weight above 1e-4 and leaves the rest; ``auto`` stays dense."""
    kwargs = dict(edges="gaussian", sigma=1.5, normalize=normalize)
    base = DenseGrid(**kwargs)(fmap_of(h=7, w=7)).adj
    shifted_grid = DenseGrid(**kwargs, edge_shift=-0.2)
    assert not shifted_grid.uses_fft(64, 64)
    shifted = shifted_grid(fmap_of(h=7, w=7)).adj
    above = base > 1e-4
    assert bool(above.any()) and bool((~above).any())
    torch.testing.assert_close(shifted[above], base[above] - 0.2)
    assert torch.equal(shifted[~above], base[~above])


@pytest.mark.parametrize("kwargs", [dict(edges="grid4"), dict(edges="learned"), dict(aggregate="fft"),
                                    dict(edge_shift="big"), dict(edge_shift=float("nan"))])
def test_dense_grid_edge_shift_refuses_what_it_cannot_shift(kwargs):
    kwargs = {"edge_shift": -0.2, **kwargs}
    with pytest.raises(ValueError, match="edge_shift="):
        DenseGrid(**kwargs)


def test_dense_grid_self_loop_weight_on_neighbour_grids():
    g = DenseGrid(edges="grid4", self_loop_weight=0.5)(fmap_of(b=1, h=3, w=3))
    loops = g.edge_index[0] == g.edge_index[1]
    assert int(loops.sum()) == 9 and torch.equal(g.edge_weight[loops], torch.full((9,), 0.5))
    assert not bool((DenseGrid(edges="grid4", self_loop_weight=None)(fmap_of(b=1, h=3, w=3)).edge_index.diff(dim=0) == 0).any())


@pytest.mark.parametrize("edges", ["inverse_distance", "gaussian", "grid4", "grid8"])
def test_dense_grid_normalize(edges):
    fmap = fmap_of(b=2, h=3, w=4)
    raw = DenseGrid(edges=edges)(fmap).dense_adj()[:1].double()
    norm = DenseGrid(edges=edges, normalize=True)(fmap).dense_adj()[:1].double()
    d = raw.abs().sum(-1).pow(-0.5)
    expected = d.unsqueeze(-1) * raw * d.unsqueeze(-2)
    torch.testing.assert_close(norm, expected, rtol=1e-4, atol=1e-6)


def test_dense_grid_learned_normalize():
    norm = DenseGrid(edges="learned", normalize=True, hidden=4)
    raw = DenseGrid(edges="learned", hidden=4)
    raw.load_state_dict(norm.state_dict())  # the same MLP, without the normalisation
    adj = norm(fmap_of(h=2, w=3)).adj[0].detach().double()
    a = raw(fmap_of(h=2, w=3)).adj[0].detach().double()
    d = a.abs().sum(-1).pow(-0.5)
    torch.testing.assert_close(adj, d[:, None] * a * d[None], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Keypoints
# ---------------------------------------------------------------------------------------------
def test_keypoints_topk_with_given_scores():
    fmap = fmap_of(b=2, c=3, h=4, w=4)
    scores = torch.randn(2, 1, 4, 4, requires_grad=True)
    g = Keypoints(num_keypoints=5)(fmap, scores=scores)
    cells = scores.detach().flatten(1).topk(5, dim=1).indices
    assert g.x.shape == (2, 5, 3) and g.adj.shape == (2, 5, 5)
    assert torch.equal(g.pos, torch.stack([cells // 4, cells % 4], -1).float())
    gate = torch.sigmoid(scores.detach().flatten(1).gather(1, cells))
    expected = fmap.flatten(2).transpose(1, 2).gather(1, cells[..., None].expand(-1, -1, 3)) * gate[..., None]
    torch.testing.assert_close(g.x, expected)
    g.x.sum().backward()
    assert int((scores.grad != 0).sum()) == 2 * 5  # the score branch is trained, at the chosen cells


def nonzero_cells(grad):
    """``[B, h·w]`` bool: cells where any channel of a ``[B, C, h, w]`` gradient is non-zero."""
    return (grad != 0).any(1).flatten(1)


def test_keypoints_topk_gradient_reaches_exactly_the_selected_cells():
    fmap = fmap_of(b=3, c=4, h=5, w=5).requires_grad_()
    kp = Keypoints(num_keypoints=6, select="topk")
    g = kp(fmap)
    (g.x * torch.randn_like(g.x)).sum().backward()
    hit = nonzero_cells(fmap.grad)
    chosen = torch.zeros(3, 25, dtype=torch.bool)
    chosen[torch.arange(3)[:, None], (g.pos[..., 0] * 5 + g.pos[..., 1]).long()] = True
    assert torch.equal(hit, chosen) and bool((hit.sum(1) == 6).all())
    assert kp.score.weight.grad is not None and bool(kp.score.weight.grad.abs().sum() > 0)


@pytest.mark.parametrize("in_channels", [3, None])
def test_keypoints_learned_score_is_its_conv(in_channels):
    kp = Keypoints(num_keypoints=5, in_channels=in_channels)
    fmap = fmap_of(b=3, c=3, h=4, w=4)
    first = kp(fmap)  # builds a lazy conv on the way
    again = kp(fmap)
    by_conv = kp(fmap, scores=kp.score(fmap))
    for g in (first, again):
        assert torch.equal(g.pos, by_conv.pos)
        torch.testing.assert_close(g.x, by_conv.x)
    assert isinstance(kp.score, torch.nn.Conv2d) and kp.score.weight.shape == (1, 3, 1, 1)


def test_keypoints_given_gradient_reaches_exactly_the_selected_cells():
    fmap = fmap_of(b=2, c=3, h=7, w=7).requires_grad_()
    keypoints = torch.tensor([[[0, 0], [27, 27], [14, 3]], [[5, 20], [9, 9], [27, 0]]])
    g = Keypoints(num_keypoints=3, select="given", image_size=(28, 28))(fmap, keypoints)
    (g.x * torch.randn_like(g.x)).sum().backward()
    cells = (keypoints[..., 0] * 7 // 28) * 7 + keypoints[..., 1] * 7 // 28
    chosen = torch.zeros(2, 49, dtype=torch.bool)
    chosen[torch.arange(2)[:, None], cells] = True
    assert torch.equal(nonzero_cells(fmap.grad), chosen)
    assert torch.equal(g.x, fmap.detach().flatten(2).transpose(1, 2).gather(1, cells[..., None].expand(-1, -1, 3)))


def test_keypoints_given_stride_mapping():
    H, W, h, w = 30, 20, 4, 3
    keypoints = torch.stack([torch.randint(0, H, (2, 9)), torch.randint(0, W, (2, 9))], -1)
    g = Keypoints(9, select="given", image_size=(H, W))(fmap_of(b=2, h=h, w=w), keypoints)
    expected = torch.stack([keypoints[..., 0] * h // H, keypoints[..., 1] * w // W], -1).float()
    cell = expected[..., 0] * w + expected[..., 1]
    first = torch.tensor([[bool((cell[b, :i] != cell[b, i]).all()) for i in range(9)] for b in range(2)])
    assert torch.equal(g.pos[first], expected[first])  # a repeated cell gives its place to an unused one
    assert all(len(set(map(tuple, p.tolist()))) == 9 for p in g.pos)


def test_keypoint_at_27_27_of_28x28_lands_in_cell_6_6_and_goes_back_there():
    fmap = fmap_of(b=1, c=2, h=7, w=7)
    g = Keypoints(1, select="given", image_size=(28, 28))(fmap, torch.tensor([[[27, 27]]]))
    assert g.pos.tolist() == [[[6.0, 6.0]]]
    out = GraphToCNN()(g)
    expected = torch.zeros_like(fmap)
    expected[..., 6, 6] = fmap[..., 6, 6]
    assert torch.equal(out, expected)


def test_keypoints_given_accepts_integral_floats_only():
    kp = Keypoints(1, select="given", image_size=(8, 8))
    assert kp(fmap_of(b=1, h=4, w=4), torch.tensor([[[7.0, 2.0]]])).pos.tolist() == [[[3.0, 1.0]]]
    with pytest.raises(ValueError, match="keypoints must be integer"):
        kp(fmap_of(b=1, h=4, w=4), torch.tensor([[[7.5, 2.0]]]))


def test_keypoints_random_and_lattice():
    fmap = fmap_of(b=4, h=5, w=6)
    kp = Keypoints(7, select="random")
    g = kp(fmap)
    cells = (g.pos[..., 0] * 6 + g.pos[..., 1]).long()
    assert all(len(set(row)) == 7 for row in cells.tolist())  # distinct cells per image
    kp.eval()
    lattice = Keypoints(7, select="lattice")(fmap)
    assert torch.equal(kp(fmap).pos, lattice.pos)  # random falls back to the lattice in eval mode
    assert torch.equal(lattice.pos[0], lattice.pos[3]) and len({tuple(p) for p in lattice.pos[0].tolist()}) == 7
    full = Keypoints(30, select="lattice")(fmap)
    assert len({tuple(p) for p in full.pos[0].tolist()}) == 30


def test_keypoints_edge_schemes():
    fmap = fmap_of(b=2, h=5, w=5)
    scores = torch.randn(2, 1, 5, 5)
    base = Keypoints(6, edges="inverse_distance", self_loop_weight=None)(fmap, scores=scores)
    d = torch.cdist(base.pos.double(), base.pos.double())
    torch.testing.assert_close(base.adj.double(), 1 / (1 + d), rtol=1e-6, atol=1e-7)
    gauss = Keypoints(6, edges="gaussian", sigma=2.0, cutoff=0.1)(fmap, scores=scores)
    expected = torch.exp(-(d**2) / 4.0)
    expected[expected < 0.1] = 0
    expected.diagonal(dim1=1, dim2=2).fill_(1.0)
    torch.testing.assert_close(gauss.adj.double(), expected, rtol=1e-6, atol=1e-7)
    knn = Keypoints(6, edges="knn", k=2, self_loop_weight=None)(fmap, scores=scores)
    assert torch.equal(knn.adj.sum(-1), torch.full((2, 6), 2.0)) and torch.equal(knn.adj.diagonal(dim1=1, dim2=2), torch.zeros(2, 6))
    far = d + torch.diag_embed(torch.full((2, 6), math.inf, dtype=torch.float64))
    picked = far.masked_fill(knn.adj == 0, -1).amax(-1)
    unpicked = far.masked_fill(knn.adj == 1, math.inf).amin(-1)
    assert bool((picked <= unpicked).all())  # the chosen two are the nearest two
    norm = Keypoints(6, normalize=True)(fmap, scores=scores).adj.double()
    a = Keypoints(6)(fmap, scores=scores).adj.double()
    deg = a.sum(-1).pow(-0.5)
    torch.testing.assert_close(norm, deg[..., None] * a * deg[..., None, :], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("select", ["topk", "given"])
@pytest.mark.parametrize("edges", ["inverse_distance", "gaussian", "knn"])
def test_keypoints_adjacency_is_per_image(select, edges):
    kp = Keypoints(4, select=select, edges=edges, k=2, image_size=(16, 16), in_channels=3)
    fmap = fmap_of(b=3, c=3, h=4, w=4)
    keypoints = torch.randint(0, 16, (3, 4, 2))
    a = kp(fmap, keypoints).adj
    fmap2, keypoints2 = fmap.clone(), keypoints.clone()
    fmap2[1] = torch.randn(3, 4, 4) * 10
    keypoints2[1] = torch.randint(0, 16, (4, 2))
    b = kp(fmap2, keypoints2).adj
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert a.shape == (3, 4, 4)


def test_keypoints_k_equals_n_and_k_equals_one():
    fmap = fmap_of(b=2, c=3, h=3, w=3)
    for select in ("topk", "lattice", "random"):
        g = Keypoints(9, select=select)(fmap)
        assert g.x.shape == (2, 9, 3)
        assert torch.equal(GraphToCNN()(g) != 0, torch.ones(2, 3, 3, 3, dtype=torch.bool))  # all cells covered
        one = Keypoints(1, select=select)(fmap)
        assert one.x.shape == (2, 1, 3) and one.adj.shape == (2, 1, 1)
    tiny = Keypoints(1)(fmap_of(b=1, c=2, h=1, w=1))
    assert tiny.x.shape == (1, 1, 2) and tiny.adj.tolist() == [[[1.0]]]


# ---------------------------------------------------------------------------------------------
# KNNGraph
# ---------------------------------------------------------------------------------------------
def brute_force_knn(x, k, metric, dilation, self_loops):
    """Per-node sorting of float64 torch.cdist distances; ``[B, N, k]`` neighbour ids."""
    x = x.double()
    if metric == "cosine":
        x = F.normalize(x, dim=-1)  # on unit vectors the Euclidean order is the cosine order
    dist = torch.cdist(x, x)
    n = x.shape[1]
    if not self_loops:
        dist = dist + torch.diag(torch.full((n,), math.inf, dtype=torch.float64))
    out = torch.empty(x.shape[0], n, k, dtype=torch.long)
    for b in range(x.shape[0]):
        for i in range(n):
            row = dist[b, i].tolist()
            order = sorted(range(n), key=row.__getitem__)
            out[b, i] = torch.tensor(order[: k * dilation : dilation])
    return out


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("dilation, self_loops", [(1, False), (2, False), (1, True), (3, True)])
def test_knn_matches_brute_force(metric, dilation, self_loops):
    b, c, h, w, k = 2, 5, 4, 5, 3
    fmap = fmap_of(b=b, c=c, h=h, w=w, seed=7) + 2.0  # an offset, as post-ReLU features have
    g = KNNGraph(k=k, metric=metric, dilation=dilation, self_loops=self_loops)(fmap)
    n = h * w
    src, dst = g.edge_index
    assert src.shape == (b * n * k,)
    # every node i receives an edge j → i from each of its k neighbours j, nearest first
    assert torch.equal(dst.view(b, n, k), (torch.arange(b)[:, None, None] * n + torch.arange(n)[None, :, None]).expand(b, n, k))
    nbr = src.view(b, n, k) - torch.arange(b)[:, None, None] * n
    assert torch.equal(nbr, brute_force_knn(g.x, k, metric, dilation, self_loops))
    assert torch.equal(g.edge_weight, torch.ones(b * n * k))


def test_knn_features_with_a_large_common_part():
    # close features far from the origin (post-ReLU maps): |a|² - 2a·b + |b|² cancels badly in float32
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 5, 5, generator=g) * 0.01 + 30.0
    nbr = KNNGraph(k=3)(x).edge_index[0].view(2, 25, 3) - torch.arange(2)[:, None, None] * 25
    assert torch.equal(nbr, brute_force_knn(x.flatten(2).transpose(1, 2), 3, "euclidean", 1, False))


@pytest.mark.parametrize("max_bytes", [4 * 25 * 25 * 2, 4 * 25 * 25, 4 * 25 * 6, 1])
def test_knn_blocks_match_one_block(max_bytes):
    # two images, one image, six rows, one row at a time
    fmap = fmap_of(b=3, c=4, h=5, w=5)
    for kwargs in ({}, {"metric": "cosine", "dilation": 2}, {"self_loops": True}):
        whole = KNNGraph(k=4, **kwargs)(fmap).edge_index
        assert torch.equal(KNNGraph(k=4, max_bytes=max_bytes, **kwargs)(fmap).edge_index, whole)


def test_knn_adjacency_is_per_image():
    fmap = fmap_of(b=3, c=4, h=3, w=4)
    knn = KNNGraph(k=3)
    a = knn(fmap).edge_index
    fmap2 = fmap.clone()
    fmap2[1] = torch.randn(4, 3, 4) * 10
    b = knn(fmap2).edge_index
    per = 12 * 3
    assert torch.equal(a[:, :per], b[:, :per]) and torch.equal(a[:, 2 * per :], b[:, 2 * per :])
    assert not torch.equal(a[:, per : 2 * per], b[:, per : 2 * per])


@pytest.mark.parametrize("weight", ["gaussian", "inverse_distance"])
def test_knn_distance_edge_weights_have_gradient(weight):
    fmap = fmap_of(b=2, c=3, h=3, w=3).requires_grad_()
    g = KNNGraph(k=2, edge_weight=weight, sigma=2.0)(fmap)
    flat = g.x.reshape(-1, 3).detach().double()
    d = (flat[g.edge_index[0]] - flat[g.edge_index[1]]).norm(dim=-1)
    expected = torch.exp(-(d**2) / 4.0) if weight == "gaussian" else 1 / (1 + d)
    torch.testing.assert_close(g.edge_weight.double(), expected, rtol=1e-5, atol=1e-6)
    g.edge_weight.sum().backward()
    assert bool(fmap.grad.abs().sum() > 0)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_knn_continuous_weights_match_their_formula(metric):
    fmap = fmap_of(b=2, c=4, h=4, w=4, seed=5).requires_grad_()
    g = KNNGraph(k=3, metric=metric, edge_weight="continuous")(fmap)
    x = g.x.detach().double()
    if metric == "cosine":
        x = F.normalize(x, dim=-1)
    dist = torch.cdist(x, x) ** 2 if metric == "euclidean" else 1 - x @ x.transpose(1, 2)
    dist = dist + torch.diag(torch.full((16,), math.inf, dtype=torch.float64))
    ranked = brute_force_knn(g.x, 4, metric, 1, False)  # the 3 neighbours, then the cut node
    assert torch.equal(g.neighbors, ranked[..., :3])  # the same neighbours as with edge_weight="ones"
    d = dist.gather(2, ranked)
    raw = (d[..., 3:] - d[..., :3]).clamp_min(0) + 1e-6
    torch.testing.assert_close(g.neighbor_weight.double(), raw / raw.sum(-1, keepdim=True), rtol=1e-4, atol=1e-5)
    assert torch.equal(g.edge_weight.view(2, 16, 3), g.neighbor_weight)
    g.edge_weight.pow(2).sum().backward()
    assert bool(fmap.grad.abs().sum() > 0)


def test_knn_continuous_weights_change_continuously_when_a_neighbour_is_swapped():
    # node 0 at the origin; nodes 1 and 2 at distance 1, node 3 at 2 ± t, node 4 at 2 ∓ t: with k = 3
    # the third neighbour changes from node 3 to node 4 as t crosses 0, and node 3 carries a value
    # (its feature) far from node 4's
    def message(t, weight):
        pts = torch.tensor([[0.0, 0], [1, 0], [0, 1], [2 + t, 0], [0, -(2 - t)], [9, 9]])
        fmap = pts.T.reshape(1, 2, 2, 3)
        g = KNNGraph(k=3, edge_weight=weight)(fmap)
        values = torch.tensor([0.0, 0, 0, 10, -10, 0])  # what each node would send
        return (g.neighbor_weight[0, 0] * values[g.neighbors[0, 0]]).sum()

    for t in (1e-3, 1e-5):
        assert abs(message(t, "continuous") - message(-t, "continuous")) < 1e3 * t
        assert abs(message(t, "ones") - message(-t, "ones")) == 20  # the usual kNN graph jumps


def test_knn_continuous_weights_need_one_node_beyond_k():
    KNNGraph(k=3, edge_weight="continuous")(fmap_of(b=1, c=2, h=1, w=5))  # k + 1 = N - 1
    with pytest.raises(ValueError, match=r"^k=4 \(× dilation=1\) is out of range for a 1×5 map with N=5 nodes: edge_weight=.continuous. needs the \(k·dilation \+ 1\)-th nearest, so k·dilation must be in \[1, 3\]$"):
        KNNGraph(k=4, edge_weight="continuous")(fmap_of(b=1, c=2, h=1, w=5))


def test_knn_small_graphs():
    g = KNNGraph(k=1, self_loops=True)(fmap_of(b=1, c=2, h=1, w=1))
    assert g.edge_index.tolist() == [[0], [0]]
    g = KNNGraph(k=3)(fmap_of(b=1, c=2, h=2, w=2))  # k = N - 1: every other node
    assert edge_set(g.edge_index) == {(j, i) for i in range(4) for j in range(4) if i != j}


# ---------------------------------------------------------------------------------------------
# GraphToCNN
# ---------------------------------------------------------------------------------------------
def node_major(x):
    """``[B, N, C]`` with contiguous rows of C (what a GNN layer returns)."""
    return x.contiguous()


def channel_major(x):
    """The same values as a ``[B, N, C]`` view of a contiguous ``[B, C, N]`` (what the interconnects return)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


LAYOUTS = [pytest.param(node_major, id="node_major"), pytest.param(channel_major, id="channel_major")]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reduce, value", [("mean", 2.0), ("sum", 4.0), ("max", 3.0)])
def test_graph_to_cnn_two_nodes_in_one_cell(reduce, value, layout):
    x = layout(torch.tensor([[[1.0, 10.0], [3.0, 30.0]]]))
    pos = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    out = GraphToCNN(reduce)(x, pos, size=(2, 2))
    assert out.shape == (1, 2, 2, 2)
    assert out[0, 0].tolist() == [[0.0, 0.0], [value, 0.0]]
    assert out[0, 1].tolist() == [[0.0, 0.0], [10 * value, 0.0]]


def test_graph_to_cnn_positions_round_to_cells():
    out = GraphToCNN()(torch.tensor([[[5.0]]]), torch.tensor([[[0.6, 1.4]]]), size=(2, 2))
    assert out[0, 0].tolist() == [[0.0, 0.0], [0.0, 5.0]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_graph_to_cnn_empty_cells_zero_or_skip(layout):
    x = layout(torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]))
    pos = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]])
    skip = torch.full((1, 2, 2, 2), -1.0)
    for reduce, first in [("mean", [2.0, 3.0]), ("sum", [4.0, 6.0]), ("max", [3.0, 4.0])]:
        out = GraphToCNN(reduce)(x, pos, size=(2, 2))
        assert out[0, :, 0, 0].tolist() == first and int((out != 0).sum()) == 2
        with_skip = GraphToCNN(reduce)(x, pos, size=(2, 2), skip=skip)
        assert with_skip[0, :, 0, 0].tolist() == first
        assert bool((with_skip.flatten(2)[..., 1:] == -1).all())
    negative = GraphToCNN("max")(-x, pos, size=(1, 1))
    assert negative.flatten().tolist() == [-1.0, -2.0]  # an occupied cell keeps a negative maximum


@pytest.mark.parametrize("layout", LAYOUTS)
def test_graph_to_cnn_gradient(layout):
    x = layout(torch.tensor([[[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]]])).requires_grad_()
    pos = torch.tensor([[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]])
    GraphToCNN("mean")(x, pos, size=(2, 2)).sum().backward()
    assert x.grad[0, :, 0].tolist() == [0.5, 0.5, 1.0]
    x.grad = None
    GraphToCNN("max")(x, pos, size=(2, 2)).sum().backward()
    assert x.grad[0, :, 0].tolist() == [0.0, 1.0, 1.0]
    x.grad = None
    skip = torch.zeros(1, 2, 2, 2, requires_grad=True)
    GraphToCNN("sum")(x, pos, size=(2, 2), skip=skip).sum().backward()
    assert x.grad[0, :, 0].tolist() == [1.0, 1.0, 1.0] and skip.grad[0, 0].flatten().tolist() == [0.0, 1.0, 1.0, 0.0]


def test_graph_to_cnn_accepts_graph_batch_and_validates():
    fmap = fmap_of(b=2, c=3, h=3, w=3)
    g = DenseGrid()(fmap)
    assert torch.equal(GraphToCNN()(g), GraphToCNN()(g.x, g.pos, g.size))
    with pytest.raises(ValueError, match=r"pos has nodes outside the 3×3 map: rows must be in \[0, 2\]"):
        GraphToCNN()(g.x, g.pos + 1, size=(3, 3))
    with pytest.raises(ValueError, match="needs pos"):
        GraphToCNN()(g.x)
    with pytest.raises(ValueError, match=r"skip must be \[B, C, h, w\]"):
        GraphToCNN()(g, skip=torch.zeros(2, 3, 2, 2))
    with pytest.raises(ValueError, match=r"reduce='median'.*'mean'"):
        GraphToCNN("median")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_graph_to_cnn_mean_counts_many_nodes_in_low_precision(layout):
    x = layout(torch.ones(1, 600, 2, dtype=torch.bfloat16))
    out = GraphToCNN("mean")(x, torch.zeros(1, 600, 2), size=(1, 1))
    assert out.dtype == torch.bfloat16 and out.flatten().tolist() == [1.0, 1.0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduce", ["mean", "sum", "max"])
def test_graph_to_cnn_layouts_agree(reduce, dtype):
    b, n, c, h, w = 3, 10, 4, 3, 3
    x = torch.randn(b, n, c).to(dtype)
    pos = torch.stack([torch.randint(0, h, (b, n)), torch.randint(0, w, (b, n))], -1).float()
    g = torch.randn(b, c, h, w).to(dtype)
    results = []
    for layout in (node_major, channel_major):
        leaf = layout(x).detach().requires_grad_()
        out = GraphToCNN(reduce)(leaf, pos, size=(h, w))
        out.backward(g)
        results.append((out, leaf.grad))
    (out_a, grad_a), (out_b, grad_b) = results
    assert out_a.dtype == dtype and out_a.shape == (b, c, h, w)
    torch.testing.assert_close(out_a, out_b)
    torch.testing.assert_close(grad_a, grad_b)


# ---------------------------------------------------------------------------------------------
# Round trips: every device, every dtype, small shapes
# ---------------------------------------------------------------------------------------------
def round_trip_modules():
    return {
        "inverse_distance": DenseGrid(edges="inverse_distance"),
        "gaussian": DenseGrid(edges="gaussian"),
        "grid4": DenseGrid(edges="grid4"),
        "grid8": DenseGrid(edges="grid8"),
        "learned": DenseGrid(edges="learned", hidden=4),
        "knn": KNNGraph(k=2),
        "knn_cosine_dilated": KNNGraph(k=2, metric="cosine", dilation=2),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(round_trip_modules()))
def test_round_trip_is_exact(name, dtype, device):
    module = round_trip_modules()[name].to(device)
    fmap = fmap_of(b=2, c=3, h=3, w=4, dtype=dtype, device=device)
    g = module(fmap)
    assert g.x.dtype == dtype and g.x.device.type == device
    out = GraphToCNN()(g)
    assert out.dtype == dtype and torch.equal(out, fmap)
    for reduce in ("sum", "max"):
        assert torch.equal(GraphToCNN(reduce)(g), fmap)
    edge_dtype = g.adj.dtype if g.adj is not None else g.edge_weight.dtype
    assert edge_dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_keypoints_round_trip_is_exact(dtype, device):
    fmap = fmap_of(b=2, c=3, h=4, w=4, dtype=dtype, device=device)
    keypoints = torch.tensor([[[0, 0], [15, 15], [8, 3]], [[1, 1], [4, 12], [12, 4]]], device=device)
    g = Keypoints(3, select="given", image_size=(16, 16)).to(device)(fmap, keypoints)
    out = GraphToCNN()(g)
    cells = (keypoints[..., 0] * 4 // 16) * 4 + keypoints[..., 1] * 4 // 16
    mask = torch.zeros(2, 16, dtype=torch.bool, device=device)
    mask[torch.arange(2, device=device)[:, None], cells] = True
    mask = mask.view(2, 1, 4, 4)
    assert out.dtype == dtype and torch.equal(out, fmap * mask)
    assert torch.equal(GraphToCNN()(g, skip=fmap), fmap)
    # topk with the learned score conv, in float32 or not; K = N covers every cell
    full = Keypoints(16).to(device)(fmap)
    assert full.x.dtype == dtype and full.adj.dtype == dtype
    covered = GraphToCNN("sum")(full.replace(x=torch.ones_like(full.x)))
    assert torch.equal(covered, torch.ones_like(fmap))


@pytest.mark.parametrize("device", DEVICES)
def test_single_image_single_cell(device):
    fmap = fmap_of(b=1, c=3, h=1, w=1, device=device)
    for module in round_trip_modules().values():
        if isinstance(module, KNNGraph):
            continue  # one node has no other node to join
        assert torch.equal(GraphToCNN()(module.to(device)(fmap)), fmap)
    assert torch.equal(GraphToCNN()(KNNGraph(k=1, self_loops=True)(fmap)), fmap)
    g = Keypoints(1, select="given", image_size=(5, 5)).to(device)(fmap, torch.tensor([[[4, 4]]], device=device))
    assert torch.equal(GraphToCNN()(g), fmap)


# ---------------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------------
def test_bad_arguments_at_construction():
    with pytest.raises(ValueError, match=r"num_keypoints=0 .*≥ 1"):
        Keypoints(num_keypoints=0)
    with pytest.raises(ValueError, match=r"num_keypoints=-3 .*≥ 1"):
        Keypoints(num_keypoints=-3)
    with pytest.raises(ValueError, match=r"select='best' .*'topk', 'given', 'detector', 'random', 'lattice'"):
        Keypoints(4, select="best")
    with pytest.raises(ValueError, match=r"edges='full' .*'inverse_distance', 'gaussian', 'knn'"):
        Keypoints(4, edges="full")
    with pytest.raises(ValueError, match=r"edges='ring' .*'inverse_distance', 'gaussian', 'grid4', 'grid8', 'learned'"):
        DenseGrid(edges="ring")
    with pytest.raises(ValueError, match=r"k=4 .*\[1, 3\]"):
        Keypoints(4, edges="knn", k=4)
    with pytest.raises(ValueError, match=r"image_size=None"):
        Keypoints(4, select="given")
    for k in (0, -1):
        with pytest.raises(ValueError, match=rf"k={k} .*≥ 1"):
            KNNGraph(k=k)
    with pytest.raises(ValueError, match=r"dilation=0 .*≥ 1"):
        KNNGraph(k=2, dilation=0)
    with pytest.raises(ValueError, match=r"metric='manhattan' .*'euclidean', 'cosine'"):
        KNNGraph(metric="manhattan")
    with pytest.raises(ValueError, match=r"sigma=0 .*> 0"):
        DenseGrid(edges="gaussian", sigma=0)


def test_bad_arguments_at_call():
    fmap = fmap_of(b=2, c=3, h=3, w=3)
    with pytest.raises(ValueError, match=r"num_keypoints=10 .*3×3.*\[1, 9\]"):
        Keypoints(10)(fmap)
    with pytest.raises(ValueError, match=r"k=9 .*N=9.*\[1, 8\]"):
        KNNGraph(k=9)(fmap)
    with pytest.raises(ValueError, match=r"k=12 .*N=9.*\[1, 8\]"):
        KNNGraph(k=12)(fmap)
    with pytest.raises(ValueError, match=r"k=3 \(× dilation=3\).*\[1, 8\]"):
        KNNGraph(k=3, dilation=3)(fmap)
    for module in (DenseGrid(), KNNGraph(k=2), Keypoints(2)):
        with pytest.raises(ValueError, match=r"fmap must be a 4-D tensor \[B, C, h, w\], got \(3, 3, 3\)"):
            module(fmap[0])
    kp = Keypoints(2, select="given", image_size=(28, 28))
    with pytest.raises(ValueError, match=r"keypoints outside the image: rows must be in \[0, 27\] and cols in \[0, 27\]"):
        kp(fmap, torch.tensor([[[0, 0], [28, 3]], [[1, 1], [2, 2]]]))
    with pytest.raises(ValueError, match=r"keypoints outside the image"):
        kp(fmap, torch.tensor([[[0, -1], [3, 3]], [[1, 1], [2, 2]]]))
    with pytest.raises(ValueError, match=r"keypoints batch size 3 differs from fmap's batch size 2"):
        kp(fmap, torch.zeros(3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"keypoints has 3 points per image; num_keypoints=2"):
        kp(fmap, torch.zeros(2, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"select='given' is the Python API's mode: it needs keypoints \[B, K, 2\].*interconnect.select=detector"):
        kp(fmap)
    with pytest.raises(ValueError, match=r"scores must be \[B, 1, h, w\]"):
        Keypoints(2)(fmap, scores=torch.zeros(2, 3, 3))


# ---------------------------------------------------------------------------------------------
# No Python loop over the batch or over nodes
# ---------------------------------------------------------------------------------------------
class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def ops_in(fn):
    with CountOps() as counter:
        fn()
    return counter.count


@pytest.mark.parametrize(
    "make, call",
    [
        (lambda: DenseGrid(), lambda m, f: GraphToCNN()(m(f))),
        (lambda: DenseGrid(edges="grid8"), lambda m, f: GraphToCNN()(m(f))),
        (lambda: DenseGrid(edges="learned", hidden=4), lambda m, f: GraphToCNN()(m(f))),
        (lambda: KNNGraph(k=3), lambda m, f: GraphToCNN()(m(f))),
        (lambda: Keypoints(4, in_channels=3), lambda m, f: GraphToCNN()(m(f))),
        (lambda: Keypoints(4, edges="knn", k=2, select="random"), lambda m, f: GraphToCNN()(m(f))),
        (
            lambda: Keypoints(4, select="given", image_size=(32, 32)),
            lambda m, f: GraphToCNN()(m(f, torch.randint(0, 32, (f.shape[0], 4, 2)))),
        ),
    ],
)
def test_forward_op_count_does_not_grow_with_batch_or_nodes(make, call):
    module = make()
    small, large = fmap_of(b=2, c=3, h=3, w=3), fmap_of(b=6, c=3, h=6, w=8)
    call(module, small), call(module, large)  # build caches and lazy parameters first
    assert ops_in(lambda: call(module, small)) == ops_in(lambda: call(module, large))


def test_forward_paths_have_no_python_loops():
    import interconnects._edges as edges_mod
    import interconnects.graph as graph_mod
    import interconnects.grid as grid_mod
    import interconnects.keypoints as keypoints_mod
    import interconnects.knn as knn_mod
    import interconnects.to_cnn as to_cnn_mod

    # the loop over blocks of the kNN distance matrix (and the list of those blocks), bounding
    # memory; the search for the lattice's shape; the stable sorts by each of a few ranking keys
    allowed = {"knn_indices": 1, "_distance_blocks": 3, "lattice_cells": 1, "top_cells": 1}
    loops = {}
    for module in (edges_mod, graph_mod, grid_mod, keypoints_mod, knn_mod, to_cnn_mod):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found = [n for n in ast.walk(node) if isinstance(n, (ast.For, ast.While, ast.comprehension))]
                if found:
                    loops[node.name] = len(found)
    assert loops == allowed


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------
def test_dense_grid_and_graph_to_cnn_under_torch_compile():
    grid, back = DenseGrid(), GraphToCNN()

    def step(fmap):
        g = grid(fmap)
        mixed = torch.bmm(g.adj.expand(fmap.shape[0], -1, -1), g.x)
        return back(g.replace(x=mixed)), back(g)

    compiled = torch.compile(step, fullgraph=True)
    fmap = fmap_of(b=2, c=3, h=3, w=3)
    mixed, same = compiled(fmap)
    eager_mixed, _ = step(fmap)
    assert torch.equal(same, fmap)
    torch.testing.assert_close(mixed, eager_mixed)
