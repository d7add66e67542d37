"""GraphToCNN: put node features back into a feature map."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._edges import check_choice
from .graph import GraphBatch

REDUCE = ("mean", "sum", "max")


class GraphToCNN(nn.Module):
    """Graph → CNN: ``(x [B, N, C], pos [B, N, 2], size=(h, w)) -> [B, C, h, w]``.

    Each node lands in the cell at its rounded position; nodes sharing a cell are combined by
    ``reduce`` (``mean``, ``sum`` or ``max``). Empty cells are zero, or taken from ``skip [B, C, h, w]``
    when it is given. Differentiable in ``x``. A :class:`GraphBatch` may stand in for ``x``, its own
    ``pos`` and ``size`` then being used.

    For grid and kNN graphs this is the exact inverse of the CNN → graph step.
    """

    def __init__(self, reduce: str = "mean") -> None:
        super().__init__()
        check_choice("reduce", reduce, REDUCE)
        self.reduce = reduce

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}"

    def forward(
        self,
        x: Tensor | GraphBatch,
        pos: Tensor | None = None,
        size: tuple[int, int] | None = None,
        skip: Tensor | None = None,
    ) -> Tensor:
        if isinstance(x, GraphBatch):
            x, pos, size = x.x, x.pos if pos is None else pos, x.size if size is None else size
        if pos is None or size is None:
            raise ValueError("GraphToCNN needs pos [B, N, 2] and size (h, w) (or a GraphBatch)")
        if x.dim() != 3 or pos.shape != (*x.shape[:2], 2):
            raise ValueError(f"x must be [B, N, C] and pos [B, N, 2]; got {tuple(x.shape)} and {tuple(pos.shape)}")
        b, n, c = x.shape
        h, w = int(size[0]), int(size[1])
        rc = pos.round().long()
        if not torch.compiler.is_compiling() and n and (
            bool(rc.min() < 0) or bool((rc[..., 0] >= h).any()) or bool((rc[..., 1] >= w).any())
        ):
            raise ValueError(f"pos has nodes outside the {h}×{w} map: rows must be in [0, {h - 1}], cols in [0, {w - 1}]")
        cells = rc[..., 0] * w + rc[..., 1] + torch.arange(b, device=x.device).unsqueeze(1) * (h * w)
        cells = cells.flatten()  # [B·N] flat cell ids
        flat = x.reshape(b * n, c)
        if self.reduce == "max":
            out = flat.new_zeros(b * h * w, c).index_reduce_(0, cells, flat, "amax", include_self=False)
        else:
            out = flat.new_zeros(b * h * w, c).index_add_(0, cells, flat)
        if self.reduce == "mean" or skip is not None:
            count = torch.zeros(b * h * w, device=x.device, dtype=x.dtype).index_add_(
                0, cells, torch.ones(b * n, device=x.device, dtype=x.dtype)
            )
            if self.reduce == "mean":
                out = out / count.clamp_min(1).unsqueeze(1)
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)
        if skip is not None:
            if skip.shape != (b, c, h, w):
                raise ValueError(f"skip must be [B, C, h, w] = {(b, c, h, w)}, got {tuple(skip.shape)}")
            out = torch.where(count.view(b, 1, h, w) > 0, out, skip)
        return out
