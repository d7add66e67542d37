"""Graph layers and the aggregation helpers they share.

The layer contract (also for layers users write themselves, see :func:`resolve_layer`): a layer is
an ``nn.Module`` built as ``Layer(in_channels, out_channels)`` and called as::

    layer(x [B, N, C], adj [B|1, N, N] | None, edge_index [2, E] | None, edge_weight [E] | None)
        -> [B, N, C']

With ``adj`` given it runs the **dense** path: batched matrix products over ``[B, N, C]``, a shared
``[1, N, N]`` adjacency broadcast over the batch (one matrix product for the whole batch, never B
copies of it). Otherwise it runs the **sparse** path on the flat ``[B·N, C]`` view with
``edge_index`` over flat node ids ``b·N + n`` (``edge_weight`` defaults to ones). Both paths compute
the same function of the same parameters; ``adj[b, i, j] != 0`` is an edge ``j → i`` with weight
``adj[b, i, j]``.

Two faster inputs are given only to layers whose class declares them (class attributes, read by
:class:`~interconnects.models.gnn.GNNHead`):

* ``supports_operator``: ``adj`` may be an adjacency *operator* instead of a tensor, e.g. the FFT
  convolution of a distance grid (:class:`~interconnects.fft.GridConvolution`), which computes
  ``A·X`` without the ``N × N`` matrix. Layers that only aggregate with ``A`` (``dense_sum``) get it.
* ``supports_neighbors``: the keyword arguments ``neighbors [B, N, k]`` (per-image node ids) and
  ``neighbor_weight [B, N, k]`` of a graph with a fixed in-degree ``k`` (kNN): the aggregation is a
  gather of ``[B, N, k, C]`` and a weighted sum, whose backward is one ``index_add_``, instead of a
  scatter over the flat edge list.

Layers whose dense form needs a tensor per edge and channel (``gat``, ``gatedgcn``, ``maxrel`` on an
incomplete graph) take the plain dense ``adj`` (an operator is turned into its matrix for them) and
build the per-edge tensor for a block of target rows at a time, ``[B, rows, N, C']`` of at most
``max_bytes``, recomputing each block in the backward pass when training (activation
checkpointing), so their memory stays bounded; their compute is still ``O(B·N²·C')`` on a complete
graph.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._edges import add_remaining_self_loops, inverse_sqrt_degree, normalize_sparse

#: Default bound, in bytes, of one block of a dense per-edge tensor (see the module docstring).
DENSE_BLOCK_BYTES = 2**28

__all__ = [
    "DENSE_BLOCK_BYTES",
    "LAYERS",
    "GNN_LAYERS",
    "resolve_layer",
    "layer_flags",
    "dense_sum",
    "sparse_sum",
    "neighbor_sum",
    "GraphLayer",
    "GCNLayer",
    "GraphConvLayer",
    "SAGELayer",
    "GATv2Layer",
    "GINLayer",
    "GatedGCNLayer",
    "MaxRelLayer",
    "Propagate",
    "IdentityLayer",
]


# ---- shared aggregation helpers -----------------------------------------------------------------
def is_operator(adj) -> bool:
    """Whether ``adj`` is an adjacency operator (has ``matmul``) rather than a dense tensor."""
    return adj is not None and not isinstance(adj, Tensor)


def dense_sum(adj, x: Tensor) -> Tensor:
    """``adj @ x``: ``adj [B|1, N, N]`` (or an adjacency operator), ``x [B, N, C]`` → ``[B, N, C]``,
    node ``i`` gets ``Σ_j adj[i, j]·x_j``.

    A shared ``[1, N, N]`` adjacency is applied as one ``[N, N] @ [N, B·C]`` product; an operator
    through its own ``matmul``.
    """
    if is_operator(adj):
        return adj.matmul(x)
    adj = adj.to(x.dtype)
    b, n, c = x.shape
    if adj.shape[0] == 1 and b > 1:
        out = adj[0] @ x.transpose(0, 1).reshape(n, b * c)
        return out.view(n, b, c).transpose(0, 1)
    return torch.matmul(adj, x)


def sparse_sum(x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
    """Weighted sum over in-edges on the flat view: ``x [M, C]`` → ``[M, C]``, ``out_i = Σ_{j→i} w·x_j``."""
    src, dst = edge_index
    msg = x.index_select(0, src)
    if edge_weight is not None:
        msg = msg * edge_weight.to(x.dtype).unsqueeze(-1)
    return torch.zeros_like(x).index_add_(0, dst, msg)


def neighbor_sum(x: Tensor, neighbors: Tensor, weight: Tensor | None) -> Tensor:
    """Weighted sum over a fixed number of in-neighbours: ``x [B, N, C]``, ``neighbors [B, N, k]``
    (per-image node ids), ``weight [B, N, k] | None`` → ``[B, N, C]``, ``out_i = Σ_k w_ik·x_{n_ik}``.

    One gather of ``[B·N·k, C]`` rows and a batched ``[1, k] @ [k, C]`` product per node; the
    backward of the gather is one ``index_add_`` (no scatter over an expanded index).
    """
    b, n, c = x.shape
    k = neighbors.shape[-1]
    offsets = torch.arange(b, device=x.device).mul_(n).view(b, 1, 1)
    rows = x.reshape(b * n, c).index_select(0, (neighbors + offsets).reshape(-1)).view(b * n, k, c)
    if weight is None:
        return rows.sum(1).view(b, n, c)
    return torch.bmm(weight.to(x.dtype).reshape(b * n, 1, k), rows).view(b, n, c)


def _weight_or_ones(edge_index: Tensor, edge_weight: Tensor | None, like: Tensor) -> Tensor:
    if edge_weight is not None:
        return edge_weight
    return torch.ones(edge_index.shape[1], dtype=like.dtype, device=like.device)


def _neighbor_weight_or_ones(neighbors: Tensor, weight: Tensor | None, like: Tensor) -> Tensor:
    if weight is not None:
        return weight.to(like.dtype)
    return torch.ones(neighbors.shape, dtype=like.dtype, device=like.device)


def _row_blocks(fn: Callable[[int, int], Tensor], n: int, row_bytes: int, max_bytes: int, grad: bool) -> Tensor:
    """``fn(start, end) -> [B, end - start, ...]`` over blocks of target rows, concatenated on dim 1.

    Blocks hold at most ``max_bytes // row_bytes`` rows (at least one); with more than one block and
    ``grad`` set, each block is checkpointed so its per-edge intermediates are not kept for backward.
    """
    rows = max(1, min(n, max_bytes // max(row_bytes, 1)))
    if rows >= n:
        return fn(0, n)
    outs = []
    for start in range(0, n, rows):
        end = min(n, start + rows)
        if grad:
            outs.append(checkpoint(fn, start, end, use_reentrant=False))
        else:
            outs.append(fn(start, end))
    return torch.cat(outs, dim=1)


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---- layers -------------------------------------------------------------------------------------
class GraphLayer(nn.Module):
    """Base of the graph layers: dispatches to :meth:`gather`, :meth:`dense` or :meth:`sparse`.

    ``forward(x [B, N, C], adj [B|1, N, N] | operator | None, edge_index [2, E] | None,
    edge_weight [E] | None, *, neighbors [B, N, k] | None, neighbor_weight [B, N, k] | None)
    -> [B, N, out_channels]``: the fixed-degree path runs when ``neighbors`` is given, else the
    dense path when ``adj`` is, else the sparse path.

    Class attributes say what a layer supports; :class:`~interconnects.models.gnn.GNNHead` reads
    them to choose its inputs (user layers not derived from this class get the defaults of
    :func:`layer_flags`).
    """

    supports_dense = True  #: takes ``adj [B|1, N, N]``
    supports_sparse = True  #: takes ``edge_index`` / ``edge_weight``
    supports_edge_weight = True  #: uses the edge weights (else only which edges exist)
    supports_operator = False  #: takes an adjacency operator with ``matmul`` as ``adj``
    supports_neighbors = False  #: takes ``neighbors`` / ``neighbor_weight`` (fixed in-degree)
    has_weights = True  #: has parameters; the head adds norm, activation, dropout and residual
    min_layers = 1  #: the fewest layers a head of this kind may stack
    per_edge = False  #: its dense path builds a tensor per edge and channel (O(B·N²·C) on a complete graph)

    in_channels: int
    out_channels: int

    def forward(
        self,
        x: Tensor,
        adj=None,
        edge_index: Tensor | None = None,
        edge_weight: Tensor | None = None,
        *,
        neighbors: Tensor | None = None,
        neighbor_weight: Tensor | None = None,
    ) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, N, C], got shape {tuple(x.shape)}")
        if neighbors is not None:
            return self.gather(x, neighbors, neighbor_weight)
        if adj is not None:
            return self.dense(x, adj)
        if edge_index is None:
            raise ValueError("a graph layer needs edges: give adj [B|1, N, N] or edge_index [2, E]")
        b, n, c = x.shape
        out = self.sparse(x.reshape(b * n, c), edge_index, edge_weight)
        return out.reshape(b, n, out.shape[-1])

    def dense(self, x: Tensor, adj) -> Tensor:
        """``x [B, N, C]``, ``adj [B|1, N, N]`` (or an operator) → ``[B, N, C']``."""
        raise NotImplementedError

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """``x [B·N, C]``, ``edge_index [2, E]``, ``edge_weight [E] | None`` → ``[B·N, C']``."""
        raise NotImplementedError

    def gather(self, x: Tensor, neighbors: Tensor, neighbor_weight: Tensor | None) -> Tensor:
        """``x [B, N, C]``, ``neighbors [B, N, k]``, ``neighbor_weight [B, N, k] | None`` → ``[B, N, C']``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"


class GCNLayer(GraphLayer):
    """Graph convolution (Kipf & Welling): ``X' = D^-1/2 Â D^-1/2 X W + b``, ``[B, N, C] -> [B, N, C']``.

    ``Â`` is the adjacency with its remaining self-loops added (a node's own non-zero self-loop
    weight is kept, a missing one becomes 1) and ``D`` the row sums of ``|Â|`` (in-degrees; the
    absolute value keeps a learned adjacency with negative weights finite). Dense: the degrees are
    the row sums of ``|adj [B|1, N, N]|`` and the scaling is done on the node features, around one
    matrix product (an adjacency operator is normalised itself, once, and cached). Sparse:
    the same normalisation of ``edge_weight``, then ``torch_geometric.nn.GCNConv``
    (``normalize=False``) whose ``lin`` and ``bias`` every path uses. Fixed degree: the same
    normalisation of ``neighbor_weight``, a gather and a weighted sum. The normalisation is the
    shared ``D^-1/2 A D^-1/2`` of :mod:`interconnects._edges` with ``eps = 0``.
    """

    supports_operator = True
    supports_neighbors = True

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = GCNConv(in_channels, out_channels, add_self_loops=False, normalize=False)

    @staticmethod
    def normalize_operator(adj):
        """``D^-1/2 Â D^-1/2`` of an adjacency operator with remaining self-loops added (built once
        per operator, then cached)."""
        return adj.cached("gcn", lambda: _normalize_operator(adj.add_diagonal((adj.diagonal() == 0).float())))

    @staticmethod
    def normalize_edges(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
        """The same normalisation on flat edges: ``(edge_index [2, E'], edge_weight [E'])`` with loops."""
        edge_index, weight = add_remaining_self_loops(edge_index, edge_weight, num_nodes)
        return edge_index, normalize_sparse(edge_index, weight, num_nodes, eps=0.0)

    @staticmethod
    def normalize_neighbors(neighbors: Tensor, weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The same normalisation for a fixed degree: ``neighbors [B, N, k]``, ``weight [B, N, k]`` →
        ``(inv_sqrt_degree [B, N], weight [B, N, k] without self-loops, self-loop weight [B, N])``.

        A self entry of non-zero weight is the node's self-loop (zero-weight entries are padding);
        a node without one gets a loop of weight 1.
        """
        n = neighbors.shape[1]
        is_self = neighbors == torch.arange(n, device=neighbors.device).view(1, n, 1)
        self_weight = weight * is_self
        loop = self_weight.sum(-1)
        loop = torch.where((self_weight != 0).any(-1), loop, torch.ones_like(loop))
        weight = weight.masked_fill(is_self, 0.0)
        return inverse_sqrt_degree(weight.abs().sum(-1) + loop.abs(), eps=0.0), weight, loop

    def dense(self, x: Tensor, adj) -> Tensor:
        h = self.conv.lin(x)
        if is_operator(adj):
            return dense_sum(self.normalize_operator(adj), h) + self.conv.bias
        # the normalisation on the node side: D^-1/2 Â D^-1/2 h = s ⊙ (A (s ⊙ h) + loop ⊙ s ⊙ h), with
        # s = D^-1/2 and loop the added self-loops: one pass over the N×N matrix (its |row| sums)
        # besides the product, instead of building the normalised matrix
        loop = (adj.diagonal(dim1=-2, dim2=-1) == 0).to(h.dtype)  # [B|1, N]
        adj = adj.to(h.dtype)
        scale = inverse_sqrt_degree(adj.abs().sum(-1) + loop, eps=0.0).unsqueeze(-1)
        scaled = h * scale
        return scale * (dense_sum(adj, scaled) + loop.unsqueeze(-1) * scaled) + self.conv.bias

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        weight = _weight_or_ones(edge_index, edge_weight, x)
        edge_index, weight = self.normalize_edges(edge_index, weight, x.shape[0])
        return self.conv(x, edge_index, weight)

    def gather(self, x: Tensor, neighbors: Tensor, neighbor_weight: Tensor | None) -> Tensor:
        weight = _neighbor_weight_or_ones(neighbors, neighbor_weight, x)
        scale, weight, loop = self.normalize_neighbors(neighbors, weight)
        h = self.conv.lin(x)
        scale = scale.unsqueeze(-1).to(h.dtype)
        out = scale * neighbor_sum(h * scale, neighbors, weight) + (scale * scale * loop.unsqueeze(-1)) * h
        return out + self.conv.bias


