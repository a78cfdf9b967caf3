"""MATLAB-style bicubic resize (``imresize(img, 1/s, 'bicubic')``), in torch.

The super-resolution benchmarks (Set5, Set14, DIV2K, ... and BasicSR's data
scripts) make their low-resolution inputs with MATLAB's ``imresize``. It
differs from ``F.interpolate(mode="bicubic", antialias=True)`` at the image
borders: MATLAB extends the image by *symmetric mirroring* before filtering,
where torch (and PIL) renormalise the kernel truncated at the border.

The kernel is Keys' cubic convolution with ``a = -0.5``::

    W(x) = 1.5|x|^3 - 2.5|x|^2 + 1            |x| <= 1
         = -0.5|x|^3 + 2.5|x|^2 - 4|x| + 2     1 < |x| <= 2
         = 0                                   otherwise

When shrinking by a factor ``f < 1`` the kernel is stretched to ``W(f x) f``
(antialiasing, support ``4 / f`` input pixels). Output pixel ``i`` (1-based)
sits at input coordinate ``u = i / f + 0.5 (1 - 1 / f)``; its weights are
normalised to sum to 1. Height is resized first, then width (MATLAB's order
for equal factors).
"""

from __future__ import annotations

import math

import torch

from .._validation import check_int


def cubic_kernel(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic kernel with ``a = -0.5`` (MATLAB ``imresize``'s ``cubic``), elementwise."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    near = 1.5 * ax3 - 2.5 * ax2 + 1.0
    far = -0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0
    return torch.where(ax <= 1, near, torch.where(ax <= 2, far, torch.zeros_like(ax)))


def _resize_matrix(in_len: int, out_len: int, factor: float) -> torch.Tensor:
    """``[out_len, in_len]`` float64 matrix of MATLAB's weights for one axis (mirrored borders folded in)."""
    width = 4.0 / factor if factor < 1 else 4.0
    out_pos = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = out_pos / factor + 0.5 * (1 - 1 / factor)
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    idx = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # 1-based input indices
    dist = u[:, None] - idx
    weights = factor * cubic_kernel(factor * dist) if factor < 1 else cubic_kernel(dist)
    weights = weights / weights.sum(dim=1, keepdim=True)
    # Symmetric extension: ..., 2, 1 | 1, 2, ..., n | n, n-1, ...
    mirror = torch.cat([torch.arange(in_len), torch.arange(in_len - 1, -1, -1)])
    src = mirror[(idx.long() - 1) % (2 * in_len)]
    matrix = torch.zeros(out_len, in_len, dtype=torch.float64)
    matrix.scatter_add_(1, src, weights)
    return matrix


def imresize_matlab(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic downscale by an integer factor, as MATLAB's ``imresize(img, 1/scale, 'bicubic')``.

    Args:
        images: float ``[..., H, W]`` (any float dtype, any device; usually
            ``[B, C, H, W]`` in [0, 1]); H and W must be multiples of ``scale``.
        scale: integer downscale factor >= 1.

    Returns:
        ``[..., H / scale, W / scale]``, same dtype and device, *not* clamped
        (cubic weights are partly negative, so values may leave the input
        range slightly, as in MATLAB on double images). Differentiable.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
    if images.dim() < 2:
        raise ValueError(f"images must have at least 2 dimensions [..., H, W], got shape {tuple(images.shape)}")
    scale = check_int(scale, "scale")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    height, width = images.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"image size {(height, width)} must be a multiple of scale={scale}; use crop_to_multiple")
    if scale == 1:
        return images.clone()
    rows = _resize_matrix(height, height // scale, 1.0 / scale).to(device=images.device, dtype=images.dtype)
    cols = _resize_matrix(width, width // scale, 1.0 / scale).to(device=images.device, dtype=images.dtype)
    return torch.matmul(torch.matmul(rows, images), cols.t())
