"""Decoders: node features (and the backbone's feature map) → features for the task head.

``ScatterDecoder`` puts the nodes back into a feature map (graph → CNN) and runs a small CNN;
``PoolDecoder`` is the usual GNN readout (global mean / max over nodes); ``FlattenDecoder`` keeps
every node's features in order (a fixed node set, as in the pixel-grid tutorial).
With no graph (the CNN baseline) each decoder works on the backbone's feature map directly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..checks import check_choice
from ..graph import GraphBatch
from ..to_cnn import GraphToCNN
from .backbones import chain, conv_block


class ScatterDecoder(nn.Module):
    """Graph → CNN at the node positions, optionally fused with the backbone's feature map, then
    ``num_convs`` 3×3 conv blocks.

    ``(graph with x [B, N, C_g] | None, fmap [B, C_f, h, w]) -> [B, channels, h, w]``.

    Args:
        fuse: ``none`` (graph only), ``add`` (1×1-projected fmap added) or ``concat``.
        empty: cells no node lands in are ``zero`` or taken from the (projected) fmap, ``skip``.
        reduce: how nodes sharing a cell combine (``mean``, ``sum``, ``max``).
    """

    def __init__(
        self,
        graph_channels: int,
        fmap_channels: int,
        channels: int = 64,
        num_convs: int = 1,
        fuse: str = "none",
        empty: str = "zero",
        reduce: str = "mean",
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        check_choice("fuse", fuse, ("none", "add", "concat"))
        check_choice("empty", empty, ("zero", "skip"))
        if isinstance(num_convs, bool) or not isinstance(num_convs, int) or num_convs < 0:
            raise ValueError(f"num_convs={num_convs!r} is out of range; it must be an integer ≥ 0")
        self.fuse, self.empty = fuse, empty
        self.to_cnn = GraphToCNN(reduce)
        needs_proj = (fuse == "add" or empty == "skip") and fmap_channels != graph_channels
        self.proj = nn.Conv2d(fmap_channels, graph_channels, 1) if needs_proj else nn.Identity()
        in_ch = graph_channels + (fmap_channels if fuse == "concat" else 0)
        self.convs, self.out_channels = chain(lambda c_in, c_out: conv_block(c_in, c_out, batch_norm), in_ch,
                                              [channels] * num_convs)

    def forward(self, graph: GraphBatch | None, fmap: Tensor) -> Tensor:
        """``(graph, fmap [B, C_f, h, w]) -> [B, out_channels, h, w]``; ``graph=None`` decodes fmap alone."""
        if graph is None:
            return self.convs(fmap)
        skip = self.proj(fmap) if (self.fuse == "add" or self.empty == "skip") else None
        out = self.to_cnn(graph, skip=skip if self.empty == "skip" else None)
        if self.fuse == "add":
            out = out + skip
        elif self.fuse == "concat":
            out = torch.cat([out, fmap], dim=1)
        return self.convs(out)


class PoolDecoder(nn.Module):
    """Global readout over nodes: ``x [B, N, C] -> [B, C]`` (``mean``, ``max`` or ``meanmax`` → 2C)."""

    def __init__(self, graph_channels: int, fmap_channels: int, readout: str = "mean") -> None:
        super().__init__()
        check_choice("readout", readout, ("mean", "max", "meanmax"))
        self.readout = readout
        self.out_channels = graph_channels * (2 if readout == "meanmax" else 1)

    def forward(self, graph: GraphBatch | None, fmap: Tensor) -> Tensor:
        """``(graph, fmap) -> [B, out_channels]``; without a graph the cells of fmap are the nodes."""
        x = graph.x if graph is not None else fmap.flatten(2).transpose(1, 2)
        if self.readout == "mean":
            return x.mean(1)
        if self.readout == "max":
            return x.amax(1)
        return torch.cat([x.mean(1), x.amax(1)], dim=-1)


class FlattenDecoder(nn.Module):
    """Every node's features in node order: ``x [B, N, C] -> [B, N·C]`` (``out_channels`` known once
    the graph size is: the builder sets it)."""

    def __init__(self, graph_channels: int, fmap_channels: int) -> None:
        super().__init__()
        self.out_channels = None

    def forward(self, graph: GraphBatch | None, fmap: Tensor) -> Tensor:
        """``(graph, fmap) -> [B, N·C]``."""
        x = graph.x if graph is not None else fmap.flatten(2).transpose(1, 2)
        return x.flatten(1)