class GraphConvLayer(GraphLayer):
    """GraphConv (Morris et al.): ``x_i' = W_rel Σ_j a_ij x_j + b + W_root x_i``, ``[B, N, C] -> [B, N, C']``.

    Sparse: ``torch_geometric.nn.GraphConv`` (``aggr="add"``, with ``edge_weight``). Dense: the
    same ``lin_rel`` / ``lin_root``, projecting before the ``adj`` product when that is narrower
    (also with an adjacency operator or a fixed degree).
    """

    supports_operator = True
    supports_neighbors = True

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        from torch_geometric.nn import GraphConv

        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = GraphConv(in_channels, out_channels, aggr="add")

    def _combine(self, x: Tensor, aggregate: Callable[[Tensor], Tensor]) -> Tensor:
        rel = self.conv.lin_rel
        if self.out_channels < self.in_channels:
            agg = aggregate(F.linear(x, rel.weight)) + rel.bias
        else:
            agg = rel(aggregate(x))
        return agg + self.conv.lin_root(x)

    def dense(self, x: Tensor, adj) -> Tensor:
        return self._combine(x, lambda v: dense_sum(adj, v))

    def gather(self, x: Tensor, neighbors: Tensor, neighbor_weight: Tensor | None) -> Tensor:
        return self._combine(x, lambda v: neighbor_sum(v, neighbors, neighbor_weight))

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        return self.conv(x, edge_index, edge_weight)


