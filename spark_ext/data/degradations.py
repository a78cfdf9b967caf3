"""Degradations that turn a clean image into a restoration input.

* Denoising: additive white Gaussian noise of standard deviation ``sigma``
  (on the [0, 1] scale, e.g. 25/255), *not* clipped — the usual AWGN benchmark
  convention, so the noise stays zero-mean near black and white.
* x``s`` super-resolution: MATLAB-``imresize`` bicubic downsampling
  (:func:`~spark_ext.data.resize.imresize_matlab`: antialiased, ``a = -0.5``,
  mirrored borders), then clamped to [0, 1] and rounded to 8-bit levels, as the
  benchmarks' low-resolution PNGs are. The SR networks take this low-resolution image and
  upsample it themselves (see :class:`spark_ext.models.ResidualSRNet`); the
  bicubic-upsampled image is available from :func:`bicubic_upsample` as a
  baseline.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .resize import imresize_matlab


def add_gaussian_noise(clean: torch.Tensor, sigma: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``clean + sigma * N(0, 1)``, same shape and dtype; noise from ``generator`` (CPU)."""
    noise = torch.randn(clean.shape, generator=generator, dtype=torch.float32)
    return clean + sigma * noise.to(device=clean.device, dtype=clean.dtype)


def crop_to_multiple(image: torch.Tensor, scale: int) -> torch.Tensor:
    """Crop ``[..., H, W]`` at the bottom/right so that H and W are multiples of ``scale``."""
    height, width = image.shape[-2:]
    return image[..., : height - height % scale, : width - width % scale]


def bicubic_downsample(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """``[B, C, H, W]`` in [0, 1] (H, W multiples of scale) -> ``[B, C, H/s, W/s]``: MATLAB-style
    bicubic downscale, clamped to [0, 1] and rounded to multiples of 1/255 (not differentiable)."""
    lr = imresize_matlab(hr, scale)
    return lr.clamp(0.0, 1.0).mul(255.0).round().div(255.0)


def bicubic_upsample(lr: torch.Tensor, scale: int) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, C, s*h, s*w]`` bicubic (the SR baseline), clamped to [0, 1]."""
    return F.interpolate(lr, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0.0, 1.0)
