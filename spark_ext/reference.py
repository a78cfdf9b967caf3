"""Pure-PyTorch oracles for every op of docs/spec.md; also the portable fallback.

These functions define what the fast backends must compute. They favour
clarity and accuracy over speed:

* Reductions accumulate in float32 for float32/float16/bfloat16 inputs and in
  float64 for float64 inputs (so ``torch.autograd.gradcheck`` can run on them).
* The difficulty signals (docs/spec.md §2) are computed in float64 with a two-pass
  variance, then returned in float32 (float64 for float64 input).
* Gradients are autograd's where autograd gives exactly the spec's gradient,
  and an explicit backward where the spec's straight-through estimator needs
  one (the fake-quantization ops).

The functions here do not validate their arguments; the public ops in
:mod:`spark_ext.ops` do that once for every backend.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

CHARBONNIER_EPS = 1e-3
LSQ_MIN_STEP = 1e-8

# --------------------------------------------------------------------------
# Regions (docs/spec.md §1)
# --------------------------------------------------------------------------


def cell_index(size: int, cells: int, device: Union[torch.device, str, None] = None) -> torch.Tensor:
    """Cell of every pixel along one axis: ``floor(i * cells / size)``, int64 ``[size]``."""
    return torch.div(torch.arange(size, device=device) * cells, size, rounding_mode="floor")


def cell_bounds(size: int, cells: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each cell along one axis: the pixels ``i`` with ``cell_index(i) == c``."""
    starts = [-(-c * size // cells) for c in range(cells + 1)]  # ceil(c * size / cells)
    return list(zip(starts[:-1], starts[1:]))


def cell_sum(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Sum ``x [B, H, W]`` over the cells of ``grid``: ``[B, Gh, Gw]`` in x's dtype.

    One slice sum per cell row, then per cell column: a NaN or inf pixel
    reaches no other cell (a one-hot matrix product would multiply it by the
    zeros of every other cell, and NaN * 0 = NaN). Static slices and sums are
    what ``torch.compile``'s CPU code generator handles for every dtype
    (its float64 scatter-add from ``index_add`` fails to compile), and a sum
    keeps float32/float64 under ``torch.autocast``.
    """
    batch, height, width = x.shape
    gh, gw = grid
    rows = torch.stack([x[:, start:stop].sum(1) for start, stop in cell_bounds(height, gh)], dim=1)
    return torch.stack([rows[:, :, start:stop].sum(2) for start, stop in cell_bounds(width, gw)], dim=2)


def _cell_counts(height: int, width: int, grid: tuple[int, int], device, dtype) -> torch.Tensor:
    gh, gw = grid
    rows = torch.bincount(cell_index(height, gh, device), minlength=gh).to(dtype)
    cols = torch.bincount(cell_index(width, gw, device), minlength=gw).to(dtype)
    return rows[:, None] * cols[None, :]


def expand_cells(cells: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Make a ``[..., Gh, Gw]`` cell map piecewise constant over ``[..., H, W]`` pixels."""
    gh, gw = cells.shape[-2:]
    rows = cell_index(height, gh, cells.device)
    cols = cell_index(width, gw, cells.device)
    return cells.index_select(-2, rows).index_select(-1, cols)


# --------------------------------------------------------------------------
# KD loss kinds
# --------------------------------------------------------------------------


def kd_elementwise(diff: torch.Tensor, kd_loss: str) -> torch.Tensor:
    """``ell(d)`` of docs/spec.md §2 for ``kd_loss`` in ``l1``, ``l2``, ``charbonnier``."""
    if kd_loss == "l1":
        return diff.abs()
    if kd_loss == "l2":
        return diff * diff
    if kd_loss == "charbonnier":
        return torch.sqrt(diff * diff + CHARBONNIER_EPS**2) - CHARBONNIER_EPS
    raise ValueError(f"kd_loss must be one of ('l1', 'l2', 'charbonnier'), got {kd_loss!r}")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for accumulation, statistics and qparam math; float64 kept for float64 inputs (exact checks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------
# docs/spec.md §2: difficulty signals and per-cell KD
# --------------------------------------------------------------------------


def _laplacian(g: torch.Tensor) -> torch.Tensor:
    """5-point Laplacian of ``g [B, H, W]`` with replicate borders."""
    p = F.pad(g[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
    return p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:] - 4 * g


def _cell_mean_and_var(x: torch.Tensor, grid: tuple[int, int], counts: torch.Tensor):
    """Two-pass cell mean and population variance of ``x [B, H, W]`` (float64)."""
    mean = cell_sum(x, grid) / counts
    centred = x - expand_cells(mean, x.shape[-2], x.shape[-1])
    var = cell_sum(centred * centred, grid) / counts
    return mean, var.clamp_min(0)


def difficulty_signals(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    grid: tuple[int, int] = (8, 8),
    kd_loss: str = "l1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell difficulty signals and per-cell KD loss (docs/spec.md §2).

    Args:
        student, teacher, target: ``[B, C, H, W]``, one floating dtype.
        grid: ``(Gh, Gw)`` cells per image.
        kd_loss: ``"l1"``, ``"l2"`` or ``"charbonnier"`` (eps 1e-3).

    Returns:
        ``signals [B, 4, Gh, Gw]`` (lap_var, pix_var, recon_err, kd_gap), no
        gradient; ``cell_kd [B, 1, Gh, Gw]`` = per-cell sum of
        ``sum_c ell(S - T)``, differentiable w.r.t. student and teacher. Both
        float32 (float64 for float64 inputs).
    """
    height, width = student.shape[-2:]
    out_dtype = accumulation_dtype(student.dtype)
    with torch.no_grad():
        s64, t64, y64 = (t.detach().to(torch.float64) for t in (student, teacher, target))
        counts = _cell_counts(height, width, grid, student.device, torch.float64)
        g = y64.mean(1)
        _, lap_var = _cell_mean_and_var(_laplacian(g), grid, counts)
        _, pix_var = _cell_mean_and_var(g, grid, counts)
        recon_err = cell_sum((s64 - y64).abs().mean(1), grid) / counts
        kd_gap = cell_sum((s64 - t64).abs().mean(1), grid) / counts
        signals = torch.stack([lap_var, pix_var, recon_err, kd_gap], dim=1).to(out_dtype)

    diff = student.to(out_dtype) - teacher.to(out_dtype)
    per_pixel = kd_elementwise(diff, kd_loss).sum(1)
    cell_kd = cell_sum(per_pixel, grid)[:, None]
    return signals, cell_kd


# --------------------------------------------------------------------------
# docs/spec.md §3: weighted KD loss
# --------------------------------------------------------------------------


def is_pixel_weight(weight: torch.Tensor, height: int, width: int) -> bool:
    """docs/spec.md §3: a weight whose last two dims are ``(H, W)`` is per pixel, else per cell."""
    return tuple(weight.shape[-2:]) == (height, width)


def fused_weighted_kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    *,
    kd_loss: str = "l1",
    reduction: str = "mean",
) -> torch.Tensor:
    """``sum(w * ell(S - T))`` (divided by ``N = B*C*H*W`` for ``"mean"``), docs/spec.md §3.

    ``weight`` is None (uniform 1), per pixel (``weight.shape[-2:] == (H, W)``,
    broadcastable to ``[B, C, H, W]``) or per cell (broadcastable to
    ``[B, 1, Gh, Gw]``, piecewise constant over docs/spec.md §1's cells).
    Returns a float32 scalar (float64 for float64 inputs), differentiable
    w.r.t. student, teacher and weight.
    """
    height, width = student.shape[-2:]
    acc = accumulation_dtype(student.dtype)
    loss = kd_elementwise(student.to(acc) - teacher.to(acc), kd_loss)
    if weight is not None:
        w = weight.to(acc)
        if not is_pixel_weight(weight, height, width):
            w = expand_cells(w, height, width)
        loss = loss * w
    total = loss.sum()
    if reduction == "mean":
        total = total / student.numel()
    return total


# --------------------------------------------------------------------------
# docs/spec.md §5a: torch-compatible learnable fake quantization
# --------------------------------------------------------------------------


def _per_channel_view(t: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _sum_except(t: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """Sum over all dims but ``axis`` (all dims when axis is None): shape ``[C]`` or ``[1]``."""
    if axis is None:
        return t.sum().reshape(1)
    dims = [d for d in range(t.dim()) if d != axis]
    return t.sum(dims) if dims else t


def _torch_fq_grads(x, dy, scale, zp, inv, quant_min, quant_max, grad_factor):
    """Element-wise gradients exactly as ATen's learnable fake-quant backward forms them.

    ATen writes ``nearbyint(zp + x * inv_scale)`` and ``xfq = (xq - zp) * scale;
    ... (xfq - x)``, which its CPU build (GCC, AVX2) and nvcc both contract
    into fused multiply-adds (one rounding each). In float32 this forms both
    in float64 and rounds once to float32, which reproduces the fused result:
    the product of two floats is exact in float64, and so is the sum, since
    the operands are of similar magnitude (``x`` within a step of
    ``(xq - zp) * scale``). The first matters for inputs on a rounding tie, the
    second for the scale gradient of wide ranges (at 16 bits ``xfq - x`` is a
    tiny difference of large numbers).
    """
    if x.dtype == torch.float32:
        xq = torch.round((x.double() * inv.double() + zp.double()).float())
    else:
        xq = torch.round(zp + x * inv)
    inside = (xq >= quant_min) & (xq <= quant_max)
    dx = dy * inside
    if x.dtype == torch.float32:
        xfq_minus_x = ((xq.clamp(quant_min, quant_max) - zp).double() * scale.double() - x.double()).float()
    else:
        xfq_minus_x = (xq.clamp(quant_min, quant_max) - zp) * scale - x
    dscale_outside = torch.where(xq < quant_min, dy * (quant_min - zp), dy * (quant_max - zp)) * grad_factor
    dscale = torch.where(inside, dy * xfq_minus_x * inv * grad_factor, dscale_outside)
    dzp = torch.where(inside, torch.zeros_like(dy), dy * -1 * scale * grad_factor)
    return dx, dscale, dzp


class _TorchLearnableFakeQuant(torch.autograd.Function):
    """ATen's learnable fake quant (per tensor when axis is None), explicit STE backward."""

    # forward + setup_context (not forward(ctx, ...)): torch.func transforms need the split.
    @staticmethod
    def forward(x, scale, zero_point, axis, quant_min, quant_max, grad_factor):
        acc = accumulation_dtype(x.dtype)
        s32 = scale.detach().to(torch.float32)
        # ATen computes 1/scale in float32 whatever the input dtype.
        inv = (1.0 / s32).to(acc)
        s = s32.to(acc)
        zp_f32 = zero_point.detach().to(torch.float32)
        # Forward rounds the zero point half-to-even (std::nearbyint / Tensor.round).
        zp = torch.round(zp_f32).clamp(quant_min, quant_max).to(acc)
        if axis is None:
            s, inv, zp = s.reshape(()), inv.reshape(()), zp.reshape(())
        else:
            s, inv, zp = (_per_channel_view(t, x.dim(), axis) for t in (s, inv, zp))
        xa = x.detach().to(acc)
        q = (torch.round(xa * inv) + zp).clamp(quant_min, quant_max)
        return ((q - zp) * s).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, zero_point, *args = inputs
        ctx.save_for_backward(x, scale, zero_point)
        ctx.args = tuple(args)

    @staticmethod
    def backward(ctx, dy):
        x, scale, zero_point = ctx.saved_tensors
        axis, quant_min, quant_max, grad_factor = ctx.args
        acc = accumulation_dtype(x.dtype)
        s32 = scale.to(torch.float32)
        inv = (1.0 / s32).to(acc)
        s = s32.to(acc)
        zp_f32 = zero_point.to(torch.float32)
        if axis is None:
            # ATen's per-tensor backward takes trunc(clamp(zp + 0.5)) rather than
            # the forward's round-half-even; kept for bit compatibility.
            zp = torch.trunc((zp_f32 + 0.5).clamp(quant_min, quant_max)).to(acc)
            s, inv, zp = s.reshape(()), inv.reshape(()), zp.reshape(())
        else:
            zp = torch.round(zp_f32).clamp(quant_min, quant_max).to(acc)
            s, inv, zp = (_per_channel_view(t, x.dim(), axis) for t in (s, inv, zp))
        gf = torch.tensor(grad_factor, dtype=torch.float32).to(acc)
        dx, dscale, dzp = _torch_fq_grads(x.to(acc), dy.to(acc), s, zp, inv, quant_min, quant_max, gf)
        dscale = _sum_except(dscale, axis).reshape(scale.shape).to(scale.dtype)
        dzp = _sum_except(dzp, axis).reshape(zero_point.shape).to(zero_point.dtype)
        return dx.to(x.dtype), dscale, dzp, None, None, None, None


def fake_quantize_learnable_per_tensor_affine(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Same results as ``torch._fake_quantize_learnable_per_tensor_affine`` (docs/spec.md §5a).

    ``x`` any shape, float32/float16/bfloat16/float64; ``scale``, ``zero_point``
    one-element float tensors. Forward: ``q = clamp(round(x * (1/s)) + zp)``,
    ``y = (q - zp) * s``, zp rounded half-to-even. Differentiable w.r.t. x,
    scale and zero_point with ATen's gradients (including its per-tensor
    backward rounding of zp as ``trunc(zp + 0.5)``).
    """
    return _TorchLearnableFakeQuant.apply(x, scale, zero_point, None, quant_min, quant_max, grad_factor)


def fake_quantize_learnable_per_channel_affine(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    axis: int,
    quant_min: int,
    quant_max: int,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    """Same results as ``torch._fake_quantize_learnable_per_channel_affine`` (docs/spec.md §5a).

    ``scale``, ``zero_point``: ``[x.shape[axis]]``. See the per-tensor op.
    """
    return _TorchLearnableFakeQuant.apply(x, scale, zero_point, axis, quant_min, quant_max, grad_factor)


# --------------------------------------------------------------------------
# docs/spec.md §5b: LSQ / LSQ+
# --------------------------------------------------------------------------


def lsq_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(Qn, Qp)``: signed ``(2^(b-1), 2^(b-1)-1)``, unsigned ``(0, 2^b - 1)``."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def lsq_grad_factor(grad_scale: Union[str, float, None], numel: int, num_steps: int, qp: int) -> float:
    """``g`` of docs/spec.md §5b: ``"lsq"`` -> ``1/sqrt(n * Qp)`` with n elements per step."""
    if grad_scale is None:
        return 1.0
    if isinstance(grad_scale, str):
        per_step = max(numel // max(num_steps, 1), 1)
        return 1.0 / math.sqrt(per_step * qp)
    return float(grad_scale)


class _LSQFakeQuant(torch.autograd.Function):
    @staticmethod
    def _quantize(x, step, offset, axis, qn, qp):
        acc = accumulation_dtype(x.dtype)
        s = step.to(acc).clamp_min(LSQ_MIN_STEP)
        o = offset.to(acc) if offset is not None else torch.zeros((), dtype=acc, device=x.device)
        if axis is not None:
            s = _per_channel_view(s, x.dim(), axis)
            o = _per_channel_view(o, x.dim(), axis) if offset is not None else o
        else:
            s, o = s.reshape(()), o.reshape(())
        v = (x.to(acc) - o) / s
        q = torch.round(v.clamp(-qn, qp))
        return v, q, s, o

    @staticmethod
    def forward(x, step, offset, axis, qn, qp, grad_factor):
        _, q, s, o = _LSQFakeQuant._quantize(
            x.detach(), step.detach(), None if offset is None else offset.detach(), axis, qn, qp
        )
        return (q * s + o).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, step, offset, *args = inputs
        ctx.save_for_backward(x, step, offset)
        ctx.args = tuple(args)

    @staticmethod
    def backward(ctx, dy):
        x, step, offset = ctx.saved_tensors
        axis, qn, qp, g = ctx.args
        v, q, _, _ = _LSQFakeQuant._quantize(x, step, offset, axis, qn, qp)
        dy = dy.to(v.dtype)
        inside = (v >= -qn) & (v <= qp)
        dx = (dy * inside).to(x.dtype)
        step_term = torch.where(inside, q - v, torch.where(v < -qn, -float(qn), float(qp)))
        dstep = (g * _sum_except(dy * step_term, axis)).reshape(step.shape).to(step.dtype)
        doffset = None
        if offset is not None:
            doffset = (g * _sum_except(dy * (~inside), axis)).reshape(offset.shape).to(offset.dtype)
        return dx, dstep, doffset, None, None, None, None


def lsq_fake_quant(
    x: torch.Tensor,
    step: torch.Tensor,
    offset: Optional[torch.Tensor] = None,
    *,
    bits: int,
    signed: bool,
    axis: Optional[int] = None,
    grad_scale: Union[str, float, None] = "lsq",
) -> torch.Tensor:
    """LSQ (offset None) / LSQ+ fake quantization, docs/spec.md §5b.

    ``v = (x - offset) / step``, ``q = round_half_even(clamp(v, -Qn, Qp))``,
    ``y = q * step + offset``. ``step``/``offset``: one element (``axis=None``)
    or ``[x.shape[axis]]``. Output in x's dtype; math in float32 (float64 for
    float64 x). Differentiable w.r.t. x (straight-through inside the range),
    step and offset (the LSQ/LSQ+ gradients scaled by ``g``).
    """
    qn, qp = lsq_range(bits, signed)
    num_steps = 1 if axis is None else x.shape[axis]
    g = lsq_grad_factor(grad_scale, x.numel(), num_steps, qp)
    return lsq_fake_quant_core(x, step, offset, axis, qn, qp, g)


def lsq_fake_quant_core(
    x: torch.Tensor,
    step: torch.Tensor,
    offset: Optional[torch.Tensor],
    axis: Optional[int],
    qn: int,
    qp: int,
    grad_factor: float,
) -> torch.Tensor:
    """:func:`lsq_fake_quant` with the range ``(Qn, Qp)`` and ``g`` already resolved.

    This is the signature every backend implements (``axis`` non-negative or None).
    """
    return _LSQFakeQuant.apply(x, step, offset, axis, qn, qp, grad_factor)


def lsq_init_step(x: torch.Tensor, bits: int, signed: bool, axis: Optional[int] = None) -> torch.Tensor:
    """LSQ initial step ``2 * mean(|x|) / sqrt(Qp)`` (per ``axis`` if given), float32."""
    _, qp = lsq_range(bits, signed)
    a = x.detach().abs().to(torch.float32)
    mean = a.mean() if axis is None else a.transpose(0, axis).reshape(a.shape[axis], -1).mean(1)
    return (2 * mean / math.sqrt(qp)).reshape(-1)


def lsq_plus_init(x: torch.Tensor, bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """LSQ+ activation init: ``step = (max - min) / (Qp + Qn)``, ``offset = min + Qn * step``."""
    qn, qp = lsq_range(bits, signed)
    lo, hi = torch.aminmax(x.detach().to(torch.float32))
    step = ((hi - lo) / (qp + qn)).clamp_min(LSQ_MIN_STEP)
    offset = lo + qn * step
    return step.reshape(1), offset.reshape(1)
