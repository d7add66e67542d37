"""A shared grid adjacency that depends only on the offset between two cells, applied by FFT.

With ``inverse_distance`` or ``gaussian`` edges the weight between cells ``(r, c)`` and
``(r', c')`` is a function of ``(r - r', c - c')``, so ``A·X`` over an ``h × w`` grid is a 2-D
convolution of each channel with a ``(2h−1) × (2w−1)`` kernel: ``O(N log N)`` time and ``O(N)``
memory per channel through ``torch.fft.rfft2`` instead of the ``N × N`` matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Bound, in bytes, of the zero-padded spectra of one block of channel maps: the FFT runs over blocks
#: of maps that stay in the CPU's cache, whatever the batch and channel count. Measured (512 maps of
#: 64×64, a 128×128 transform, 2 threads): 2 MiB blocks take 11 ms, 16 MiB blocks 17–26 ms.
FFT_BLOCK_BYTES = 2**21


def fast_fft_size(n: int) -> int:
    """The smallest ``m ≥ n`` whose prime factors are 2, 3 and 5 (sizes the FFT handles fastest)."""
    m = max(1, n)
    while True:
        rest = m
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return m
        m += 1


def offset_grid(h: int, w: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Row and column offsets ``[2h−1, 2w−1]`` from ``-(h−1)`` to ``h−1`` (and ``-(w−1)`` to ``w−1``)."""
    dr = torch.arange(-(h - 1), h, device=device, dtype=dtype)
    dc = torch.arange(-(w - 1), w, device=device, dtype=dtype)
    return dr.view(-1, 1).expand(-1, 2 * w - 1), dc.view(1, -1).expand(2 * h - 1, -1)


