"""Public op ``fused_weighted_kd`` (docs/spec.md §3): validation, backend registration, dispatch.

Backends: ``reference`` (:func:`spark_ext.reference.fused_weighted_kd`),
``triton`` (``spark_ext.kernels.weighted_kd``; CUDA tensors, CPU tensors only
when forced under ``TRITON_INTERPRET=1``; see ``ops/_dispatch.py`` for the
availability rules and ``ops/difficulty.py`` for why the ops are opaque custom ops) and ``cpp``
(``csrc/cpu/weighted_kd_cpu.cpp``; CPU tensors of float32/float16/bfloat16).

Triton path by kind of weight:

* ``None`` or per pixel: ``spark_ext::fused_weighted_kd_triton(S, T, weight, kd_loss,
  reduction) -> loss`` (one fused pass) with autograd through
  ``spark_ext::fused_weighted_kd_backward_triton(g, S, T, weight, kd_loss, reduction,
  need_s, need_t, need_w) -> (dS, dT, dweight)`` (one fused pass; a gradient
  not needed is an empty ``[0]`` tensor and is not computed).
* per cell (grid weights): ``sum(weight * cell_kd) / N`` with ``cell_kd`` from
  ``spark_ext::cell_kd_triton`` (one pass over S and T; its backward is the
  elementwise ``cell_kd`` backward). The product and sum are over
  ``[B, 1, Gh, Gw]`` only, and autograd reduces the weight's gradient over
  its broadcast dims.

The ``cpp`` backend has the same structure with the compiled library's
``spark_ext::fused_weighted_kd`` / ``fused_weighted_kd_backward`` (the same
:data:`SCHEMAS`) and ``spark_ext::cell_kd`` for grid weights. Its
backward reduces ``dweight`` over the broadcast dims in the same pass,
deterministically, with no temporary of size N (a float32 copy of a
non-float32 weight aside, weight-sized).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import KD_LOSSES, REDUCTIONS, check_choice, check_images, check_same_device, check_tensor
from . import _dispatch
from .difficulty import cell_kd_cpp, cell_kd_triton

OP = "fused_weighted_kd"

# The schemas of this module's ops, for the compiled kernels (csrc/cpu/weighted_kd_cpu.cpp) under these names
# and for the Triton kernels under the same names plus "_triton".
SCHEMAS = {
    "fused_weighted_kd": "(Tensor student, Tensor teacher, Tensor? weight, str kd_loss, str reduction) -> Tensor",
    "fused_weighted_kd_backward": (
        "(Tensor grad, Tensor student, Tensor teacher, Tensor? weight, str kd_loss, str reduction, "
        "bool need_student, bool need_teacher, bool need_weight) -> (Tensor, Tensor, Tensor)"
    ),
}
_dispatch.define_ops(SCHEMAS)


def _reference(student, teacher, weight, kd_loss, reduction):
    return reference.fused_weighted_kd(student, teacher, weight, kd_loss=kd_loss, reduction=reduction)


_dispatch.register(OP, "reference", _reference)


# --------------------------------------------------------------------------
# Triton backend
# --------------------------------------------------------------------------


def _kernels():
    from ..kernels import weighted_kd as kernels

    return kernels


@torch.library.custom_op("spark_ext::fused_weighted_kd_triton", mutates_args=(), schema=SCHEMAS["fused_weighted_kd"])
def _fused_weighted_kd_triton(student, teacher, weight, kd_loss, reduction):
    """docs/spec.md §3 loss for ``weight`` None or per pixel: a float32 0-dim tensor."""
    return _kernels().fused_weighted_kd(student, teacher, weight, kd_loss, reduction)


# Fakes shared by the Triton ops and the compiled C++ ops (same schemas, same outputs).
def _fake_weighted(student, teacher, weight, kd_loss, reduction):
    return student.new_empty((), dtype=torch.float32)


def _fake_weighted_backward(
    grad, student, teacher, weight, kd_loss, reduction, need_student, need_teacher, need_weight
):
    ds = torch.empty_like(student) if need_student else student.new_empty((0,))
    dt = torch.empty_like(teacher) if need_teacher else teacher.new_empty((0,))
    if need_weight and weight is not None:
        dw = weight.new_empty(weight.shape)  # contiguous, as the kernels write it
    else:
        dw = (student if weight is None else weight).new_empty((0,))
    return ds, dt, dw


_fused_weighted_kd_triton.register_fake(_fake_weighted)


@torch.library.custom_op(
    "spark_ext::fused_weighted_kd_backward_triton", mutates_args=(), schema=SCHEMAS["fused_weighted_kd_backward"]
)
def _fused_weighted_kd_backward_triton(
    grad, student, teacher, weight, kd_loss, reduction, need_student, need_teacher, need_weight
):
    """``(dS, dT, dweight)`` for the 0-dim upstream ``grad``; an unneeded one is empty ``[0]``."""
    return _kernels().fused_weighted_kd_backward(
        grad, student, teacher, weight, kd_loss, reduction, need_student, need_teacher, need_weight
    )


_fused_weighted_kd_backward_triton.register_fake(_fake_weighted_backward)


def _setup_weighted(ctx, inputs, output):
    student, teacher, weight, kd_loss, reduction = inputs
    ctx.save_for_backward(student, teacher, weight)
    ctx.kd_loss, ctx.reduction = kd_loss, reduction


def _backward_weighted(ctx, grad):
    """The Triton op's gradients through its fused backward op (the compiled op's are csrc/autograd.cpp's)."""
    student, teacher, weight = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_w = weight is not None and ctx.needs_input_grad[2]
    if not (need_s or need_t or need_w):
        return None, None, None, None, None
    ds, dt, dw = _fused_weighted_kd_backward_triton(
        grad, student, teacher, weight, ctx.kd_loss, ctx.reduction, need_s, need_t, need_w
    )
    return (ds if need_s else None), (dt if need_t else None), (dw if need_w else None), None, None


