"""Triton kernels for docs/spec.md §3: the weighted KD loss with per-pixel weights.

``loss = sum(w * ell(S - T))`` (divided by ``N = B*C*H*W`` for ``"mean"``),
``w`` absent (uniform 1) or a per-pixel weight broadcastable to
``[B, C, H, W]``. (Grid weights go through ``cell_kd`` in
``kernels/difficulty.py``: ``loss = sum(weight * cell_kd) / N``.)

Work decomposition
------------------
The weight is expanded to 4-D ``[Bw, Cw, H, W]`` (``Bw`` in ``{1, B}``,
``Cw`` in ``{1, C}``; dims it broadcasts over are the "inner" dims). A
program owns one ``BH x BW`` pixel tile of one *weight* plane and loops over
the ``(B/Bw) * (C/Cw)`` image planes that share it, in a fixed order. So:

* forward: each weight element is read once, S and T once; the program
  writes one float32 partial sum, and a one-program kernel adds the partials
  in index order (deterministic: no float atomics) and divides by ``N``;
* backward, one pass: ``dS = (g/N) * w * ell'(S - T)`` and ``dT = -dS``
  written per element where requested, and ``dweight = (g/N) * sum over the
  inner planes of ell(S - T)`` accumulated in registers in loop order and
  written once: the reduction over the broadcast dims needs no second pass
  and no atomics.

With no weight every image plane is its own "weight plane" (no inner loop).
The tile size shrinks (down to 256 pixels) when there would be too few
programs to fill the GPU. The upstream gradient ``g`` is read from device
memory inside the kernel (no host synchronisation). Inputs are addressed
through their strides with 64-bit offsets (channels_last and sliced views
read in place); all arithmetic is float32 whatever the input dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    KD_KINDS,
    LAUNCH_OPTIONS,
    cast_out,
    cdiv,
    kd_elem,
    kd_grad,
    next_pow2,
    on_input_device,
    out_code,
    target_programs,
    tile_pixels,
)


# Programs enumerate (weight image bo, weight channel co, tile): pid = (bo * CO + co) * NTILES + tile.
# Arguments: H, W: image height and width; CO: channels of the 4-D weight (1 or C; C without a weight);
# NTW: tiles per image row, cdiv(W, BW); NTILES: tiles per plane, cdiv(H, BH) * NTW; BH, BW: tile shape.
@triton.jit
def _program_tile(H, W, CO, NTW, NTILES, BH: tl.constexpr, BW: tl.constexpr):
    """This program's weight plane ``(bo, co)`` and pixel tile: int64 ``rows [BH,1]``,
    ``cols [1,BW]`` and the in-image mask ``[BH,BW]`` (shared by forward and backward)."""
    pid = tl.program_id(0)
    tile = pid % NTILES
    o = pid // NTILES
    bo = (o // CO).to(tl.int64)
    co = (o % CO).to(tl.int64)
    rows = (tile // NTW).to(tl.int64) * BH + tl.arange(0, BH)
    cols = (tile % NTW).to(tl.int64) * BW + tl.arange(0, BW)
    m = (rows < H)[:, None] & (cols < W)[None, :]
    return bo, co, rows[:, None], cols[None, :], m


# Forward of docs/spec.md §3 for no weight or a per-pixel weight. The weight is viewed as 4-D [Bw, Cw, H, W]
# (Bw in {1, B}, Cw in {1, C}; without a weight Bw = B, Cw = C). Launch grid: (Bw * Cw * NTILES,); each
# program owns one tile of one weight plane (bo, co) and loops over the BI * CI image planes sharing it.
# Arguments:
#   s_ptr, t_ptr          student and teacher [B, C, H, W], input dtype, any strides
#   w_ptr                 weight [Bw, Cw, H, W], any float dtype and strides (stride 0 allowed); S, never read,
#                         when HAS_W is False
#   part_ptr              one float32 partial sum per program, summed by _sum_partials_kernel
#   H, W                  image height and width
#   CO                    Cw: weight channels (planes per weight image)
#   BI                    B // Bw: images sharing one weight image (B if the weight broadcasts over B, else 1)
#   CI                    C // Cw: channels sharing one weight channel (C if it broadcasts over C, else 1)
#   NTW, NTILES           tiles per image row and per plane (see _program_tile)
#   ssb, ssc, ssh, ssw    student strides (elements) along B, C, H, W
#   stb, stc, sth, stw    teacher strides
#   swb, swc, swh, sww    weight strides along Bw, Cw, H, W
#   KIND                  constexpr KD loss kind: 0 l1, 1 l2, 2 charbonnier
#   HAS_W                 constexpr: a weight is given
#   BH, BW                constexpr: tile rows and columns (powers of two)
@triton.jit
def _wkd_fwd_kernel(
    s_ptr,
    t_ptr,
    w_ptr,
    part_ptr,
    H,
    W,
    CO,
    BI,
    CI,
    NTW,
    NTILES,
    ssb,
    ssc,
    ssh,
    ssw,
    stb,
    stc,
    sth,
    stw,
    swb,
    swc,
    swh,
    sww,
    KIND: tl.constexpr,
    HAS_W: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    bo, co, rows, cols, m = _program_tile(H, W, CO, NTW, NTILES, BH, BW)
    off_s = rows * ssh + cols * ssw
    off_t = rows * sth + cols * stw
    acc = tl.zeros([BH, BW], tl.float32)
    for i in range(BI * CI):
        # Exactly one of (bo, i // CI) and one of (co, i % CI) is nonzero-ranged.
        b = bo + i // CI
        c = co + i % CI
        sv = tl.load(s_ptr + b * ssb + c * ssc + off_s, mask=m, other=0.0).to(tl.float32)
        tv = tl.load(t_ptr + b * stb + c * stc + off_t, mask=m, other=0.0).to(tl.float32)
        acc += kd_elem(sv - tv, KIND)
    if HAS_W:
        wv = tl.load(w_ptr + bo * swb + co * swc + rows * swh + cols * sww, mask=m, other=0.0).to(tl.float32)
        acc = acc * wv
    acc = tl.where(m, acc, 0.0)
    tl.store(part_ptr + tl.program_id(0), tl.sum(tl.sum(acc, axis=1), axis=0))


# One program. Arguments: part_ptr: NPART float32 partial sums; out_ptr: the 0-dim float32 loss;
# NPART: number of partials; DIV: N = B*C*H*W for reduction "mean", 1 for "sum"; BLOCK: chunk width (constexpr).
@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, NPART, DIV, BLOCK: tl.constexpr):
    """``out = sum(part) / DIV`` in a fixed order: chunked tree sums added in chunk order."""
    total = tl.zeros([BLOCK], tl.float32)
    for start in range(0, NPART, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        total += tl.load(part_ptr + idx, mask=idx < NPART, other=0.0)
    tl.store(out_ptr, tl.div_rn(tl.sum(total, axis=0), DIV))


# One-pass backward of _wkd_fwd_kernel, same launch grid and program layout. Arguments as there, plus:
#   g_ptr                    0-dim upstream gradient (float32), read on the device
#   ds_ptr, dt_ptr           outputs dS, dT in the input dtype (a dummy pointer with zero strides when not needed)
#   dw_ptr                   output dweight, a fresh contiguous [Bw, Cw, H, W] buffer in the weight's dtype,
#                            reduced over the BI * CI planes sharing each weight element (dummy unless NEED_W)
#   DIV                      N for reduction "mean", 1 for "sum"
#   sdsb, sdsc, sdsh, sdsw   dS strides along B, C, H, W
#   sdtb, sdtc, sdth, sdtw   dT strides
#   NEED_S, NEED_T, NEED_W   constexpr: write dS / dT / dweight
#   OUT                      constexpr: dtype code of dS and dT (_utils.out_code)
#   OUT_W                    constexpr: dtype code of dweight (0 when NEED_W is False)
@triton.jit
def _wkd_bwd_kernel(
    g_ptr,
    s_ptr,
    t_ptr,
    w_ptr,
    ds_ptr,
    dt_ptr,
    dw_ptr,
    DIV,
    H,
    W,
    CO,
    BI,
    CI,
    NTW,
    NTILES,
    ssb,
    ssc,
    ssh,
    ssw,
    stb,
    stc,
    sth,
    stw,
    swb,
    swc,
    swh,
    sww,
    sdsb,
    sdsc,
    sdsh,
    sdsw,
    sdtb,
    sdtc,
    sdth,
    sdtw,
    KIND: tl.constexpr,
    HAS_W: tl.constexpr,
    NEED_S: tl.constexpr,
    NEED_T: tl.constexpr,
    NEED_W: tl.constexpr,
    OUT: tl.constexpr,
    OUT_W: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    bo, co, rows, cols, m = _program_tile(H, W, CO, NTW, NTILES, BH, BW)
    # d loss / d (w * ell) = g / N, as autograd forms it for the reference.
    gs = tl.div_rn(tl.load(g_ptr).to(tl.float32), DIV)
    if HAS_W:
        wv = tl.load(w_ptr + bo * swb + co * swc + rows * swh + cols * sww, mask=m, other=0.0).to(tl.float32)
        coef = gs * wv
    else:
        coef = tl.zeros([BH, BW], tl.float32) + gs
    dw_acc = tl.zeros([BH, BW], tl.float32)
    off_s = rows * ssh + cols * ssw
    off_t = rows * sth + cols * stw
    off_ds = rows * sdsh + cols * sdsw
    off_dt = rows * sdth + cols * sdtw
    for i in range(BI * CI):
        b = bo + i // CI
        c = co + i % CI
        sv = tl.load(s_ptr + b * ssb + c * ssc + off_s, mask=m, other=0.0).to(tl.float32)
        tv = tl.load(t_ptr + b * stb + c * stc + off_t, mask=m, other=0.0).to(tl.float32)
        d = sv - tv
        if NEED_S or NEED_T:
            gd = coef * kd_grad(d, KIND)
            if NEED_S:
                tl.store(ds_ptr + b * sdsb + c * sdsc + off_ds, cast_out(gd, OUT), mask=m)
            if NEED_T:
                tl.store(dt_ptr + b * sdtb + c * sdtc + off_dt, cast_out(-gd, OUT), mask=m)
        if NEED_W:
            dw_acc += kd_elem(d, KIND)
    if NEED_W:
        # dweight is a fresh contiguous [Bw, Cw, H, W] buffer; plane (bo, co).
        off_dw = (bo * CO + co) * H * W + rows * W + cols
        tl.store(dw_ptr + off_dw, cast_out(gs * dw_acc, OUT_W), mask=m)


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


def _weight4(weight: torch.Tensor) -> torch.Tensor:
    """View a per-pixel weight as 4-D ``[Bw, Cw, H, W]`` (leading size-1 dims added)."""
    return weight.reshape((1,) * (4 - weight.dim()) + tuple(weight.shape)) if weight.dim() < 4 else weight


def _plan(student, weight4):
    """Outer (weight) planes, inner loop lengths and tile shape for one launch."""
    batch, channels, height, width = student.shape
    if weight4 is None:
        bo, co = batch, channels
    else:
        bo, co = weight4.shape[0], weight4.shape[1]
    bi, ci = batch // bo if bo else 1, channels // co if co else 1
    dev = student.device
    tile = tile_pixels(dev)
    # Fewer pixels per tile when the launch would not fill the device.
    want = target_programs(dev)
    while tile > 256 and bo * co * cdiv(height * width, tile) < want:
        tile //= 2
    bw = min(next_pow2(width), 128 if dev.type == "cuda" else tile)
    bh = min(next_pow2(height), max(tile // bw, 1))
    ntw = cdiv(width, bw)
    ntiles = cdiv(height, bh) * ntw
    return bo, co, bi, ci, bh, bw, ntw, ntiles


def _weight_args(weight4, student):
    if weight4 is None:
        return student, (0, 0, 0, 0)  # dummy pointer, never read (HAS_W=False)
    return weight4, weight4.stride()


@on_input_device
def fused_weighted_kd(student, teacher, weight, kd_loss: str, reduction: str) -> torch.Tensor:
    """docs/spec.md §3 forward for ``weight`` None or per pixel: a float32 0-dim tensor.

    ``student``, ``teacher``: ``[B, C, H, W]`` float32/float16/bfloat16, any
    strides; ``weight``: None or any float dtype, 2-4 dims with last two
    ``(H, W)``, broadcastable to ``[B, C, H, W]``, any strides (stride 0 ok).
    Not differentiable by itself (see ``spark_ext.ops.weighted_kd``).
    """
    batch, channels, height, width = student.shape
    w4 = None if weight is None else _weight4(weight)
    bo, co, bi, ci, bh, bw, ntw, ntiles = _plan(student, w4)
    nprog = bo * co * ntiles
    dev = student.device
    out = torch.empty((), dtype=torch.float32, device=dev)
    part = torch.empty((max(nprog, 1),), dtype=torch.float32, device=dev)
    w_arg, w_strides = _weight_args(w4, student)
    if nprog > 0:
        _wkd_fwd_kernel[(nprog,)](
            student,
            teacher,
            w_arg,
            part,
            height,
            width,
            co,
            bi,
            ci,
            ntw,
            ntiles,
            *student.stride(),
            *teacher.stride(),
            *w_strides,
            KIND=KD_KINDS[kd_loss],
            HAS_W=w4 is not None,
            BH=bh,
            BW=bw,
            **LAUNCH_OPTIONS,
        )
    div = float(student.numel()) if reduction == "mean" else 1.0
    block = 1024 if dev.type == "cuda" else 4096
    _sum_partials_kernel[(1,)](part, out, nprog, div, BLOCK=block, **LAUNCH_OPTIONS)
    return out


@on_input_device
def fused_weighted_kd_backward(
    grad, student, teacher, weight, kd_loss, reduction, need_student, need_teacher, need_weight
):
    """One-pass backward of :func:`fused_weighted_kd`: ``(dS, dT, dweight)``.

    ``grad``: 0-dim float32 upstream gradient (read on device). ``dS``/``dT``
    have the input's dtype and layout, ``dweight`` the weight's dtype and
    shape (reduced over the dims the weight broadcasts over). A gradient that
    is not requested is returned as an empty ``[0]`` tensor and not computed.
    """
    batch, channels, height, width = student.shape
    w4 = None if weight is None else _weight4(weight)
    need_weight = need_weight and w4 is not None
    ds = torch.empty_like(student) if need_student else student.new_empty((0,))
    dt = torch.empty_like(teacher) if need_teacher else teacher.new_empty((0,))
    if need_weight:
        dw = torch.empty(tuple(w4.shape), dtype=weight.dtype, device=weight.device)
    else:
        dw = student.new_empty((0,)) if weight is None else weight.new_empty((0,))
    if not (need_student or need_teacher or need_weight):
        return ds, dt, dw
    bo, co, bi, ci, bh, bw, ntw, ntiles = _plan(student, w4)
    nprog = bo * co * ntiles
    # An empty input (e.g. B = 0 under a weight broadcast over the batch) has
    # no terms: every gradient is zero. The kernel would form (g / N) * 0 with
    # N = 0, which is NaN.
    if nprog > 0 and student.numel() > 0:
        w_arg, w_strides = _weight_args(w4, student)
        ds_arg, ds_strides = (ds, ds.stride()) if need_student else (student, (0, 0, 0, 0))
        dt_arg, dt_strides = (dt, dt.stride()) if need_teacher else (student, (0, 0, 0, 0))
        dw_arg = dw if need_weight else student
        div = float(student.numel()) if reduction == "mean" else 1.0
        _wkd_bwd_kernel[(nprog,)](
            grad,
            student,
            teacher,
            w_arg,
            ds_arg,
            dt_arg,
            dw_arg,
            div,
            height,
            width,
            co,
            bi,
            ci,
            ntw,
            ntiles,
            *student.stride(),
            *teacher.stride(),
            *w_strides,
            *ds_strides,
            *dt_strides,
            KIND=KD_KINDS[kd_loss],
            HAS_W=w4 is not None,
            NEED_S=need_student,
            NEED_T=need_teacher,
            NEED_W=need_weight,
            OUT=out_code(student.dtype),
            OUT_W=out_code(dw.dtype) if need_weight else 0,
            BH=bh,
            BW=bw,
            **LAUNCH_OPTIONS,
        )
    elif need_weight:
        dw.zero_()
    if need_weight:
        dw = dw.reshape(weight.shape)
    return ds, dt, dw
