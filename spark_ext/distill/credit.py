"""First-order per-cell credit for SPARK's KD weights, and the policy update that learns from it.

The question the policy must answer is: *does more KD in this cell help the
student on data it is not training on?* To first order it has a cheap answer.
One optimiser step with cell weights ``w`` moves the student by
``-P (g_rec + lambda/N sum_c w_c grad kd_c)`` (``P``: the optimiser's
preconditioner, ``lr / (sqrt(v) + eps)`` for Adam), so the held-out loss changes by

    dL_val / dw_c = -(lambda/N) <P g_val, grad_theta kd_c>

where ``g_val`` is the gradient of the reconstruction loss on a held-out batch
(Learning-to-Reweight / Meta-Weight-Net's hypergradient, to first order).
The inner product for every cell at once comes from the *output* side:
``<P g_val, grad_theta kd_c> = <J P g_val, dkd_c/dS>``, and ``J P g_val`` is the
change of the student's output on the training batch under one virtual
optimiser step along the held-out gradient. So :func:`cell_credit` needs one
held-out forward + backward and one extra forward of the perturbed student
(no per-cell backward), and returns

    credit_c = -sum_{pixels, channels in c} dkd/dS * (S(theta + delta) - S(theta)),
    delta = -P g_val   (one virtual step that lowers the held-out loss)

``credit_c > 0``: the gradient of cell ``c``'s KD term points the same way as
the held-out descent step, so weighting that cell more helps.

The perturbed forward runs the real (fake-quantized) student, so the credit
sees the quantizers' rounding, not only their straight-through gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .._validation import check_real
from ..reference import cell_sum, kd_elementwise
from . import distributed
from .losses import per_image_loss


def _trainable(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def virtual_step(
    student: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    held_inputs: torch.Tensor,
    held_targets: torch.Tensor,
    rec_loss: str = "l1",
) -> tuple[list[torch.nn.Parameter], list[torch.Tensor], float]:
    """One virtual optimiser step on the held-out reconstruction loss: ``(params, deltas, held_loss)``.

    ``delta = -lr * g / (sqrt(v_hat) + eps)`` for parameters whose optimiser
    state has Adam's ``exp_avg_sq`` (bias-corrected with the state's step
    count), ``-lr * g`` otherwise (``lr`` of the parameter's group, 1e-3 when
    no optimiser is given). Nothing is modified; ``held_loss`` is the held-out
    loss at the current parameters. The student's ``.grad`` fields are untouched.
    """
    params = _trainable(student)
    loss = per_image_loss(student(held_inputs), held_targets, rec_loss).mean()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    lrs, eps, betas = {}, {}, {}
    if optimizer is not None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                lrs[id(p)] = float(group["lr"])
                eps[id(p)] = float(group.get("eps", 1e-8))
                betas[id(p)] = group.get("betas", (0.9, 0.999))[1]
    deltas = []
    with torch.no_grad():
        for p, g in zip(params, grads):
            if g is None:
                deltas.append(torch.zeros_like(p))
                continue
            lr = lrs.get(id(p), 1e-3)
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            if "exp_avg_sq" in state and float(state["step"]) > 0:
                correction = 1.0 - betas[id(p)] ** float(state["step"])
                denom = (state["exp_avg_sq"] / correction).sqrt() + eps[id(p)]
                deltas.append(-lr * g / denom)
            else:
                deltas.append(-lr * g)
    return params, deltas, float(loss.detach())


def kd_output_gradient(student_out: torch.Tensor, teacher_out: torch.Tensor, kd_loss: str) -> torch.Tensor:
    """``d ell(S - T) / dS`` per element (docs/spec.md §2's KD loss), no graph: shaped like ``student_out``."""
    dtype = torch.float64 if student_out.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        diff = (student_out.detach().to(dtype) - teacher_out.detach().to(dtype)).requires_grad_(True)
        (grad,) = torch.autograd.grad(kd_elementwise(diff, kd_loss).sum(), diff)
    return grad


def cell_credit(
    student: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    inputs: torch.Tensor,
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    held_inputs: torch.Tensor,
    held_targets: torch.Tensor,
    grid: tuple[int, int],
    *,
    kd_loss: str = "l1",
    rec_loss: str = "l1",
    pixel_weight: Optional[torch.Tensor] = None,
    process_group: Optional[object] = None,
) -> torch.Tensor:
    """First-order credit of every cell's KD weight (module docstring): ``[B, 1, Gh, Gw]``, no gradient
    (float32; float64 for a float64 student).

    Args:
        student: the student, at the parameters ``student_out`` was computed with.
        optimizer: its optimiser (Adam's state gives the preconditioner; may be None).
        inputs: the training batch's inputs; ``student_out``, ``teacher_out``: ``[B, C, H, W]`` outputs on it.
        held_inputs, held_targets: a held-out batch (not the training batch).
        grid: ``(Gh, Gw)`` as in :func:`~spark_ext.difficulty_signals`.
        pixel_weight: optional per-element factor of the KD term inside each cell (e.g. a teacher gate),
            broadcastable to ``student_out``.
    Under DDP the held-out direction is averaged over ranks (every rank scores
    its cells against the same step). The student's parameters are never modified, so this may run
    while a graph through them awaits its backward.
    """
    params, deltas, _ = virtual_step(student, optimizer, held_inputs, held_targets, rec_loss)
    distributed.average_tensors(deltas, process_group)
    # The perturbed forward swaps in ``p + delta`` (torch.func) instead of editing the parameters in place:
    # the caller's graph of ``student_out`` may still be waiting for its backward (SparkDistiller.compute_loss).
    names = {id(p): name for name, p in student.named_parameters()}
    with torch.no_grad():
        moved_params = {names[id(p)]: p + d for p, d in zip(params, deltas)}
        moved = torch.func.functional_call(student, moved_params, (inputs,))
    dtype = torch.float64 if student_out.dtype == torch.float64 else torch.float32
    change = moved.to(dtype) - student_out.detach().to(dtype)
    kd_grad = kd_output_gradient(student_out, teacher_out, kd_loss)
    if pixel_weight is not None:
        kd_grad = kd_grad * pixel_weight
    per_pixel = (kd_grad * change).sum(1)
    return -cell_sum(per_pixel, tuple(grid))[:, None]


class RunningScale:
    """EMA of a signal's mean square; ``normalize(x) = x / sqrt(ema)`` (bias-corrected, scale-free)."""

    def __init__(self, momentum: float = 0.99, device=None):
        self.momentum = check_real(momentum, "scale_momentum")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"scale momentum must be in [0, 1), got {momentum}")
        self.mean_square = torch.zeros((), device=device)
        self.count = 0

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().float()
        self.mean_square = self.momentum * self.mean_square + (1 - self.momentum) * x.pow(2).mean()
        self.count += 1
        ema = self.mean_square / (1 - self.momentum**self.count)
        return x / (ema.sqrt() + 1e-20)

    def state_dict(self) -> dict:
        return {"mean_square": self.mean_square.clone(), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean_square = state["mean_square"].to(self.mean_square.device).clone()
        self.count = int(state["count"])


def credit_loss(weight: torch.Tensor, credit: torch.Tensor) -> torch.Tensor:
    """``-mean(w * credit)``: the first-order held-out loss change of the weighting, to minimise.

    ``weight``: ``[B, 1, Gh, Gw]`` differentiable w.r.t. the policy; ``credit``: same shape, constant.
    """
    return -(weight * credit.detach()).mean()
