"""GraphBatch: the contract between a CNN → graph interconnect and everything after it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class GraphBatch:
    """A batch of graphs made from a batch of feature maps, with a fixed node count per image.

    Attributes:
        x: node features ``[B, N, C]``.
        pos: node positions ``[B, N, 2]`` as float (row, col) in feature-map cells.
        size: the feature map's ``(h, w)``.
        adj: dense adjacency ``[B, N, N]``, or ``[1, N, N]`` when every image shares it.
            ``adj[b, i, j]`` is the weight of the edge ``j → i`` (a message from ``j`` into ``i``),
            so ``adj @ x`` aggregates each node's in-neighbours. With an ``aggregator`` and no
            ``adj`` given, reading ``adj`` builds the aggregator's matrix (once, cached).
        edge_index: ``[2, E]`` (source, target) over flat node ids ``b·N + n``.
        edge_weight: ``[E]``, one weight per column of ``edge_index``.
        aggregator: an adjacency *operator* standing for a shared ``[1, N, N]`` adjacency that is
            never materialised (the FFT convolution of a distance grid,
            :class:`~interconnects.fft.GridConvolution`): ``aggregator.matmul(x [B, N, C])`` is
            ``A·x``, ``aggregator.dense()`` the ``[1, N, N]`` matrix.
        neighbors: the fixed-degree view of graphs where every node has ``k`` in-edges (kNN):
            ``[B, N, k]`` int64 per-image node ids, ``neighbors[b, i, :]`` the sources of the edges
            into node ``i`` of image ``b``. A self entry of weight 0 is padding, not an edge.
        neighbor_weight: ``[B, N, k]`` weights of those edges (``None``: ones).

    At least one of ``adj``, ``edge_index``, ``aggregator`` and ``neighbors`` is set;
    :meth:`dense_adj` and :meth:`sparse_edges` give the dense and flat views from any of them
    (built when asked). The dense view of ``x`` is free and the flat ``[B·N, C]`` view is a reshape.
    """

    x: Tensor
    pos: Tensor
    size: tuple[int, int]
    adj: Tensor | None = None
    edge_index: Tensor | None = None
    edge_weight: Tensor | None = None
    aggregator: Any = None
    neighbors: Tensor | None = None
    neighbor_weight: Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.dim() != 3:
            raise ValueError(f"GraphBatch.x must be [B, N, C], got shape {tuple(self.x.shape)}")
        if self.pos.shape != (*self.x.shape[:2], 2):
            raise ValueError(
                f"GraphBatch.pos must be [B, N, 2] = {(*self.x.shape[:2], 2)}, got {tuple(self.pos.shape)}"
            )
        adj = self.__dict__["_adj"]
        if adj is None and self.edge_index is None and self.aggregator is None and self.neighbors is None:
            raise ValueError(
                "GraphBatch needs edges: give adj [B|1, N, N], edge_index [2, E], an aggregator or neighbors [B, N, k]"
            )
        if self.neighbors is not None:
            if self.neighbors.dim() != 3 or self.neighbors.shape[:2] != self.x.shape[:2]:
                raise ValueError(
                    f"GraphBatch.neighbors must be [B, N, k] with [B, N] = {tuple(self.x.shape[:2])}, "
                    f"got {tuple(self.neighbors.shape)}"
                )
            if self.neighbor_weight is not None and self.neighbor_weight.shape != self.neighbors.shape:
                raise ValueError(
                    f"GraphBatch.neighbor_weight must be [B, N, k] = {tuple(self.neighbors.shape)}, "
                    f"got {tuple(self.neighbor_weight.shape)}"
                )
        if self.edge_index is not None:
            if self.edge_index.dim() != 2 or self.edge_index.shape[0] != 2:
                raise ValueError(f"GraphBatch.edge_index must be [2, E], got {tuple(self.edge_index.shape)}")
            if self.edge_weight is not None and self.edge_weight.shape != (self.edge_index.shape[1],):
                raise ValueError(
                    f"GraphBatch.edge_weight must be [E] = ({self.edge_index.shape[1]},), "
                    f"got {tuple(self.edge_weight.shape)}"
                )
        if adj is not None:
            n = self.x.shape[1]
            if adj.dim() != 3 or adj.shape[1:] != (n, n) or adj.shape[0] not in (1, self.x.shape[0]):
                raise ValueError(
                    f"GraphBatch.adj must be [B, N, N] or [1, N, N] with B={self.x.shape[0]}, N={n}; "
                    f"got {tuple(adj.shape)}"
                )

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def num_nodes(self) -> int:
        """Nodes per graph, N."""
        return self.x.shape[1]

    @property
    def num_channels(self) -> int:
        return self.x.shape[2]

    # ---- views -----------------------------------------------------------------------------
    def replace(self, **changes) -> "GraphBatch":
        """A copy with some fields replaced, e.g. ``graph.replace(x=new_x)`` after a GNN layer."""
        changes.setdefault("adj", self.__dict__["_adj"])  # without building an aggregator's matrix
        return dataclasses.replace(self, **changes)

    def flat_x(self) -> Tensor:
        """Node features as ``[B·N, C]``, the layout torch_geometric layers take."""
        return self.x.reshape(-1, self.x.shape[-1])

    def batch_vector(self) -> Tensor:
        """``[B·N]`` graph id of each flat node."""
        return torch.arange(self.batch_size, device=self.x.device).repeat_interleave(self.num_nodes)

    def cell_index(self) -> Tensor:
        """``[B, N]`` long: the row-major cell ``row·w + col`` each node sits in."""
        rc = self.pos.round().long()
        return rc[..., 0] * self.size[1] + rc[..., 1]

    def dense_adj(self) -> Tensor:
        """Dense adjacency, ``[B, N, N]`` or the shared ``[1, N, N]``."""
        if self.adj is not None:
            return self.adj
        b, n = self.batch_size, self.num_nodes
        if self.neighbors is not None:  # one scatter of the fixed-degree view (repeats add up)
            weight = self.neighbor_weight
            if weight is None:
                weight = torch.ones(self.neighbors.shape, dtype=self.x.dtype, device=self.x.device)
            return torch.zeros(b, n, n, dtype=weight.dtype, device=weight.device).scatter_add(2, self.neighbors, weight)
        (src, dst), weight = self.sparse_edges()
        adj = torch.zeros(b * n * n, dtype=weight.dtype, device=weight.device)
        # flat id of (graph, target row, source col); index_put with accumulate sums duplicate edges
        graph = dst // n
        adj.index_put_((graph * n * n + (dst % n) * n + (src % n),), weight, accumulate=True)
        return adj.view(b, n, n)

    def sparse_edges(self) -> tuple[Tensor, Tensor]:
        """``(edge_index [2, E], edge_weight [E])`` over flat node ids ``b·N + n``.

        A shared ``[1, N, N]`` adjacency is expanded to every graph of the batch.
        """
        if self.edge_index is not None:
            weight = self.edge_weight
            if weight is None:
                weight = torch.ones(self.edge_index.shape[1], dtype=self.x.dtype, device=self.x.device)
            return self.edge_index, weight
        if self.aggregator is None and self.adj is None and self.neighbors is not None:
            return self._neighbor_edges()
        adj = self.dense_adj()
        b, n = self.batch_size, self.num_nodes
        graph, dst, src = adj.nonzero(as_tuple=True)
        weight = adj[graph, dst, src]
        if adj.shape[0] == 1 and b > 1:
            offsets = (torch.arange(b, device=adj.device) * n).repeat_interleave(src.numel())
            src, dst = src.repeat(b) + offsets, dst.repeat(b) + offsets
            weight = weight.repeat(b)
        else:
            src, dst = src + graph * n, dst + graph * n
        return torch.stack([src, dst]), weight

    def _neighbor_edges(self) -> tuple[Tensor, Tensor]:
        b, n, k = self.neighbors.shape
        offsets = (torch.arange(b, device=self.x.device) * n).view(b, 1, 1)
        src = self.neighbors + offsets
        dst = (torch.arange(n, device=self.x.device).view(1, n, 1) + offsets).expand(b, n, k)
        weight = self.neighbor_weight
        if weight is None:
            weight = torch.ones(self.neighbors.shape, dtype=self.x.dtype, device=self.x.device)
        real = (src != dst) | (weight != 0)  # zero-weight self entries are padding
        return torch.stack([src[real], dst[real]]), weight[real]

    def to_pyg(self):
        """torch_geometric ``Batch`` with flat ``x``, ``edge_index``, ``edge_weight``, ``pos`` and ``batch``.

        Edges are grouped by graph (sorted stably when they are not already), and the batch carries
        the slice bookkeeping of ``Batch.from_data_list``, so ``batch[i]`` and ``to_data_list()`` work.
        """
        from torch_geometric.data import Batch

        edge_index, edge_weight = self.sparse_edges()
        b, n, device = self.batch_size, self.num_nodes, self.x.device
        graph = edge_index[1] // n  # the graph each edge belongs to
        if graph.numel() > 1 and bool((graph[1:] < graph[:-1]).any()):
            order = graph.argsort(stable=True)
            edge_index, edge_weight, graph = edge_index[:, order], edge_weight[order], graph[order]
        node_ptr = torch.arange(b + 1, device=device) * n
        edge_ptr = torch.zeros(b + 1, dtype=torch.long, device=device)
        edge_ptr[1:] = torch.bincount(graph, minlength=b).cumsum(0)
        batch = Batch(
            x=self.flat_x(),
            edge_index=edge_index,
            edge_weight=edge_weight,
            pos=self.pos.reshape(-1, 2),
            batch=self.batch_vector(),
            ptr=node_ptr,
        )
        zeros = torch.zeros(b, dtype=torch.long, device=device)
        batch._num_graphs = b
        batch._slice_dict = {"x": node_ptr, "edge_index": edge_ptr, "edge_weight": edge_ptr, "pos": node_ptr}
        batch._inc_dict = {"x": zeros, "edge_index": node_ptr[:-1], "edge_weight": zeros, "pos": zeros}
        return batch


def _get_adj(self: GraphBatch):
    adj = self.__dict__["_adj"]
    if adj is None and self.aggregator is not None:
        return self.aggregator.dense()
    return adj


def _set_adj(self: GraphBatch, value) -> None:
    self.__dict__["_adj"] = value


# ``adj`` is a dataclass field (constructor argument, ``replace``) whose reading is lazy: the frozen
# dataclass's __init__ stores it through this property's setter
GraphBatch.adj = property(_get_adj, _set_adj, doc="Dense adjacency ``[B|1, N, N]`` (built from ``aggregator`` when asked).")