class _Product(torch.autograd.Function):
    """``y = M·x`` of a :class:`GridConvolution` ``M = diag(left)·K·diag(right) + diag(extra)`` for
    ``x [B, N, C]``; the backward pass is ``Mᵀ·grad`` (the correlation with the same kernel: the
    conjugate spectrum, ``left`` and ``right`` swapped). ``left``, ``right`` and ``extra`` are
    constants of the graph (no gradient). Nothing of the size of ``x`` is kept for the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, op: "GridConvolution") -> Tensor:
        ctx.op = op
        return op._product(x, transpose=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.op._product(grad, transpose=True), None


def _scaled(values: Tensor, scale: Tensor | None, out: Tensor) -> Tensor:
    """``values · scale`` (broadcast; ``None``: 1) written into ``out`` in one pass, whatever the layouts."""
    return out.copy_(values) if scale is None else torch.mul(values, scale, out=out)


def _convolve_blocks(maps: Tensor, spectrum: Tensor, size: tuple[int, int], out: Tensor) -> None:
    """``out[i] = Σ_j K[i − j]·maps[j]`` for ``maps [M, h, w]`` (float32) into ``out [M, h, w]``,
    ``K`` given by its ``spectrum`` on the zero-padded ``size``, over blocks of maps."""
    m, h, w = maps.shape
    ph, pw = size
    per_map = (ph + h) * (pw // 2 + 1) * 8 + h * pw * 4  # the spectra and the inverse of one map
    rows = max(1, FFT_BLOCK_BYTES // per_map)
    for start in range(0, m, rows):  # blocks of maps bound the working memory (not a loop over the batch)
        block = maps[start : start + rows]
        # two 1-D passes instead of one 2-D transform: the zero rows of the padding are never
        # transformed along the width, and the inverse width pass runs on the h kept rows only
        spec = torch.fft.fft(torch.fft.rfft(block, n=pw, dim=-1), n=ph, dim=-2)
        spec.mul_(spectrum)
        rows_back = torch.fft.ifft(spec, dim=-2)[:, :h]
        out[start : start + rows] = torch.fft.irfft(rows_back, n=pw, dim=-1)[..., :w]


class GridConvolution:
    """The adjacency ``M = diag(left)·K·diag(right) + diag(extra)`` of an ``h × w`` grid, ``K`` the
    convolution with ``kernel [2h−1, 2w−1]`` (``K[i, j] = kernel[r_i − r_j + h − 1, c_i − c_j + w − 1]``).

    It stands for a shared ``[1, N, N]`` adjacency (``N = h·w``, row-major cells) in a
    :class:`~interconnects.graph.GraphBatch` (``aggregator``): :meth:`matmul` is ``M·X`` for
    ``X [B, N, C]``, :meth:`dense` the matrix itself. Degree normalisations stay in the family:
    :meth:`abs_row_sums` (the convolution of ``right`` with the kernel: the degrees are the same
    convolution applied to ones), :meth:`scale` and :meth:`add_diagonal` give new operators. The
    kernel must be non-negative (distance weights are), so row sums of ``|M|`` are row sums of ``M``
    up to the ``extra`` diagonal.

    The FFTs run in float32 at least (``torch.fft`` has no bfloat16 on the CPU); the result is cast
    back to ``X``'s dtype.
    """

    def __init__(
        self,
        kernel: Tensor,
        size: tuple[int, int],
        left: Tensor | None = None,
        right: Tensor | None = None,
        extra: Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        _spectrum: Tensor | None = None,
    ) -> None:
        h, w = size
        if kernel.shape != (2 * h - 1, 2 * w - 1):
            raise ValueError(f"kernel must be [2h−1, 2w−1] = {(2 * h - 1, 2 * w - 1)}, got {tuple(kernel.shape)}")
        if bool((kernel < 0).any()):
            raise ValueError("GridConvolution needs a non-negative kernel")
        self.kernel, self.size, self.dtype = kernel.float(), (h, w), dtype
        self.left, self.right, self.extra = left, right, extra
        # the kernel's reach (a Gaussian with a cutoff has a short one): offsets up to (rh, rw)
        nonzero = self.kernel != 0
        rh = int((torch.arange(-(h - 1), h, device=kernel.device).abs() * nonzero.any(1)).max())
        rw = int((torch.arange(-(w - 1), w, device=kernel.device).abs() * nonzero.any(0)).max())
        # circular layout: offset (dr, dc) at index (dr mod P_h, dc mod P_w); P_h ≥ h + rh keeps the
        # offsets reaching the h×w outputs from wrapping onto each other
        self.fft_size = (fast_fft_size(h + rh), fast_fft_size(w + rw))
        if _spectrum is None:
            ph, pw = self.fft_size
            padded = kernel.new_zeros(ph, pw, dtype=torch.float32)
            padded[: 2 * rh + 1, : 2 * rw + 1] = self.kernel[h - 1 - rh : h + rh, w - 1 - rw : w + rw]
            padded = padded.roll(shifts=(-rh, -rw), dims=(0, 1))
            _spectrum = torch.fft.rfft2(padded)
        self.spectrum = _spectrum
        self._cache: dict = {}

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def num_nodes(self) -> int:
        return self.size[0] * self.size[1]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(1, N, N)``, the shape of the matrix it stands for."""
        return (1, self.num_nodes, self.num_nodes)

    @property
    def device(self) -> torch.device:
        return self.kernel.device

    def __repr__(self) -> str:
        return f"GridConvolution(size={self.size}, fft_size={self.fft_size})"

    # ---- the product --------------------------------------------------------------------------
    def convolve(self, maps: Tensor) -> Tensor:
        """``K`` alone on ``maps [M, h, w]`` (float32) → ``[M, h, w]`` (no gradient)."""
        out = torch.empty_like(maps)
        _convolve_blocks(maps.contiguous(), self.spectrum, self.fft_size, out)
        return out

    def matmul(self, x: Tensor) -> Tensor:
        """``M·X``: ``x [B, N, C]`` → ``[B, N, C]`` in ``x``'s dtype, differentiable in ``x``."""
        b, n, c = x.shape
        h, w = self.size
        if n != self.num_nodes:
            raise ValueError(f"x must be [B, N, C] with N = {self.num_nodes} for a {h}×{w} grid, got {tuple(x.shape)}")
        return _Product.apply(x, self).to(x.dtype)

    def _product(self, x: Tensor, transpose: bool) -> Tensor:
        """``M·x`` (or ``Mᵀ·x``) for ``x [B, N, C]`` → float32 ``[B, N, C]``, in three passes over the
        data besides the FFTs: scale by ``right`` into the ``[B, C, h, w]`` maps the FFT takes (a free
        view when ``x`` is the node view of a feature map and nothing scales), convolve, and scale by
        ``left`` back into ``[B, N, C]``, plus ``extra·x``."""
        b, n, c = x.shape
        h, w = self.size
        pre, post = (self.left, self.right) if transpose else (self.right, self.left)
        spectrum = self.cached("conj", self.spectrum.conj) if transpose else self.spectrum
        nodes = x.float()
        channel_major = nodes.transpose(1, 2)  # [B, C, N]
        if pre is None and channel_major.is_contiguous():
            maps = channel_major
        else:
            maps = _scaled(channel_major, pre, torch.empty(b, c, n, device=x.device))
        convolved = torch.empty(b * c, h, w, device=x.device)
        _convolve_blocks(maps.view(b * c, h, w), spectrum, self.fft_size, convolved)
        convolved = convolved.view(b, c, n).transpose(1, 2)  # [B, N, C] view
        out = _scaled(convolved, None if post is None else post.unsqueeze(-1), torch.empty(b, n, c, device=x.device))
        if self.extra is not None:
            out.addcmul_(nodes, self.extra.unsqueeze(-1))
        return out

    __matmul__ = matmul

    # ---- the family ---------------------------------------------------------------------------
    def _derive(self, left, right, extra) -> "GridConvolution":
        return GridConvolution(self.kernel, self.size, left, right, extra, self.dtype, _spectrum=self.spectrum)

    def diagonal(self) -> Tensor:
        """``[N]`` diagonal of ``M`` (the self-loop weights)."""
        centre = self.kernel[self.size[0] - 1, self.size[1] - 1]
        diag = centre.expand(self.num_nodes).clone()
        if self.left is not None:
            diag = diag * self.left
        if self.right is not None:
            diag = diag * self.right
        return diag if self.extra is None else diag + self.extra

    def abs_row_sums(self) -> Tensor:
        """``[N]`` row sums of ``|M|`` (in-degrees), by the same convolution applied to ``right``."""
        h, w = self.size
        ones = torch.ones(self.num_nodes, device=self.device) if self.right is None else self.right.abs()
        rows = self.convolve(ones.view(1, h, w).float()).reshape(-1)
        if self.left is not None:
            rows = rows * self.left.abs()
        return rows if self.extra is None else rows + self.extra.abs()

    def scale(self, left: Tensor | None, right: Tensor | None) -> "GridConvolution":
        """``diag(left)·M·diag(right)`` (``None``: no scaling on that side)."""
        new_left = left if self.left is None else (self.left if left is None else self.left * left)
        new_right = right if self.right is None else (self.right if right is None else self.right * right)
        extra = self.extra
        if extra is not None:
            extra = extra * (1 if left is None else left) * (1 if right is None else right)
        return self._derive(new_left, new_right, extra)

    def add_diagonal(self, values: Tensor) -> "GridConvolution":
        """``M + diag(values)`` for ``values [N]``."""
        return self._derive(self.left, self.right, values if self.extra is None else self.extra + values)

    def cached(self, key: str, build):
        """``build()`` once per operator and ``key`` (e.g. a layer's normalised form of it)."""
        if key not in self._cache:
            with torch.no_grad():
                self._cache[key] = build()
        return self._cache[key]

    def dense(self) -> Tensor:
        """The ``[1, N, N]`` matrix it stands for (built once, then cached)."""
        return self.cached("dense", self._dense)

    def _dense(self) -> Tensor:
        h, w = self.size
        r = torch.arange(h, device=self.device).repeat_interleave(w)
        c = torch.arange(w, device=self.device).repeat(h)
        adj = self.kernel[(r.view(-1, 1) - r.view(1, -1)) + h - 1, (c.view(-1, 1) - c.view(1, -1)) + w - 1]
        if self.left is not None:
            adj = self.left.unsqueeze(-1) * adj
        if self.right is not None:
            adj = adj * self.right.unsqueeze(0)
        if self.extra is not None:
            adj = adj + torch.diag(self.extra)
        return adj.to(self.dtype).unsqueeze(0)
