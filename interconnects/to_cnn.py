"""GraphToCNN: put node features back into a feature map."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .checks import check_choice
from .graph import GraphBatch

REDUCE = ("mean", "sum", "max")


class GraphToCNN(nn.Module):
    """Graph → CNN: ``(x [B, N, C], pos [B, N, 2], size=(h, w)) -> [B, C, h, w]``.

    Each node lands in the cell at its rounded position; nodes sharing a cell are combined by
    ``reduce`` (``mean``, ``sum`` or ``max``). Empty cells are zero, or taken from ``skip [B, C, h, w]``
    when it is given. Differentiable in ``x``. A :class:`GraphBatch` may stand in for ``x``, its own
    ``pos`` and ``size`` then being used.

    For grid and kNN graphs this is the exact inverse of the CNN → graph step. A graph that carries an
    ``assignment [B, h, w]`` (region graphs, :class:`~interconnects.superpixels.Superpixels`) is
    scattered by it instead: each cell takes its region's node features, so the map is exact
    wherever the features are constant over a region (``skip`` and ``reduce`` have nothing to do).

    Node features that are a ``[B, N, C]`` view of a ``[B, C, ·]`` tensor (what the interconnects
    produce) are scattered channel by channel and give a contiguous map; contiguous ``[B, N, C]``
    rows are added row by row and give a channels-last map. The values are the same either way.
    """

    def __init__(self, reduce: str = "mean") -> None:
        super().__init__()
        check_choice("reduce", reduce, REDUCE)
        self.reduce = reduce

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}"

    @staticmethod
    def from_assignment(x: Tensor, assignment: Tensor) -> Tensor:
        """Region graphs: every cell takes the features of the node it is assigned to,
        ``(x [B, N, C], assignment [B, h, w] long) -> [B, C, h, w]`` (an exact gather, differentiable in x)."""
        b, n, c = x.shape
        h, w = assignment.shape[1:]
        index = assignment.reshape(b, 1, h * w).expand(b, c, h * w)
        return x.transpose(1, 2).gather(2, index).view(b, c, h, w)

    def forward(
        self,
        x: Tensor | GraphBatch,
        pos: Tensor | None = None,
        size: tuple[int, int] | None = None,
        skip: Tensor | None = None,
    ) -> Tensor:
        if isinstance(x, GraphBatch):
            assignment = getattr(x, "assignment", None)
            if assignment is not None and pos is None and size is None:
                return self.from_assignment(x.x, assignment)
            x, pos, size = x.x, x.pos if pos is None else pos, x.size if size is None else size
        if pos is None or size is None:
            raise ValueError("GraphToCNN needs pos [B, N, 2] and size (h, w) (or a GraphBatch)")
        if x.dim() != 3 or pos.shape != (*x.shape[:2], 2):
            raise ValueError(f"x must be [B, N, C] and pos [B, N, 2]; got {tuple(x.shape)} and {tuple(pos.shape)}")
        b, n, c = x.shape
        h, w = int(size[0]), int(size[1])
        rc = pos.round().long()
        compiling = torch.compiler.is_compiling()
        if not compiling and n and bool(((rc < 0).any(-1) | (rc[..., 0] >= h) | (rc[..., 1] >= w)).any()):
            raise ValueError(f"pos has nodes outside the {h}×{w} map: rows must be in [0, {h - 1}], cols in [0, {w - 1}]")
        hw = h * w
        cell = rc[..., 0] * w + rc[..., 1]  # [B, N] cell of each node within its map
        flat_cells = (cell + torch.arange(b, device=x.device).unsqueeze(1) * hw).flatten()  # [B·N]
        if x.stride(1) == 1 and x.stride(2) != 1:
            # channel-major x (the [B, N, C] view of a [B, C, ·] tensor, as the interconnects give):
            # scatter along the contiguous node axis straight into a [B, C, h·w] map, and the backward
            # gathers from the incoming NCHW gradient without a transposing copy
            src = x.transpose(1, 2)
            index = cell.unsqueeze(1).expand(b, c, n)
            out = src.new_zeros(b, c, hw)
            if self.reduce == "max":
                out = out.scatter_reduce_(2, index, src, "amax", include_self=False)
            else:
                out = out.scatter_add_(2, index, src)
            layout = "bcn"
        else:
            # node-major x ([B, N, C] rows): add whole rows into a [B·h·w, C] map
            flat = x.reshape(b * n, c)
            out = flat.new_zeros(b * hw, c)
            if self.reduce == "max":
                out = out.index_reduce_(0, flat_cells, flat, "amax", include_self=False)
            else:
                out = out.index_add_(0, flat_cells, flat)
            layout = "bnc"
        if self.reduce == "mean" or skip is not None:
            # counted in float32 at least: float16/bfloat16 stop counting at 2048/256 nodes per cell
            count_dtype = torch.promote_types(x.dtype, torch.float32)
            count = torch.zeros(b * hw, device=x.device, dtype=count_dtype).index_add_(
                0, flat_cells, torch.ones(b * n, device=x.device, dtype=count_dtype)
            )
            # the division is skipped when no cell holds two nodes (grids, kNN, distinct keypoints)
            if self.reduce == "mean" and (compiling or bool((count > 1).any())):
                scale = count.clamp_min(1)
                scale = scale.view(b, 1, hw) if layout == "bcn" else scale.unsqueeze(1)
                out = (out / scale).to(x.dtype)
        out = out.view(b, c, h, w) if layout == "bcn" else out.view(b, h, w, c).permute(0, 3, 1, 2)
        if skip is not None:
            if skip.shape != (b, c, h, w):
                raise ValueError(f"skip must be [B, C, h, w] = {(b, c, h, w)}, got {tuple(skip.shape)}")
            out = torch.where(count.view(b, 1, h, w) > 0, out, skip)
        return out