class SAGELayer(GraphLayer):
    """GraphSAGE with a weighted mean: ``x_i' = W_l (Σ_j a_ij x_j / Σ_j |a_ij|) + b + W_r x_i``.

    ``[B, N, C] -> [B, N, C']``. ``torch_geometric.nn.SAGEConv`` takes no edge weights (and
    ``DenseSAGEConv`` divides by ``max(Σ_j a_ij, 1)``, which is no mean for weights below one), so
    both paths use this module's own weighted mean; with unit weights it is SAGEConv's mean
    aggregation. A node without in-edges aggregates 0.
    """

    supports_operator = True
    supports_neighbors = True

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.lin_l = nn.Linear(in_channels, out_channels)
        self.lin_r = nn.Linear(in_channels, out_channels, bias=False)

    def dense(self, x: Tensor, adj) -> Tensor:
        if is_operator(adj):
            mean = adj.cached("mean", lambda: adj.scale(adj.abs_row_sums().clamp_min(1e-12).reciprocal(), None))
        else:
            mean = adj / adj.abs().sum(-1, keepdim=True).clamp_min(1e-12)
        return self.lin_l(dense_sum(mean, x)) + self.lin_r(x)

    def gather(self, x: Tensor, neighbors: Tensor, neighbor_weight: Tensor | None) -> Tensor:
        weight = _neighbor_weight_or_ones(neighbors, neighbor_weight, x)
        weight = weight / weight.abs().sum(-1, keepdim=True).clamp_min(1e-12)
        return self.lin_l(neighbor_sum(x, neighbors, weight)) + self.lin_r(x)

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        weight = _weight_or_ones(edge_index, edge_weight, x)
        dst = edge_index[1]
        denom = torch.zeros(x.shape[0], dtype=weight.dtype, device=weight.device).index_add_(0, dst, weight.abs())
        weight = weight / denom.clamp_min(1e-12)[dst]
        return self.lin_l(sparse_sum(x, edge_index, weight)) + self.lin_r(x)


