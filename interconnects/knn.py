"""KNNGraph: every cell a node, edges to its k nearest neighbours in feature space."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._edges import grid_positions
from .checks import check_choice, check_fmap, check_positive
from .graph import GraphBatch

KNN_METRICS = ("euclidean", "cosine")
KNN_WEIGHTS = ("ones", "gaussian", "inverse_distance", "continuous")
#: the ``continuous`` weights' floor (in squared-distance units): keeps them defined, and equal, where
#: a node's ``k + 1`` nearest are all at the same distance
CONTINUOUS_EPS = 1e-6


# Blocks of the distance matrix are sized to stay in cache (each is written once and read once by
# topk); ``max_bytes`` stays the hard memory bound when it is smaller.
_CACHE_BYTES = 2**23


def _distance_blocks(b: int, n: int, max_bytes: int) -> list[tuple[int, int, int, int]]:
    """``(image start, image stop, row start, row stop)`` blocks covering the ``[B, N, N]`` distances.

    Whole images are grouped while a group's ``[g, N, N]`` float32 block fits the budget (one block
    for small maps: the usual case); an image too large for it is cut into row blocks.
    """
    budget = max(1, min(max_bytes, _CACHE_BYTES))
    per_image = 4 * n * n
    if per_image <= budget:
        group = budget // per_image
        return [(i, min(b, i + group), 0, n) for i in range(0, b, group)]
    rows = max(1, budget // (4 * n))
    return [(i, i + 1, r, min(n, r + rows)) for i in range(b) for r in range(0, n, rows)]


def knn_indices(
    x: Tensor, k: int, metric: str = "euclidean", dilation: int = 1, self_loops: bool = False, max_bytes: int = 2**28
) -> Tensor:
    """Indices ``[B, N, k]`` of each node's ``k`` nearest nodes of the same image, nearest first.

    Args:
        x: node features ``[B, N, C]``.
        dilation: take the ``k·dilation`` nearest and keep every ``dilation``-th (Vision GNN).
        self_loops: let a node count as its own neighbour.
        max_bytes: the ``[B, N, N]`` distance matrix is processed in blocks of at most this many
            bytes (and of at most 8 MiB, so that a block stays in cache).

    Computed without gradient: neighbour choice is not differentiable.
    """
    b, n, _ = x.shape
    kd = k * dilation
    with torch.no_grad():
        feats = x.float()
        if metric == "cosine":
            # the most similar unit vectors are the nearest: rank by the dot product, largest first
            feats = nn.functional.normalize(feats, dim=-1)
            sq = None
        else:
            # distances do not change under a shift; centring each image keeps |a|² - 2a·b + |b|²
            # from cancelling catastrophically on features with a large common part (post-ReLU maps)
            feats = feats - feats.mean(1, keepdim=True)
            # a row's own |a|² does not change its order, so the ranked value is |b|² - 2a·b
            sq = feats.pow(2).sum(-1).unsqueeze(1)  # [B, 1, N]
        keys = feats.transpose(1, 2)  # [B, C, N]
        fill = float("-inf") if sq is None else float("inf")
        blocks = _distance_blocks(b, n, max_bytes)
        out = None if len(blocks) == 1 else torch.empty(b, n, k, dtype=torch.long, device=x.device)
        for i0, i1, r0, r1 in blocks:  # a loop over blocks of the distance matrix bounds memory
            q = feats[i0:i1, r0:r1]
            if sq is None:
                score = torch.bmm(q, keys[i0:i1])
            else:
                score = torch.baddbmm(sq[i0:i1], q, keys[i0:i1], alpha=-2.0)
            if not self_loops:
                rows = torch.arange(r0, r1, device=x.device)
                score[:, rows - r0, rows] = fill
            idx = score.topk(kd, dim=-1, largest=sq is None).indices
            if dilation > 1:
                idx = idx[..., ::dilation]
            if out is None:
                return idx
            out[i0:i1, r0:r1] = idx
        return out


def max_k(num_nodes: int, edge_weight: str = "ones", self_loops: bool = False) -> int:
    """The largest ``k · dilation`` a graph of ``num_nodes`` nodes allows: every other node (and
    itself with ``self_loops``), less one for ``edge_weight='continuous'``, whose weights need the
    ``(k·dilation + 1)``-th nearest as their cut."""
    limit = num_nodes if self_loops else num_nodes - 1
    return limit - 1 if edge_weight == "continuous" else limit


class KNNGraph(nn.Module):
    """CNN → graph joining each cell to its ``k`` nearest cells in feature space: ``fmap -> GraphBatch``.

    ``N = h·w``, node ``n`` at cell ``(n // w, n % w)`` as in :class:`DenseGrid`. Each node ``i``
    receives an edge ``j → i`` from each of its neighbours ``j``; ``edge_index [2, B·N·k]``. Every
    node has in-degree ``k``, so the graph also carries the fixed-degree view ``neighbors [B, N, k]``
    / ``neighbor_weight [B, N, k]`` (the same edges and weights, in the same order) that GNN layers
    aggregate by a gather instead of a scatter.

    Args:
        k: neighbours per node (1 ≤ k·dilation ≤ N - 1, or ≤ N with ``self_loops``).
        metric: ``euclidean`` or ``cosine`` distance between node features.
        dilation: take the ``k·dilation`` nearest and keep every ``dilation``-th (Vision GNN).
        self_loops: let a node be its own neighbour.
        edge_weight: ``ones``, or weights from the feature distance with gradient (``gaussian``:
            ``exp(-d² / σ²)``, ``inverse_distance``: ``1 / (1 + d)``, ``continuous``: a node's
            weights fall linearly in the squared distance to 0 at its ``(k+1)``-th nearest and sum
            to 1, ``w_j ∝ (d²_{k+1} - d²_j) + ε``, so that what a node aggregates changes
            continuously as its features move, also when a neighbour is swapped for another; for
            ``cosine``, ``1 - cos`` in place of ``d²``).
        sigma: width of the ``gaussian`` edge weight.
        max_bytes: memory bound of one chunk of the distance matrix.
    """

    def __init__(
        self,
        k: int = 8,
        metric: str = "euclidean",
        dilation: int = 1,
        self_loops: bool = False,
        edge_weight: str = "ones",
        sigma: float = 1.0,
        max_bytes: int = 2**28,
    ) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} is out of range; it must be an integer ≥ 1 and below the node count")
        if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1:
            raise ValueError(f"dilation={dilation!r} is out of range; it must be an integer ≥ 1")
        check_choice("metric", metric, KNN_METRICS)
        check_choice("edge_weight", edge_weight, KNN_WEIGHTS)
        check_positive("sigma", sigma)
        self.k, self.metric, self.dilation, self.self_loops = k, metric, dilation, self_loops
        self.edge_weight, self.sigma, self.max_bytes = edge_weight, sigma, max_bytes

    def extra_repr(self) -> str:
        return (f"k={self.k}, metric={self.metric!r}, dilation={self.dilation}, self_loops={self.self_loops}, "
                f"edge_weight={self.edge_weight!r}")

    def _continuous_weights(self, x: Tensor, ranked: Tensor) -> Tensor:
        """``[B, N, k]`` weights of the ``continuous`` scheme from the node features ``x [B, N, C]`` and
        the indices ``ranked [B, N, k + 1]`` of each node's neighbours followed by its cut node."""
        b, n, c = x.shape
        if self.metric == "cosine":
            x = nn.functional.normalize(x, dim=-1)
        others = x.reshape(b * n, c)[ranked + (torch.arange(b, device=x.device) * n).view(b, 1, 1)]  # [B, N, k+1, C]
        if self.metric == "cosine":
            dist = 1.0 - (others * x.unsqueeze(2)).sum(-1)  # [B, N, k + 1]
        else:
            dist = (others - x.unsqueeze(2)).pow(2).sum(-1)
        raw = (dist[..., -1:] - dist[..., :-1]).clamp_min(0.0) + CONTINUOUS_EPS
        return raw / raw.sum(-1, keepdim=True)

    def forward(self, fmap: Tensor) -> GraphBatch:
        """``fmap [B, C, h, w]`` → GraphBatch with ``x [B, h·w, C]`` and ``edge_index [2, B·h·w·k]``."""
        check_fmap(fmap)
        b, c, h, w = fmap.shape
        n = h * w
        continuous = self.edge_weight == "continuous"
        top = max_k(n, self.edge_weight, self.self_loops)
        if self.k * self.dilation > top:
            need = ("edge_weight='continuous' needs the (k·dilation + 1)-th nearest, so " if continuous else "")
            raise ValueError(
                f"k={self.k} (× dilation={self.dilation}) is out of range for a {h}×{w} map with N={n} nodes: "
                f"{need}k·dilation must be in [1, {top}]"
            )
        x = fmap.flatten(2).transpose(1, 2)
        if continuous:  # the k·dilation + 1 nearest: the neighbours, and the one whose distance is the cut
            ranked = knn_indices(x, self.k * self.dilation + 1, self.metric, 1, self.self_loops, self.max_bytes)
            nbr = ranked[..., : self.k * self.dilation : self.dilation]
        else:
            nbr = knn_indices(x, self.k, self.metric, self.dilation, self.self_loops, self.max_bytes)  # [B, N, k]
        offsets = (torch.arange(b, device=fmap.device) * n).view(b, 1, 1)
        src = (nbr + offsets).flatten()
        dst = (torch.arange(n, device=fmap.device).view(1, n, 1) + offsets).expand(b, n, self.k).flatten()
        if self.edge_weight == "ones":
            weight = torch.ones(src.numel(), dtype=fmap.dtype, device=fmap.device)
        elif continuous:
            weight = self._continuous_weights(x, torch.cat([nbr, ranked[..., -1:]], -1)).flatten()
        else:
            flat = x.reshape(b * n, c)
            dist_sq = (flat[src] - flat[dst]).pow(2).sum(-1)
            if self.edge_weight == "gaussian":
                weight = torch.exp(-dist_sq / self.sigma**2)
            else:
                weight = 1.0 / (1.0 + dist_sq.clamp_min(1e-12).sqrt())
        pos = grid_positions(h, w, fmap.device).expand(b, -1, -1)
        return GraphBatch(
            x=x, pos=pos, size=(h, w), edge_index=torch.stack([src, dst]), edge_weight=weight,
            neighbors=nbr, neighbor_weight=weight.view(b, n, self.k),
        )
