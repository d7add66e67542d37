"""GNN heads: shapes, gradients, dense ≡ sparse, batch independence and argument checks."""

from __future__ import annotations

import pytest
import torch

from interconnects import DenseGrid, GraphBatch, KNNGraph
from interconnects.models.gnn import GNN_LAYERS, GNNHead

# torch_geometric's import calls the deprecated torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:FutureWarning")

B, H, W, C = 2, 3, 3, 8
N = H * W
HIDDEN = 8
# every layer computes the same function on both paths
EQUAL_LAYERS = GNN_LAYERS


def _pos(b: int = B) -> torch.Tensor:
    rows = torch.arange(H).repeat_interleave(W)
    cols = torch.arange(W).repeat(H)
    return torch.stack([rows, cols], -1).float().expand(b, N, 2)


def shared_graph(seed: int = 0) -> GraphBatch:
    """Complete graph, ``adj [1, N, N]`` with inverse-distance weights and self-loops of 2."""
    torch.manual_seed(seed)
    fmap = torch.randn(B, C, H, W)
    return DenseGrid("inverse_distance", self_loop_weight=2.0)(fmap)


def per_image_graph(seed: int = 0) -> GraphBatch:
    """``adj [B, N, N]``: random positive weights on about half the pairs, some self-loops, one node
    of image 0 with no in-edges."""
    torch.manual_seed(seed)
    x = torch.randn(B, N, C)
    keep = torch.rand(B, N, N) < 0.5
    adj = (torch.rand(B, N, N) + 0.1) * keep
    adj[0, 4] = 0.0
    return GraphBatch(x=x, pos=_pos(), size=(H, W), adj=adj)


def sparse_graph(seed: int = 0) -> GraphBatch:
    """kNN graph, ``edge_index`` over the batch with Gaussian weights of the feature distance."""
    torch.manual_seed(seed)
    return KNNGraph(k=3, edge_weight="gaussian", sigma=4.0)(torch.randn(B, C, H, W))


def as_sparse(graph: GraphBatch) -> GraphBatch:
    edge_index, edge_weight = graph.sparse_edges()
    return GraphBatch(x=graph.x, pos=graph.pos, size=graph.size, edge_index=edge_index, edge_weight=edge_weight)


def as_dense(graph: GraphBatch) -> GraphBatch:
    return GraphBatch(x=graph.x, pos=graph.pos, size=graph.size, adj=graph.dense_adj())


def with_x(graph: GraphBatch, x: torch.Tensor) -> GraphBatch:
    return graph.replace(x=x)


GRAPHS = {"shared": shared_graph, "per_image": per_image_graph, "sparse": sparse_graph}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_head(layer: str, **kwargs) -> GNNHead:
    torch.manual_seed(1)
    kwargs.setdefault("hidden_channels", HIDDEN)
    return GNNHead(C, layer, **kwargs)