class GATv2Layer(GraphLayer):
    """GATv2 attention (Brody et al.) with the edge weight as a one-dimensional edge feature.

    ``[B, N, C] -> [B, N, C']``. For an edge ``j → i`` with weight ``a_ij`` and head ``h``:
    ``e_ij = attᵀ LeakyReLU(W_r x_i + W_l x_j + W_e a_ij)``, softmax over ``i``'s in-neighbours,
    ``x_i' = Σ_j α_ij W_l x_j`` (heads concatenated to ``C'`` when ``heads`` divides it, else
    averaged) ``+ b``. Self-loops are replaced by one per node whose weight is the mean of the
    node's other in-edge weights (GATv2Conv's ``fill_value="mean"``).

    Sparse: ``torch_geometric.nn.GATv2Conv(edge_dim=1)`` with ``edge_attr = edge_weight``. Dense:
    the same parameters, attention masked to ``adj != 0`` (plus the diagonal); it builds
    ``[B, rows, N, heads, C'/heads]`` for blocks of target rows of at most ``max_bytes`` — at
    ``N = 784``, ``B = 32``, ``C' = 64`` the whole tensor would be about 5 GB in float32. Needs
    per-edge tensors: an FFT grid is given to it as its dense matrix.
    """

    per_edge = True

    def __init__(self, in_channels: int, out_channels: int, heads: int = 4, max_bytes: int = DENSE_BLOCK_BYTES) -> None:
        super().__init__()
        from torch_geometric.nn import GATv2Conv

        self.in_channels, self.out_channels, self.max_bytes = in_channels, out_channels, max_bytes
        concat = out_channels % heads == 0
        per_head = out_channels // heads if concat else out_channels
        self.conv = GATv2Conv(in_channels, per_head, heads=heads, concat=concat, edge_dim=1)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, heads={self.conv.heads}, concat={self.conv.concat}"

    def dense(self, x: Tensor, adj: Tensor) -> Tensor:
        conv = self.conv
        b, n, _ = x.shape
        h, c = conv.heads, conv.out_channels
        x_l = conv.lin_l(x).view(b, n, h, c)
        x_r = conv.lin_r(x).view(b, n, h, c)
        # self-loops: drop the existing ones, add one per node weighted by the mean of its in-edges
        eye = torch.eye(n, dtype=torch.bool, device=adj.device)
        off = (adj != 0) & ~eye
        loop = (adj * off).sum(-1) / off.sum(-1).clamp_min(1)
        weight = adj.masked_fill(eye, 0) + torch.diag_embed(loop)
        mask = off | eye
        w_edge = conv.lin_edge.weight.view(h, c).to(x_l.dtype)
        att = conv.att.view(h, c).to(x_l.dtype)
        weight = weight.to(x_l.dtype)

        def block(start: int, end: int) -> Tensor:
            s = x_r[:, start:end, None] + x_l[:, None] + weight[:, start:end, :, None, None] * w_edge
            logit = torch.einsum("bijhc,hc->bijh", F.leaky_relu(s, conv.negative_slope), att)
            logit = logit.masked_fill(~mask[:, start:end, :, None], float("-inf"))
            alpha = torch.softmax(logit, dim=2)
            alpha = F.dropout(alpha, p=conv.dropout, training=self.training)
            return torch.einsum("bijh,bjhc->bihc", alpha, x_l)

        out = _row_blocks(block, n, b * n * h * c * x_l.element_size(), self.max_bytes, _needs_grad(x_l, weight))
        out = out.reshape(b, n, h * c) if conv.concat else out.mean(dim=2)
        if conv.res is not None:
            out = out + conv.res(x)
        return out + conv.bias

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        weight = _weight_or_ones(edge_index, edge_weight, x)
        return self.conv(x, edge_index, edge_attr=weight.unsqueeze(-1))


