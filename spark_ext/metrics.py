"""Image-quality metrics as image-restoration papers compute them (BasicSR conventions).

* Images are compared as 8-bit images: a float output in [0, 1] is clamped and
  rounded to ``uint8`` levels first (:func:`to_uint8_levels`), as BasicSR's
  ``tensor2img`` does before ``calculate_psnr`` / ``calculate_ssim``.
* Super-resolution is scored on the luma channel Y of ITU-R BT.601
  (:func:`rgb_to_y`, BasicSR's ``rgb2ycbcr(..., y_only=True)``: values in
  [16, 235]) with a border of ``scale`` pixels cropped on every side
  (``crop_border = scale``, ``test_y_channel = True``). Denoising is scored on
  RGB with no crop.
* PSNR: ``10 log10(255^2 / MSE)`` over all pixels and channels, in float64.
* SSIM: Wang et al. (2004) with an 11x11 Gaussian window of sigma 1.5,
  ``K1 = 0.01``, ``K2 = 0.03``, ``L = 255``, computed on the valid region (no
  padding: the map is 10 pixels smaller in each dimension), averaged over the
  map, then over channels.

Every function takes torch tensors ``[N, C, H, W]`` (C = 1 or 3, RGB order)
and returns one value per image (float64 ``[N]``). None is differentiable:
they are evaluation metrics.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._validation import check_choice, check_int

# BT.601 luma for RGB in [0, 1] -> Y in [16, 235] (on the 0..255 scale).
_Y_WEIGHTS = (65.481, 128.553, 24.966)
_Y_OFFSET = 16.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _check_images(images: torch.Tensor, name: str, channels: tuple[int, ...] = (1, 3)) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in channels:
        raise ValueError(f"{name} must be [N, C, H, W] with C in {channels}, got shape {tuple(images.shape)}")
    if images.shape[0] < 1 or images.shape[-1] < 1 or images.shape[-2] < 1:
        raise ValueError(f"{name} must not be empty, got shape {tuple(images.shape)}")


def _check_pair(output: torch.Tensor, target: torch.Tensor) -> None:
    _check_images(output, "output")
    _check_images(target, "target")
    if output.shape != target.shape:
        raise ValueError(
            f"output and target must have the same shape, got {tuple(output.shape)} and {tuple(target.shape)}"
        )


def to_uint8_levels(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> float64 on the 0..255 scale, clamped and rounded to integers.

    ``images``: floating ``[N, C, H, W]`` (values outside [0, 1] are clamped);
    ``uint8`` input is taken as already on the 0..255 scale.
    """
    _check_images(images, "images")
    if images.dtype == torch.uint8:
        return images.double()
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1] or uint8, got {images.dtype}")
    return images.detach().double().clamp(0.0, 1.0).mul(255.0).round()


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of RGB images on the 0..255 scale: ``[N, 3, H, W]`` -> ``[N, 1, H, W]`` in [16, 235].

    ``Y = (65.481 R + 128.553 G + 24.966 B) / 255 + 16`` (BasicSR ``rgb2ycbcr``,
    MATLAB ``rgb2ycbcr``), in the input's float dtype, not rounded.
    """
    _check_images(images, "images", channels=(3,))
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point on the 0..255 scale, got {images.dtype}")
    weights = torch.tensor(_Y_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1) / 255.0
    return (images * weights).sum(dim=1, keepdim=True) + _Y_OFFSET


def crop_border(images: torch.Tensor, border: int) -> torch.Tensor:
    """``images[..., b:-b, b:-b]`` (``border = 0``: unchanged)."""
    border = check_int(border, "border")
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    if border == 0:
        return images
    if min(images.shape[-2:]) <= 2 * border:
        raise ValueError(f"border={border} leaves nothing of images of size {tuple(images.shape[-2:])}")
    return images[..., border:-border, border:-border]


def psnr(output: torch.Tensor, target: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """PSNR in dB per image of ``[N, C, H, W]`` tensors on a ``0..data_range`` scale -> float64 ``[N]``.

    Identical images give ``inf``. No rounding or colour conversion here: see
    :func:`restoration_metrics` for the BasicSR pipeline.
    """
    _check_pair(output, target)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = (output.double() - target.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float64) -> torch.Tensor:
    """``[size, size]`` normalised Gaussian (outer product of the 1-D one, as ``cv2.getGaussianKernel``)."""
    size = check_int(size, "size")
    if size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd integer, got {size}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    g = g / g.sum()
    return torch.outer(g, g).to(dtype)


def ssim(output: torch.Tensor, target: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """SSIM (Wang et al. 2004) per image of ``[N, C, H, W]`` on a ``0..data_range`` scale -> float64 ``[N]``.

    11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, valid region only
    (H and W must be >= 11), mean over the SSIM map and then over channels —
    BasicSR's ``_ssim``.
    """
    _check_pair(output, target)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    if min(output.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(output.shape[-2:])}")
    x, y = output.double(), target.double()
    channels = x.shape[1]
    window = gaussian_window().to(x.device).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)
    blur = lambda t: F.conv2d(t, window, groups=channels)  # noqa: E731  (valid: no padding)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(2).mean(dim=2).mean(dim=1)


def restoration_metrics(
    output: torch.Tensor, target: torch.Tensor, task: str, scale: Optional[int] = None
) -> dict[str, torch.Tensor]:
    """PSNR (dB) and SSIM per image, as papers report them for ``task``.

    Args:
        output, target: float ``[N, 3, H, W]`` RGB in [0, 1] (``uint8`` taken as
            0..255), same shape. Both are clamped and rounded to 8-bit levels.
        task: ``"denoise"`` (RGB, no crop) or ``"sr"`` (Y channel of BT.601,
            ``scale`` pixels cropped on every side).
        scale: the SR factor (required for ``"sr"``, ignored for ``"denoise"``).

    Returns:
        ``{"psnr": float64 [N], "ssim": float64 [N]}``.
    """
    check_choice(task, "task", ("denoise", "sr"))
    _check_pair(output, target)
    if output.shape[1] != 3:
        raise ValueError(f"output and target must be RGB [N, 3, H, W], got shape {tuple(output.shape)}")
    a, b = to_uint8_levels(output), to_uint8_levels(target)
    if task == "sr":
        if scale is None:
            raise ValueError("scale is required for task 'sr'")
        scale = check_int(scale, "scale")
        if scale < 1:
            raise ValueError(f"scale must be >= 1, got {scale}")
        a, b = crop_border(rgb_to_y(a), scale), crop_border(rgb_to_y(b), scale)
    return {"psnr": psnr(a, b), "ssim": ssim(a, b)}
