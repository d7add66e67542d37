"""Classical keypoint detectors on the input image, batched: corner or intensity response, then
non-maximum suppression, pooled onto the feature map's cells.

Everything here is a few convolutions and pooling operations over the whole batch at once; there is
no loop over images or pixels. Responses are computed in float32 whatever the image's dtype (the
products of gradients lose too much in bfloat16), and without autograd: the detector chooses
cells, it is not trained.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur

DETECTORS = ("harris", "shi_tomasi", "intensity")

#: Harris' sensitivity constant ``k`` in ``det(M) - k·trace(M)²``.
HARRIS_K = 0.04

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8.0


def _blur(x: Tensor, sigma: float) -> Tensor:
    """Gaussian window of ``sigma`` pixels over ``x [B, C, H, W]`` (each channel on its own)."""
    size = 2 * math.ceil(2.0 * sigma) + 1
    return gaussian_blur(x, [size, size], [sigma, sigma])


def sobel_gradients(gray: Tensor) -> tuple[Tensor, Tensor]:
    """``gray [B, 1, H, W]`` → ``(d/dx, d/dy)``, each ``[B, 1, H, W]``.

    The border is replicated, so the image's edge is not mistaken for an intensity edge.
    """
    kernel = _SOBEL_X.to(gray.device, gray.dtype)
    kernels = torch.stack([kernel, kernel.t()]).unsqueeze(1)  # [2, 1, 3, 3]: d/dx (columns), d/dy (rows)
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    return grad[:, :1], grad[:, 1:]


def detector_response(image: Tensor, detector: str = "harris", sigma: float = 1.0, k: float = HARRIS_K) -> Tensor:
    """Per-pixel response ``[B, H, W]`` (float32) of ``image [B, C, H, W]`` (channels averaged).

    ``harris``: ``det(M) - k·trace(M)²`` of the structure tensor ``M`` (Sobel gradients, Gaussian
    window of ``sigma`` pixels); positive at corners, negative along edges, zero on flat regions.
    ``shi_tomasi``: the smaller eigenvalue of ``M``. ``intensity``: the image smoothed by the same
    Gaussian (bright blobs and strokes).
    """
    if detector not in DETECTORS:
        raise ValueError(f"detector={detector!r} is not supported; choose one of {', '.join(map(repr, DETECTORS))}")
    gray = image.detach().float().mean(1, keepdim=True)
    if detector == "intensity":
        return _blur(gray, sigma).squeeze(1)
    gx, gy = sobel_gradients(gray)
    m = _blur(torch.cat([gx * gx, gy * gy, gx * gy], dim=1), sigma)
    mxx, myy, mxy = m.unbind(1)
    trace = mxx + myy
    if detector == "harris":
        return mxx * myy - mxy * mxy - k * trace * trace
    # the smaller root of λ² - trace·λ + det = 0, written without det to stay accurate
    return 0.5 * trace - torch.sqrt(0.25 * (mxx - myy) ** 2 + mxy * mxy)


def peak_mask(response: Tensor, nms_size: int = 3, floor: Tensor | float = 0.0) -> Tensor:
    """Non-maximum suppression: ``response [B, H, W]`` → bool ``[B, H, W]``, true where a pixel is the
    maximum of its ``nms_size × nms_size`` neighbourhood and above ``floor`` (a number, or ``[B, 1, 1]``).

    Equal neighbours on a plateau are all kept; the cells they fall in are told apart later.
    """
    local_max = F.max_pool2d(response.unsqueeze(1), nms_size, stride=1, padding=nms_size // 2).squeeze(1)
    return (response >= local_max) & (response > floor)


def pool_to_cells(values: Tensor, size: tuple[int, int]) -> Tensor:
    """The maximum of ``values [B, H, W]`` over the pixels of each feature-map cell: ``[B, h·w]``, row-major.

    Pixel ``(r, c)`` belongs to cell ``(r·h // H, c·w // W)``, the stride mapping of
    ``Keypoints(select="given")``; a cell without pixels (``h > H``) gets ``-inf``.
    """
    b, H, W = values.shape
    h, w = size
    rows = torch.arange(H, device=values.device) * h // H
    cols = torch.arange(W, device=values.device) * w // W
    cell = (rows.unsqueeze(1) * w + cols.unsqueeze(0)).flatten()  # [H·W]
    out = values.new_full((b, h * w), float("-inf"))
    return out.scatter_reduce(1, cell.expand(b, -1), values.flatten(1), reduce="amax", include_self=True)


def cell_scores(image: Tensor, size: tuple[int, int], detector: str = "harris", nms_size: int = 3,
                sigma: float = 1.0) -> tuple[Tensor, Tensor]:
    """Score each cell of an ``h × w`` feature map from ``image [B, C, H, W]``.

    Returns ``(peak [B, h·w], response [B, h·w])``: the strongest detection (a peak of the response
    after non-maximum suppression) in each cell, ``-inf`` where the cell holds none, and the
    strongest response in each cell at all. Corners count only where their response is positive;
    intensity peaks only where they are above the image's darkest value, so a blank image has none.
    """
    response = detector_response(image, detector, sigma)
    floor = response.flatten(1).amin(1).view(-1, 1, 1) if detector == "intensity" else 0.0
    peaks = response.masked_fill(~peak_mask(response, nms_size, floor), float("-inf"))
    return pool_to_cells(peaks, size), pool_to_cells(response, size)