class GINLayer(GraphLayer):
    """GIN-ε with weighted sums: ``x_i' = MLP((1 + ε) x_i + Σ_j a_ij x_j)``, ``[B, N, C] -> [B, N, C']``.

    The MLP is ``Linear(C, C') → ReLU → Linear(C', C')``, ``ε`` is learned (starts at 0). Both paths
    use this module's weighted sum (``torch_geometric.nn.GINConv`` ignores edge weights; with unit
    weights the sparse path is GINConv's ``add`` aggregation; the dense path is DenseGINConv's).
    """

    supports_operator = True
    supports_neighbors = True

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, out_channels), nn.ReLU(), nn.Linear(out_channels, out_channels)
        )
        self.eps = nn.Parameter(torch.zeros(()))

    def dense(self, x: Tensor, adj) -> Tensor:
        return self.mlp((1 + self.eps) * x + dense_sum(adj, x))

    def gather(self, x: Tensor, neighbors: Tensor, neighbor_weight: Tensor | None) -> Tensor:
        return self.mlp((1 + self.eps) * x + neighbor_sum(x, neighbors, neighbor_weight))

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        return self.mlp((1 + self.eps) * x + sparse_sum(x, edge_index, edge_weight))


class GatedGCNLayer(GraphLayer):
    """Residual gated graph conv (Bresson & Laurent) with the edge weight as an edge feature.

    ``[B, N, C] -> [B, N, C']``. For an edge ``j → i`` with weight ``a_ij``:
    ``η_ij = σ(K [x_i, a_ij] + Q [x_j, a_ij])``, ``x_i' = Σ_j η_ij ⊙ V [x_j, a_ij] + W_skip x_i + b``.
    Sparse: ``torch_geometric.nn.ResGatedGraphConv(edge_dim=1)`` with ``edge_attr = edge_weight``.
    Dense: the same parameters split into node and edge parts, gates masked to ``adj != 0``; it
    builds ``[B, rows, N, C']`` for blocks of target rows of at most ``max_bytes``. Needs per-edge
    tensors: an FFT grid is given to it as its dense matrix. Fixed degree (kNN, superpixels): the
    three linears applied per node, then one gather of the sources' query and value rows,
    ``[B, N, k, 2C']``; every entry of ``neighbors`` is an edge, as on the sparse path.
    """

    per_edge = True
    supports_neighbors = True

    def __init__(self, in_channels: int, out_channels: int, max_bytes: int = DENSE_BLOCK_BYTES) -> None:
        super().__init__()
        from torch_geometric.nn import ResGatedGraphConv

        self.in_channels, self.out_channels, self.max_bytes = in_channels, out_channels, max_bytes
        self.conv = ResGatedGraphConv(in_channels, out_channels, edge_dim=1)

    def dense(self, x: Tensor, adj: Tensor) -> Tensor:
        conv, c = self.conv, self.in_channels
        b, n, _ = x.shape
        key = F.linear(x, conv.lin_key.weight[:, :c], conv.lin_key.bias)
        query = F.linear(x, conv.lin_query.weight[:, :c], conv.lin_query.bias)
        value = F.linear(x, conv.lin_value.weight[:, :c], conv.lin_value.bias)
        gate_edge = (conv.lin_key.weight[:, c] + conv.lin_query.weight[:, c]).to(key.dtype)
        value_edge = conv.lin_value.weight[:, c].to(value.dtype)
        mask = adj != 0
        weight = adj.to(key.dtype)

        def block(start: int, end: int) -> Tensor:
            w = weight[:, start:end, :, None]
            logit = key[:, start:end, None] + query[:, None] + w * gate_edge
            # sigmoid(-inf) = 0 removes the non-edges; for the default gate use the exact form
            if isinstance(conv.act, nn.Sigmoid):
                gate = torch.sigmoid(logit.masked_fill(~mask[:, start:end, :, None], float("-inf")))
            else:
                gate = conv.act(logit) * mask[:, start:end, :, None]
            out = torch.einsum("bijc,bjc->bic", gate, value)
            return out + torch.einsum("bijc,bij->bic", gate, weight[:, start:end].expand(b, -1, -1)) * value_edge

        out = _row_blocks(
            block, n, b * n * self.out_channels * key.element_size(), self.max_bytes, _needs_grad(key, weight)
        )
        if conv.lin_skip is not None:
            out = out + conv.lin_skip(x)
        if conv.bias is not None:
            out = out + conv.bias
        return out

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        weight = _weight_or_ones(edge_index, edge_weight, x)
        return self.conv(x, edge_index, edge_attr=weight.unsqueeze(-1).to(x.dtype))

    def gather(self, x: Tensor, neighbors: Tensor, neighbor_weight: Tensor | None) -> Tensor:
        """``x [B, N, C]``, ``neighbors [B, N, k]``, ``neighbor_weight [B, N, k] | None`` (ones) →
        ``[B, N, C']``: the key, query and value of every node by one product each, the query and
        value of each edge's source by one gather of ``[B·N·k, C']`` rows each (their backward one
        ``index_add_``). Unit weights (``None``) are folded into the node biases, so an edge costs
        only its gate; other weights add their share per edge."""
        conv, c = self.conv, self.in_channels
        b, n, _ = x.shape
        k, co = neighbors.shape[-1], self.out_channels
        gate_edge = conv.lin_key.weight[:, c] + conv.lin_query.weight[:, c]  # [C']
        value_edge = conv.lin_value.weight[:, c]
        key_bias, value_bias = conv.lin_key.bias, conv.lin_value.bias
        if neighbor_weight is None:  # a_ij = 1: the edge parts are constant, node biases
            key_bias = gate_edge if key_bias is None else key_bias + gate_edge
            value_bias = value_edge if value_bias is None else value_bias + value_edge
        key = F.linear(x, conv.lin_key.weight[:, :c], key_bias)  # [B, N, C']
        query = F.linear(x, conv.lin_query.weight[:, :c], conv.lin_query.bias)
        value = F.linear(x, conv.lin_value.weight[:, :c], value_bias)
        src = (neighbors + torch.arange(b, device=x.device).mul_(n).view(b, 1, 1)).reshape(-1)  # [B·N·k]
        query = query.reshape(b * n, co).index_select(0, src).view(b, n, k, co)
        value = value.reshape(b * n, co).index_select(0, src).view(b, n, k, co)
        logit = query + key.unsqueeze(2)  # [B, N, k, C']
        if neighbor_weight is not None:
            w = neighbor_weight.to(key.dtype).unsqueeze(-1)  # [B, N, k, 1]
            logit = logit.addcmul_(w, gate_edge.to(key.dtype))
            value = torch.addcmul(value, w, value_edge.to(value.dtype))
        out = (conv.act(logit) * value).sum(2)
        if conv.lin_skip is not None:
            out = out + conv.lin_skip(x)
        if conv.bias is not None:
            out = out + conv.bias
        return out


