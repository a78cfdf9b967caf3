"""Public op ``lsq_fake_quant`` (docs/spec.md §5b, LSQ / LSQ+): validation, registration, dispatch.

Backend implementations take ``(x, step, offset, axis, qn, qp, grad_factor)``
with the range and gradient scale already resolved (see
:func:`spark_ext.reference.lsq_fake_quant_core`).

Backends: ``cpp`` (CPU) and ``cuda`` run the compiled ops
``torch.ops.spark_ext.lsq_fake_quant`` / ``_backward`` (csrc/); their
fake (meta) implementations and autograd formula are registered here, once,
when the library loads. The forward op's autograd calls the fused backward op,
which reads x and dy once, writes dx and reduces the step and offset
gradients in float32 deterministically.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _extension, reference
from .._validation import (
    check_axis,
    check_bits,
    check_finite_values,
    check_float_dtype,
    check_grad_scale,
    check_positive_step,
    check_same_device,
    check_tensor,
)
from . import _dispatch
from .fake_quant import register_compiled_hooks

OP = "lsq_fake_quant"

_dispatch.register(OP, "reference", reference.lsq_fake_quant_core)


def _compiled_lsq(x, step, offset, axis, qn, qp, grad_factor):
    """cpp / cuda backend: ``torch.ops.spark_ext.lsq_fake_quant`` (differentiable)."""
    return torch.ops.spark_ext.lsq_fake_quant(x, step, offset, axis, qn, qp, grad_factor)


_extension.on_load(lambda: register_compiled_hooks(OP))
_dispatch.register_compiled(OP, _compiled_lsq)


def lsq_fake_quant(
    x: torch.Tensor,
    step: torch.Tensor,
    offset: Optional[torch.Tensor] = None,
    *,
    bits: int,
    signed: bool,
    axis: Optional[int] = None,
    grad_scale: Union[str, float, None] = "lsq",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """LSQ (``offset=None``) or LSQ+ learnable fake quantization, docs/spec.md §5b.

    Args:
        x: any shape, float32/float16/bfloat16, any strides.
        step: positive, finite; one element (``axis=None``) or ``[x.shape[axis]]``.
            A tiny positive step is clamped to 1e-8.
        offset: ``None`` or a finite tensor shaped like ``step`` (LSQ+).
        bits: 2..16. signed: range ``[-2^(b-1), 2^(b-1)-1]``, else ``[0, 2^b-1]``.
        axis: ``None`` (per tensor) or the dimension that has one step per index.
        grad_scale: ``"lsq"`` (``1/sqrt(n * Qp)``, n elements per step), a
            positive float, or ``None`` (1).
        backend: ``None`` (process default), ``"auto"``, ``"cpp"``, ``"cuda"``, ``"reference"``.

    Returns:
        Fake-quantized x in x's dtype, same shape. Differentiable w.r.t. x
        (straight-through inside the range), step and offset; their gradients
        keep their dtypes.

    The compiled backends (``cpp``, ``cuda``) take float32/float16/bfloat16 and
    any dense layout (contiguous, channels_last, permuted) as is; a layout with
    gaps (e.g. a strided slice) is first copied densely (one extra read and
    write of x). The ``cpp`` backward reads the upstream gradient in place
    whatever its strides (e.g. the expanded ones of ``y.sum()``); the ``cuda``
    one copies a gradient whose strides differ from x's into x's layout.
    """
    check_tensor(x, "x")
    check_float_dtype(x, "x")
    bits = check_bits(bits)
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {signed!r}")
    grad_scale = check_grad_scale(grad_scale)
    if axis is not None:
        if x.dim() == 0:
            raise ValueError("axis must be None for a 0-D x")
        axis = check_axis(axis, x.dim())
    expected = 1 if axis is None else x.shape[axis]
    for t, name in ((step, "step"), (offset, "offset")):
        if t is None:
            continue
        check_tensor(t, name)
        check_same_device(t, name, x)
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
        if t.numel() != expected or t.dim() > 1:
            what = "one element" if axis is None else f"shape [{expected}] (x.shape[{axis}])"
            raise ValueError(f"{name} must have {what}, got shape {tuple(t.shape)}")
    check_positive_step(step, "step")
    if offset is not None:
        check_finite_values(offset, "offset")
    qn, qp = reference.lsq_range(bits, signed)
    g = reference.lsq_grad_factor(grad_scale, x.numel(), expected, qp)
    _, fn = _dispatch.resolve(OP, backend, x)
    return fn(x, step, offset, axis, qn, qp, g)