_fused_weighted_kd_triton.register_autograd(_backward_weighted, setup_context=_setup_weighted)


def _backend(cell_kd_fn, weighted_op: str):
    """A backend's implementation: grid weights through ``cell_kd_fn``, the others through ``weighted_op``."""

    def implementation(student, teacher, weight, kd_loss, reduction):
        height, width = student.shape[-2:]
        if weight is not None and not reference.is_pixel_weight(weight, height, width):
            # Grid weights: loss = sum(weight * cell_kd) / N, no second image pass.
            gh, gw = weight.shape[-2:]
            cell_kd = cell_kd_fn(student, teacher, (gh, gw), kd_loss)
            # contiguous(): a [B,1,Gh,Gw] copy at most, so the summation order
            # (hence the bits) does not depend on the weight's strides.
            total = (weight.to(torch.float32) * cell_kd).contiguous().sum()
            return total / student.numel() if reduction == "mean" else total
        return getattr(torch.ops.spark_ext, weighted_op)(student, teacher, weight, kd_loss, reduction)

    return implementation


_dispatch.register(OP, "triton", _backend(cell_kd_triton, "fused_weighted_kd_triton"))


# --------------------------------------------------------------------------
# C++ backend (CPU): spark_ext::fused_weighted_kd / _backward (csrc/cpu/weighted_kd_cpu.cpp)
# --------------------------------------------------------------------------


# Fakes of the compiled weighted-KD ops (``ops/difficulty.py`` does the cell_kd ones); their autograd
# is the library's C++ kernel (csrc/autograd.cpp), the same formula as the Triton ops' above.
torch.library.register_fake("spark_ext::fused_weighted_kd", _fake_weighted)
torch.library.register_fake("spark_ext::fused_weighted_kd_backward", _fake_weighted_backward)

_dispatch.register(OP, "cpp", _backend(cell_kd_cpp, "fused_weighted_kd"))
_cpp_op = torch.ops.spark_ext.fused_weighted_kd.default


# --------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------


def check_weight(weight: torch.Tensor, student: torch.Tensor) -> None:
    """docs/spec.md §3: per-pixel weights broadcast to [B, C, H, W]; grid weights to [B, 1, Gh, Gw]."""
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
    """Spatially weighted KD loss ``sum(w * ell(S - T))`` (``/ N`` for ``"mean"``), docs/spec.md §3.

    Args:
        student, teacher: ``[B, C, H, W]``, one floating dtype, one device.
        weight: ``None`` (uniform), per-pixel (``weight.shape[-2:] == (H, W)``,
            broadcastable to ``[B, C, H, W]``) or per-cell (broadcastable to
            ``[B, 1, Gh, Gw]``, constant over docs/spec.md §1's cells). Any float dtype.
        kd_loss: ``"l1"``, ``"l2"``, ``"charbonnier"``.
        reduction: ``"mean"`` (divide by ``N = B*C*H*W``) or ``"sum"``.
        backend: ``None`` (process default), ``"auto"``, ``"triton"``, ``"cpp"``, ``"reference"``.

    Returns:
        A float32 scalar, differentiable w.r.t. student, teacher and weight
        (each only when it requires grad).
    """
    # No weight or a per-pixel one on the C++ backend: one op call, checked by the op itself.
    pixel_weight = weight is None or (isinstance(weight, torch.Tensor) and weight.shape[-2:] == student.shape[-2:])
    if pixel_weight and _dispatch.runs_compiled(OP, backend, student):
        try:
            return _cpp_op(student, teacher, weight, kd_loss, reduction)
        except (RuntimeError, TypeError, ValueError):
            pass  # the checked call below names the bad argument
    check_images(student, teacher)
    if weight is not None:
        check_weight(weight, student)
    check_choice(kd_loss, "kd_loss", KD_LOSSES)
    check_choice(reduction, "reduction", REDUCTIONS)
    _, fn = _dispatch.resolve(OP, backend, student)
    return fn(student, teacher, weight, kd_loss, reduction)