class MaxRelLayer(GraphLayer):
    """Max-relative graph conv (Vision GNN): ``x_i' = W [x_i, max_{j→i} (x_j − x_i)] + b``.

    ``[B, N, C] -> [B, N, C']``. Edges only: the weights are not used (as in Vision GNN), an edge is
    ``adj != 0``; a node without in-edges gets a zero max. Sparse: ``scatter_reduce("amax")`` on
    the flat view. Dense: ``max_j x_j`` over the masked neighbours minus ``x_i`` (the same
    numbers); a complete graph is a plain max over the nodes, otherwise it builds
    ``[B, rows, N, C]`` for blocks of target rows of at most ``max_bytes``. Needs per-edge tensors:
    an FFT grid is given to it as its dense matrix.
    """

    supports_edge_weight = False
    per_edge = True

    def __init__(self, in_channels: int, out_channels: int, max_bytes: int = DENSE_BLOCK_BYTES) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.max_bytes = in_channels, out_channels, max_bytes
        self.lin = nn.Linear(2 * in_channels, out_channels)

    def dense(self, x: Tensor, adj: Tensor) -> Tensor:
        b, n, c = x.shape
        mask = adj != 0
        if bool(mask.all()):
            rel = x.amax(dim=1, keepdim=True) - x
        else:
            has_edge = mask.any(-1, keepdim=True)

            def block(start: int, end: int) -> Tensor:
                vals = x[:, None].masked_fill(~mask[:, start:end, :, None], float("-inf"))
                return vals.amax(dim=2)

            top = _row_blocks(block, n, b * n * c * x.element_size(), self.max_bytes, _needs_grad(x))
            rel = torch.where(has_edge, top - x, torch.zeros((), dtype=x.dtype, device=x.device))
        return self.lin(torch.cat([x, rel], dim=-1))

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        src, dst = edge_index
        diff = x.index_select(0, src) - x.index_select(0, dst)
        index = dst.unsqueeze(-1).expand_as(diff)
        rel = torch.zeros_like(x).scatter_reduce(0, index, diff, reduce="amax", include_self=False)
        return self.lin(torch.cat([x, rel], dim=-1))


