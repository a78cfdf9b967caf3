"""Per-image reconstruction losses (the task loss and SPARK's reward signal)."""

from __future__ import annotations

import torch

from ..reference import CHARBONNIER_EPS

REC_LOSSES = ("l1", "l2", "charbonnier")


def per_image_loss(output: torch.Tensor, target: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean over ``C, H, W`` of ``ell(output - target)``: ``[B]`` float32.

    ``kind``: ``"l1"`` (``|d|``), ``"l2"`` (``d^2``) or ``"charbonnier"``
    (``sqrt(d^2 + 1e-6) - 1e-3``). Computed in float32 whatever the input
    dtype; differentiable w.r.t. ``output``. The batch mean of this is the
    task loss ``L_rec``; its per-image change is SPARK's reward.
    """
    d = output.float() - target.float()
    if kind == "l1":
        e = d.abs()
    elif kind == "l2":
        e = d * d
    elif kind == "charbonnier":
        e = torch.sqrt(d * d + CHARBONNIER_EPS**2) - CHARBONNIER_EPS
    else:
        raise ValueError(f"rec_loss must be one of {REC_LOSSES}, got {kind!r}")
    return e.flatten(1).mean(1)
