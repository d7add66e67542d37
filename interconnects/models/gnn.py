"""GNN heads: a stack of graph layers over a :class:`~interconnects.graph.GraphBatch`.

The layers, their contract and the table of layer names live in :mod:`interconnects.models.layers`;
this module stacks them (norm, activation, dropout and residual built once, here) and picks, for
each graph, the cheapest input its layers support.
"""

from __future__ import annotations

import inspect
import logging

from torch import Tensor, nn

from ..checks import check_choice, check_fraction, check_int
from ..graph import GraphBatch
from .layers import GNN_LAYERS, layer_flags, resolve_layer

GNN_NORMS = ("batch", "layer", None)
ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}

log = logging.getLogger(__name__)
_told: set = set()  # the dense-fallback note is logged once per process

#: A fixed-degree graph (kNN) of at most this many nodes per image is aggregated through its dense
#: ``[B, N, N]`` adjacency (one batched matrix product) rather than by a gather, where the layer has a
#: dense path. Measured on the CPU (batch 64, C = 64, k = 8, forward + backward, gcn / graphconv):
#: dense 1.3–2.9× faster at N = 49, 196 and 256, gather 1.0–2.4× faster from N = 400 on.
NEIGHBORS_DENSE_MAX_NODES = 256

# (the layers and their table of names live in interconnects.models.layers; GNN_LAYERS, the head's
# choices of layer, is re-exported)
__all__ = ["GNN_LAYERS", "GNN_NORMS", "ACTIVATIONS", "NEIGHBORS_DENSE_MAX_NODES", "GNNHead", "layer_inputs"]


class _NodeNorm(nn.Module):
    """Normalisation of node features ``[B, N, C]``: BatchNorm over the ``B·N`` nodes, or LayerNorm."""

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(channels) if kind == "batch" else nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.norm, (nn.BatchNorm1d, nn.SyncBatchNorm)):  # (SyncBatchNorm: under torchrun)
            return self.norm(x.reshape(-1, x.shape[-1])).view(x.shape)
        return self.norm(x)


def layer_inputs(flags: dict, graph: GraphBatch) -> tuple:
    """``(adj, edge_index, edge_weight, neighbor_view)`` to call a layer with the ``flags`` of
    :func:`~interconnects.models.layers.layer_flags` on ``graph``: the first of an adjacency operator
    (FFT grid), the fixed-degree view (as its dense adjacency for small graphs, see
    :data:`NEIGHBORS_DENSE_MAX_NODES`), the dense ``adj`` and the flat edges that the layer supports
    and the graph has; the others are built from what the graph has when needed."""
    weights = flags["supports_edge_weight"]
    if graph.aggregator is not None:
        if flags["supports_operator"]:
            return graph.aggregator, None, None, {}
        if flags["supports_dense"] and graph.adj is None and not _told:
            _told.add(True)
            log.info("a GNN layer that needs per-edge tensors builds the dense N×N adjacency of an FFT grid")
    if graph.neighbors is not None and flags["supports_neighbors"]:
        # (a layer with per-edge tensors would build N×N of them from the dense adjacency: it gathers)
        if flags["supports_dense"] and not flags["per_edge"] and graph.num_nodes <= NEIGHBORS_DENSE_MAX_NODES:
            return graph.dense_adj(), None, None, {}
        return None, None, None, {"neighbors": graph.neighbors, "neighbor_weight": graph.neighbor_weight if weights else None}
    has_dense = graph.adj is not None or graph.aggregator is not None
    if flags["supports_dense"] and (has_dense or not flags["supports_sparse"]):
        return graph.dense_adj(), None, None, {}
    edge_index, edge_weight = graph.sparse_edges()
    return None, edge_index, edge_weight if weights else None, {}


class GNNHead(nn.Module):
    """A stack of graph layers: ``GraphBatch -> GraphBatch`` with ``x [B, N, out_channels]``.

    Each layer is ``conv → norm → activation → dropout``, plus the layer's input when
    ``residual`` and the shapes match (the first layer projects ``in_channels → hidden_channels``
    and has no residual unless the two are equal). Each layer gets the cheapest view of the edges it
    supports (:func:`layer_inputs`): an FFT grid's operator, the fixed-degree neighbours of a kNN
    graph, the dense ``adj`` (complete graphs are never turned into an ``edge_index``), else the
    flat ``edge_index`` / ``edge_weight``.

    Args:
        in_channels: node feature channels of the incoming graphs.
        layer: one of :data:`GNN_LAYERS`, or a dotted path to a user's layer class following the
            layer contract of :mod:`interconnects.models.layers` (``mylab.layers.MyConv``).
            Layers without weights (``propagate``: ``A·x`` per layer; ``none``: identity) skip
            norm, activation, dropout and residual, so ``out_channels = in_channels`` and the output
            is exactly ``Aᴸ·x`` (or ``x``).
        hidden_channels: width of every layer, and ``out_channels`` for the layers with weights.
        num_layers: depth (≥ 1; ``none`` accepts 0).
        residual: add each layer's input to its output where the shapes match.
        norm: ``"batch"`` (BatchNorm over the ``B·N`` nodes), ``"layer"`` or ``None``.
        dropout: feature dropout after each layer's activation, in ``[0, 1)``.
        heads: attention heads of ``gat`` (concatenated when they divide ``hidden_channels``,
            averaged otherwise); passed to every layer class whose constructor takes ``heads``.
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
        cls = resolve_layer(layer)
        flags = layer_flags(cls)
        check_int("in_channels", in_channels)
        check_int("hidden_channels", hidden_channels)
        check_int("num_layers", num_layers, flags["min_layers"])
        check_int("heads", heads)
        check_choice("norm", norm, GNN_NORMS)
        check_choice("act", act, tuple(ACTIVATIONS))
        check_fraction("dropout", dropout)
        self.layer, self.in_channels, self.hidden_channels = layer, in_channels, hidden_channels
        self.residual, self.norm_kind, self.act_name, self.dropout_p = residual, norm, act, float(dropout)
        self.flags = flags
        self.plain = not flags["has_weights"]
        self.num_layers = num_layers
        self.out_channels = in_channels if self.plain else hidden_channels

        params = inspect.signature(cls).parameters
        extra = {name: value for name, value in {"heads": heads}.items() if name in params}
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        channels = in_channels
        for _ in range(num_layers):
            self.convs.append(cls(channels, self.out_channels, **extra))
            if not self.plain:
                self.norms.append(_NodeNorm(norm, self.out_channels) if norm is not None else nn.Identity())
            channels = self.out_channels
        self.act = ACTIVATIONS[act]()
        self.drop = nn.Dropout(dropout)

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
        adj, edge_index, edge_weight, view = layer_inputs(self.flags, graph)
        x = graph.x
        if self.plain:
            for conv in self.convs:
                x = conv(x, adj, edge_index, edge_weight, **view)
            return graph.replace(x=x)
        for conv, norm in zip(self.convs, self.norms):
            h = self.drop(self.act(norm(conv(x, adj, edge_index, edge_weight, **view))))
            x = h + x if self.residual and h.shape == x.shape else h
        return graph.replace(x=x)