@pytest.mark.parametrize("kind", list(GRAPHS))
@pytest.mark.parametrize("layer", GNN_LAYERS)
def test_forward_backward(layer, kind):
    graph = GRAPHS[kind]()
    assert (graph.adj is not None) == (kind != "sparse")
    if kind == "shared":
        assert graph.adj.shape == (1, N, N)
    x = graph.x.clone().requires_grad_(True)
    head = make_head(layer, num_layers=2, dropout=0.1)
    out = head(with_x(graph, x))
    expected = C if layer in ("propagate", "none") else HIDDEN
    assert head.out_channels == expected
    assert out.x.shape == (B, N, expected)
    assert out.adj is graph.adj and out.edge_index is graph.edge_index
    assert torch.isfinite(out.x).all()
    (out.x * torch.randn_like(out.x)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    params = list(head.parameters())
    assert bool(params) == (layer not in ("propagate", "none"))
    for name, p in head.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("kind", ["shared", "per_image"])
@pytest.mark.parametrize("layer", EQUAL_LAYERS)
def test_dense_equals_sparse(layer, kind):
    dense = GRAPHS[kind]()
    sparse = as_sparse(dense)
    assert sparse.adj is None
    head_d = make_head(layer, num_layers=2)
    head_s = GNNHead(C, layer, hidden_channels=HIDDEN, num_layers=2)
    head_s.load_state_dict(head_d.state_dict())
    x_d = dense.x.clone().requires_grad_(True)
    x_s = dense.x.clone().requires_grad_(True)
    out_d = head_d(with_x(dense, x_d)).x
    out_s = head_s(with_x(sparse, x_s)).x
    torch.testing.assert_close(out_d, out_s, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out_d)
    (out_d * grad).sum().backward()
    (out_s * grad).sum().backward()
    torch.testing.assert_close(x_d.grad, x_s.grad, rtol=1e-4, atol=1e-5)
    # a bias right before batch norm has a zero gradient up to rounding: compare on the model's scale
    scale = max((p.grad.abs().max().item() for p in head_d.parameters()), default=1.0)
    for (name, p_d), p_s in zip(head_d.named_parameters(), head_s.parameters()):
        torch.testing.assert_close(p_d.grad, p_s.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("layer", EQUAL_LAYERS)
def test_sparse_graph_equals_its_dense_adjacency(layer):
    sparse = sparse_graph()
    dense = as_dense(sparse)
    assert dense.adj.shape == (B, N, N)
    head = make_head(layer, num_layers=2, norm="layer")
    torch.testing.assert_close(head(dense).x, head(sparse).x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", ["gat", "gatedgcn", "maxrel"])
def test_dense_row_blocks_match_one_block(layer):
    graph = per_image_graph()
    head = make_head(layer, num_layers=2, norm=None)
    x = graph.x.clone().requires_grad_(True)
    whole = head(with_x(graph, x)).x
    grads_whole = torch.autograd.grad(whole.sum(), [x, *head.parameters()])
    for conv in head.convs:
        conv.max_bytes = 1  # one target row per block, each checkpointed
    blocks = head(with_x(graph, x)).x
    grads_blocks = torch.autograd.grad(blocks.sum(), [x, *head.parameters()])
    torch.testing.assert_close(whole, blocks)
    for g_w, g_b in zip(grads_whole, grads_blocks):
        torch.testing.assert_close(g_w, g_b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", list(GRAPHS))
@pytest.mark.parametrize("layer", GNN_LAYERS)
def test_batch_independence(layer, kind):
    graph = GRAPHS[kind]()
    if kind == "sparse":
        # keep image 0's edges fixed: the kNN edges depend on the features
        graph = GraphBatch(x=graph.x, pos=graph.pos, size=graph.size, edge_index=graph.edge_index,
                           edge_weight=graph.edge_weight.detach())
    head = make_head(layer, num_layers=2, norm=None)
    out = head(graph).x
    x2 = graph.x.clone()
    x2[1] = torch.randn_like(x2[1]) * 3
    out2 = head(with_x(graph, x2)).x
    torch.testing.assert_close(out[0], out2[0])
    if layer != "none":
        assert not torch.allclose(out[1], out2[1])


def test_batch_independence_with_batch_norm_in_eval():
    graph = per_image_graph()
    head = make_head("gcn", norm="batch").eval()
    x2 = graph.x.clone()
    x2[1] += 5.0
    torch.testing.assert_close(head(graph).x[0], head(with_x(graph, x2)).x[0])


@pytest.mark.parametrize("kind", list(GRAPHS))
def test_propagate_is_adjacency_times_x(kind):
    graph = GRAPHS[kind]()
    adj = graph.dense_adj()
    one = GNNHead(C, "propagate", num_layers=1)
    two = GNNHead(C, "propagate", num_layers=2)
    assert one.out_channels == C and not list(one.parameters())
    ax = torch.matmul(adj, graph.x)
    torch.testing.assert_close(one(graph).x, ax)
    torch.testing.assert_close(two(graph).x, torch.matmul(adj, ax))


def test_none_is_identity():
    graph = sparse_graph()
    head = GNNHead(C, "none", num_layers=0)
    assert head.out_channels == C
    assert head(graph).x is graph.x


def test_residual_and_layer_count():
    graph = per_image_graph()
    plain = make_head("gcn", num_layers=3, residual=False, norm=None, act="identity")
    res = make_head("gcn", num_layers=3, residual=True, norm=None, act="identity")
    assert len(res.convs) == 3 and len(res.norms) == 3
    res.load_state_dict(plain.state_dict())
    assert not torch.allclose(plain(graph).x, res(graph).x)
    # in == hidden: the first layer has a residual too
    same = GNNHead(C, "gin", hidden_channels=C, num_layers=1, norm=None, act="identity")
    conv_out = same.convs[0](graph.x, graph.adj)
    torch.testing.assert_close(same(graph).x, conv_out + graph.x)


@pytest.mark.parametrize("layer", GNN_LAYERS)
def test_autocast_bfloat16(layer):
    for graph in (shared_graph(), sparse_graph()):
        head = make_head(layer, num_layers=2, norm="layer")
        ref = head(graph).x
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(graph).x
        assert out.shape == ref.shape
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
        if out.requires_grad:
            out.float().sum().backward()


def test_gat_heads_concat_or_average():
    concat = GNNHead(C, "gat", hidden_channels=8, heads=4, num_layers=1)
    average = GNNHead(C, "gat", hidden_channels=6, heads=4, num_layers=1)
    assert concat.convs[0].conv.concat and concat.convs[0].conv.out_channels == 2
    assert not average.convs[0].conv.concat and average.convs[0].conv.out_channels == 6
    graph = shared_graph()
    assert concat(graph).x.shape == (B, N, 8)
    assert average(graph).x.shape == (B, N, 6)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"layer": "transformer"}, "layer"),
        ({"layer": "gcn", "num_layers": 0}, "num_layers"),
        ({"layer": "propagate", "num_layers": 0}, "num_layers"),
        ({"layer": "none", "num_layers": -1}, "num_layers"),
        ({"layer": "gcn", "num_layers": 1.5}, "num_layers"),
        ({"layer": "gcn", "hidden_channels": 0}, "hidden_channels"),
        ({"layer": "gcn", "dropout": 1.0}, "dropout"),
        ({"layer": "gcn", "dropout": -0.1}, "dropout"),
        ({"layer": "gcn", "norm": "group"}, "norm"),
        ({"layer": "gcn", "act": "swish"}, "act"),
        ({"layer": "gat", "heads": 0}, "heads"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        GNNHead(C, **kwargs)


def test_bad_arguments_list_accepted_values():
    with pytest.raises(ValueError, match="gatedgcn"):
        GNNHead(C, "transformer")
    with pytest.raises(ValueError, match="'layer'"):
        GNNHead(C, "gcn", norm="group")


def test_none_accepts_zero_layers_and_wrong_channels_raise():
    assert GNNHead(C, "none", num_layers=0).num_layers == 0
    with pytest.raises(ValueError, match="in_channels"):
        GNNHead(C + 1, "gcn")(shared_graph())


# ---- the layer table and user layers ------------------------------------------------------------
class SumConv(torch.nn.Module):
    """A user's layer following the contract: ``Linear(x + A·x)`` on the dense path only."""

    supports_sparse = False

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.lin = torch.nn.Linear(in_channels, out_channels)

    def forward(self, x, adj, edge_index, edge_weight):
        return self.lin(x + torch.matmul(adj, x))


def test_layer_table_is_the_one_source():
    from interconnects.models.layers import LAYERS, resolve_layer

    assert GNN_LAYERS == tuple(LAYERS)
    for name, cls in LAYERS.items():
        assert resolve_layer(name) is cls
    assert resolve_layer("interconnects.models.layers.GINLayer") is LAYERS["gin"]


def test_dotted_path_user_layer():
    head = GNNHead(C, "interconnects.models.layers.GINLayer", hidden_channels=HIDDEN, num_layers=2)
    assert isinstance(head.convs[0], type(GNNHead(C, "gin").convs[0]))
    # a user's class without the flags: default dense + sparse, weights, norm and residual built
    user = GNNHead(C, SumConv, hidden_channels=HIDDEN, num_layers=2, norm=None, act="identity", residual=False)
    graph = sparse_graph()  # only sparse edges: the dense-only layer gets the dense adjacency
    adj = graph.dense_adj()
    first = user.convs[0].lin(graph.x + adj @ graph.x)
    torch.testing.assert_close(user(graph).x, user.convs[1].lin(first + adj @ first))


@pytest.mark.parametrize(
    "layer, message",
    [
        ("torch.nn.Linear", "missing adj, edge_index, edge_weight"),
        ("collections.OrderedDict", "not an nn.Module class"),
        ("nowhere_pkg.layers.Conv", "cannot be imported"),
        ("torch.nn.ReLU", "constructor must take"),
        ("transformer", "dotted path"),
    ],
)
def test_dotted_path_errors_name_what_is_missing(layer, message):
    with pytest.raises(ValueError, match=message) as info:
        GNNHead(C, layer)
    assert f"layer={layer!r}" in str(info.value) and "\n" not in str(info.value)


def test_propagate_and_identity_are_one_layer():
    from interconnects.models.layers import IdentityLayer, Propagate

    assert issubclass(IdentityLayer, Propagate) and IdentityLayer.steps == 0
    graph = shared_graph()
    assert IdentityLayer(C)(graph.x, graph.adj) is graph.x
    torch.testing.assert_close(Propagate(C)(graph.x, graph.adj), torch.matmul(graph.adj, graph.x))


# ---- the fixed-degree (gather) path -------------------------------------------------------------
GATHER_LAYERS = [name for name in GNN_LAYERS if GNNHead(C, name).flags["supports_neighbors"]]


def test_gather_layers():
    assert {"gcn", "graphconv", "sage", "gin", "gatedgcn", "propagate"} <= set(GATHER_LAYERS)


@pytest.mark.parametrize("self_loops", [False, True])
@pytest.mark.parametrize("weights", ["ones", "gaussian"])
@pytest.mark.parametrize("layer", GATHER_LAYERS)
def test_gather_path_equals_flat_sparse_path(layer, weights, self_loops):
    torch.manual_seed(0)
    fmap = torch.randn(B, C, H, W)
    knn = KNNGraph(k=3, edge_weight=weights, sigma=4.0, self_loops=self_loops)
    head_g = make_head(layer, num_layers=2)
    head_s = make_head(layer, num_layers=2)
    head_s.load_state_dict(head_g.state_dict())
    fmap_g, fmap_s = fmap.clone().requires_grad_(True), fmap.clone().requires_grad_(True)
    graph = knn(fmap_g)
    assert graph.neighbors.shape == (B, N, 3) and graph.neighbors.dtype == torch.long
    flat = knn(fmap_s).replace(neighbors=None, neighbor_weight=None)
    out_g, out_s = head_g(graph).x, head_s(flat).x
    torch.testing.assert_close(out_g, out_s, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(out_g)
    (out_g * grad).sum().backward()
    (out_s * grad).sum().backward()
    # the input gradient includes the path through the Gaussian edge weights
    torch.testing.assert_close(fmap_g.grad, fmap_s.grad, rtol=1e-4, atol=1e-5)
    for (name, p_g), p_s in zip(head_g.named_parameters(), head_s.parameters()):
        torch.testing.assert_close(p_g.grad, p_s.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_neighbor_view_gives_the_same_edges():
    torch.manual_seed(0)
    graph = KNNGraph(k=3, edge_weight="gaussian")(torch.randn(B, C, H, W))
    lazy = graph.replace(edge_index=None, edge_weight=None)
    edge_index, edge_weight = lazy.sparse_edges()
    assert torch.equal(edge_index, graph.edge_index)
    torch.testing.assert_close(edge_weight, graph.edge_weight)
    torch.testing.assert_close(lazy.dense_adj(), graph.dense_adj())
    assert lazy.to_pyg().num_edges == B * N * 3


@pytest.mark.parametrize("weighted", [False, True])
def test_gatedgcn_gather_equals_sparse_on_a_region_graph(weighted):
    """The fixed-degree GatedGCN (per-node linears, then a gather) is the sparse ResGatedGraphConv
    on the same edges, values and gradients, an edge of weight 0 included; the head takes the
    gather (not the N×N dense adjacency) for a small graph."""
    from interconnects.models.gnn import layer_inputs
    from interconnects.models.layers import GatedGCNLayer

    torch.manual_seed(0)
    b, n, k, c, co = 3, 20, 5, 6, 7
    x = torch.randn(b, n, c)
    nbr = torch.rand(b, n, n).masked_fill(torch.eye(n, dtype=torch.bool), 2.0).topk(k, -1, largest=False).indices
    weight = torch.rand(b, n, k) if weighted else None
    if weighted:
        weight[0, 3, 1] = 0.0  # an edge of weight 0 is still an edge on both paths
    layer = GatedGCNLayer(c, co)
    x_g, x_s = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w_g = w_s = None
    if weighted:
        w_g, w_s = weight.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    out_g = layer(x_g, neighbors=nbr, neighbor_weight=w_g)
    graph = GraphBatch(x=x, pos=torch.zeros(b, n, 2), size=(4, 5), neighbors=nbr, neighbor_weight=weight)
    edge_index, _ = graph.sparse_edges()
    edge_weight = w_s.reshape(-1) if weighted else None
    grads_g = torch.autograd.grad((out_g * torch.linspace(-1, 1, co)).sum(), [x_g, *layer.parameters()]
                                  + ([w_g] if weighted else []))
    out_s = layer(x_s, None, edge_index, edge_weight)
    grads_s = torch.autograd.grad((out_s * torch.linspace(-1, 1, co)).sum(), [x_s, *layer.parameters()]
                                  + ([w_s] if weighted else []))
    assert out_g.shape == (b, n, co)
    torch.testing.assert_close(out_g, out_s, rtol=1e-4, atol=1e-5)
    for g_g, g_s in zip(grads_g, grads_s):
        torch.testing.assert_close(g_g, g_s, rtol=1e-4, atol=1e-5)
    flags = GNNHead(c, "gatedgcn", hidden_channels=co).flags
    adj, edges, _, view = layer_inputs(flags, graph)
    assert adj is None and edges is None and view["neighbors"] is nbr
