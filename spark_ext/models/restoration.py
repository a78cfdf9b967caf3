"""Restoration networks: an encoder-bottleneck-decoder denoiser and a residual SR net.

Both are deliberately plain (Conv2d + ReLU + PixelShuffle, no normalisation
layers): every weight layer is an ``nn.Conv2d`` so the QAT toolkit can swap it
for a quantized one, and there is no BatchNorm whose running statistics would
change under SPARK's extra no-grad reward forward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validation import check_choice, check_int


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


class EncoderDecoderNet(nn.Module):
    """Encoder -> bottleneck -> decoder denoiser with one skip and a global residual.

    Layout (``w = width``)::

        head    Conv3x3(C->w) ReLU
        enc     Conv3x3(w->w) ReLU                     full resolution, kept for the skip
        down    Conv3x3(w->2w, stride 2) ReLU          half resolution
        bottleneck  [Conv3x3(2w->2w) ReLU] x depth     <- DFD hook point (``"bottleneck"``)
        up      Conv3x3(2w->4w) PixelShuffle(2)        back to full resolution, w channels
        fuse    Conv3x3(2w->w) ReLU                    on concat(up, enc)
        tail    Conv3x3(w->C)
        out = input + tail                             (predicts the residual)

    Args:
        channels: image channels C (3).
        width: base width w (the bottleneck has 2w channels).
        depth: number of conv+ReLU pairs in the bottleneck.

    Forward: float ``[B, C, H, W]`` (any H, W >= 1; odd sizes are padded by
    replication to even and cropped back) -> ``[B, C, H, W]``, differentiable.
    """

    feature_layer = "bottleneck"

    def __init__(self, channels: int = 3, width: int = 16, depth: int = 2):
        super().__init__()
        channels, width, depth = check_int(channels, "channels"), check_int(width, "width"), check_int(depth, "depth")
        if channels < 1 or width < 1 or depth < 1:
            raise ValueError(f"channels, width and depth must be >= 1, got {channels}, {width}, {depth}")
        self.head = nn.Sequential(_conv(channels, width), nn.ReLU())
        self.enc = nn.Sequential(_conv(width, width), nn.ReLU())
        self.down = nn.Sequential(_conv(width, 2 * width, stride=2), nn.ReLU())
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [_conv(2 * width, 2 * width), nn.ReLU()]
        self.bottleneck = nn.Sequential(*layers)
        self.up = nn.Sequential(_conv(2 * width, 4 * width), nn.PixelShuffle(2))
        self.fuse = nn.Sequential(_conv(2 * width, width), nn.ReLU())
        self.tail = _conv(width, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # The stride-2 / PixelShuffle pair needs even sizes; replicate-pad one row/column.
        pad_h, pad_w = height % 2, width % 2
        xp = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if (pad_h or pad_w) else x
        enc = self.enc(self.head(xp))
        mid = self.bottleneck(self.down(enc))
        dec = self.fuse(torch.cat([self.up(mid), enc], dim=1))
        out = xp + self.tail(dec)
        return out[..., :height, :width]


class _ResBlock(nn.Module):
    """``x + Conv3x3(ReLU(Conv3x3(x)))`` (EDSR-style, no normalisation)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = _conv(width, width)
        self.act = nn.ReLU()
        self.conv2 = _conv(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class ResidualSRNet(nn.Module):
    """Residual super-resolution network working at low resolution (post-upsampling).

    Layout (``w = width``)::

        head      Conv3x3(C->w)
        body      ResBlock(w) x blocks, then Conv3x3(w->w)  <- DFD hook point (``"body"``)
        upsample  Conv3x3(w -> C*s^2) PixelShuffle(s)
        out = upsample(head + body) + bicubic_upsample(input, s)

    The network sees the low-resolution image and upsamples it itself (the
    cheap choice: every conv runs on s^2 fewer pixels than a pre-upsampling
    net); the bicubic skip means it only learns the missing detail.

    Forward: float ``[B, C, h, w]`` -> ``[B, C, s*h, s*w]``, differentiable.
    """

    feature_layer = "body"

    def __init__(self, channels: int = 3, width: int = 16, blocks: int = 2, scale: int = 2):
        super().__init__()
        channels, width = check_int(channels, "channels"), check_int(width, "width")
        blocks, scale = check_int(blocks, "blocks"), check_int(scale, "scale")
        if channels < 1 or width < 1 or blocks < 1 or scale < 1:
            raise ValueError(f"channels, width, blocks, scale must be >= 1, got {channels}, {width}, {blocks}, {scale}")
        self.scale = scale
        self.head = _conv(channels, width)
        self.body = nn.Sequential(*[_ResBlock(width) for _ in range(blocks)], _conv(width, width))
        self.upsample = nn.Sequential(_conv(width, channels * scale * scale), nn.PixelShuffle(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.head(x)
        feat = feat + self.body(feat)
        skip = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return self.upsample(feat) + skip


def build_model(task: str, width: int = 16, *, depth: int = 2, scale: int = 2) -> nn.Module:
    """The demo network for ``task``: ``"denoise"`` -> :class:`EncoderDecoderNet`,
    ``"sr"`` -> :class:`ResidualSRNet` (``depth`` residual blocks, upscale ``scale``)."""
    check_choice(task, "task", ("denoise", "sr"))
    if task == "denoise":
        return EncoderDecoderNet(width=width, depth=depth)
    return ResidualSRNet(width=width, blocks=depth, scale=scale)


def feature_layer(model: nn.Module) -> str:
    """Name of the model's DFD hook point (``model.feature_layer``)."""
    name = getattr(model, "feature_layer", None)
    if not isinstance(name, str):
        raise ValueError(f"{type(model).__name__} has no 'feature_layer' attribute naming its DFD hook point")
    return name
