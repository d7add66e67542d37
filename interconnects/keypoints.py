"""Keypoints: only chosen cells become nodes."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._edges import (
    check_choice,
    check_fmap,
    check_positive,
    distance_weights,
    knn_mask,
    normalize_symmetric,
    pairwise_distance,
    set_self_loops,
)
from .graph import GraphBatch

KEYPOINT_SELECT = ("topk", "given", "random", "lattice")
KEYPOINT_EDGES = ("inverse_distance", "gaussian", "knn")


def lattice_cells(num_keypoints: int, h: int, w: int, device=None) -> Tensor:
    """``[K]`` row-major cell ids of a regular pattern of ``K`` distinct cells spread over ``h × w``."""
    rows = min(h, max(1, math.ceil(math.sqrt(num_keypoints * h / w))))
    cols = min(w, math.ceil(num_keypoints / rows))
    while rows * cols < num_keypoints:  # only when one side was clipped to the map
        rows = min(h, rows + 1)
        cols = min(w, math.ceil(num_keypoints / rows))
    r = ((torch.arange(rows, device=device) + 0.5) * h / rows).long()
    c = ((torch.arange(cols, device=device) + 0.5) * w / cols).long()
    return (r.unsqueeze(1) * w + c.unsqueeze(0)).flatten()[:num_keypoints]


class Keypoints(nn.Module):
    """CNN → graph over ``K`` chosen cells: ``(fmap [B, C, h, w], keypoints=None, scores=None) -> GraphBatch``.

    ``N = K``. Node features are gathered from the chosen cells, differentiably: the gradient of the
    node features reaches exactly those cells.

    Args:
        num_keypoints: K, the nodes per image (1 ≤ K ≤ h·w).
        select: ``topk`` (the K highest cells of ``scores [B, 1, h, w]``, or of a learned 1×1 conv
            over fmap when no scores are given; node features are scaled by the sigmoid of their
            score, as top-k pooling does, so the score branch is trained), ``given`` (``keypoints
            [B, K, 2]`` integer (row, col) pixel coordinates in an input image of ``image_size``,
            mapped to cells by the stride: ``cell = (row·h // H, col·w // W)``), ``random`` (K random
            distinct cells per image while training, an augmentation; the lattice in eval mode) or
            ``lattice`` (a fixed regular pattern).
        edges: per-image edges over the keypoints' cell positions: ``inverse_distance``
            (``1 / (1 + d)``), ``gaussian`` (``exp(-d² / σ²)``, under ``cutoff`` dropped) or ``knn``
            (each node to its ``k`` nearest keypoints, weight 1).
        image_size: ``(H, W)`` of the input image, required by ``select="given"``.
        in_channels: channels of fmap for the ``topk`` score conv (inferred on first call when None).
        k: neighbours for ``edges="knn"``.
        self_loop_weight: the weight put on the diagonal; ``None`` keeps the scheme's own.
        normalize: symmetric degree normalisation ``D^-1/2 A D^-1/2``.

    Each image's adjacency ``adj [B, K, K]`` depends only on its own keypoints.
    """

    def __init__(
        self,
        num_keypoints: int,
        select: str = "topk",
        edges: str = "inverse_distance",
        image_size: tuple[int, int] | None = None,
        in_channels: int | None = None,
        sigma: float = 1.0,
        cutoff: float = 0.01,
        k: int = 8,
        self_loop_weight: float | None = 1.0,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(num_keypoints, bool) or not isinstance(num_keypoints, int) or num_keypoints < 1:
            raise ValueError(f"num_keypoints={num_keypoints!r} is out of range; it must be an integer ≥ 1")
        check_choice("select", select, KEYPOINT_SELECT)
        check_choice("edges", edges, KEYPOINT_EDGES)
        check_positive("sigma", sigma)
        if edges == "knn" and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < num_keypoints):
            raise ValueError(f"k={k!r} is out of range; with edges='knn' it must be an integer in [1, {num_keypoints - 1}]")
        if select == "given":
            if image_size is None or len(image_size) != 2 or min(image_size) < 1:
                raise ValueError(f"image_size={image_size!r} is required by select='given': (H, W) of the input image")
            image_size = (int(image_size[0]), int(image_size[1]))
        self.num_keypoints = num_keypoints
        self.select, self.edges = select, edges
        self.image_size = image_size
        self.sigma, self.cutoff, self.k = sigma, cutoff, k
        self.self_loop_weight, self.normalize = self_loop_weight, normalize
        self.score = None
        if select == "topk":
            self.score = nn.Conv2d(in_channels, 1, 1) if in_channels else nn.LazyConv2d(1, 1)

    def extra_repr(self) -> str:
        return f"num_keypoints={self.num_keypoints}, select={self.select!r}, edges={self.edges!r}"

    def forward(self, fmap: Tensor, keypoints: Tensor | None = None, scores: Tensor | None = None) -> GraphBatch:
        """``fmap [B, C, h, w]`` → GraphBatch with ``x [B, K, C]``, ``pos [B, K, 2]``, ``adj [B, K, K]``."""
        check_fmap(fmap)
        b, c, h, w = fmap.shape
        k = self.num_keypoints
        if k > h * w:
            raise ValueError(f"num_keypoints={k} is out of range for a {h}×{w} feature map; it must be in [1, {h * w}]")
        logit = None  # [B, K] score of each chosen cell, with gradient, for the top-k gate
        if self.select == "given":
            cells = self._cells_from_keypoints(keypoints, b, h, w)
        elif self.select == "topk":
            if scores is not None:
                if scores.shape != (b, 1, h, w):
                    raise ValueError(f"scores must be [B, 1, h, w] = {(b, 1, h, w)}, got {tuple(scores.shape)}")
                cells = scores.detach().flatten(1).topk(k, dim=1).indices
                logit = scores.flatten(1).gather(1, cells)
            elif self._pointwise_score():
                # a 1×1 conv to one channel is a dot product per cell: rank every cell without
                # autograd, and score only the K chosen ones again with it (backward touches K cells)
                weight = self.score.weight.view(1, 1, c)
                with torch.no_grad():  # bmm reads [B, C, h·w] as it lies (matmul would copy it)
                    rank = torch.bmm(weight.expand(b, 1, c), fmap.flatten(2).to(weight.dtype)).squeeze(1)
                cells = rank.topk(k, dim=1).indices
            else:
                # the score conv runs in its own parameters' dtype (a float32 conv, lazily built or
                # not, scores a float16/bfloat16 map); the gate is cast back to the map's dtype below
                scores = self.score(fmap.to(self.score.weight.dtype))
                cells = scores.detach().flatten(1).topk(k, dim=1).indices
                logit = scores.flatten(1).gather(1, cells)
        elif self.select == "random" and self.training:
            cells = torch.rand(b, h * w, device=fmap.device).topk(k, dim=1).indices
        else:
            cells = lattice_cells(k, h, w, fmap.device).expand(b, -1)
        # gathered along the contiguous cell axis of [B, C, h·w]; x is its [B, K, C] view
        x = fmap.flatten(2).gather(2, cells.unsqueeze(1).expand(-1, c, -1)).transpose(1, 2)
        if self.select == "topk":
            if logit is None:
                weight, bias = self.score.weight.view(c, 1), self.score.bias
                logit = torch.matmul(x.to(weight.dtype), weight).squeeze(-1)
                if bias is not None:
                    logit = logit + bias
            x = x * torch.sigmoid(logit).unsqueeze(-1).to(x.dtype)
        pos = torch.stack([cells // w, cells % w], dim=-1).float()
        return GraphBatch(x=x, pos=pos, size=(h, w), adj=self._adjacency(pos).to(fmap.dtype))

    def score_map(self, fmap: Tensor) -> Tensor | None:
        """The learned score of every cell, ``fmap [B, C, h, w] -> [B, 1, h, w]``, whose ``K`` highest
        cells ``select="topk"`` chooses (before the sigmoid gate); ``None`` for the other selections."""
        if self.score is None:
            return None
        return self.score(fmap.to(self.score.weight.dtype))

    def _pointwise_score(self) -> bool:
        """Whether ``score`` is a built plain 1×1 convolution to one channel (a per-cell dot product)."""
        conv = self.score
        return (
            type(conv) is nn.Conv2d
            and not nn.parameter.is_lazy(conv.weight)
            and conv.out_channels == 1
            and conv.groups == 1
            and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and conv.padding in ((0, 0), "valid")
        )

    def _cells_from_keypoints(self, keypoints: Tensor | None, b: int, h: int, w: int) -> Tensor:
        if keypoints is None:
            raise ValueError("keypoints [B, K, 2] are required by select='given'")
        if keypoints.dim() != 3 or keypoints.shape[-1] != 2:
            raise ValueError(f"keypoints must be [B, K, 2] (row, col), got {tuple(keypoints.shape)}")
        if keypoints.shape[0] != b:
            raise ValueError(
                f"keypoints batch size {keypoints.shape[0]} differs from fmap's batch size {b}; "
                f"keypoints must be [B, K, 2] with B = {b}"
            )
        if keypoints.shape[1] != self.num_keypoints:
            raise ValueError(f"keypoints has {keypoints.shape[1]} points per image; num_keypoints={self.num_keypoints}")
        if keypoints.is_floating_point():
            if not torch.equal(keypoints, keypoints.round()):
                raise ValueError("keypoints must be integer (row, col) pixel coordinates")
            keypoints = keypoints.long()
        H, W = self.image_size
        row, col = keypoints[..., 0], keypoints[..., 1]
        if bool(((row < 0) | (row >= H) | (col < 0) | (col >= W)).any()):
            raise ValueError(
                f"keypoints outside the image: rows must be in [0, {H - 1}] and cols in [0, {W - 1}] "
                f"for image_size=({H}, {W}); got rows [{int(row.min())}, {int(row.max())}], "
                f"cols [{int(col.min())}, {int(col.max())}]"
            )
        return (row * h // H) * w + (col * w // W)

    def _adjacency(self, pos: Tensor) -> Tensor:
        dist = pairwise_distance(pos)
        if self.edges == "knn":
            adj = knn_mask(dist, self.k, include_self=False)
        else:
            adj = distance_weights(dist, self.edges, self.sigma, self.cutoff)
        adj = set_self_loops(adj, self.self_loop_weight)
        return normalize_symmetric(adj) if self.normalize else adj
