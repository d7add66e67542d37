"""GNN heads: a stack of graph layers over a :class:`~interconnects.graph.GraphBatch`.

Every layer is a small module taking plain tensors::

    layer(x [B, N, C], adj [B|1, N, N] | None, edge_index [2, E] | None, edge_weight [E] | None)
        -> [B, N, C']

With ``adj`` given it runs the **dense** path: batched matrix products over ``[B, N, C]``, a shared
``[1, N, N]`` adjacency broadcast over the batch (one matrix product for the whole batch, never B
copies of it). Otherwise it runs the **sparse** path on the flat ``[B·N, C]`` view with
``edge_index`` over flat node ids ``b·N + n`` (``edge_weight`` defaults to ones). Both paths compute
the same function of the same parameters; ``adj[b, i, j] != 0`` is an edge ``j → i`` with weight
``adj[b, i, j]``.

Layers whose dense form needs a tensor per edge and channel (``gat``, ``gatedgcn``, ``maxrel`` on an
incomplete graph) build it for a block of target rows at a time, ``[B, rows, N, C']`` of at most
``max_bytes``, and recompute each block in the backward pass when training (activation
checkpointing), so their memory stays bounded; their compute is still ``O(B·N²·C')`` on a complete
graph.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .._edges import check_choice
from ..graph import GraphBatch

GNN_LAYERS = ("gcn", "graphconv", "sage", "gat", "gin", "gatedgcn", "maxrel", "propagate", "none")
GNN_NORMS = ("batch", "layer", None)
ACTIVATIONS = ("relu", "gelu", "silu", "elu", "leaky_relu", "tanh", "identity")

#: Default bound, in bytes, of one block of a dense per-edge tensor (see the module docstring).
DENSE_BLOCK_BYTES = 2**28

__all__ = [
    "GNN_LAYERS",
    "GNN_NORMS",
    "ACTIVATIONS",
    "GNNHead",
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
def dense_sum(adj: Tensor, x: Tensor) -> Tensor:
    """``adj @ x``: ``adj [B|1, N, N]``, ``x [B, N, C]`` → ``[B, N, C]``, node ``i`` gets ``Σ_j adj[i, j]·x_j``.

    A shared ``[1, N, N]`` adjacency is applied as one ``[N, N] @ [N, B·C]`` product.
    """
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


def _weight_or_ones(edge_index: Tensor, edge_weight: Tensor | None, like: Tensor) -> Tensor:
    if edge_weight is not None:
        return edge_weight
    return torch.ones(edge_index.shape[1], dtype=like.dtype, device=like.device)


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
    """Base of the graph layers: dispatches to :meth:`dense` or :meth:`sparse`.

    ``forward(x [B, N, C], adj [B|1, N, N] | None, edge_index [2, E] | None, edge_weight [E] | None)
    -> [B, N, out_channels]``; the dense path runs whenever ``adj`` is given.
    """

    in_channels: int
    out_channels: int

    def forward(
        self,
        x: Tensor,
        adj: Tensor | None = None,
        edge_index: Tensor | None = None,
        edge_weight: Tensor | None = None,
    ) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, N, C], got shape {tuple(x.shape)}")
        if adj is not None:
            return self.dense(x, adj)
        if edge_index is None:
            raise ValueError("a graph layer needs edges: give adj [B|1, N, N] or edge_index [2, E]")
        b, n, c = x.shape
        out = self.sparse(x.reshape(b * n, c), edge_index, edge_weight)
        return out.reshape(b, n, out.shape[-1])

    def dense(self, x: Tensor, adj: Tensor) -> Tensor:
        """``x [B, N, C]``, ``adj [B|1, N, N]`` → ``[B, N, C']``."""
        raise NotImplementedError

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        """``x [B·N, C]``, ``edge_index [2, E]``, ``edge_weight [E] | None`` → ``[B·N, C']``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"


class GCNLayer(GraphLayer):
    """Graph convolution (Kipf & Welling): ``X' = D^-1/2 Â D^-1/2 X W + b``, ``[B, N, C] -> [B, N, C']``.

    ``Â`` is the adjacency with its remaining self-loops added (a node's own non-zero self-loop
    weight is kept, a missing one becomes 1) and ``D`` the row sums of ``|Â|`` (in-degrees; the
    absolute value keeps a learned adjacency with negative weights finite). Dense: the
    normalisation is done once on ``adj [B|1, N, N]`` (once for the whole batch when shared), then
    one matrix product. Sparse: the same normalisation of ``edge_weight``, then
    ``torch_geometric.nn.GCNConv`` (``normalize=False``) whose ``lin`` and ``bias`` both paths use.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv

        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = GCNConv(in_channels, out_channels, add_self_loops=False, normalize=False)

    @staticmethod
    def normalize_dense(adj: Tensor) -> Tensor:
        """``D^-1/2 Â D^-1/2`` of ``adj [B|1, N, N]`` with remaining self-loops added."""
        diag = adj.diagonal(dim1=-2, dim2=-1)
        adj = adj + torch.diag_embed((diag == 0).to(adj.dtype))
        inv_sqrt = adj.abs().sum(-1).clamp_min(1e-12).pow(-0.5)
        return inv_sqrt.unsqueeze(-1) * adj * inv_sqrt.unsqueeze(-2)

    @staticmethod
    def normalize_sparse(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
        """The same normalisation on flat edges: ``(edge_index [2, E'], edge_weight [E'])`` with loops."""
        src, dst = edge_index
        is_loop = src == dst
        loop_weight = torch.ones(num_nodes, dtype=edge_weight.dtype, device=edge_weight.device)
        loop_weight[src[is_loop]] = edge_weight[is_loop]
        loops = torch.arange(num_nodes, device=edge_index.device)
        keep = ~is_loop
        src = torch.cat([src[keep], loops])
        dst = torch.cat([dst[keep], loops])
        weight = torch.cat([edge_weight[keep], loop_weight])
        deg = torch.zeros(num_nodes, dtype=weight.dtype, device=weight.device).index_add_(0, dst, weight.abs())
        inv_sqrt = deg.clamp_min(1e-12).pow(-0.5)
        return torch.stack([src, dst]), inv_sqrt[src] * weight * inv_sqrt[dst]

    def dense(self, x: Tensor, adj: Tensor) -> Tensor:
        out = dense_sum(self.normalize_dense(adj), self.conv.lin(x))
        return out + self.conv.bias

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        weight = _weight_or_ones(edge_index, edge_weight, x)
        edge_index, weight = self.normalize_sparse(edge_index, weight, x.shape[0])
        return self.conv(x, edge_index, weight)


class GraphConvLayer(GraphLayer):
    """GraphConv (Morris et al.): ``x_i' = W_rel Σ_j a_ij x_j + b + W_root x_i``, ``[B, N, C] -> [B, N, C']``.

    Sparse: ``torch_geometric.nn.GraphConv`` (``aggr="add"``, with ``edge_weight``). Dense: the
    same ``lin_rel`` / ``lin_root``, projecting before the ``adj`` product when that is narrower.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        from torch_geometric.nn import GraphConv

        self.in_channels, self.out_channels = in_channels, out_channels
        self.conv = GraphConv(in_channels, out_channels, aggr="add")

    def dense(self, x: Tensor, adj: Tensor) -> Tensor:
        rel = self.conv.lin_rel
        if self.out_channels < self.in_channels:
            agg = dense_sum(adj, F.linear(x, rel.weight)) + rel.bias
        else:
            agg = rel(dense_sum(adj, x))
        return agg + self.conv.lin_root(x)

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        return self.conv(x, edge_index, edge_weight)


class SAGELayer(GraphLayer):
    """GraphSAGE with a weighted mean: ``x_i' = W_l (Σ_j a_ij x_j / Σ_j |a_ij|) + b + W_r x_i``.

    ``[B, N, C] -> [B, N, C']``. ``torch_geometric.nn.SAGEConv`` takes no edge weights (and
    ``DenseSAGEConv`` divides by ``max(Σ_j a_ij, 1)``, which is no mean for weights below one), so
    both paths use this module's own weighted mean; with unit weights it is SAGEConv's mean
    aggregation. A node without in-edges aggregates 0.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.lin_l = nn.Linear(in_channels, out_channels)
        self.lin_r = nn.Linear(in_channels, out_channels, bias=False)

    def dense(self, x: Tensor, adj: Tensor) -> Tensor:
        denom = adj.abs().sum(-1, keepdim=True).clamp_min(1e-12)
        return self.lin_l(dense_sum(adj / denom, x)) + self.lin_r(x)

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
    ``N = 784``, ``B = 32``, ``C' = 64`` the whole tensor would be about 5 GB in float32.
    """

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

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, out_channels), nn.ReLU(), nn.Linear(out_channels, out_channels)
        )
        self.eps = nn.Parameter(torch.zeros(()))

    def dense(self, x: Tensor, adj: Tensor) -> Tensor:
        return self.mlp((1 + self.eps) * x + dense_sum(adj, x))

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        return self.mlp((1 + self.eps) * x + sparse_sum(x, edge_index, edge_weight))


class GatedGCNLayer(GraphLayer):
    """Residual gated graph conv (Bresson & Laurent) with the edge weight as an edge feature.

    ``[B, N, C] -> [B, N, C']``. For an edge ``j → i`` with weight ``a_ij``:
    ``η_ij = σ(K [x_i, a_ij] + Q [x_j, a_ij])``, ``x_i' = Σ_j η_ij ⊙ V [x_j, a_ij] + W_skip x_i + b``.
    Sparse: ``torch_geometric.nn.ResGatedGraphConv(edge_dim=1)`` with ``edge_attr = edge_weight``.
    Dense: the same parameters split into node and edge parts, gates masked to ``adj != 0``; it
    builds ``[B, rows, N, C']`` for blocks of target rows of at most ``max_bytes``.
    """

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


class MaxRelLayer(GraphLayer):
    """Max-relative graph conv (Vision GNN): ``x_i' = W [x_i, max_{j→i} (x_j − x_i)] + b``.

    ``[B, N, C] -> [B, N, C']``. Edges only: the weights are not used (as in Vision GNN), an edge is
    ``adj != 0``; a node without in-edges gets a zero max. Sparse: ``scatter_reduce("amax")`` on
    the flat view. Dense: ``max_j x_j`` over the masked neighbours minus ``x_i`` (the same
    numbers); a complete graph is a plain max over the nodes, otherwise it builds
    ``[B, rows, N, C]`` for blocks of target rows of at most ``max_bytes``.
    """

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
    """Parameter-free propagation ``A·x``: ``[B, N, C] -> [B, N, C]``, ``x_i' = Σ_j a_ij x_j``.

    Dense: ``adj @ x``; sparse: the weighted sum by ``index_add_``. Followed by a Linear it is the
    one-layer "Linear applied to A·x" model.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = self.out_channels = in_channels

    def extra_repr(self) -> str:
        return f"{self.in_channels}"

    def dense(self, x: Tensor, adj: Tensor) -> Tensor:
        return dense_sum(adj, x)

    def sparse(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        return sparse_sum(x, edge_index, edge_weight)


class IdentityLayer(GraphLayer):
    """The no-GNN ablation: ``[B, N, C] -> [B, N, C]`` unchanged."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = self.out_channels = in_channels

    def extra_repr(self) -> str:
        return f"{self.in_channels}"

    def forward(self, x, adj=None, edge_index=None, edge_weight=None) -> Tensor:
        return x


# ---- the head -----------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} is out of range; it must be an integer ≥ {minimum}")


def _activation(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "silu": nn.SiLU,
        "elu": nn.ELU,
        "leaky_relu": nn.LeakyReLU,
        "tanh": nn.Tanh,
        "identity": nn.Identity,
    }[name]()


class _NodeNorm(nn.Module):
    """Normalisation of node features ``[B, N, C]``: BatchNorm over the ``B·N`` nodes, or LayerNorm."""

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(channels) if kind == "batch" else nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm, (nn.BatchNorm1d, nn.SyncBatchNorm)):  # (SyncBatchNorm: under torchrun)
            return self.norm(x.reshape(-1, x.shape[-1])).view(x.shape)
        return self.norm(x)


class GNNHead(nn.Module):
    """A stack of graph layers: ``GraphBatch -> GraphBatch`` with ``x [B, N, out_channels]``.

    Each layer is ``conv → norm → activation → dropout``, plus the layer's input when
    ``residual`` and the shapes match (the first layer projects ``in_channels → hidden_channels``
    and has no residual unless the two are equal). The dense path runs whenever ``graph.adj`` is
    set (complete graphs are never turned into an ``edge_index``), else the sparse path on
    ``graph.edge_index`` / ``graph.edge_weight``.

    Args:
        in_channels: node feature channels of the incoming graphs.
        layer: one of :data:`GNN_LAYERS`. ``propagate`` (``A·x`` applied ``num_layers`` times) and
            ``none`` (identity, ``num_layers`` ignored) have no parameters and skip norm,
            activation, dropout and residual, so ``out_channels = in_channels`` and the output is
            exactly ``Aᴸ·x`` (or ``x``).
        hidden_channels: width of every layer, and ``out_channels`` for the layers with weights.
        num_layers: depth (≥ 1).
        residual: add each layer's input to its output where the shapes match.
        norm: ``"batch"`` (BatchNorm over the ``B·N`` nodes), ``"layer"`` or ``None``.
        dropout: feature dropout after each layer's activation, in ``[0, 1)``.
        heads: attention heads of ``gat`` (concatenated when they divide ``hidden_channels``,
            averaged otherwise).
        act: one of :data:`ACTIVATIONS`.
    """

    def __init__(
        self,
        in_channels: int,
        layer: str = "gcn",
        hidden_channels: int = 64,
        num_layers: int = 2,
        residual: bool = True,
        norm: str | None = "batch",
        dropout: float = 0.0,
        heads: int = 4,
        act: str = "relu",
    ) -> None:
        super().__init__()
        check_choice("layer", layer, GNN_LAYERS)
        _check_int("in_channels", in_channels, 1)
        _check_int("hidden_channels", hidden_channels, 1)
        _check_int("num_layers", num_layers, 0 if layer == "none" else 1)
        _check_int("heads", heads, 1)
        check_choice("norm", norm, GNN_NORMS)
        check_choice("act", act, ACTIVATIONS)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout={dropout!r} is out of range; it must be a number in [0, 1)")
        self.layer, self.in_channels, self.hidden_channels = layer, in_channels, hidden_channels
        self.residual, self.norm_kind, self.act_name, self.dropout_p = residual, norm, act, float(dropout)

        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        self.plain = layer in ("propagate", "none")
        if layer == "none":
            self.num_layers = 0
            self.out_channels = in_channels
        elif layer == "propagate":
            self.num_layers = num_layers
            self.out_channels = in_channels
            self.convs.extend(Propagate(in_channels) for _ in range(num_layers))
        else:
            self.num_layers = num_layers
            self.out_channels = hidden_channels
            channels = in_channels
            for _ in range(num_layers):
                self.convs.append(self._make_layer(layer, channels, hidden_channels, heads))
                self.norms.append(_NodeNorm(norm, hidden_channels) if norm is not None else nn.Identity())
                channels = hidden_channels
        self.act = _activation(act)
        self.drop = nn.Dropout(dropout)

    @staticmethod
    def _make_layer(layer: str, c_in: int, c_out: int, heads: int) -> GraphLayer:
        layers = {"gcn": GCNLayer, "graphconv": GraphConvLayer, "sage": SAGELayer, "gin": GINLayer,
                  "gatedgcn": GatedGCNLayer, "maxrel": MaxRelLayer}
        if layer == "gat":
            return GATv2Layer(c_in, c_out, heads=heads)
        if layer in layers:
            return layers[layer](c_in, c_out)
        raise ValueError(f"layer={layer!r} is not supported; choose one of {', '.join(map(repr, GNN_LAYERS))}")

    def extra_repr(self) -> str:
        return (
            f"layer={self.layer!r}, in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"num_layers={self.num_layers}, residual={self.residual}, norm={self.norm_kind!r}, "
            f"act={self.act_name!r}, dropout={self.dropout_p}"
        )

    def forward(self, graph: GraphBatch) -> GraphBatch:
        """``graph`` with ``x [B, N, in_channels]`` → the same graph with ``x [B, N, out_channels]``."""
        if graph.num_channels != self.in_channels:
            raise ValueError(
                f"GNNHead expects {self.in_channels} input channels (in_channels), got x of shape "
                f"{tuple(graph.x.shape)}"
            )
        if not self.convs:
            return graph
        adj = graph.adj
        edge_index = edge_weight = None
        if adj is None:
            edge_index, edge_weight = graph.edge_index, graph.edge_weight
        x = graph.x
        if self.plain:
            for conv in self.convs:
                x = conv(x, adj, edge_index, edge_weight)
            return graph.replace(x=x)
        for conv, norm in zip(self.convs, self.norms):
            h = self.drop(self.act(norm(conv(x, adj, edge_index, edge_weight))))
            x = h + x if self.residual and h.shape == x.shape else h
        return graph.replace(x=x)
