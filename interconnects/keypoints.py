"""Keypoints: only chosen cells become nodes."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._edges import distance_weights, knn_mask, normalize_symmetric, pairwise_distance, set_self_loops
from .checks import check_choice, check_fmap, check_positive
from .detectors import DETECTORS, cell_scores
from .graph import GraphBatch

KEYPOINT_SELECT = ("topk", "given", "detector", "random", "lattice")
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


def fallback_order(num_keypoints: int, h: int, w: int, device=None) -> Tensor:
    """``[h·w]`` every cell id once: the :func:`lattice_cells` of ``K`` first, then the rest row-major.

    The order in which cells fill the places a detector or the given keypoints leave open, so that
    a blank image gets the lattice, deterministically.
    """
    n = h * w
    rank = torch.arange(n, device=device) + num_keypoints  # after every lattice cell
    rank[lattice_cells(num_keypoints, h, w, device)] = torch.arange(num_keypoints, device=device)
    return rank.argsort()


def top_cells(keys: tuple[Tensor, ...], num_keypoints: int, h: int, w: int) -> Tensor:
    """``[B, K]`` distinct cell ids, the K best by ``keys`` (each ``[B, h·w]``, higher first).

    Ties on the first key are broken by the second, and so on; cells equal on every key come in
    :func:`fallback_order`. Stable sorts make the choice deterministic.
    """
    order = fallback_order(num_keypoints, h, w, keys[0].device).expand(keys[0].shape[0], -1)
    for key in reversed(keys):  # least significant first: each stable sort keeps the order of ties
        order = order.gather(1, key.gather(1, order).sort(dim=1, descending=True, stable=True).indices)
    return order[:, :num_keypoints]


def distinct_cells(cells: Tensor, h: int, w: int) -> Tensor:
    """``cells [B, K]`` with every repeat of an earlier cell replaced by an unused one: ``[B, K]`` distinct.

    Cells seen first keep their place; the repeats take the unused cells in :func:`fallback_order`.
    """
    b, k = cells.shape
    same = cells.unsqueeze(2) == cells.unsqueeze(1)  # [B, K, K]
    repeat = (same & torch.ones(k, k, dtype=torch.bool, device=cells.device).tril(-1)).any(-1)
    used = torch.zeros(b, h * w, dtype=torch.bool, device=cells.device).scatter_(1, cells, True)
    order = fallback_order(k, h, w, cells.device).expand(b, -1)
    unused = order.gather(1, used.gather(1, order).to(torch.uint8).sort(dim=1, stable=True).indices)
    fill = unused.gather(1, (repeat.cumsum(1) - 1).clamp(min=0))
    return torch.where(repeat, fill, cells)


class Keypoints(nn.Module):
    """CNN → graph over ``K`` chosen cells:
    ``(fmap [B, C, h, w], keypoints=None, scores=None, image=None) -> GraphBatch``.

    ``N = K``. Node features are gathered from the chosen cells, differentiably: the gradient of the
    node features reaches exactly those cells.

    Args:
        num_keypoints: K, the nodes per image (1 ≤ K ≤ h·w).
        select: ``topk`` (the K highest cells of ``scores [B, 1, h, w]``, or of a learned 1×1 conv
            over fmap when no scores are given; node features are scaled by the sigmoid of their
            score, as top-k pooling does, so the score branch is trained), ``given`` (``keypoints
            [B, K, 2]`` integer (row, col) pixel coordinates in an input image of ``image_size``,
            mapped to cells by the stride: ``cell = (row·h // H, col·w // W)``; the Python API's
            mode), ``detector`` (the K cells holding the strongest detections of a classical
            ``detector`` on the input image, mapped to cells the same way; the command line's mode),
            ``random`` (K random distinct cells per image while training, an augmentation; the
            lattice in eval mode) or ``lattice`` (a fixed regular pattern).
        edges: per-image edges over the keypoints' cell positions: ``inverse_distance``
            (``1 / (1 + d)``), ``gaussian`` (``exp(-d² / σ²)``, under ``cutoff`` dropped) or ``knn``
            (each node to its ``k`` nearest keypoints, weight 1).
        image_size: ``(H, W)`` of the input image, required by ``select="given"``.
        detector: for ``select="detector"``: ``harris`` or ``shi_tomasi`` (corner response of the
            structure tensor from Sobel gradients), or ``intensity`` (the brightest points); see
            :func:`interconnects.detectors.detector_response`.
        nms_size: the window of the detector's non-maximum suppression, in pixels (odd).
        detector_sigma: the width, in pixels, of the detector's Gaussian window.
        in_channels: channels of fmap for the ``topk`` score conv (inferred on first call when None).
        k: neighbours for ``edges="knn"``.
        self_loop_weight: the weight put on the diagonal; ``None`` keeps the scheme's own.
        normalize: symmetric degree normalisation ``D^-1/2 A D^-1/2``.

    Each image's adjacency ``adj [B, K, K]`` depends only on its own keypoints.

    With ``given`` and ``detector`` the K cells are always distinct: keypoints that fall in a cell
    already taken, or an image with fewer than K detections, are filled up deterministically
    (detections first by strength, then cells by their strongest response, then the lattice).
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
        detector: str = "harris",
        nms_size: int = 3,
        detector_sigma: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(num_keypoints, bool) or not isinstance(num_keypoints, int) or num_keypoints < 1:
            raise ValueError(f"num_keypoints={num_keypoints!r} is out of range; it must be an integer ≥ 1")
        check_choice("select", select, KEYPOINT_SELECT)
        check_choice("edges", edges, KEYPOINT_EDGES)
        check_positive("sigma", sigma)
        check_choice("detector", detector, DETECTORS)
        if isinstance(nms_size, bool) or not isinstance(nms_size, int) or nms_size < 1 or nms_size % 2 == 0:
            raise ValueError(f"nms_size={nms_size!r} is out of range; it must be an odd integer ≥ 1")
        check_positive("detector_sigma", detector_sigma)
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
        self.detector, self.nms_size, self.detector_sigma = detector, nms_size, detector_sigma
        self.score = None
        if select == "topk":
            self.score = nn.Conv2d(in_channels, 1, 1) if in_channels else nn.LazyConv2d(1, 1)

    @property
    def needs_image(self) -> bool:
        """Whether :meth:`forward` needs the input image (``select="detector"``): the model passes it as ``image=``."""
        return self.select == "detector"

    def extra_repr(self) -> str:
        detector = f", detector={self.detector!r}" if self.select == "detector" else ""
        return f"num_keypoints={self.num_keypoints}, select={self.select!r}{detector}, edges={self.edges!r}"

    def forward(self, fmap: Tensor, keypoints: Tensor | None = None, scores: Tensor | None = None,
                image: Tensor | None = None) -> GraphBatch:
        """``fmap [B, C, h, w]`` → GraphBatch with ``x [B, K, C]``, ``pos [B, K, 2]``, ``adj [B, K, K]``.

        ``keypoints [B, K, 2]``: for ``select="given"``; ``scores [B, 1, h, w]``: optional for
        ``topk``; ``image [B, C_in, H, W]``: the input image, for ``select="detector"``.
        """
        check_fmap(fmap)
        b, c, h, w = fmap.shape
        k = self.num_keypoints
        if k > h * w:
            raise ValueError(f"num_keypoints={k} is out of range for a {h}×{w} feature map; it must be in [1, {h * w}]")
        logit = None  # [B, K] score of each chosen cell, with gradient, for the top-k gate
        if self.select == "given":
            cells = distinct_cells(self._cells_from_keypoints(keypoints, b, h, w), h, w)
        elif self.select == "detector":
            cells = self._cells_from_image(image, b, h, w)
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
            and not isinstance(conv.weight, nn.parameter.UninitializedParameter)
            and conv.out_channels == 1
            and conv.groups == 1
            and conv.kernel_size == (1, 1)
            and conv.stride == (1, 1)
            and conv.dilation == (1, 1)
            and conv.padding in ((0, 0), "valid")
        )

    def _cells_from_keypoints(self, keypoints: Tensor | None, b: int, h: int, w: int) -> Tensor:
        if keypoints is None:
            raise ValueError(
                "select='given' is the Python API's mode: it needs keypoints [B, K, 2] passed as "
                "model(image, keypoints=...); on the command line use interconnect.select=detector "
                f"(interconnect.detector={'|'.join(DETECTORS)})"
            )
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

    def _cells_from_image(self, image: Tensor | None, b: int, h: int, w: int) -> Tensor:
        if image is None:
            raise ValueError("select='detector' needs the input image: call forward(fmap, image=image) "
                             "(HybridModel passes it, as needs_image is true)")
        if image.dim() != 4 or image.shape[0] != b:
            raise ValueError(f"image must be [B, C, H, W] with B = {b}, got {tuple(image.shape)}")
        with torch.no_grad():
            peak, response = cell_scores(image, (h, w), self.detector, self.nms_size, self.detector_sigma)
            return top_cells((peak, response), self.num_keypoints, h, w)

    def _adjacency(self, pos: Tensor) -> Tensor:
        dist = pairwise_distance(pos)
        if self.edges == "knn":
            adj = knn_mask(dist, self.k, include_self=False)
        else:
            adj = distance_weights(dist, self.edges, self.sigma, self.cutoff)
        adj = set_self_loops(adj, self.self_loop_weight)
        return normalize_symmetric(adj) if self.normalize else adj
