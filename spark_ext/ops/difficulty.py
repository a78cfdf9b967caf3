"""Public op ``difficulty_signals`` (docs/spec.md §2): validation, backend registration, dispatch.

Backends: ``reference`` (:func:`spark_ext.reference.difficulty_signals`),
``triton`` (fused kernels in ``spark_ext.kernels.difficulty``, CUDA tensors;
CPU tensors only when forced, under ``TRITON_INTERPRET=1``) and ``cpp``
(``csrc/cpu/difficulty_cpu.cpp``, CPU tensors of float32/float16/bfloat16).

The Triton backend is exposed to PyTorch as opaque ``torch.library`` custom
ops, each with a fake (meta) implementation and, for the forward ops, an
autograd formula whose backward is itself a custom op, so
``torch.compile(fullgraph=True)`` traces forward and backward without graph
breaks and ``torch.library.opcheck`` passes:

* ``spark_ext::difficulty_signals_triton(S, T, Y, gh, gw, kd_loss) -> (signals, cell_kd)``
* ``spark_ext::cell_kd_triton(S, T, gh, gw, kd_loss) -> cell_kd`` (no Y, no
  signals; used by grid-weighted :func:`~spark_ext.fused_weighted_kd`)
* ``spark_ext::cell_kd_backward_triton(G, S, T, kd_loss, need_s, need_t) -> (dS, dT)``

(Opaque ``custom_op`` rather than ``triton_op``/``wrap_triton``: the latter
traces into the kernel, which fails opcheck's fake-tensor test and
``torch.compile`` when kernels run under the interpreter.) The Triton op
is the compiled op's name plus ``_triton``: one name to grep, and no
collision with the compiled library's ops in the same namespace.

The ``cpp`` backend runs the compiled library's kernels of
``spark_ext::difficulty_signals``, ``spark_ext::cell_kd`` and
``spark_ext::cell_kd_backward``, with the same fakes and autograd structure.
Every schema is written once, in :data:`SCHEMAS`.

Triton is imported lazily, on the first call that needs it, so
``import spark_ext`` stays fast and works where Triton is not installed.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import KD_LOSSES, check_choice, check_grid, check_images
from . import _dispatch

OP = "difficulty_signals"

# The schemas of this module's ops, for the compiled kernels (csrc/cpu/difficulty_cpu.cpp) under these names
# and for the Triton kernels under the same names plus "_triton".
SCHEMAS = {
    "difficulty_signals": (
        "(Tensor student, Tensor teacher, Tensor target, int gh, int gw, str kd_loss) -> (Tensor, Tensor)"
    ),
    "cell_kd": "(Tensor student, Tensor teacher, int gh, int gw, str kd_loss) -> Tensor",
    "cell_kd_backward": (
        "(Tensor grad, Tensor student, Tensor teacher, str kd_loss, bool need_student, bool need_teacher) "
        "-> (Tensor, Tensor)"
    ),
}
_dispatch.define_ops(SCHEMAS)
_dispatch.register(OP, "reference", reference.difficulty_signals)


def _kernels():
    from ..kernels import difficulty as kernels

    return kernels


# --------------------------------------------------------------------------
# Triton backend: custom ops
# --------------------------------------------------------------------------


@torch.library.custom_op("spark_ext::difficulty_signals_triton", mutates_args=(), schema=SCHEMAS["difficulty_signals"])
def _difficulty_signals_triton(student, teacher, target, gh, gw, kd_loss):
    """Fused docs/spec.md §2 forward: ``(signals [B,4,gh,gw], cell_kd [B,1,gh,gw])``, float32."""
    return _kernels().difficulty_signals(student, teacher, target, (gh, gw), kd_loss)


# Fakes shared by the Triton ops and the compiled C++ ops (same schemas, same outputs).
def _fake_signals(student, teacher, target, gh, gw, kd_loss):
    batch = student.shape[0]
    return (
        student.new_empty((batch, 4, gh, gw), dtype=torch.float32),
        student.new_empty((batch, 1, gh, gw), dtype=torch.float32),
    )


def _fake_cell_kd(student, teacher, gh, gw, kd_loss):
    return student.new_empty((student.shape[0], 1, gh, gw), dtype=torch.float32)


def _fake_cell_kd_backward(grad, student, teacher, kd_loss, need_student, need_teacher):
    ds = torch.empty_like(student) if need_student else student.new_empty((0,))
    dt = torch.empty_like(teacher) if need_teacher else teacher.new_empty((0,))
    return ds, dt


_difficulty_signals_triton.register_fake(_fake_signals)


@torch.library.custom_op("spark_ext::cell_kd_triton", mutates_args=(), schema=SCHEMAS["cell_kd"])
def _cell_kd_triton(student, teacher, gh, gw, kd_loss):
    """``cell_kd [B,1,gh,gw]`` float32 alone (reads S and T only)."""
    return _kernels().cell_kd(student, teacher, (gh, gw), kd_loss)


_cell_kd_triton.register_fake(_fake_cell_kd)


@torch.library.custom_op("spark_ext::cell_kd_backward_triton", mutates_args=(), schema=SCHEMAS["cell_kd_backward"])
def _cell_kd_backward_triton(grad, student, teacher, kd_loss, need_student, need_teacher):
    """``(dS, dT)`` of ``cell_kd`` for upstream ``grad [B,1,gh,gw]``; an unneeded one is empty ``[0]``."""
    return _kernels().cell_kd_backward(grad, student, teacher, kd_loss, need_student, need_teacher)


_cell_kd_backward_triton.register_fake(_fake_cell_kd_backward)


# Autograd of the Triton ops through their fused backward op (the compiled ops' is csrc/autograd.cpp's).
def _cell_kd_grads(ctx, grad_cell_kd):
    student, teacher = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_cell_kd is None or not (need_s or need_t):
        return None, None
    ds, dt = _cell_kd_backward_triton(grad_cell_kd, student, teacher, ctx.kd_loss, need_s, need_t)
    return (ds if need_s else None), (dt if need_t else None)


def _setup_signals(ctx, inputs, output):
    student, teacher, _target, _gh, _gw, kd_loss = inputs
    ctx.save_for_backward(student, teacher)
    ctx.kd_loss = kd_loss
    # docs/spec.md §2: the signals carry no gradient (as in the reference).
    ctx.mark_non_differentiable(output[0])


def _backward_signals(ctx, _grad_signals, grad_cell_kd):
    return (*_cell_kd_grads(ctx, grad_cell_kd), None, None, None, None)


def _setup_cell_kd(ctx, inputs, output):
    student, teacher, _gh, _gw, kd_loss = inputs
    ctx.save_for_backward(student, teacher)
    ctx.kd_loss = kd_loss


def _backward_cell_kd(ctx, grad_cell_kd):
    return (*_cell_kd_grads(ctx, grad_cell_kd), None, None, None)


_difficulty_signals_triton.register_autograd(_backward_signals, setup_context=_setup_signals)
_cell_kd_triton.register_autograd(_backward_cell_kd, setup_context=_setup_cell_kd)


def cell_kd_triton(student: torch.Tensor, teacher: torch.Tensor, grid: tuple[int, int], kd_loss: str) -> torch.Tensor:
    """Differentiable ``cell_kd [B,1,Gh,Gw]`` (float32) via the Triton kernels; arguments already validated."""
    return torch.ops.spark_ext.cell_kd_triton(student, teacher, grid[0], grid[1], kd_loss)


def _triton_backend(student, teacher, target, grid, kd_loss):
    return torch.ops.spark_ext.difficulty_signals_triton(student, teacher, target, grid[0], grid[1], kd_loss)


_dispatch.register(OP, "triton", _triton_backend)


# --------------------------------------------------------------------------
# C++ backend (CPU): ops of the compiled library (csrc/cpu/difficulty_cpu.cpp)
# --------------------------------------------------------------------------


# Autograd of these ops is the library's C++ kernel (csrc/autograd.cpp), the Triton ops' formula above.
torch.library.register_fake("spark_ext::difficulty_signals", _fake_signals)
torch.library.register_fake("spark_ext::cell_kd", _fake_cell_kd)
torch.library.register_fake("spark_ext::cell_kd_backward", _fake_cell_kd_backward)


def cell_kd_cpp(student: torch.Tensor, teacher: torch.Tensor, grid: tuple[int, int], kd_loss: str) -> torch.Tensor:
    """Differentiable ``cell_kd [B,1,Gh,Gw]`` (float32) via the C++ kernel; arguments already validated."""
    return torch.ops.spark_ext.cell_kd(student, teacher, grid[0], grid[1], kd_loss)


def _cpp_backend(student, teacher, target, grid, kd_loss):
    return torch.ops.spark_ext.difficulty_signals(student, teacher, target, grid[0], grid[1], kd_loss)


_dispatch.register(OP, "cpp", _cpp_backend)
_cpp_op = torch.ops.spark_ext.difficulty_signals.default


# --------------------------------------------------------------------------
# Public op
# --------------------------------------------------------------------------


def difficulty_signals(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    grid: tuple[int, int] = (8, 8),
    kd_loss: str = "l1",
    *,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The four SPARK difficulty signals and the per-cell KD loss, docs/spec.md §2.

    Args:
        student, teacher, target: ``[B, C, H, W]`` tensors of one floating dtype
            (float32, float16, bfloat16; float64 on the reference backend) on one
            device, any strides.
        grid: ``(Gh, Gw)`` with ``1 <= Gh <= H``, ``1 <= Gw <= W``; pixel row h
            lies in cell row ``floor(h * Gh / H)`` (cells need not be equal).
        kd_loss: ``"l1"``, ``"l2"`` or ``"charbonnier"`` (eps 1e-3).
        backend: ``None`` (process default), ``"auto"``, ``"triton"``, ``"cpp"``, ``"reference"``.

    Returns:
        ``(signals, cell_kd)``: ``signals [B, 4, Gh, Gw]`` float32 holding
        lap_var, pix_var, recon_err, kd_gap per cell (no gradient);
        ``cell_kd [B, 1, Gh, Gw]`` float32, the per-cell *sum* of
        ``sum_c ell(S - T)``, differentiable w.r.t. student and teacher.
    """
    if _dispatch.runs_compiled(OP, backend, student):
        try:
            gh, gw = grid
            if type(gh) is int and type(gw) is int:
                return _cpp_op(student, teacher, target, gh, gw, kd_loss)
        except (RuntimeError, TypeError, ValueError):
            pass  # the checked call below names the bad argument
    check_images(student, teacher, target)
    grid = check_grid(grid, student.shape[-2], student.shape[-1])
    check_choice(kd_loss, "kd_loss", KD_LOSSES)
    _, fn = _dispatch.resolve(OP, backend, student)
    return fn(student, teacher, target, grid, kd_loss)
