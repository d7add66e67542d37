"""Superpixels: one node per SLIC region of the input image, its features pooled over the region.

SLIC (Achanta et al., TPAMI 2012) is k-means over colour and position, each pixel choosing among
the seed centres near it. Here it is batched tensor code: the whole batch is segmented at once, each
of a fixed number of iterations comparing every pixel with the four seed centres whose grid places
surround it (the original SLIC's ``2S × 2S`` search window, for seeds at their grid places), by a few
fused multiply-adds over ``[pixels per quad, B · quads]`` planes, the centres then updated by one
``scatter_add_`` over the flat batch, so it runs on the CPU and the GPU alike and never loops over
images or regions. Four iterations by default: the regions' agreement with skimage's (ten) stops
changing after four (docs/benchmarks.md).

The seeds lie on the same regular grid as ``skimage.segmentation.slic`` places them, and the distance
is its own: ``|Δcolour|² / compactness² + |Δposition|² / step²``, with colour the image in ``[0, 1]``
for grey images and CIELAB (``L`` in ``[0, 100]``) for RGB ones, so ``compactness`` means what it
means there. Each image is first rescaled to ``[0, 1]`` by its own minimum and maximum, so the regions
do not depend on the dataset normalisation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .checks import check_choice, check_fmap, check_int, check_positive
from .graph import GraphBatch

SUPERPIXEL_EDGES = ("knn", "adjacency")


@dataclass(frozen=True)
class RegionGraphBatch(GraphBatch):
    """A :class:`GraphBatch` whose nodes are image regions, with the assignments that map them back.

    Attributes (besides :class:`GraphBatch`'s):
        assignment: ``[B, h, w]`` long, the node each feature-map cell belongs to (the region covering
            most of the cell's pixels): graph → CNN gives each cell its node's features.
        regions: ``[B, H, W]`` long, the node each pixel of the input image belongs to.
        valid: ``[B, N]`` bool, false for the slots of regions that ended empty; such a slot holds a
            copy of the region that took over its seed (same features, position and edges), so the
            node count stays fixed and no slot is left without content.
    """

    assignment: Tensor | None = None
    regions: Tensor | None = None
    valid: Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        b, n = self.x.shape[:2]
        if self.assignment is not None and (self.assignment.dim() != 3 or self.assignment.shape[0] != b
                                            or tuple(self.assignment.shape[1:]) != tuple(self.size)):
            raise ValueError(f"RegionGraphBatch.assignment must be [B, h, w] = {(b, *self.size)}, "
                             f"got {tuple(self.assignment.shape)}")
        if self.regions is not None and (self.regions.dim() != 3 or self.regions.shape[0] != b):
            raise ValueError(f"RegionGraphBatch.regions must be [B, H, W] with B = {b}, got {tuple(self.regions.shape)}")
        if self.valid is not None and self.valid.shape != (b, n):
            raise ValueError(f"RegionGraphBatch.valid must be [B, N] = {(b, n)}, got {tuple(self.valid.shape)}")


# ---- the seed grid -------------------------------------------------------------------------------
def seed_grid(height: int, width: int, num_segments: int) -> tuple[int, int, int, int, int]:
    """``(start_row, start_col, step_row, step_col, step)`` of the regular seed grid SLIC starts from.

    The grid of ``skimage.util.regular_grid`` over the ``(1, H, W)`` volume skimage's ``slic`` sees:
    seeds at rows ``start_row, start_row + step_row, ...`` (and so for columns), about
    ``num_segments`` of them; ``step`` is the larger step, the spatial scale of the distance.
    """
    dims = [1, height, width]
    space = float(height * width)
    if space <= num_segments:
        return 0, 0, 1, 1, 1
    order = sorted(range(3), key=lambda i: dims[i])
    sorted_dims = [dims[i] for i in order]
    steps = [(space / num_segments) ** (1 / 3)] * 3
    if any(d < s for d, s in zip(sorted_dims, steps)):
        for dim in range(3):
            steps[dim] = float(sorted_dims[dim])
            rest = float(math.prod(sorted_dims[dim + 1:]))
            for later in range(dim + 1, 3):
                steps[later] = (rest / num_segments) ** (1 / (3 - dim - 1))
            if all(d >= s for d, s in zip(sorted_dims, steps)):
                break
    starts = [int(s // 2) for s in steps]
    rounded = [int(round(s)) for s in steps]
    start = [0, 0, 0]
    step = [1, 1, 1]
    for rank, axis in enumerate(order):
        start[axis], step[axis] = starts[rank], max(1, rounded[rank])
    return start[1], start[2], step[1], step[2], max(step)


class SeedLayout(NamedTuple):
    """The fixed layout SLIC works in for one image shape (see :func:`seed_layout`)."""

    seeds: Tensor  # [S, 2] long (row, col) pixel of each seed, row-major over the gh × gw seed grid
    step: int  # the spatial scale of the distance, pixels
    cand: Tensor  # [Q, 4] long: the 2×2 seeds around each quad (the pixels between four seeds), clamped
    blocked: Tensor  # [Q, 4] float: +inf for the candidates that fall off the seed grid, else 0
    members: Tensor  # [Q·P] long: the pixels of each quad, padded with the quad's first pixel
    slot: Tensor  # [H·W] long: where each pixel sits in ``members``
    first: Tensor  # [Q] long: the id its first candidate would have on an unbounded seed grid
    shift: tuple[int, int, int, int]  # the other candidates' ids from the first: 0, 1, gw, gw + 1


@functools.lru_cache(maxsize=32)
def _seed_layout(height: int, width: int, num_segments: int, device: str) -> SeedLayout:
    r0, c0, sr, sc, step = seed_grid(height, width, num_segments)
    rows = torch.arange(r0, height, sr)
    cols = torch.arange(c0, width, sc)
    gh, gw = rows.numel(), cols.numel()
    seeds = torch.stack([rows.repeat_interleave(gw), cols.repeat(gh)], dim=-1)
    # a pixel's quad: the seed row above it (-1 before the first) and the seed column left of it
    qr = torch.div(torch.arange(height) - r0, sr, rounding_mode="floor").clamp(-1, gh - 1) + 1  # [H] in [0, gh]
    qc = torch.div(torch.arange(width) - c0, sc, rounding_mode="floor").clamp(-1, gw - 1) + 1
    nr = torch.arange(gh + 1).view(-1, 1, 1, 1) + torch.tensor([-1, 0]).view(1, 1, 2, 1)  # seed rows
    nc = torch.arange(gw + 1).view(1, -1, 1, 1) + torch.tensor([-1, 0]).view(1, 1, 1, 2)
    off = ((nr < 0) | (nr >= gh)) | ((nc < 0) | (nc >= gw))  # [gh + 1, gw + 1, 2, 2]
    quads = (gh + 1) * (gw + 1)
    cand = (nr.clamp(0, gh - 1) * gw + nc.clamp(0, gw - 1)).reshape(quads, 4)
    blocked = torch.zeros(quads, 4).masked_fill_(off.reshape(quads, 4), float("inf"))
    quad = (qr.view(-1, 1) * (gw + 1) + qc.view(1, -1)).flatten()  # [H·W] quad of each pixel
    order = quad.argsort(stable=True)  # pixels grouped by quad, row-major within one
    per_quad = torch.bincount(quad, minlength=quads)
    p = int(per_quad.max())
    first = torch.cumsum(per_quad, 0) - per_quad
    rank = torch.empty_like(order)
    rank[order] = torch.arange(height * width) - first[quad[order]]
    slot = quad * p + rank
    members = order[first.clamp(max=height * width - 1)].repeat_interleave(p)  # padding: a pixel of the quad
    members[slot] = torch.arange(height * width)
    to = torch.device(device)
    first = ((torch.arange(gh + 1) - 1).view(-1, 1) * gw + (torch.arange(gw + 1) - 1).view(1, -1)).flatten()
    return SeedLayout(seeds.to(to), step, cand.to(to), blocked.to(to), members.to(to), slot.to(to), first.to(to),
                      (0, 1, gw, gw + 1))


def seed_layout(height: int, width: int, num_segments: int, device=None) -> SeedLayout:
    """The seeds of :func:`seed_grid` for an ``H × W`` image, the quad of each pixel (the pixels
    between the same four seeds) and the four candidate seeds of every quad (built once per shape
    and device)."""
    return _seed_layout(height, width, num_segments, str(torch.device(device or "cpu")))


class BatchSlots(NamedTuple):
    """The flat indices of :meth:`Superpixels.cluster` for a batch of ``B`` images of one shape: the
    slots ``(p, b, q)`` (quad ``q``'s ``p``-th pixel of image ``b``) laid out as ``[P, B·Q]`` planes."""

    gather: Tensor  # [P·B·Q] long: the feature column of each slot, B·H·W (a zero column) for padding
    seed_at: Tensor  # [B·S] long: the feature column of each seed's pixel
    near: Tensor  # [4·B·Q] long: the ids (into the batch's B·S seeds) of each quad's four candidates
    blocked: Tensor  # [4, B·Q] float: +inf for the candidates that fall off the seed grid, else 0
    base: Tensor  # [1, B·Q] long: the id its first candidate would have on an unbounded seed grid
    pixel_slot: Tensor  # [B·H·W] long: the slot of each pixel
    image_seed: Tensor  # [B, 1] long: b·S, the first seed id of image b


@functools.lru_cache(maxsize=16)
def _batch_slots(height: int, width: int, num_segments: int, batch: int, device: str) -> BatchSlots:
    grid = _seed_layout(height, width, num_segments, "cpu")
    q, s, npix = grid.cand.shape[0], grid.seeds.shape[0], height * width
    p = grid.members.numel() // q
    image = torch.arange(batch).view(1, batch, 1)
    real = torch.zeros(q * p, dtype=torch.bool)
    real[grid.slot] = True  # (an index_put_, which the tracer of TensorBoard's graph follows; index_fill_ it does not)
    real = real.view(q, p).t().unsqueeze(1)
    members = grid.members.view(q, p).t().unsqueeze(1)  # [P, 1, Q]
    gather = torch.where(real, image * npix + members, batch * npix).flatten()
    seed_at = (image.view(batch, 1) * npix + grid.seeds[:, 0] * width + grid.seeds[:, 1]).flatten()
    near = (grid.cand.t().unsqueeze(1) + image * s).flatten()
    blocked = grid.blocked.t().unsqueeze(1).expand(4, batch, q).reshape(4, batch * q)
    base = (grid.first.view(1, q) + image.view(batch, 1) * s).view(1, batch * q)
    slot = grid.slot.view(1, npix)
    pixel_slot = (((slot % p) * batch + image.view(batch, 1)) * q + torch.div(slot, p, rounding_mode="floor")).flatten()
    to = torch.device(device)
    return BatchSlots(gather.to(to), seed_at.to(to), near.to(to), blocked.to(to), base.to(to), pixel_slot.to(to),
                      (image.view(batch, 1) * s).to(to))


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB ``[B, 3, H, W]`` in ``[0, 1]`` → CIELAB ``[B, 3, H, W]`` (D65, ``L`` in ``[0, 100]``), as
    ``skimage.color.rgb2lab``."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    matrix = torch.tensor([[0.412453, 0.357580, 0.180423],
                           [0.212671, 0.715160, 0.072169],
                           [0.019334, 0.119193, 0.950227]], dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    white = torch.tensor([0.95047, 1.0, 1.08883], dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    t = xyz / white
    f = torch.where(t > 0.008856, t.clamp_min(1e-12).pow(1 / 3), 7.787 * t + 16 / 116)
    lightness = torch.where(t[:, 1:2] > 0.008856, 116 * f[:, 1:2] - 16, 903.3 * t[:, 1:2])
    return torch.cat([lightness, 500 * (f[:, 0:1] - f[:, 1:2]), 200 * (f[:, 1:2] - f[:, 2:3])], dim=1)


def slic_colour(image: Tensor) -> Tensor:
    """The colour SLIC compares: ``image [B, C, H, W]`` rescaled to ``[0, 1]`` per image (min–max
    over its pixels and channels); RGB (``C = 3``) then as CIELAB. Returns ``[B, C, H, W]`` float."""
    image = image.detach().float()
    low = image.amin(dim=(1, 2, 3), keepdim=True)
    high = image.amax(dim=(1, 2, 3), keepdim=True)
    scaled = (image - low) / (high - low).clamp_min(1e-12)
    return rgb_to_lab(scaled) if image.shape[1] == 3 else scaled


# ---- connectivity --------------------------------------------------------------------------------
def _neighbour_views(t: Tensor, fill) -> list[Tensor]:
    """The 4-neighbours of every pixel of ``t [B, H, W]`` (up, left, down, right), ``fill`` off the edge."""
    padded = nn.functional.pad(t.unsqueeze(1), (1, 1, 1, 1), value=fill).squeeze(1)
    return [padded[:, :-2, 1:-1], padded[:, 1:-1, :-2], padded[:, 2:, 1:-1], padded[:, 1:-1, 2:]]


def _run_ends(labels: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The runs of equal labels along ``dim`` (2: rows, 1: columns) of ``labels [B, H, W]``:
    ``(offset [B, H, W], end [B, H·W])``, each pixel's run index along the line times ``H·W`` (runs
    count up along the line) and the flat id of the last pixel of its run."""
    b, h, w = labels.shape
    n = h * w
    ids = torch.arange(n, device=labels.device, dtype=_id_dtype(h, w)).view(1, h, w)
    line = labels.shape[dim]
    start = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    start.narrow(dim, 1, line - 1).copy_(labels.narrow(dim, 1, line - 1) != labels.narrow(dim, 0, line - 1))
    end = torch.ones_like(start)
    end.narrow(dim, 0, line - 1).copy_(start.narrow(dim, 1, line - 1))
    last = torch.where(end, ids, n).flip(dim).cummin(dim).values.flip(dim)  # the next run end at or after
    return start.to(ids.dtype).cumsum(dim, dtype=ids.dtype).mul_(n), last.reshape(b, n)


def _id_dtype(h: int, w: int) -> torch.dtype:
    """The integer type of pixel ids and run offsets (``run · H·W + id``) of an ``H × W`` image:
    int32 where they fit (half the memory traffic of int64), else int64."""
    return torch.int32 if (max(h, w) + 1) * h * w < 2**31 else torch.int64


def connected_components(labels: Tensor) -> Tensor:
    """``labels [B, H, W]`` → ``[B, H, W]`` long: for every pixel the smallest flat pixel id of its
    4-connected component of equal labels."""
    return _components(labels).long()


def _components(labels: Tensor) -> Tensor:
    """:func:`connected_components` in the id type of :func:`_id_dtype`.

    Each round takes the minimum over every run of equal labels along the rows, then along the
    columns (a running minimum per line, kept inside a run by subtracting a per-run offset, read
    back at the run's last pixel), then jumps pointers (each pixel takes the id its id holds); rounds
    repeat until the column pass changes nothing, a handful for compact regions, every step over the
    whole batch.
    """
    b, h, w = labels.shape
    n = h * w
    off_row, end_row = _run_ends(labels, 2)
    off_col, end_col = _run_ends(labels, 1)
    comp = torch.arange(n, device=labels.device, dtype=off_row.dtype).view(1, h, w).expand(b, h, w).contiguous()
    while True:
        rows = (comp - off_row).cummin(2).values.add_(off_row).view(b, n).gather(1, end_row).view(b, h, w)
        cols = (rows - off_col).cummin(1).values.add_(off_col).view(b, n).gather(1, end_col)
        if torch.equal(cols.view(b, h, w), rows):  # a fixed point of both passes (each is idempotent)
            return rows
        comp = cols.gather(1, cols).view(b, h, w)  # pointer jumping: the id of my id (never larger, same component)


def enforce_connectivity(labels: Tensor, num_regions: int, min_size: float = 0.0) -> Tensor:
    """Each region of ``labels [B, H, W]`` (values in ``[0, num_regions)``) made one connected piece.

    A region keeps its largest 4-connected component (ties: the one with the smallest pixel id); its
    other components, and kept components smaller than ``min_size`` pixels, are stray: they are
    grown over by the labels around them, one pixel ring at a time (each stray pixel takes the label
    of a settled 4-neighbour, in the order up, left, down, right), which keeps every region connected.
    The largest component of each image is always kept. Returns ``[B, H, W]`` long; regions may end
    empty.
    """
    b, h, w = labels.shape
    n = h * w
    # ids, sizes and keys (size · H·W + id) in int32 where they fit (half the memory traffic), labels alike
    dtype = torch.int32 if (n + 1) * n < 2**31 else torch.int64
    labels = labels.to(dtype)
    flat_labels = labels.reshape(b, n)
    comp = _components(labels).to(dtype).reshape(b, n)
    size = torch.zeros(b, n, dtype=dtype, device=labels.device).scatter_add_(1, comp, torch.ones_like(comp))
    comp_size = size.gather(1, comp)  # [B, H·W] size of each pixel's component
    key = comp_size * n + (n - 1 - comp)  # larger components first, then the smaller pixel id
    best = torch.zeros(b, num_regions, dtype=dtype, device=labels.device)
    best = best.scatter_reduce_(1, flat_labels, key, "amax")
    keep = (key == best.gather(1, flat_labels)) & (comp_size >= min_size)
    keep |= key == key.amax(1, keepdim=True)
    out = flat_labels.clone().view(b, h, w)
    settled = keep.view(b, h, w)
    while not bool(settled.all()):
        taken = torch.zeros_like(settled)
        grown = out
        for neighbour, ok in zip(_neighbour_views(out, 0), _neighbour_views(settled, False)):
            take = ok & ~settled & ~taken
            grown = torch.where(take, neighbour, grown)
            taken |= take
        out, settled = grown, settled | taken
    return out.long()


# ---- the interconnect ----------------------------------------------------------------------------
class Superpixels(nn.Module):
    """CNN → graph over SLIC regions of the input image:
    ``(fmap [B, C, h, w], image [B, C_in, H, W] = fmap) -> RegionGraphBatch``.

    ``N`` = the number of SLIC seeds (about ``num_segments``; 81 for 28×28 and 75, 121 for 32×32 and
    150, as skimage places them), the same for every image of a shape. Regions are made connected
    (:func:`enforce_connectivity`); a region that ends empty keeps its slot as a copy of the region
    that took over its seed (``valid`` is false there), so the graph stays dense.

    Node features ``x [B, N, C + 3 + C_in]``: the mean of ``fmap`` over the region's pixels (each
    pixel taking its feature-map cell's features, cell ``(row·h // H, col·w // W)``: the fmap
    upsampled by nearest neighbour, pooled by one scatter or one batched product, differentiable in
    fmap), then the region's centroid (row, col) in ``[0, 1]`` of the image, its size relative to
    the mean region size, and its mean colour (the input image's values). ``pos`` is the centroid
    in feature-map cells.

    Args:
        num_segments: the approximate number of regions (seeds) per image.
        compactness: weight of position against colour, as in skimage (grey in ``[0, 1]``: about
            0.1–1; CIELAB: about 10).
        iterations: SLIC (k-means) iterations.
        edges: ``knn`` (each region to its ``k`` nearest regions by centroid, weight 1; the fixed
            in-degree view ``neighbors`` too) or ``adjacency`` (regions sharing a pixel border,
            weight 1, symmetric, ``adj [B, N, N]``).
        k: neighbours for ``edges="knn"`` (below the region count).
        min_size_factor: pieces smaller than this share of the mean region size are merged into
            the regions around them (skimage's default is 0.5).
    """

    needs_image = True  # the hybrid passes the input image as image=

    def __init__(
        self,
        num_segments: int = 75,
        compactness: float = 0.25,
        iterations: int = 4,
        edges: str = "knn",
        k: int = 8,
        min_size_factor: float = 0.5,
    ) -> None:
        super().__init__()
        check_int("num_segments", num_segments, 2)
        check_positive("compactness", compactness)
        check_int("iterations", iterations)
        check_choice("edges", edges, SUPERPIXEL_EDGES)
        if edges == "knn":
            check_int("k", k)
        if isinstance(min_size_factor, bool) or not isinstance(min_size_factor, (int, float)) \
                or not 0 <= min_size_factor <= 1:
            raise ValueError(f"min_size_factor={min_size_factor!r} is out of range; it must be a number in [0, 1]")
        self.num_segments, self.compactness, self.iterations = num_segments, float(compactness), iterations
        self.edges, self.k, self.min_size_factor = edges, k, float(min_size_factor)

    def extra_repr(self) -> str:
        knn = f", k={self.k}" if self.edges == "knn" else ""
        return (f"num_segments={self.num_segments}, compactness={self.compactness}, "
                f"iterations={self.iterations}, edges={self.edges!r}{knn}")

    # ---- segmentation --------------------------------------------------------------------------
    @torch.compiler.disable
    @torch.no_grad()
    def segment(self, image: Tensor) -> Tensor:
        """``image [B, C, H, W] -> regions [B, H, W]`` long in ``[0, S)``: batched SLIC
        (:meth:`cluster`), then :func:`enforce_connectivity`. Not differentiable (a region choice is
        discrete). Left out of ``torch.compile`` (``trainer.compile=true`` compiles the rest of the
        model): inductor's C++ code for the connectivity's masked label comparisons does not
        compile on the CPU (torch 2.14), and the segmentation is a small share of a step."""
        labels = self.cluster(image)
        s = seed_layout(*image.shape[-2:], self.num_segments, image.device).seeds.shape[0]
        return enforce_connectivity(labels, s, self.min_size_factor * labels[0].numel() / s)

    @torch.compiler.disable
    def _segment_with_seeds(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`segment` and the seeds ``[S, 2]`` of the image's shape (their layout is built once
        per shape, in a cache that ``torch.compile`` would trace through)."""
        seeds = seed_layout(*image.shape[-2:], self.num_segments, image.device).seeds
        return self.segment(image), seeds

    @torch.no_grad()
    def cluster(self, image: Tensor) -> Tensor:
        """The SLIC k-means alone: ``image [B, C, H, W] -> [B, H, W]`` long, the seed each pixel chose
        in the last iteration among the four seeds around it (regions may be in pieces)."""
        if image.dim() != 4:
            raise ValueError(f"image must be a 4-D tensor [B, C, H, W], got shape {tuple(image.shape)}")
        b, _, h, w = image.shape
        device = image.device
        grid = seed_layout(h, w, self.num_segments, device)
        at = _batch_slots(h, w, self.num_segments, b, str(torch.device(device)))
        step, s, q = grid.step, grid.seeds.shape[0], grid.cand.shape[0]
        p = grid.members.numel() // q  # the most pixels a quad has (short quads padded)
        npix, gw = h * w, grid.shift[2]
        colour = slic_colour(image) / self.compactness  # [B, Cc, H, W]
        d = colour.shape[1] + 2
        # the feature planes [D + 1, B·H·W + 1]: colour, row and column (position over the step), a
        # count of 1, and a zero column that padding slots read
        feats = torch.zeros(d + 1, b * npix + 1, device=device)
        feats[:d - 2, :-1].view(d - 2, b, npix).copy_(colour.flatten(2).transpose(0, 1))
        feats[d - 2, :-1].view(b, h, w).copy_((torch.arange(h, device=device, dtype=torch.float32) / step).view(1, h, 1))
        feats[d - 1, :-1].view(b, h, w).copy_((torch.arange(w, device=device, dtype=torch.float32) / step).view(1, 1, w))
        feats[d, :-1] = 1.0
        # Everything is kept as planes over the slots (p, b, q), quad q's p-th pixel of image b: each
        # of the four candidates scores a whole [P, B·Q] plane against its seed by broadcast
        # multiply-adds along the long B·Q axis, |f - c|² = |f|² - 2 f·c + |c|², where |f|² does not
        # change which seed is nearest.
        summed = feats.index_select(1, at.gather)  # [D + 1, P·B·Q]: what the centres are summed from
        cells = summed[:d].view(d, 1, p, b * q)
        centres = feats[:d].index_select(1, at.seed_at)  # [D, B·S] the centres as planes
        flat = None
        for it in range(self.iterations):  # a loop over iterations; each is over the whole batch
            near = centres.index_select(1, at.near).view(d, 4, b * q)  # [D, 4, B·Q] each quad's candidates
            bias = near.pow(2).sum(0).add_(at.blocked).unsqueeze(1)  # [4, 1, B·Q]
            weight = near.mul(-2).unsqueeze(2)  # [D, 4, 1, B·Q]
            score = torch.addcmul(bias, cells[0], weight[0])  # [4, P, B·Q]: D fused multiply-adds
            for i in range(1, d):
                score.addcmul_(cells[i], weight[i])
            # the nearest of the four by two pairs (a tie goes to the lower seed id, as in a scan); its
            # id is the quad's first candidate plus its offset on the seed grid: 0, 1, gw or gw + 1
            # (candidates off the grid score +inf and never win, so their clamped ids do not matter)
            right_top, right_bottom = score[1] < score[0], score[3] < score[2]
            bottom = torch.minimum(score[2], score[3]) < torch.minimum(score[0], score[1])
            right = right_top ^ (bottom & (right_top ^ right_bottom))
            flat = torch.add(at.base, right).add_(bottom, alpha=gw).view(1, -1)  # [1, P·B·Q] ids into B·S
            if it == self.iterations - 1:
                break  # the last assignment is the answer: its centres are not needed
            # every centre to the mean of its pixels, by one scatter_add_ over the flat batch (an empty one stays put)
            sums = torch.zeros(d + 1, b * s, device=device).scatter_add_(1, flat.expand(d + 1, -1), summed)
            count = sums[d:]
            centres = torch.where(count > 0, sums[:d] / count.clamp_min(1), centres)
        if flat is None:  # iterations ≥ 1 is checked in __init__
            raise ValueError("iterations must be ≥ 1")
        labels = flat.view(-1).index_select(0, at.pixel_slot).view(b, npix) - at.image_seed
        return labels.view(b, h, w)  # [B, H, W] each pixel's seed

    # ---- the graph -----------------------------------------------------------------------------
    def forward(self, fmap: Tensor, image: Tensor | None = None) -> RegionGraphBatch:
        """``fmap [B, C, h, w]`` (and ``image [B, C_in, H, W]``, default ``fmap``) → RegionGraphBatch
        with ``x [B, N, C + 3 + C_in]``, ``pos [B, N, 2]``, ``assignment [B, h, w]``, ``regions [B, H, W]``
        and edges ``neighbors [B, N, k]`` / ``edge_index [2, B·N·k]`` (knn) or ``adj [B, N, N]``."""
        check_fmap(fmap)
        if image is None:
            image = fmap
        if image.dim() != 4 or image.shape[0] != fmap.shape[0]:
            raise ValueError(f"image must be [B, C, H, W] with B = {fmap.shape[0]}, got {tuple(image.shape)}")
        b, c, h, w = fmap.shape
        height, width = image.shape[-2:]
        regions, seeds = self._segment_with_seeds(image)  # [B, H, W], [S, 2]
        s = seeds.shape[0]
        if self.edges == "knn" and self.k >= s:
            raise ValueError(f"k={self.k} is out of range for {s} regions on a {height}×{width} image; "
                             f"it must be in [1, {s - 1}]")
        npix = height * width
        label = regions.view(b, npix)
        device, dtype = fmap.device, fmap.dtype
        count = torch.zeros(b, s, device=device).scatter_add_(1, label, torch.ones(b, npix, device=device))
        area = count.clamp_min(1)
        # the region mean of fmap: every pixel takes its cell's features (nearest upsampling)
        if (h, w) == (height, width):
            cell_of_pixel = None
            sums = fmap.new_zeros(b, c, s).scatter_add(2, label.unsqueeze(1).expand(b, c, npix), fmap.flatten(2))
            pooled = sums.transpose(1, 2) / area.unsqueeze(-1).to(dtype)
            assignment = regions
        else:
            prow = torch.arange(height, device=device) * h // height
            pcol = torch.arange(width, device=device) * w // width
            cell_of_pixel = (prow.view(-1, 1) * w + pcol.view(1, -1)).flatten()  # [H·W]
            overlap = torch.zeros(b, s * h * w, device=device)
            overlap.scatter_add_(1, label * (h * w) + cell_of_pixel, torch.ones(b, npix, device=device))
            overlap = overlap.view(b, s, h * w)  # pixels of region s in cell c
            pooled = torch.bmm(overlap.to(dtype), fmap.flatten(2).transpose(1, 2)) / area.unsqueeze(-1).to(dtype)
            assignment = overlap.argmax(1).view(b, h, w)  # each cell's majority region
        # centroid, size and mean colour of each region
        prow_f = torch.arange(height, device=device, dtype=torch.float32).repeat_interleave(width)
        pcol_f = torch.arange(width, device=device, dtype=torch.float32).repeat(height)
        coords = torch.stack([prow_f, pcol_f], dim=-1).expand(b, npix, 2)
        centroid = torch.zeros(b, s, 2, device=device).scatter_add_(1, label.unsqueeze(-1).expand(-1, -1, 2), coords)
        centroid = centroid / area.unsqueeze(-1)  # pixels
        img = image.flatten(2)
        colour = img.new_zeros(b, img.shape[1], s).scatter_add(2, label.unsqueeze(1).expand(-1, img.shape[1], -1), img)
        colour = colour.transpose(1, 2) / area.unsqueeze(-1).to(img.dtype)
        extent = torch.tensor([max(height - 1, 1), max(width - 1, 1)], device=device, dtype=torch.float32)
        extra = torch.cat([centroid / extent, (count * s / npix).unsqueeze(-1)], dim=-1)
        x = torch.cat([pooled, extra.to(dtype), colour.to(dtype)], dim=-1)
        pos = (centroid + 0.5) * torch.tensor([h / height, w / width], device=device) - 0.5  # fmap cells
        valid = count > 0
        # an empty slot becomes a copy of the region that holds its seed pixel (always gathered, an
        # identity where no slot is empty: no data-dependent branch to break a compiled graph)
        holder = label.gather(1, (seeds[:, 0] * width + seeds[:, 1]).expand(b, s))
        take = torch.where(valid, torch.arange(s, device=device).expand(b, s), holder)  # [B, S]
        x = x.gather(1, take.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        pos = pos.gather(1, take.unsqueeze(-1).expand(-1, -1, 2))
        common = dict(x=x, pos=pos, size=(h, w), assignment=assignment, regions=regions, valid=valid)
        if self.edges == "knn":
            with torch.no_grad():
                dist = torch.cdist(pos, pos)
                dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
                nbr = dist.topk(self.k, dim=-1, largest=False).indices  # [B, S, k] nearest first
            offsets = (torch.arange(b, device=device) * s).view(b, 1, 1)
            src = (nbr + offsets).flatten()
            dst = (torch.arange(s, device=device).view(1, s, 1) + offsets).expand(b, s, self.k).flatten()
            weight = torch.ones(src.numel(), dtype=dtype, device=device)
            return RegionGraphBatch(**common, edge_index=torch.stack([src, dst]), edge_weight=weight,
                                    neighbors=nbr)  # neighbor_weight None: ones, which layers fold into node terms
        return RegionGraphBatch(**common, adj=self._adjacency(regions, s, take).to(dtype))

    @staticmethod
    def _adjacency(regions: Tensor, s: int, take: Tensor) -> Tensor:
        """``[B, S, S]`` 0/1: regions sharing a pixel border (4-neighbours), both ways; an empty slot
        has the edges of the region it copies."""
        b = regions.shape[0]
        pairs = [(regions[:, :, :-1], regions[:, :, 1:]), (regions[:, :-1, :], regions[:, 1:, :])]
        adj = torch.zeros(b, s * s, device=regions.device)
        for a, c in pairs:
            a, c = a.reshape(b, -1), c.reshape(b, -1)
            border = (a != c).float()
            adj.scatter_reduce_(1, a * s + c, border, "amax")
            adj.scatter_reduce_(1, c * s + a, border, "amax")
        adj = adj.view(b, s, s)
        adj = adj.gather(1, take.unsqueeze(-1).expand(-1, -1, s)).gather(2, take.unsqueeze(1).expand(-1, s, -1))
        return adj * (1 - torch.eye(s, device=regions.device))
