"""Public op ``lsq_fake_quant`` (docs/spec.md §5b, LSQ / LSQ+): validation, registration, dispatch.

Backend implementations take ``(x, step, offset, axis, qn, qp, grad_factor)``
with the range and gradient scale already resolved (see
:func:`spark_ext.reference.lsq_fake_quant_core`).

Backends: ``cpp`` (CPU) and ``cuda`` run the compiled ops
``torch.ops.spark_ext.lsq_fake_quant`` / ``_backward`` (csrc/); their
schemas (:data:`SCHEMAS`) and fake (meta) implementations are registered
here, the kernels and the C++ autograd kernel (csrc/autograd.cpp) by the
compiled library when it loads. The forward op's autograd calls the fused
backward op, which reads x and dy once, writes dx and reduces the step and
offset gradients in float32 deterministically. As for the torch-compatible
ops (``ops/fake_quant.py``), a call on a compiled backend goes straight to
the op, and the arguments are checked in Python only when the op refuses them.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .. import reference
from .._validation import (
    check_axis,
    check_bits,
    check_finite_values,
    check_float_dtype,
    check_grad_scale,
    check_positive_step,
    check_qparam,
    check_tensor,
)
from . import _dispatch
from .fake_quant import call_compiled, register_compiled_fakes

OP = "lsq_fake_quant"

# The compiled ops' schemas (kernels: csrc/cpu/fake_quant_cpu.cpp, csrc/cuda/fake_quant_cuda.cu).
SCHEMAS = {
    OP: "(Tensor x, Tensor step, Tensor? offset, int? axis, int qn, int qp, float grad_factor) -> Tensor",
    f"{OP}_backward": (
        "(Tensor grad, Tensor x, Tensor step, Tensor? offset, int? axis, int qn, int qp, float grad_factor) "
        "-> (Tensor, Tensor, Tensor)"
    ),
}
_dispatch.define_ops(SCHEMAS)

_dispatch.register(OP, "reference", reference.lsq_fake_quant_core)


register_compiled_fakes(OP)
_op = torch.ops.spark_ext.lsq_fake_quant.default

# cpp / cuda backend: differentiable through its C++ autograd kernel
_dispatch.register_compiled(OP, lambda *args: call_compiled(OP, *args))

# (bits, signed) -> (Qn, Qp) for every valid pair: a KeyError for anything else.
_RANGES = {(bits, signed): reference.lsq_range(bits, signed) for bits in range(2, 17) for signed in (False, True)}


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
    if (
        _dispatch.runs_compiled(OP, backend, x)
        and type(bits) is int
        and type(signed) is bool
        and (axis is None or type(axis) is int)
    ):
        try:
            qn, qp = _RANGES[bits, signed]
            steps = 1 if axis is None else x.shape[axis]
            grad_factor = reference.lsq_grad_factor(check_grad_scale(grad_scale), x.numel(), steps, qp)
            return _op(x, step, offset, axis, qn, qp, grad_factor)
        except (RuntimeError, TypeError, ValueError, KeyError, IndexError):
            pass  # the checked call below names the bad argument
    return _checked_lsq(x, step, offset, bits, signed, axis, grad_scale, backend)


def _checked_lsq(x, step, offset, bits, signed, axis, grad_scale, backend):
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
    shape_rule = "have one element" if axis is None else f"have shape [{expected}] (x.shape[{axis}])"
    check_qparam(step, "step", x, expected, shape_rule)
    if offset is not None:
        check_qparam(offset, "offset", x, expected, shape_rule)
    name, fn = _dispatch.resolve(OP, backend, x)
    if name == "reference":  # the compiled kernels check the values they read
        check_positive_step(step, "step")
        if offset is not None:
            check_finite_values(offset, "offset")
    qn, qp = reference.lsq_range(bits, signed)
    g = reference.lsq_grad_factor(grad_scale, x.numel(), expected, qp)
    return fn(x, step, offset, axis, qn, qp, g)
