"""Drop-ins for ``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` (docs/spec.md §5a).

Backends ``cpp`` (CPU) and ``cuda`` run the compiled op
``torch.ops.spark_ext.fake_quantize_learnable`` (``axis`` None for per tensor),
differentiable through its C++ autograd kernel (csrc/autograd.cpp) and the
fused ``fake_quantize_learnable_backward``. Its schema (:data:`SCHEMAS`) and
fake implementations are registered here, the kernels by the compiled library
when it loads.

A call on a compiled backend goes straight to the op: the C++ checks the
shapes, dtypes and ranges, and the kernel the parameter values as it reads
them, so a call costs no extra pass over anything. When the op refuses a call,
the public function checks the arguments again in Python and raises the
documented ``ValueError`` / ``TypeError`` naming the argument (or, for a
quantization range beyond ``±2^21``, which the kernels' rounding does not
cover, computes it with the reference backend). The ``reference`` backend is
checked in Python up front.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import (
    check_axis,
    check_float_dtype,
    check_int,
    check_not_nan,
    check_positive_scale,
    check_qparam,
    check_real,
    check_tensor,
)
from . import _dispatch

OP_PER_TENSOR = "fake_quantize_learnable_per_tensor_affine"
OP_PER_CHANNEL = "fake_quantize_learnable_per_channel_affine"

_dispatch.register(OP_PER_TENSOR, "reference", reference.fake_quantize_learnable_per_tensor_affine)
_dispatch.register(OP_PER_CHANNEL, "reference", reference.fake_quantize_learnable_per_channel_affine)

# The compiled ops' schemas (kernels: csrc/cpu/fake_quant_cpu.cpp, csrc/cuda/fake_quant_cuda.cu).
SCHEMAS = {
    "fake_quantize_learnable": (
        "(Tensor x, Tensor scale, Tensor zero_point, int? axis, int quant_min, int quant_max, float grad_factor) "
        "-> Tensor"
    ),
    "fake_quantize_learnable_backward": (
        "(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int? axis, int quant_min, int quant_max, "
        "float grad_factor) -> (Tensor, Tensor, Tensor)"
    ),
}
_dispatch.define_ops(SCHEMAS)

KERNEL_MAX_RANGE = 2**21  # |quant_min|, |quant_max| the compiled kernels take


def register_compiled_fakes(op: str) -> None:
    """Fake (meta) implementations of the compiled op ``op`` and its ``op + "_backward"``.

    Both fake-quant families share the shape of their schemas:
    ``op(x, p0, p1, axis, lo, hi, grad_factor) -> y`` and
    ``op_backward(grad, x, p0, p1, axis, lo, hi, grad_factor) -> (dx, dp0, dp1)``,
    with ``(p0, p1)`` = (scale, zero_point) or (step, offset); only LSQ's
    offset may be None. The kernels allocate ``y`` and ``dx`` with
    ``empty_like(x)``: same shape, dtype and strides (dense layouts kept,
    others made dense in empty_like's layout). Autograd is the C++ kernel's.
    """

    def forward_fake(x, p0, p1, axis, lo, hi, grad_factor):
        return torch.empty_like(x)

    def backward_fake(grad, x, p0, p1, axis, lo, hi, grad_factor):
        return torch.empty_like(x), torch.empty_like(p0), torch.empty_like(p0 if p1 is None else p1)

    torch.library.register_fake(f"spark_ext::{op}", forward_fake)
    torch.library.register_fake(f"spark_ext::{op}_backward", backward_fake)


class FunctorchFakeQuant(torch.autograd.Function):
    """The compiled op's autograd in Python, for ``torch.func`` transforms only.

    functorch cannot run a C++ ``torch::autograd::Function``; under its
    transforms the public ops call this instead (same kernels, same formula:
    the forward op below autograd, then the fused backward op).
    ``op`` is ``fake_quantize_learnable`` or ``lsq_fake_quant``.
    """

    @staticmethod
    def forward(op, x, p0, p1, axis, lo, hi, grad_factor):
        with torch.no_grad():
            return getattr(torch.ops.spark_ext, op).default(x, p0, p1, axis, lo, hi, grad_factor)

    @staticmethod
    def setup_context(ctx, inputs, output):
        op, x, p0, p1, *args = inputs
        ctx.save_for_backward(x, p0, p1)
        ctx.op, ctx.args = op, args

    @staticmethod
    def backward(ctx, grad):
        x, p0, p1 = ctx.saved_tensors
        backward_op = getattr(torch.ops.spark_ext, f"{ctx.op}_backward").default
        dx, dp0, dp1 = backward_op(grad, x, p0, p1, *ctx.args)
        return None, dx, dp0, dp1 if ctx.needs_input_grad[3] else None, None, None, None, None


def call_compiled(op: str, x, p0, p1, axis, lo, hi, grad_factor):
    """``torch.ops.spark_ext.<op>`` (a fake-quant op), through :class:`FunctorchFakeQuant` under torch.func."""
    if torch._C._are_functorch_transforms_active():
        return FunctorchFakeQuant.apply(op, x, p0, p1, axis, lo, hi, grad_factor)
    return getattr(torch.ops.spark_ext, op).default(x, p0, p1, axis, lo, hi, grad_factor)


def _in_kernel_range(quant_min: int, quant_max: int) -> bool:
    return -KERNEL_MAX_RANGE <= quant_min and quant_max <= KERNEL_MAX_RANGE


def _compiled_per_tensor(x, scale, zero_point, quant_min, quant_max, grad_factor):
    if not _in_kernel_range(quant_min, quant_max):
        return reference.fake_quantize_learnable_per_tensor_affine(
            x, scale, zero_point, quant_min, quant_max, grad_factor
        )
    return call_compiled("fake_quantize_learnable", x, scale, zero_point, None, quant_min, quant_max, grad_factor)


def _compiled_per_channel(x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
    if not _in_kernel_range(quant_min, quant_max):
        return reference.fake_quantize_learnable_per_channel_affine(
            x, scale, zero_point, axis, quant_min, quant_max, grad_factor
        )
    return call_compiled("fake_quantize_learnable", x, scale, zero_point, axis, quant_min, quant_max, grad_factor)


register_compiled_fakes("fake_quantize_learnable")
_op = torch.ops.spark_ext.fake_quantize_learnable.default
_dispatch.register_compiled(OP_PER_TENSOR, _compiled_per_tensor)
_dispatch.register_compiled(OP_PER_CHANNEL, _compiled_per_channel)


def check_quant_range(quant_min: object, quant_max: object) -> tuple[int, int]:
    """Integer ``quant_min <= 0 <= quant_max`` (torch's learnable backward needs 0 in range)."""
    qmin, qmax = check_int(quant_min, "quant_min"), check_int(quant_max, "quant_max")
    if not qmin <= 0 <= qmax:
        raise ValueError(f"quant_min <= 0 <= quant_max is required, got quant_min={qmin}, quant_max={qmax}")
    return qmin, qmax


def _check_qparams(x, scale, zero_point, expected_numel: int, what: str, values: bool) -> torch.Tensor:
    """Validate x, scale, zero_point; returns the zero point as a float tensor.

    Like torch, an integer zero point is accepted (it cannot require grad);
    it is converted to float32, which gives the same results. A NaN zero
    point is rejected (torch: "zero_point must be between quant_min and
    quant_max"); an infinite one is clamped to the range, as torch does.
    ``values``: also check the values (the reference backend; the compiled
    kernels check them as they read them).
    """
    check_tensor(x, "x")
    check_float_dtype(x, "x")
    shape_rule = f"hold {what} ({expected_numel} elements, 1-D)"
    check_qparam(scale, "scale", x, expected_numel, shape_rule)
    check_qparam(zero_point, "zero_point", x, expected_numel, shape_rule, int_ok=True)
    if values:
        check_positive_scale(scale, "scale")
    if not zero_point.is_floating_point():
        return zero_point.to(torch.float32)
    if values:
        check_not_nan(zero_point, "zero_point")
    return zero_point


def _plain_numbers(quant_min, quant_max, grad_factor) -> bool:
    """The op's schema takes a bool for an int or float; the checked path refuses bools."""
    return type(quant_min) is int and type(quant_max) is int and type(grad_factor) is not bool


def fake_quantize_learnable_per_tensor_affine(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Same results as ``torch._fake_quantize_learnable_per_tensor_affine``, plus fp16/bf16 backward.

    Args:
        x: any shape, float32/float16/bfloat16, any strides.
        scale: one-element float tensor, finite and > 0 with a finite
            reciprocal (>= 2.9e-39). Unlike torch, other scales are rejected
            with a ValueError (see docs/quantization.md: torch's own learnable
            FakeQuantize clamps the scale to >= eps, so a non-positive scale
            here is a diverged or uninitialised parameter, and for a subnormal
            scale torch returns ``quant_min * scale`` for ``x = 0``).
        zero_point: one-element tensor, float (rounded half-to-even and
            clamped to the range in the forward; NaN rejected with a
            ValueError, +-inf clamped, as torch does) or integer (accepted like
            torch; same results as the float value, and no gradient).
        quant_min, quant_max: ints with ``quant_min <= 0 <= quant_max``.
        grad_factor: multiplies the scale and zero-point gradients.

    Returns:
        ``x`` fake-quantized, in x's dtype and shape; differentiable w.r.t. x,
        scale and zero_point with ATen's gradients (scale and zero-point
        gradients in their own dtypes). First derivatives only on the compiled
        backends (differentiating the gradient again raises a RuntimeError there).

    The compiled backends read dense layouts (contiguous, channels_last) in
    place; other layouts cost one extra copy of x. The ``cpp`` backward reads
    the upstream gradient in place whatever its strides; the ``cuda`` one
    copies a gradient whose strides differ from x's (one extra copy of x).
    On CUDA a bad scale or zero-point value is a device-side assertion.
    """
    if _dispatch.runs_compiled(OP_PER_TENSOR, backend, x) and _plain_numbers(quant_min, quant_max, grad_factor):
        try:
            return _op(x, scale, zero_point, None, quant_min, quant_max, grad_factor)
        except (RuntimeError, TypeError, ValueError):
            pass  # the checked call below names the bad argument, or runs what the kernels do not
    return _checked_per_tensor(x, scale, zero_point, quant_min, quant_max, grad_factor, backend)


def _checked_per_tensor(x, scale, zero_point, quant_min, quant_max, grad_factor, backend):
    check_tensor(x, "x")
    name, fn = _dispatch.resolve(OP_PER_TENSOR, backend, x)
    zero_point = _check_qparams(x, scale, zero_point, 1, "one value", name == "reference")
    qmin, qmax = check_quant_range(quant_min, quant_max)
    grad_factor = check_real(grad_factor, "grad_factor")
    return fn(x, scale, zero_point, qmin, qmax, grad_factor)


def fake_quantize_learnable_per_channel_affine(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Same results as ``torch._fake_quantize_learnable_per_channel_affine``, plus fp16/bf16 backward.

    ``scale`` and ``zero_point`` are ``[x.shape[axis]]``; see the per-tensor op
    for what they accept (every scale finite and > 0 with a finite reciprocal,
    unlike torch; a float or integer zero point, NaN rejected).
    """
    if (
        _dispatch.runs_compiled(OP_PER_CHANNEL, backend, x)
        and type(axis) is int
        and _plain_numbers(quant_min, quant_max, grad_factor)
    ):
        try:
            return _op(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)
        except (RuntimeError, TypeError, ValueError):
            pass  # the checked call below names the bad argument, or runs what the kernels do not
    return _checked_per_channel(x, scale, zero_point, axis, quant_min, quant_max, grad_factor, backend)


def _checked_per_channel(x, scale, zero_point, axis, quant_min, quant_max, grad_factor, backend):
    check_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension for per-channel quantization")
    axis = check_axis(axis, x.dim())
    name, fn = _dispatch.resolve(OP_PER_CHANNEL, backend, x)
    what = f"one value per index of x.shape[{axis}]"
    zero_point = _check_qparams(x, scale, zero_point, x.shape[axis], what, name == "reference")
    qmin, qmax = check_quant_range(quant_min, quant_max)
    grad_factor = check_real(grad_factor, "grad_factor")
    return fn(x, scale, zero_point, axis, qmin, qmax, grad_factor)
