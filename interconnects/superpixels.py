"""Superpixels: one node per SLIC region of the input image, its features pooled over the region.

SLIC (Achanta et al., TPAMI 2012) is k-means over colour and position, each pixel choosing among
the seed centres near it. Here it is batched tensor code: the whole batch is segmented at once, each
of a fixed number of iterations comparing every pixel with the four seed centres whose grid places
surround it (the original SLIC's ``2S × 2S`` search window, for seeds at their grid places), by a few
broadcast products over ``[B, quads, pixels per quad]``, so it runs on the CPU and the GPU alike and
never loops over images or regions.

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


def connected_components(labels: Tensor) -> Tensor:
    """``labels [B, H, W]`` → ``[B, H, W]`` long: for every pixel the smallest flat pixel id of its
    4-connected component of equal labels.

    Label propagation (each pixel takes the smallest id among its same-label neighbours) with pointer
    jumping (each pixel then takes the id its id points at), repeated until nothing changes: a loop
    over iterations, a few dozen at most on small images, every step over the whole batch.
    """
    b, h, w = labels.shape
    big = h * w
    comp = torch.arange(big, device=labels.device).view(1, h, w).expand(b, h, w).contiguous()
    same = [n == labels for n in _neighbour_views(labels, -1)]
    while True:
        best = comp
        for neighbour, joined in zip(_neighbour_views(comp, big), same):
            best = torch.minimum(best, torch.where(joined, neighbour, big))
        flat = best.view(b, big)
        flat = flat.gather(1, flat)  # pointer jumping: the id of my id (never larger, same component)
        flat = flat.gather(1, flat)
        best = flat.view(b, h, w)
        if torch.equal(best, comp):
            return comp
        comp = best


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
    flat_labels = labels.reshape(b, n)
    comp = connected_components(labels).reshape(b, n)
    size = torch.zeros(b, n, dtype=torch.long, device=labels.device).scatter_add_(1, comp, torch.ones_like(comp))
    comp_size = size.gather(1, comp)  # [B, H·W] size of each pixel's component
    key = comp_size * n + (n - 1 - comp)  # larger components first, then the smaller pixel id
    best = torch.zeros(b, num_regions, dtype=torch.long, device=labels.device)
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
    return out


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
        iterations: int = 10,
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
    @torch.no_grad()
    def segment(self, image: Tensor) -> Tensor:
        """``image [B, C, H, W] -> regions [B, H, W]`` long in ``[0, S)``: batched SLIC
        (:meth:`cluster`), then :func:`enforce_connectivity`. Not differentiable (a region choice is
        discrete)."""
        labels = self.cluster(image)
        s = seed_layout(*image.shape[-2:], self.num_segments, image.device).seeds.shape[0]
        return enforce_connectivity(labels, s, self.min_size_factor * labels[0].numel() / s)

    @torch.no_grad()
    def cluster(self, image: Tensor) -> Tensor:
        """The SLIC k-means alone: ``image [B, C, H, W] -> [B, H, W]`` long, the seed each pixel chose
        in the last iteration among the four seeds around it (regions may be in pieces)."""
        if image.dim() != 4:
            raise ValueError(f"image must be a 4-D tensor [B, C, H, W], got shape {tuple(image.shape)}")
        b, _, h, w = image.shape
        device = image.device
        grid = seed_layout(h, w, self.num_segments, device)
        seeds, step, s = grid.seeds, grid.step, grid.seeds.shape[0]
        colour = slic_colour(image) / self.compactness  # [B, Cc, H, W]
        npix = h * w
        rows = torch.arange(h, device=device, dtype=torch.float32).repeat_interleave(w) / step
        cols = torch.arange(w, device=device, dtype=torch.float32).repeat(h) / step
        feats = torch.cat([colour.flatten(2), torch.stack([rows, cols]).expand(b, 2, npix)], dim=1)  # [B, D, H·W]
        d = feats.shape[1]
        # the pixels grouped by quad, [D, B, Q, P] (P: the most pixels a quad has, short quads padded):
        # every pixel of a quad is scored against the quad's four seeds by a few broadcast products,
        # |f - c|² = |f|² - 2 f·c + |c|², where |f|² does not change which seed is nearest
        q = grid.cand.shape[0]
        cells = feats.index_select(2, grid.members).view(b, d, q, -1).transpose(0, 1).contiguous()  # [D, B, Q, P]
        real = torch.zeros(q * cells.shape[-1], device=device).index_fill_(0, grid.slot, 1.0)  # not padding
        real = real.view(1, q, -1).expand(b, -1, -1).flatten()
        weighted = [(cells[i].flatten() * real) for i in range(d)]  # padding weighs nothing in the means
        centres = feats[:, :, seeds[:, 0] * w + seeds[:, 1]]  # [B, D, S]
        # the winning candidate's seed id is the quad's first candidate plus its offset on the seed grid
        # (candidates off the grid score +inf and never win, so their clamped ids do not matter)
        offsets = (torch.arange(b, device=device) * s).view(b, 1, 1)
        base = grid.first.view(1, q, 1) + offsets  # [B, Q, 1] the first candidate's id in the batch
        labels = nearest = None
        for _ in range(self.iterations):  # a loop over iterations; each is over the whole batch
            near = centres.index_select(2, grid.cand.flatten()).view(b, d, q, 4)  # the quads' candidates
            weight = (-2 * near).unsqueeze(-1)  # [B, D, Q, 4, 1]
            bias = (near.pow(2).sum(1) + grid.blocked).unsqueeze(-1)  # [B, Q, 4, 1]
            best = None
            for j in range(4):  # the four candidates: a few passes over [B, Q, P] each
                score = torch.addcmul(bias[:, :, j], cells[0], weight[:, 0, :, j])
                for i in range(1, d):
                    score.addcmul_(cells[i], weight[:, i, :, j])
                if best is None:
                    best, nearest = score, base.expand(score.shape)
                else:
                    nearest = torch.where(score < best, base + grid.shift[j], nearest)
                    best = torch.minimum(best, score)
            flat = nearest.flatten()  # [B·Q·P] ids into the batch's B·S seeds
            count = torch.bincount(flat, real, minlength=b * s).view(b, 1, s)
            sums = torch.stack([torch.bincount(flat, weighted[i], minlength=b * s) for i in range(d)])
            sums = sums.view(d, b, s).transpose(0, 1).to(feats.dtype)  # [B, D, S]
            centres = torch.where(count > 0, sums / count.clamp_min(1), centres)  # an empty one stays put
        if nearest is not None:
            labels = (nearest - offsets).view(b, -1).index_select(1, grid.slot)  # [B, H·W] each pixel's seed
        if labels is None:  # iterations ≥ 1 is checked in __init__
            raise ValueError("iterations must be ≥ 1")
        return labels.view(b, h, w)

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
        regions = self.segment(image)  # [B, H, W]
        s = seed_layout(height, width, self.num_segments, image.device).seeds.shape[0]
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
        # an empty slot becomes a copy of the region that holds its seed pixel
        seeds = seed_layout(height, width, self.num_segments, device).seeds
        holder = label.gather(1, (seeds[:, 0] * width + seeds[:, 1]).expand(b, s))
        take = torch.where(valid, torch.arange(s, device=device).expand(b, s), holder)  # [B, S]
        if not bool(valid.all()):
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
