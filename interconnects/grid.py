"""DenseGrid: every feature-map cell becomes a node."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._edges import (distance_weights, grid_positions, inverse_sqrt_degree, normalize_sparse, normalize_symmetric,
                     pairwise_distance, set_self_loops)
from .checks import check_choice, check_fmap, check_positive
from .fft import GridConvolution, offset_grid
from .graph import GraphBatch

GRID_EDGES = ("inverse_distance", "gaussian", "grid4", "grid8", "learned")
GRID_AGGREGATE = ("auto", "dense", "fft")
#: Edge schemes whose weight depends only on the offset between two cells (an FFT convolution).
FFT_EDGES = ("inverse_distance", "gaussian")
#: ``edge_shift`` moves the weights above this (the tutorial's threshold); smaller ones stay as built.
SHIFT_ABOVE = 1e-4
#: ``aggregate="auto"`` uses the FFT from this many nodes on: the crossover measured on the CPU (one GCN
#: layer, C = 64, batch 8, forward + backward, one thread; docs/benchmarks.md): dense is faster at
#: 32×32, the FFT at 48×48.
FFT_MIN_NODES = 1600


class DenseGrid(nn.Module):
    """CNN → graph with one node per cell: ``fmap [B, C, h, w] -> GraphBatch`` with ``N = h·w``.

    Node ``n`` sits at cell ``(n // w, n % w)`` and carries ``fmap[:, :, n // w, n % w]``.

    Args:
        edges: ``inverse_distance`` (complete graph, ``w = 1 / (1 + d)``), ``gaussian``
            (``exp(-d² / σ²)``, weights under ``cutoff`` dropped), ``grid4`` / ``grid8`` (the 4 or 8
            neighbouring cells, weight 1), or ``learned`` (an MLP over the two cells' standardised
            coordinates predicts each weight, shared by all images and trained with the model).
        sigma: width of the Gaussian, in cells (times ``coord_scale``).
        cutoff: Gaussian weights below this are set to 0.
        squared: Gaussian of the squared distance (``True``) or of the distance itself.
        coord_scale: distances are measured in cells times this (``1/28`` measures a 28-wide map in
            units of its width).
        self_loop_weight: the weight put on the diagonal; ``None`` keeps the scheme's own
            (1 for distance schemes, none for ``grid4``/``grid8``, predicted for ``learned``).
        normalize: apply the symmetric degree normalisation ``D^-1/2 A D^-1/2``.
        edge_shift: added to every weight above :data:`SHIFT_ABOVE` once the adjacency is built
            (normalised, if ``normalize``): ``-0.2`` is the trick of Knyazev's tutorial code,
            ``A[A > 1e-4] -= 0.2``, which makes near neighbours' weights negative. Distance schemes
            (``inverse_distance``, ``gaussian``) with the dense adjacency only: the shifted matrix is
            no convolution, so ``aggregate='auto'`` stays dense.
        hidden: width of the ``learned`` edge MLP.
        aggregate: how distance schemes apply their shared adjacency: ``dense`` (the ``[1, N, N]``
            matrix), ``fft`` (a 2-D convolution through ``torch.fft``, ``O(N log N)`` time and
            ``O(N)`` memory, the graph's ``aggregator``; only ``inverse_distance`` and ``gaussian``)
            or ``auto`` (``fft`` for those schemes from :data:`FFT_MIN_NODES` nodes on, the measured
            crossover, else ``dense``).

    The edges do not depend on the image: distance schemes give a shared ``adj [1, N, N]`` built
    once per map size (or, with the FFT, its ``aggregator``, whose ``adj`` is built only when asked);
    ``grid4``/``grid8`` give ``edge_index``/``edge_weight`` over the batch.
    """

    def __init__(
        self,
        edges: str = "inverse_distance",
        sigma: float = 1.0,
        cutoff: float = 0.01,
        squared: bool = True,
        coord_scale: float = 1.0,
        self_loop_weight: float | None = 1.0,
        normalize: bool = False,
        edge_shift: float = 0.0,
        hidden: int = 64,
        aggregate: str = "auto",
    ) -> None:
        super().__init__()
        check_choice("edges", edges, GRID_EDGES)
        check_choice("aggregate", aggregate, GRID_AGGREGATE)
        if aggregate == "fft" and edges not in FFT_EDGES:
            raise ValueError(
                f"aggregate='fft' needs edges in {', '.join(map(repr, FFT_EDGES))} (a weight that depends only on "
                f"the offset between cells), got edges={edges!r}; use aggregate='auto' or 'dense'"
            )
        if isinstance(edge_shift, bool) or not isinstance(edge_shift, (int, float)) or not math.isfinite(edge_shift):
            raise ValueError(f"edge_shift={edge_shift!r} is not supported; it must be a finite number (0: no shift)")
        if edge_shift and (edges not in FFT_EDGES or aggregate == "fft"):
            raise ValueError(
                f"edge_shift={edge_shift} needs edges in {', '.join(map(repr, FFT_EDGES))} with aggregate 'auto' or "
                f"'dense' (a shift of the dense adjacency's weights), got edges={edges!r}, aggregate={aggregate!r}"
            )
        check_positive("sigma", sigma)
        check_positive("cutoff", cutoff, allow_zero=True)
        check_positive("coord_scale", coord_scale)
        if self_loop_weight is not None:
            check_positive("self_loop_weight", self_loop_weight, allow_zero=True)
        self.edges = edges
        self.sigma, self.cutoff, self.squared, self.coord_scale = sigma, cutoff, squared, coord_scale
        self.self_loop_weight = self_loop_weight
        self.normalize = normalize
        self.edge_shift = float(edge_shift)
        self.aggregate = aggregate
        self.edge_mlp = (
            nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Tanh())
            if edges == "learned"
            else None
        )
        self._cache: dict = {}

    def extra_repr(self) -> str:
        return (
            f"edges={self.edges!r}, self_loop_weight={self.self_loop_weight}, normalize={self.normalize}, "
            f"aggregate={self.aggregate!r}" + (f", edge_shift={self.edge_shift}" if self.edge_shift else "")
        )

    def uses_fft(self, h: int, w: int) -> bool:
        """Whether an ``h × w`` map is aggregated by FFT (``aggregate`` and the scheme decide)."""
        if self.edges not in FFT_EDGES or self.aggregate == "dense" or self.edge_shift:
            return False
        return self.aggregate == "fft" or h * w >= FFT_MIN_NODES

    def forward(self, fmap: Tensor) -> GraphBatch:
        """``fmap [B, C, h, w]`` → GraphBatch with ``x [B, h·w, C]``, ``pos [B, h·w, 2]``."""
        check_fmap(fmap)
        b, c, h, w = fmap.shape
        x = fmap.flatten(2).transpose(1, 2)
        pos = grid_positions(h, w, fmap.device, torch.float32).expand(b, -1, -1)
        if self.edges == "learned":
            return GraphBatch(x=x, pos=pos, size=(h, w), adj=self._learned_adj(h, w, fmap))
        key = (h, w, fmap.device, fmap.dtype)
        if key not in self._cache:
            # built as ordinary tensors even when the first call runs under torch.inference_mode,
            # so that later calls with autograd can save the cached edges for backward
            with torch.inference_mode(False), torch.no_grad():
                self._cache[key] = self._build(h, w, fmap.device, fmap.dtype)
        edges = self._cache[key]
        if isinstance(edges, GridConvolution):
            return GraphBatch(x=x, pos=pos, size=(h, w), aggregator=edges)
        if isinstance(edges, Tensor):
            return GraphBatch(x=x, pos=pos, size=(h, w), adj=edges)
        edge_index, edge_weight = edges
        offsets = (torch.arange(b, device=fmap.device) * (h * w)).repeat_interleave(edge_index.shape[1])
        edge_index = edge_index.repeat(1, b) + offsets
        return GraphBatch(x=x, pos=pos, size=(h, w), edge_index=edge_index, edge_weight=edge_weight.repeat(b))

    def _build(self, h: int, w: int, device, dtype):
        pos = grid_positions(h, w, device, torch.float32)
        if self.edges in ("grid4", "grid8"):
            return self._neighbour_edges(pos, h * w, dtype)
        if self.uses_fft(h, w):
            return self._convolution(h, w, device, dtype)
        dist = pairwise_distance(pos, self.coord_scale)
        adj = distance_weights(dist, self.edges, self.sigma, self.cutoff, self.squared)
        adj = set_self_loops(adj, self.self_loop_weight)
        if self.normalize:
            adj = normalize_symmetric(adj)
        if self.edge_shift:
            adj = torch.where(adj > SHIFT_ABOVE, adj + self.edge_shift, adj)
        return adj.to(dtype).unsqueeze(0)

    def _convolution(self, h: int, w: int, device, dtype) -> GridConvolution:
        """The same adjacency as :meth:`_build` as a convolution kernel over cell offsets."""
        dr, dc = offset_grid(h, w, device)
        dist = (dr * dr + dc * dc).sqrt()
        if self.coord_scale != 1.0:
            dist = dist * self.coord_scale
        kernel = distance_weights(dist, self.edges, self.sigma, self.cutoff, self.squared)
        if self.self_loop_weight is not None:
            kernel[h - 1, w - 1] = self.self_loop_weight  # offset (0, 0): the diagonal
        op = GridConvolution(kernel, (h, w), dtype=dtype)
        if self.normalize:
            scale = inverse_sqrt_degree(op.abs_row_sums())  # eps as normalize_symmetric's
            op = op.scale(scale, scale)
        return op

    def _neighbour_edges(self, pos: Tensor, n: int, dtype) -> tuple[Tensor, Tensor]:
        offset = (pos.unsqueeze(1) - pos.unsqueeze(0)).abs()  # [N, N, 2]
        dr, dc = offset[..., 0], offset[..., 1]
        neighbour = (dr + dc == 1) if self.edges == "grid4" else (dr.maximum(dc) == 1)
        dst, src = neighbour.nonzero(as_tuple=True)
        weight = torch.ones(src.numel(), device=pos.device)
        if self.self_loop_weight:
            loops = torch.arange(n, device=pos.device)
            src, dst = torch.cat([src, loops]), torch.cat([dst, loops])
            weight = torch.cat([weight, torch.full((n,), float(self.self_loop_weight), device=pos.device)])
        edge_index = torch.stack([src, dst])
        if self.normalize:
            weight = normalize_sparse(edge_index, weight, n)
        return edge_index, weight.to(dtype)

    def _learned_adj(self, h: int, w: int, fmap: Tensor) -> Tensor:
        """``adj [1, h·w, h·w]``: ``adj[i, j] = edge_mlp(xy_j, xy_i)`` over standardised ``(x, y) = (col, row)``.

        The published model's formula, input order included: ``(x, y)`` of the source pixel ``j``,
        then of the target ``i`` (which receives ``Σ_j adj[i, j]·x_j``), each coordinate
        standardised over the grid with the population standard deviation plus ``1e-5``.
        """
        xy = grid_positions(h, w, fmap.device, torch.float32).flip(-1)
        if h * w > 1:
            xy = (xy - xy.mean(0)) / (xy.std(0, unbiased=False) + 1e-5)
        # The first layer over the pair [xy_j, xy_i] is W_src·xy_j + W_dst·xy_i + b: both halves are
        # computed once per cell and broadcast-added, instead of a [N, N, 4] pair tensor through a
        # K = 4 matrix product (the same function, 1.3× faster a training step at 28 × 28).
        first, _, second, _ = self.edge_mlp
        xy = xy.to(first.weight.dtype)
        src = xy @ first.weight[:, :2].T  # [N, hidden]
        dst = torch.addmm(first.bias, xy, first.weight[:, 2:].T)  # [N, hidden]
        hidden = (dst.unsqueeze(1) + src.unsqueeze(0)).relu_()  # [N (target i), N (source j), hidden]
        adj = torch.tanh(second(hidden).squeeze(-1))
        adj = set_self_loops(adj, self.self_loop_weight)
        if self.normalize:
            adj = normalize_symmetric(adj)
        return adj.to(fmap.dtype).unsqueeze(0)
