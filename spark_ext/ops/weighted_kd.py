"""Public op ``fused_weighted_kd`` (SPEC §3): validation, backend registration, dispatch."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import KD_LOSSES, REDUCTIONS, check_choice, check_images, check_same_device, check_tensor
from . import _dispatch

OP = "fused_weighted_kd"


def _reference(student, teacher, weight, kd_loss, reduction):
    return reference.fused_weighted_kd(student, teacher, weight, kd_loss=kd_loss, reduction=reduction)


_dispatch.register(OP, "reference", _reference)


def check_weight(weight: torch.Tensor, student: torch.Tensor) -> None:
    """SPEC §3: per-pixel weights broadcast to [B, C, H, W]; grid weights to [B, 1, Gh, Gw]."""
    check_tensor(weight, "weight")
    check_same_device(weight, "weight", student)
    if not weight.is_floating_point():
        raise TypeError(f"weight must have a floating dtype, got {weight.dtype}")
    if not 2 <= weight.dim() <= 4:
        raise ValueError(
            f"weight must be [H, W]-like per-pixel or [B, 1, Gh, Gw]-like per-cell (2 to 4 dims), "
            f"got shape {tuple(weight.shape)}"
        )
    batch, _, height, width = student.shape
    if reference.is_pixel_weight(weight, height, width):
        target, kind = tuple(student.shape), "per-pixel weight"
    else:
        gh, gw = weight.shape[-2:]
        if not (1 <= gh <= height and 1 <= gw <= width):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} is neither per-pixel (last dims {(height, width)}) "
                f"nor a grid with 1 <= Gh <= {height}, 1 <= Gw <= {width}"
            )
        target, kind = (batch, 1, gh, gw), "grid weight"
    try:
        ok = torch.broadcast_shapes(weight.shape, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{kind} of shape {tuple(weight.shape)} must broadcast to {target}")


def fused_weighted_kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    kd_loss: str = "l1",
    reduction: str = "mean",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Spatially weighted KD loss ``sum(w * ell(S - T))`` (``/ N`` for ``"mean"``), SPEC §3.

    Args:
        student, teacher: ``[B, C, H, W]``, one floating dtype, one device.
        weight: ``None`` (uniform), per-pixel (``weight.shape[-2:] == (H, W)``,
            broadcastable to ``[B, C, H, W]``) or per-cell (broadcastable to
            ``[B, 1, Gh, Gw]``, constant over SPEC §1's cells). Any float dtype.
        kd_loss: ``"l1"``, ``"l2"``, ``"charbonnier"``.
        reduction: ``"mean"`` (divide by ``N = B*C*H*W``) or ``"sum"``.
        backend: ``None`` (process default), ``"auto"``, ``"triton"``, ``"reference"``.

    Returns:
        A float32 scalar, differentiable w.r.t. student, teacher and weight
        (each only when it requires grad).
    """
    check_images(student, teacher)
    if weight is not None:
        check_weight(weight, student)
    check_choice(kd_loss, "kd_loss", KD_LOSSES)
    check_choice(reduction, "reduction", REDUCTIONS)
    _, fn = _dispatch.resolve(OP, backend, student)
    return fn(student, teacher, weight, kd_loss, reduction)