class Propagate(GraphLayer):
    """Parameter-free propagation ``A^steps·x``: ``[B, N, C] -> [B, N, C]``, one step ``x_i' = Σ_j a_ij x_j``.

    Dense: ``adj @ x`` (or the operator's ``matmul``); sparse: the weighted sum by ``index_add_``;
    fixed degree: a gather and weighted sum. Followed by a Linear it is the one-layer "Linear applied
    to A·x" model. :class:`IdentityLayer` is the same layer with zero steps.
    """

    supports_operator = True
    supports_neighbors = True
    has_weights = False
    steps = 1  #: applications of ``A`` per call

    def __init__(self, in_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        if out_channels is not None and out_channels != in_channels:
            raise ValueError(
                f"out_channels={out_channels!r} is out of range; {type(self).__name__} keeps the "
                f"{in_channels} input channels"
            )
        self.in_channels = self.out_channels = in_channels

    def extra_repr(self) -> str:
        return f"{self.in_channels}"

    def forward(self, x: Tensor, adj=None, edge_index=None, edge_weight=None, **neighbor_view) -> Tensor:
        for _ in range(self.steps):
            x = super().forward(x, adj, edge_index, edge_weight, **neighbor_view)
        return x

    def dense(self, x: Tensor, adj) -> Tensor:
        return dense_sum(adj, x)

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        return sparse_sum(x, edge_index, edge_weight)

    def gather(self, x: Tensor, neighbors: Tensor, neighbor_weight: Tensor | None) -> Tensor:
        return neighbor_sum(x, neighbors, neighbor_weight)


class IdentityLayer(Propagate):
    """The no-GNN ablation: ``[B, N, C] -> [B, N, C]`` unchanged (:class:`Propagate` with zero steps)."""

    steps = 0
    min_layers = 0


def _normalize_operator(op):
    """``D^-1/2 A D^-1/2`` of an adjacency operator (degrees from its ``abs_row_sums``)."""
    scale = inverse_sqrt_degree(op.abs_row_sums(), eps=0.0)
    return op.scale(scale, scale)


# ---- the table of layers ------------------------------------------------------------------------
#: Layer names (``gnn.layer=``) → classes: the one place a layer is registered.
LAYERS: dict[str, type[nn.Module]] = {
    "gcn": GCNLayer,
    "graphconv": GraphConvLayer,
    "sage": SAGELayer,
    "gat": GATv2Layer,
    "gin": GINLayer,
    "gatedgcn": GatedGCNLayer,
    "maxrel": MaxRelLayer,
    "propagate": Propagate,
    "none": IdentityLayer,
}
GNN_LAYERS = tuple(LAYERS)

_FLAGS = ("supports_dense", "supports_sparse", "supports_edge_weight", "supports_operator",
          "supports_neighbors", "has_weights", "min_layers", "per_edge")
_CONTRACT_ARGS = ("x", "adj", "edge_index", "edge_weight")


def layer_flags(cls: type) -> dict:
    """What a layer class supports: the :class:`GraphLayer` class attributes, with its defaults for a
    user's class that does not declare them (dense and sparse, edge weights, parameters, ≥ 1 layer;
    no operator, no fixed-degree view)."""
    return {name: getattr(cls, name, getattr(GraphLayer, name)) for name in _FLAGS}


def _choices() -> str:
    return ", ".join(map(repr, GNN_LAYERS)) + " or a dotted path to a layer class (mylab.layers.MyConv)"


def _check_contract(name: str, cls) -> None:
    """One-line ``ValueError`` naming what ``cls`` lacks of the layer contract."""
    where = f"layer={name!r}"
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{where} is not an nn.Module class (got {type(cls).__name__}); choose one of {_choices()}")
    try:
        inspect.signature(cls).bind(1, 1)
    except TypeError:
        raise ValueError(f"{where}: the constructor must take (in_channels, out_channels)") from None
    params = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < len(_CONTRACT_ARGS):
        missing = ", ".join(_CONTRACT_ARGS[len(positional):])
        raise ValueError(
            f"{where}: forward must take (x, adj, edge_index, edge_weight); it is missing {missing}"
        )


def resolve_layer(name) -> type[nn.Module]:
    """The layer class for ``name``: a key of :data:`LAYERS`, or a dotted path ``package.module.Class``
    (or a class) that follows the layer contract (see the module docstring). Raises a one-line
    ``ValueError`` naming ``layer=...`` and what would be accepted."""
    if isinstance(name, type):
        _check_contract(f"{name.__module__}.{name.__qualname__}", name)
        return name
    if isinstance(name, str) and name in LAYERS:
        return LAYERS[name]
    if isinstance(name, str) and "." in name.strip("."):
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"layer={name!r} cannot be imported ({exc}); choose one of {_choices()}") from None
        _check_contract(name, cls)
        return cls
    raise ValueError(f"layer={name!r} is not supported; choose one of {_choices()}")
