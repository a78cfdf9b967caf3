"""Public op ``difficulty_signals`` (SPEC §2): validation, backend registration, dispatch."""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import KD_LOSSES, check_choice, check_grid, check_images
from . import _dispatch

OP = "difficulty_signals"

_dispatch.register(OP, "reference", reference.difficulty_signals)


def difficulty_signals(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    grid: tuple[int, int] = (8, 8),
    kd_loss: str = "l1",
    *,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The four SPARK difficulty signals and the per-cell KD loss, SPEC §2.

    Args:
        student, teacher, target: ``[B, C, H, W]`` tensors of one floating dtype
            (float32, float16, bfloat16; float64 on the reference backend) on one
            device, any strides.
        grid: ``(Gh, Gw)`` with ``1 <= Gh <= H``, ``1 <= Gw <= W``; pixel row h
            lies in cell row ``floor(h * Gh / H)`` (cells need not be equal).
        kd_loss: ``"l1"``, ``"l2"`` or ``"charbonnier"`` (eps 1e-3).
        backend: ``None`` (process default), ``"auto"``, ``"triton"``, ``"reference"``.

    Returns:
        ``(signals, cell_kd)``: ``signals [B, 4, Gh, Gw]`` float32 holding
        lap_var, pix_var, recon_err, kd_gap per cell (no gradient);
        ``cell_kd [B, 1, Gh, Gw]`` float32, the per-cell *sum* of
        ``sum_c ell(S - T)``, differentiable w.r.t. student and teacher.
    """
    check_images(student, teacher, target)
    grid = check_grid(grid, student.shape[-2], student.shape[-1])
    check_choice(kd_loss, "kd_loss", KD_LOSSES)
    _, fn = _dispatch.resolve(OP, backend, student)
    return fn(student, teacher, target, grid, kd_loss)
