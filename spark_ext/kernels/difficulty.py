"""Triton kernels for docs/spec.md §2: difficulty signals, per-cell KD, and its backward.

Forward work decomposition
--------------------------
The output is per cell, so the kernel is organised around cells, with one
launch shape that serves every grid from ``(1, 1)`` to ``(H, W)``:

* A program owns ``NC`` consecutive cells in the flat order
  ``q = (b*Gh + r)*Gw + c`` (``NC`` = 1 for big cells; for small cells, e.g.
  ``grid == (H, W)``, a tile's worth of them, possibly spanning cell rows and
  images, so that no program runs mostly-masked tiles and tiny grids do not
  launch ``B*H*W`` programs), and optionally only a band of
  ``ROWS_PER_SPLIT`` pixel rows of them ("split"): when there are too few
  cells to fill the GPU (grid (1, 1) on a batch of 16 is 16 cells), each cell
  is cut into row bands that run in parallel.
* The program walks its band in tiles laid out as a 2-D block
  ``[NC, BH * BW]``: row ``i`` of the block is cell ``i``'s ``BH x BW`` window
  of pixels (cells of one grid differ in size by at most one pixel per axis,
  so the window is sized for the largest cell and clipped by masks). Per tile
  it reads S, T, Y once per channel (the four Laplacian neighbours of Y are
  extra loads that hit in cache) and reduces along axis 1 to per-cell tile
  statistics. Cell bounds are computed once per cell, not per pixel.
* Tile statistics are merged into running per-cell statistics in a fixed
  order: for the two variances, (count, mean, M2) merged with Chan et al.'s
  parallel formula (each tile's own M2 is taken around the tile mean, so no
  catastrophic cancellation); for the three means, Kahan-compensated sums.
* With one split per cell the program writes the outputs directly. With
  several, each writes its partial statistics to a scratch buffer
  ``[fields, splits, B*Gh*Gw]`` and a second small kernel merges the splits
  of each cell in split order with the same formulas. No float atomics
  anywhere, so results are bitwise reproducible run to run.

Numerics
--------
* ``L`` is formed as ``mean_c sum_dir (Y_dir - Y)``: differences of nearby
  pixel values are exact in float32 (Sterbenz), so a large common offset in
  Y (e.g. 1000 + noise) does not cancel catastrophically as it would in
  ``sum(neighbours) - 4 g``.
* ``g`` is accumulated shifted by a per-cell constant ``K`` (the cell's first
  pixel of channel 0): ``g - K = mean_c (Y_c - K)``, again exact differences,
  so the pixel variance keeps its precision whatever the offset. The shift
  does not change the variance.
* All accumulation is float32; inputs may be float32, float16 or bfloat16.

Backward
--------
``cell_kd``'s backward is elementwise: a 2-D ``BH x BW`` pixel tile of one
image per program, looping over channels, so the upstream gradient
``G[b, 0, cell(h), cell(w)]`` is loaded once per pixel (through its strides,
so an expanded stride-0 ``G`` costs nothing) and
``dS = G * ell'(S - T)``, ``dT = -dS`` are written only where requested.

Launch shape (``_forward_config``)
----------------------------------
On a GPU a tile holds 256 pixel slots (``BW`` <= 128 columns): ptxas for
sm_90 reports 56-128 registers and no spills for those shapes at 4 warps,
against ~250 for 1024-pixel tiles. Row-band splits are added until there are
about four programs per SM. Under the interpreter, tiles hold 4096 slots and
cells are never split (fewer, bigger programs run faster in Python); tests
force the GPU-like shapes explicitly. These sizes are informed guesses, not
yet tuned on a GPU.

All pointers are addressed through the tensors' own strides with 64-bit
offsets, so channels_last and sliced views are read in place; gradients are
written in the input's dtype (bfloat16 rounded to nearest-even, see
``_utils.cast_out``).
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

# Fields of the split-partials scratch buffer (signals mode).
_F_N, _F_MEAN_L, _F_M2_L, _F_MEAN_G, _F_M2_G, _F_E, _F_K, _F_L = range(8)
_FIELDS_SIGNALS = 8
_FIELDS_KD_ONLY = 1


# Arguments: ``n, mean, m2``: running count, mean and M2 (sum of squared deviations from the mean) of each
# cell, float32 vectors; ``n_t, mean_t, m2_t``: the same statistics of the part being merged in.
# Returns the merged ``(n, mean, m2)``.
@triton.jit
def _chan_merge(n, mean, m2, n_t, mean_t, m2_t):
    """Merge (count, mean, M2) of a part into running statistics (Chan et al.)."""
    n_new = n + n_t
    frac = tl.where(n_new > 0, n_t / tl.maximum(n_new, 1.0), 0.0)
    delta = mean_t - mean
    mean = mean + delta * frac
    # delta * (delta * n * frac), not delta * delta * ...: for the first part (n = 0) a delta whose
    # square overflows must add 0, not inf * 0 = NaN (a cell holding 1e25 has an inf variance).
    m2 = m2 + m2_t + delta * (delta * n * frac)
    return n_new, mean, m2


# Arguments: ``total``: running sum; ``comp``: its Kahan compensation (the low-order bits lost so far);
# ``x``: the value to add. All float32 vectors of one shape.
@triton.jit
def _kahan_add(total, comp, x):
    """Compensated ``total += x`` (returns the new total and compensation)."""
    y = x - comp
    t = total + y
    comp = (t - total) - y
    return t, comp


# Arguments:
#   sig_ptr      signals output [B, 4, GH, GW], float32, contiguous (not written when SIGNALS is False)
#   kd_ptr       cell_kd output [B, 1, GH, GW], float32, contiguous
#   q, qmask     flat cell indices (b*GH + r)*GW + c of this program's cells (int64) and which are real cells
#   PLANE        GH * GW, cells per image
#   C            channels of the images (recon_err and kd_gap are channel sums divided by C)
#   n            pixels per cell (float32)
#   m2_l, m2_g   M2 (sum of squared deviations) of the Laplacian L and of g = mean_c Y over the cell
#   sum_e, sum_k cell sums of sum_c |S - Y| and sum_c |S - T|
#   sum_l        cell sum of sum_c ell(S - T): the cell_kd value
#   SIGNALS      constexpr: also write the four signals (else only cell_kd; the other values are ignored)
@triton.jit
def _write_outputs(sig_ptr, kd_ptr, q, qmask, PLANE, C, n, m2_l, m2_g, sum_e, sum_k, sum_l, SIGNALS: tl.constexpr):
    """Store cells ``q`` (flat ``(b*GH + r)*GW + c``): cell_kd [B,1,GH,GW] and signals [B,4,GH,GW], fp32."""
    tl.store(kd_ptr + q, sum_l, mask=qmask)
    if SIGNALS:
        base = sig_ptr + (q // PLANE) * (4 * PLANE) + q % PLANE
        inv_n = 1.0 / tl.maximum(n, 1.0)
        # Clamp rounding below zero away, but keep a NaN (tl.maximum would drop
        # it and report a cell holding NaN/inf, or overflowing, as flat).
        var_l = m2_l * inv_n
        var_g = m2_g * inv_n
        tl.store(base, tl.where(var_l < 0.0, 0.0, var_l), mask=qmask)
        tl.store(base + PLANE, tl.where(var_g < 0.0, 0.0, var_g), mask=qmask)
        tl.store(base + 2 * PLANE, sum_e * inv_n / C, mask=qmask)
        tl.store(base + 3 * PLANE, sum_k * inv_n / C, mask=qmask)


# Forward of docs/spec.md §2. Launch grid: (cdiv(NCELLS, NC) * NSPLIT,); program pid handles row band
# pid % NSPLIT of the NC consecutive cells starting at (pid // NSPLIT) * NC. Arguments:
#   s_ptr, t_ptr, y_ptr   student S, teacher T, target Y: [B, C, H, W] in the input dtype, any strides
#                         (y_ptr is S, never read, when SIGNALS is False)
#   sig_ptr               signals output [B, 4, GH, GW] float32 (an alias of kd_ptr, unused, without SIGNALS)
#   kd_ptr                cell_kd output [B, 1, GH, GW] float32
#   part_ptr              scratch [fields, NSPLIT, NCELLS] float32 for the row bands' partial statistics
#                         (fields: 8 with SIGNALS, see _F_*; 1 without); an unused alias of kd_ptr when DIRECT
#   C, H, W               channels, height and width of the images
#   GH, GW                grid: cells per column and per row of an image (docs/spec.md §1)
#   NCELLS                B * GH * GW, the number of cells (range of the flat cell index q)
#   NSPLIT                row bands each cell is cut into (1: no split)
#   ROWS_PER_SPLIT        pixel rows per band (a multiple of BH)
#   CH_MAX, CW_MAX        height and width of the largest cell: cdiv(H, GH), cdiv(W, GW)
#   ssb, ssc, ssh, ssw    student strides (elements) along B, C, H, W
#   stb, stc, sth, stw    teacher strides along B, C, H, W
#   syb, syc, syh, syw    target strides along B, C, H, W
#   KIND                  constexpr KD loss kind: 0 l1, 1 l2, 2 charbonnier (_utils.KD_KINDS)
#   SIGNALS               constexpr: compute the four signals and cell_kd (else cell_kd only, Y not read)
#   DIRECT                constexpr: NSPLIT == 1, so write the outputs directly instead of partials
#   NC                    constexpr: cells per program (a power of two)
#   BH, BW                constexpr: rows and columns of the pixel window each cell gets per tile (powers of two)
@triton.jit
def _difficulty_fwd_kernel(
    s_ptr,
    t_ptr,
    y_ptr,
    sig_ptr,
    kd_ptr,
    part_ptr,
    C,
    H,
    W,
    GH,
    GW,
    NCELLS,
    NSPLIT,
    ROWS_PER_SPLIT,
    CH_MAX,
    CW_MAX,
    ssb,
    ssc,
    ssh,
    ssw,
    stb,
    stc,
    sth,
    stw,
    syb,
    syc,
    syh,
    syw,
    KIND: tl.constexpr,
    SIGNALS: tl.constexpr,
    DIRECT: tl.constexpr,
    NC: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    # program id -> (group of NC consecutive cells, row band s of them).
    pid = tl.program_id(0)
    s = pid % NSPLIT
    qblock = pid // NSPLIT

    # Flat cell index q = (b*GH + r)*GW + c of each of this program's cells.
    q = qblock.to(tl.int64) * NC + tl.arange(0, NC)
    qmask = q < NCELLS
    plane = tl.cast(GH, tl.int64) * GW
    b = q // plane
    r = (q % plane) // GW
    c = q % GW
    # docs/spec.md §1: pixel row h is in cell row floor(h*GH/H), so cell row r spans
    # rows [ceil(r*H/GH), ceil((r+1)*H/GH)); likewise for columns. int64
    # throughout: r*H and offsets can exceed 2^31.
    h0 = (r * H + GH - 1) // GH
    ch = tl.where(qmask, ((r + 1) * H + GH - 1) // GH - h0, 0)  # cell height (0: no cell)
    w0 = (c * W + GW - 1) // GW
    cw = ((c + 1) * W + GW - 1) // GW - w0

    p = tl.arange(0, BH * BW)
    dy = p // BW
    dx = p % BW

    if SIGNALS:
        # Per-cell shift for g (see module docstring): Y[b, 0, h0, w0].
        k_shift = tl.load(y_ptr + b * syb + h0 * syh + w0 * syw, mask=qmask, other=0.0).to(tl.float32)
        n = tl.zeros([NC], tl.float32)
        mean_l = tl.zeros([NC], tl.float32)
        m2_l = tl.zeros([NC], tl.float32)
        mean_g = tl.zeros([NC], tl.float32)
        m2_g = tl.zeros([NC], tl.float32)
        sum_e = tl.zeros([NC], tl.float32)
        c_e = tl.zeros([NC], tl.float32)
        sum_k = tl.zeros([NC], tl.float32)
        c_k = tl.zeros([NC], tl.float32)
    sum_l = tl.zeros([NC], tl.float32)
    c_l = tl.zeros([NC], tl.float32)

    # Rows [band_lo, band_hi) of every cell (relative to the cell's first row).
    band_lo = s * ROWS_PER_SPLIT
    band_hi = tl.minimum(band_lo + ROWS_PER_SPLIT, CH_MAX)
    for hh in range(band_lo, band_hi, BH):
        lr = hh + dy[None, :]  # local row in the cell, [1, P]
        rows = h0[:, None] + lr  # [NC, P]
        rvalid = lr < ch[:, None]
        for ww in range(0, CW_MAX, BW):
            lc = ww + dx[None, :]
            cols = w0[:, None] + lc
            m = rvalid & (lc < cw[:, None])
            off_s = b[:, None] * ssb + rows * ssh + cols * ssw
            off_t = b[:, None] * stb + rows * sth + cols * stw
            acc_l = tl.zeros([NC, BH * BW], tl.float32)
            if SIGNALS:
                # Replicate borders: neighbours clamped into the image.
                by = b[:, None] * syb
                off_y = by + rows * syh + cols * syw
                off_yu = by + tl.maximum(rows - 1, 0) * syh + cols * syw
                off_yd = by + tl.minimum(rows + 1, H - 1) * syh + cols * syw
                off_yl = by + rows * syh + tl.maximum(cols - 1, 0) * syw
                off_yr = by + rows * syh + tl.minimum(cols + 1, W - 1) * syw
                acc_g = tl.zeros([NC, BH * BW], tl.float32)
                acc_lap = tl.zeros([NC, BH * BW], tl.float32)
                acc_e = tl.zeros([NC, BH * BW], tl.float32)
                acc_k = tl.zeros([NC, BH * BW], tl.float32)
            # Channel planes are reached by advancing 64-bit pointers: an int32
            # channel index times an int32 stride (``ch * ssc``) wraps once
            # (C - 1) * ssc >= 2^31.
            s_c, t_c, yc = s_ptr, t_ptr, y_ptr
            for _ch in range(C):
                sv = tl.load(s_c + off_s, mask=m, other=0.0).to(tl.float32)
                tv = tl.load(t_c + off_t, mask=m, other=0.0).to(tl.float32)
                d = sv - tv
                acc_l += kd_elem(d, KIND)
                if SIGNALS:
                    yv = tl.load(yc + off_y, mask=m, other=0.0).to(tl.float32)
                    yu = tl.load(yc + off_yu, mask=m, other=0.0).to(tl.float32)
                    yd = tl.load(yc + off_yd, mask=m, other=0.0).to(tl.float32)
                    yl = tl.load(yc + off_yl, mask=m, other=0.0).to(tl.float32)
                    yr = tl.load(yc + off_yr, mask=m, other=0.0).to(tl.float32)
                    acc_g += yv - k_shift[:, None]
                    acc_lap += ((yu - yv) + (yd - yv)) + ((yl - yv) + (yr - yv))
                    acc_e += tl.abs(sv - yv)
                    acc_k += tl.abs(d)
                s_c += ssc
                t_c += stc
                yc += syc
            # Per-cell tile statistics merged into the running ones. Written
            # out inline rather than through @triton.jit helpers: the GPU
            # compiler inlines either way, but Triton's interpreter pays about
            # a millisecond per helper call.
            tile_l = tl.sum(tl.where(m, acc_l, 0.0), axis=1)
            y_l = tile_l - c_l  # Kahan: sum_l += tile_l
            t_l = sum_l + y_l
            c_l = (t_l - sum_l) - y_l
            sum_l = t_l
            if SIGNALS:
                n_t = tl.sum(m.to(tl.float32), axis=1)
                inv_nt = 1.0 / tl.maximum(n_t, 1.0)
                # Tile mean and M2 around it (two passes over registers) ...
                lap = acc_lap / C
                mt_l = tl.sum(tl.where(m, lap, 0.0), axis=1) * inv_nt
                dev = tl.where(m, lap - mt_l[:, None], 0.0)
                m2t_l = tl.sum(dev * dev, axis=1)
                gs = acc_g / C
                mt_g = tl.sum(tl.where(m, gs, 0.0), axis=1) * inv_nt
                dev = tl.where(m, gs - mt_g[:, None], 0.0)
                m2t_g = tl.sum(dev * dev, axis=1)
                # ... merged with Chan et al.'s formula.
                n_new = n + n_t
                frac = tl.where(n_new > 0, n_t / tl.maximum(n_new, 1.0), 0.0)
                delta = mt_l - mean_l
                mean_l = mean_l + delta * frac
                m2_l = m2_l + m2t_l + delta * (delta * n * frac)  # as _chan_merge: no inf * 0
                delta = mt_g - mean_g
                mean_g = mean_g + delta * frac
                m2_g = m2_g + m2t_g + delta * (delta * n * frac)  # as _chan_merge: no inf * 0
                n = n_new
                tile_e = tl.sum(tl.where(m, acc_e, 0.0), axis=1)
                y_e = tile_e - c_e
                t_e = sum_e + y_e
                c_e = (t_e - sum_e) - y_e
                sum_e = t_e
                tile_k = tl.sum(tl.where(m, acc_k, 0.0), axis=1)
                y_k = tile_k - c_k
                t_k = sum_k + y_k
                c_k = (t_k - sum_k) - y_k
                sum_k = t_k

    if DIRECT:
        if SIGNALS:
            _write_outputs(sig_ptr, kd_ptr, q, qmask, plane, C, n, m2_l, m2_g, sum_e, sum_k, sum_l, True)
        else:
            _write_outputs(sig_ptr, kd_ptr, q, qmask, plane, C, sum_l, sum_l, sum_l, sum_l, sum_l, sum_l, False)
    else:
        # Partials: part[field, s, q].
        base = part_ptr + tl.cast(s, tl.int64) * NCELLS + q
        stride_f = tl.cast(NSPLIT, tl.int64) * NCELLS
        if SIGNALS:
            tl.store(base, n, mask=qmask)
            tl.store(base + 1 * stride_f, mean_l, mask=qmask)
            tl.store(base + 2 * stride_f, m2_l, mask=qmask)
            tl.store(base + 3 * stride_f, mean_g, mask=qmask)
            tl.store(base + 4 * stride_f, m2_g, mask=qmask)
            tl.store(base + 5 * stride_f, sum_e, mask=qmask)
            tl.store(base + 6 * stride_f, sum_k, mask=qmask)
            tl.store(base + 7 * stride_f, sum_l, mask=qmask)
        else:
            tl.store(base, sum_l, mask=qmask)


# Second stage of the forward when NSPLIT > 1. Launch grid: (cdiv(NCELLS, BLOCK),). Arguments:
#   part_ptr          partial statistics [fields, NSPLIT, NCELLS] float32 written by _difficulty_fwd_kernel
#   sig_ptr, kd_ptr   outputs, as in _difficulty_fwd_kernel
#   C                 channels of the images
#   GH, GW            grid
#   NSPLIT            row bands per cell (partials merged in band order)
#   NCELLS            B * GH * GW
#   SIGNALS           constexpr: partials hold the 8 signal fields (else cell_kd only)
#   BLOCK             constexpr: cells per program
@triton.jit
def _difficulty_merge_kernel(
    part_ptr,
    sig_ptr,
    kd_ptr,
    C,
    GH,
    GW,
    NSPLIT,
    NCELLS,
    SIGNALS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Merge the row-band partials of each cell in split order and write the outputs."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    qmask = q < NCELLS
    stride_f = tl.cast(NSPLIT, tl.int64) * NCELLS
    n = tl.zeros([BLOCK], tl.float32)
    mean_l = tl.zeros([BLOCK], tl.float32)
    m2_l = tl.zeros([BLOCK], tl.float32)
    mean_g = tl.zeros([BLOCK], tl.float32)
    m2_g = tl.zeros([BLOCK], tl.float32)
    sum_e = tl.zeros([BLOCK], tl.float32)
    c_e = tl.zeros([BLOCK], tl.float32)
    sum_k = tl.zeros([BLOCK], tl.float32)
    c_k = tl.zeros([BLOCK], tl.float32)
    sum_l = tl.zeros([BLOCK], tl.float32)
    c_l = tl.zeros([BLOCK], tl.float32)
    for s in range(NSPLIT):
        base = part_ptr + tl.cast(s, tl.int64) * NCELLS + q
        if SIGNALS:
            n_t = tl.load(base, mask=qmask, other=0.0)
            mt = tl.load(base + 1 * stride_f, mask=qmask, other=0.0)
            m2t = tl.load(base + 2 * stride_f, mask=qmask, other=0.0)
            _, mean_l, m2_l = _chan_merge(n, mean_l, m2_l, n_t, mt, m2t)
            mt = tl.load(base + 3 * stride_f, mask=qmask, other=0.0)
            m2t = tl.load(base + 4 * stride_f, mask=qmask, other=0.0)
            n, mean_g, m2_g = _chan_merge(n, mean_g, m2_g, n_t, mt, m2t)
            sum_e, c_e = _kahan_add(sum_e, c_e, tl.load(base + 5 * stride_f, mask=qmask, other=0.0))
            sum_k, c_k = _kahan_add(sum_k, c_k, tl.load(base + 6 * stride_f, mask=qmask, other=0.0))
            sum_l, c_l = _kahan_add(sum_l, c_l, tl.load(base + 7 * stride_f, mask=qmask, other=0.0))
        else:
            sum_l, c_l = _kahan_add(sum_l, c_l, tl.load(base, mask=qmask, other=0.0))
    plane = tl.cast(GH, tl.int64) * GW
    if SIGNALS:
        _write_outputs(sig_ptr, kd_ptr, q, qmask, plane, C, n, m2_l, m2_g, sum_e, sum_k, sum_l, True)
    else:
        _write_outputs(sig_ptr, kd_ptr, q, qmask, plane, C, sum_l, sum_l, sum_l, sum_l, sum_l, sum_l, False)


# Backward of cell_kd (docs/spec.md §2): dS = G[cell] * ell'(S - T), dT = -dS. Launch grid: (B * NTILES,);
# program pid handles pixel tile pid % NTILES of image pid // NTILES, all channels. Arguments:
#   g_ptr                    upstream gradient G [B, 1, GH, GW] float32, any strides (stride 0 allowed)
#   s_ptr, t_ptr             student and teacher [B, C, H, W], input dtype, any strides
#   ds_ptr, dt_ptr           outputs dS and dT in the input dtype (a dummy pointer when not needed)
#   C, H, W                  channels, height and width of the images
#   GH, GW                   grid (cell of row h is h * GH // H, docs/spec.md §1)
#   NTW                      tiles per image row: cdiv(W, BW)
#   NTILES                   tiles per image: cdiv(H, BH) * NTW
#   sgb, sgh, sgw            G's strides along B, GH, GW (its channel dim has size 1)
#   ssb, ssc, ssh, ssw       student strides along B, C, H, W
#   stb, stc, sth, stw       teacher strides
#   sdsb, sdsc, sdsh, sdsw   dS strides (zeros when NEED_S is False)
#   sdtb, sdtc, sdth, sdtw   dT strides (zeros when NEED_T is False)
#   KIND                     constexpr KD loss kind (0 l1, 1 l2, 2 charbonnier)
#   NEED_S, NEED_T           constexpr: write dS / dT
#   OUT                      constexpr: dtype code of dS and dT (_utils.out_code)
#   BH, BW                   constexpr: tile rows and columns (powers of two)
@triton.jit
def _cell_kd_bwd_kernel(
    g_ptr,
    s_ptr,
    t_ptr,
    ds_ptr,
    dt_ptr,
    C,
    H,
    W,
    GH,
    GW,
    NTW,
    NTILES,
    sgb,
    sgh,
    sgw,
    ssb,
    ssc,
    ssh,
    ssw,
    stb,
    stc,
    sth,
    stw,
    sdsb,
    sdsc,
    sdsh,
    sdsw,
    sdtb,
    sdtc,
    sdth,
    sdtw,
    KIND: tl.constexpr,
    NEED_S: tl.constexpr,
    NEED_T: tl.constexpr,
    OUT: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    pid = tl.program_id(0)
    tile = pid % NTILES
    b = (pid // NTILES).to(tl.int64)
    rows = (tile // NTW).to(tl.int64) * BH + tl.arange(0, BH)
    cols = (tile % NTW).to(tl.int64) * BW + tl.arange(0, BW)
    m = (rows < H)[:, None] & (cols < W)[None, :]
    # Cell of each row / column (docs/spec.md §1), computed on the 1-D index vectors.
    g_off = b * sgb + ((rows * GH) // H)[:, None] * sgh + ((cols * GW) // W)[None, :] * sgw
    gv = tl.load(g_ptr + g_off, mask=m, other=0.0).to(tl.float32)
    off_s = b * ssb + rows[:, None] * ssh + cols[None, :] * ssw
    off_t = b * stb + rows[:, None] * sth + cols[None, :] * stw
    off_ds = b * sdsb + rows[:, None] * sdsh + cols[None, :] * sdsw
    off_dt = b * sdtb + rows[:, None] * sdth + cols[None, :] * sdtw
    # 64-bit pointers advanced per channel (see the forward kernel).
    s_c, t_c, ds_c, dt_c = s_ptr, t_ptr, ds_ptr, dt_ptr
    for _ch in range(C):
        sv = tl.load(s_c + off_s, mask=m, other=0.0).to(tl.float32)
        tv = tl.load(t_c + off_t, mask=m, other=0.0).to(tl.float32)
        gd = gv * kd_grad(sv - tv, KIND)
        if NEED_S:
            tl.store(ds_c + off_ds, cast_out(gd, OUT), mask=m)
        if NEED_T:
            tl.store(dt_c + off_dt, cast_out(-gd, OUT), mask=m)
        s_c += ssc
        t_c += stc
        ds_c += sdsc
        dt_c += sdtc


# --------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------


def _forward_config(height: int, width: int, grid: tuple[int, int], batch: int, device: torch.device):
    """Launch shape of the forward kernel: ``(BH, BW, NC, NSPLIT, ROWS_PER_SPLIT)``.

    ``BH x BW`` is the per-cell pixel window of a tile (powers of two covering
    the largest cell up to a tile's size), ``NC`` the cells per program (fill
    the tile with small cells), ``NSPLIT`` row bands per cell (only when there
    are too few programs to fill the device).
    """
    gh, gw = grid
    ch_max = cdiv(height, gh)  # cells differ by at most one row / column
    cw_max = cdiv(width, gw)
    # 256 pixels per tile on a GPU. With the Laplacian's five 64-bit offset
    # vectors and five accumulators per pixel, ptxas (sm_90, 4 warps) reports
    # up to ~250 registers per thread for 1024- and some 512-pixel tiles (two
    # blocks per SM) and 56-128 with no spills for every 256-pixel shape
    # tried, NC > 1 included.
    tile = tile_pixels(device, gpu=256)
    bw = min(next_pow2(cw_max), 128 if device.type == "cuda" else tile)
    bh = min(next_pow2(ch_max), max(tile // bw, 1))
    ncells = batch * gh * gw
    nc = min(max(tile // (bh * bw), 1), next_pow2(ncells))
    programs = cdiv(ncells, nc)
    want = target_programs(device)
    nsplit, rows_per_split = 1, ch_max
    if programs < want and ch_max > bh:
        per = cdiv(ch_max, cdiv(want, programs))
        rows_per_split = cdiv(per, bh) * bh
        nsplit = cdiv(ch_max, rows_per_split)
    return bh, bw, nc, nsplit, rows_per_split


def _launch_forward(student, teacher, target, grid, kd_loss, signals: bool, config=None):
    batch, channels, height, width = student.shape
    gh, gw = grid
    dev = student.device
    cell_kd = torch.empty((batch, 1, gh, gw), dtype=torch.float32, device=dev)
    sig = torch.empty((batch, 4, gh, gw), dtype=torch.float32, device=dev) if signals else cell_kd
    if batch == 0:
        return (sig, cell_kd) if signals else cell_kd
    if channels == 0:
        # Nothing to read (the kernel would still load each cell's shift from
        # an empty target): cell_kd is an empty sum, the signals are means
        # over no channels, NaN, as in the reference and the C++ kernels.
        cell_kd.zero_()
        if signals:
            sig.fill_(float("nan"))
        return (sig, cell_kd) if signals else cell_kd
    bh, bw, nc, nsplit, rows_per_split = config or _forward_config(height, width, grid, batch, dev)
    ncells = batch * gh * gw
    direct = nsplit == 1
    nfields = _FIELDS_SIGNALS if signals else _FIELDS_KD_ONLY
    part = cell_kd if direct else torch.empty((nfields, nsplit, ncells), dtype=torch.float32, device=dev)
    y = target if signals else student  # unused pointer when signals is False
    _difficulty_fwd_kernel[(cdiv(ncells, nc) * nsplit,)](
        student,
        teacher,
        y,
        sig,
        cell_kd,
        part,
        channels,
        height,
        width,
        gh,
        gw,
        ncells,
        nsplit,
        rows_per_split,
        cdiv(height, gh),
        cdiv(width, gw),
        *student.stride(),
        *teacher.stride(),
        *y.stride(),
        KIND=KD_KINDS[kd_loss],
        SIGNALS=signals,
        DIRECT=direct,
        NC=nc,
        BH=bh,
        BW=bw,
        **LAUNCH_OPTIONS,
    )
    if not direct:
        block = 256 if dev.type == "cuda" else 4096
        _difficulty_merge_kernel[(cdiv(ncells, block),)](
            part,
            sig,
            cell_kd,
            channels,
            gh,
            gw,
            nsplit,
            ncells,
            SIGNALS=signals,
            BLOCK=block,
            **LAUNCH_OPTIONS,
        )
    return (sig, cell_kd) if signals else cell_kd


@on_input_device
def difficulty_signals(student, teacher, target, grid, kd_loss, *, config=None):
    """docs/spec.md §2 forward: ``(signals [B,4,Gh,Gw], cell_kd [B,1,Gh,Gw])``, both float32.

    ``student``, ``teacher``, ``target``: ``[B, C, H, W]`` float32/float16/bfloat16,
    any strides (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
    ``grid``: validated ``(Gh, Gw)``; ``kd_loss``: ``"l1"|"l2"|"charbonnier"``.
    ``config`` (tests only) overrides the launch configuration
    ``(BH, BW, NC, NSPLIT, ROWS_PER_SPLIT)``. Not differentiable
    by itself (see ``spark_ext.ops.difficulty``).
    """
    return _launch_forward(student, teacher, target, grid, kd_loss, True, config)


@on_input_device
def cell_kd(student, teacher, grid, kd_loss, *, config=None):
    """``cell_kd [B,1,Gh,Gw]`` float32 alone (no Y, no signals): the grid-weighted KD path."""
    return _launch_forward(student, teacher, None, grid, kd_loss, False, config)


def _elementwise_tile(height: int, width: int, device: torch.device) -> tuple[int, int]:
    tile = tile_pixels(device)
    bw = min(next_pow2(width), 128 if device.type == "cuda" else tile)
    bh = min(next_pow2(height), max(tile // bw, 1))
    return bh, bw


@on_input_device
def cell_kd_backward(grad, student, teacher, kd_loss, need_student: bool, need_teacher: bool):
    """Backward of ``cell_kd``: ``(dS, dT)`` with ``dS = G[cell] * ell'(S - T)``, ``dT = -dS``.

    ``grad``: ``[B, 1, Gh, Gw]`` float32 (any strides, stride 0 allowed).
    ``dS``/``dT`` have the input's dtype and (dense) layout; an output that is
    not needed is returned as an empty ``[0]`` tensor and not computed.
    """
    batch, channels, height, width = student.shape
    gh, gw = grad.shape[-2:]
    dev = student.device
    ds = torch.empty_like(student) if need_student else student.new_empty((0,))
    dt = torch.empty_like(teacher) if need_teacher else teacher.new_empty((0,))
    if not (need_student or need_teacher) or student.numel() == 0:
        return ds, dt
    bh, bw = _elementwise_tile(height, width, dev)
    ntw = cdiv(width, bw)
    ntiles = cdiv(height, bh) * ntw
    # Unneeded outputs get a dummy pointer and zero strides; the kernel never stores to them.
    ds_arg, ds_strides = (ds, ds.stride()) if need_student else (student, (0, 0, 0, 0))
    dt_arg, dt_strides = (dt, dt.stride()) if need_teacher else (student, (0, 0, 0, 0))
    _cell_kd_bwd_kernel[(batch * ntiles,)](
        grad,
        student,
        teacher,
        ds_arg,
        dt_arg,
        channels,
        height,
        width,
        gh,
        gw,
        ntw,
        ntiles,
        grad.stride(0),
        grad.stride(2),
        grad.stride(3),
        *student.stride(),
        *teacher.stride(),
        *ds_strides,
        *dt_strides,
        KIND=KD_KINDS[kd_loss],
        NEED_S=need_student,
        NEED_T=need_teacher,
        OUT=out_code(student.dtype),
        BH=bh,
        BW=bw,
        **LAUNCH_OPTIONS,
    )
    return ds, dt
