"""A small CNN classifier for 8x8 digits (the classification path's model)."""

from __future__ import annotations

import torch
import torch.nn as nn


class DigitsCNN(nn.Module):
    """``[B, 1, 8, 8] -> [B, num_classes]`` logits: three 3x3 convs (the last two stride 2), global pool, linear.

    Built only from ``nn.Conv2d``, ``nn.ReLU`` and ``nn.Linear`` so ``quantize_model``
    converts every layer; ``features`` (the last conv block's output, ``[B, 2w, 2, 2]``)
    is the feature-KD hook point."""

    feature_layer = "features"

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        w = int(width)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU())
        self.features = nn.Sequential(nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.down(self.stem(x))).mean((2, 3)))
