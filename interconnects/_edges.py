"""Edge weights shared by the interconnects."""

from __future__ import annotations

import torch
from torch import Tensor


def grid_positions(h: int, w: int, device=None, dtype=torch.float32) -> Tensor:
    """``[h·w, 2]`` (row, col) of every cell in row-major order."""
    rows = torch.arange(h, device=device, dtype=dtype).repeat_interleave(w)
    cols = torch.arange(w, device=device, dtype=dtype).repeat(h)
    return torch.stack([rows, cols], dim=-1)


def pairwise_distance(pos: Tensor, scale: float = 1.0) -> Tensor:
    """Euclidean distances ``[..., N, N]`` between positions ``[..., N, 2]`` (times ``scale``)."""
    # one coordinate at a time: no [..., N, N, 2] intermediate and no reduction over a size-2 axis
    r, c = pos[..., 0].contiguous(), pos[..., 1].contiguous()
    dr = r.unsqueeze(-1) - r.unsqueeze(-2)
    dc = c.unsqueeze(-1) - c.unsqueeze(-2)
    if torch.is_grad_enabled() and pos.requires_grad:
        dist = (dr * dr + dc * dc).sqrt()
    else:
        dist = dr.mul_(dr).addcmul_(dc, dc).sqrt_()
    return dist if scale == 1.0 else dist * scale


def distance_weights(
    dist: Tensor, scheme: str, sigma: float = 1.0, cutoff: float = 0.01, squared: bool = True
) -> Tensor:
    """Edge weights from distances ``[..., N, N]``.

    ``inverse_distance``: ``1 / (1 + d)`` (a complete graph);
    ``gaussian``: ``exp(-d² / σ²)`` (or ``exp(-d / σ²)`` with ``squared=False``), weights below
    ``cutoff`` set to 0.
    """
    if scheme == "inverse_distance":
        return (1.0 + dist).reciprocal_()
    if scheme == "gaussian":
        weight = torch.exp(-(dist.pow(2) if squared else dist) / sigma**2)
        return weight.masked_fill(weight < cutoff, 0.0)
    raise ValueError(f"edges={scheme!r} has no distance weighting; use 'inverse_distance' or 'gaussian'")


def knn_mask(dist: Tensor, k: int, include_self: bool) -> Tensor:
    """``[..., N, N]`` 0/1 mask keeping, for each row, the ``k`` smallest distances."""
    if not include_self:
        eye = torch.eye(dist.shape[-1], dtype=torch.bool, device=dist.device)
        dist = dist.masked_fill(eye, float("inf"))
    idx = dist.topk(k, dim=-1, largest=False).indices
    return torch.zeros_like(dist).scatter_(-1, idx, 1.0)


def set_self_loops(adj: Tensor, weight: float | None) -> Tensor:
    """Set the diagonal of ``adj [..., N, N]`` to ``weight``; ``None`` keeps it as it is."""
    if weight is None:
        return adj
    eye = torch.eye(adj.shape[-1], dtype=torch.bool, device=adj.device)
    return adj.masked_fill(eye, weight)


def inverse_sqrt_degree(deg: Tensor, eps: float = 1e-5) -> Tensor:
    """``(deg + eps)^-1/2`` of degrees ``[...]``, finite for isolated nodes (``eps = 0`` is allowed)."""
    return (deg + eps).clamp_min(1e-12).pow(-0.5)


def normalize_symmetric(adj: Tensor, eps: float = 1e-5) -> Tensor:
    """Kipf–Welling normalisation ``D^-1/2 A D^-1/2`` of ``adj [..., N, N]``.

    Degrees are row sums of ``|A|``, so a learned adjacency with negative weights keeps its signs.
    """
    inv_sqrt = inverse_sqrt_degree(adj.abs().sum(-1), eps)
    return inv_sqrt.unsqueeze(-1) * adj * inv_sqrt.unsqueeze(-2)


def normalize_sparse(edge_index: Tensor, edge_weight: Tensor, num_nodes: int, eps: float = 1e-5) -> Tensor:
    """The same normalisation for ``edge_index [2, E]`` / ``edge_weight [E]`` over ``num_nodes`` flat nodes.

    Returns the normalised ``edge_weight [E]``.
    """
    src, dst = edge_index
    deg = torch.zeros(num_nodes, dtype=edge_weight.dtype, device=edge_weight.device)
    deg.index_add_(0, dst, edge_weight.abs())  # row sums of |A|, as in normalize_symmetric
    inv_sqrt = inverse_sqrt_degree(deg, eps)
    return inv_sqrt[src] * edge_weight * inv_sqrt[dst]


def add_remaining_self_loops(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Flat edges with exactly one self-loop per node: an existing loop keeps its weight, a missing one
    gets 1. Returns ``(edge_index [2, E'], edge_weight [E'])``, the loops last in node order."""
    src, dst = edge_index
    is_loop = src == dst
    loop_weight = torch.ones(num_nodes, dtype=edge_weight.dtype, device=edge_weight.device)
    loop_weight[src[is_loop]] = edge_weight[is_loop]
    loops = torch.arange(num_nodes, device=edge_index.device)
    keep = ~is_loop
    src = torch.cat([src[keep], loops])
    dst = torch.cat([dst[keep], loops])
    return torch.stack([src, dst]), torch.cat([edge_weight[keep], loop_weight])
