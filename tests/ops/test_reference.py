"""The pure-PyTorch references against independent computations (docs/spec.md §1-§3, §5).

Everything here is checked against formulas written out in the test itself
(explicit loops in float64 over pixels and cells, or torch's own learnable
fake-quant built-ins), so a mistake in reference.py cannot hide behind a
shared helper.
"""

import itertools
import math

import numpy as np
import pytest
import torch

import spark_ext
from spark_ext import reference

EPS = 1e-3


def _ell(d, kind):
    return {"l1": np.abs(d), "l2": d * d, "charbonnier": np.sqrt(d * d + EPS * EPS) - EPS}[kind]


def _ell_grad(d, kind):
    return {"l1": np.sign(d), "l2": 2 * d, "charbonnier": d / np.sqrt(d * d + EPS * EPS)}[kind]


def signals_by_loops(S, T, Y, grid, kind):
    """docs/spec.md §2 written out per pixel and per cell in float64 numpy."""
    S, T, Y = (t.double().numpy() for t in (S, T, Y))
    B, C, H, W = S.shape
    gh, gw = grid
    g = Y.mean(1)
    L = np.zeros_like(g)
    for b, h, w in itertools.product(range(B), range(H), range(W)):
        up, down = g[b, max(h - 1, 0), w], g[b, min(h + 1, H - 1), w]
        left, right = g[b, h, max(w - 1, 0)], g[b, h, min(w + 1, W - 1)]
        L[b, h, w] = up + down + left + right - 4 * g[b, h, w]
    e = np.abs(S - Y).mean(1)
    k = np.abs(S - T).mean(1)
    lpix = _ell(S - T, kind).sum(1)
    signals = np.zeros((B, 4, gh, gw))
    cell_kd = np.zeros((B, 1, gh, gw))
    for b, i, j in itertools.product(range(B), range(gh), range(gw)):
        rows = [h for h in range(H) if h * gh // H == i]
        cols = [w for w in range(W) if w * gw // W == j]
        sel = np.ix_(rows, cols)
        signals[b, 0, i, j] = L[b][sel].var()
        signals[b, 1, i, j] = g[b][sel].var()
        signals[b, 2, i, j] = e[b][sel].mean()
        signals[b, 3, i, j] = k[b][sel].mean()
        cell_kd[b, 0, i, j] = lpix[b][sel].sum()
    return torch.from_numpy(signals), torch.from_numpy(cell_kd)


SHAPES_AND_GRIDS = [
    ((1, 1, 1, 1), (1, 1)),
    ((2, 3, 7, 9), (3, 4)),
    ((2, 3, 7, 9), (7, 9)),
    ((1, 2, 5, 6), (1, 1)),
    ((2, 1, 8, 8), (8, 8)),
    ((1, 3, 11, 4), (5, 3)),
]


@pytest.mark.parametrize("shape,grid", SHAPES_AND_GRIDS)
@pytest.mark.parametrize("kind", ["l1", "l2", "charbonnier"])
def test_difficulty_signals_match_loops(shape, grid, kind):
    S, T, Y = (torch.randn(shape) for _ in range(3))
    signals, cell_kd = reference.difficulty_signals(S, T, Y, grid, kind)
    want_signals, want_kd = signals_by_loops(S, T, Y, grid, kind)
    assert signals.dtype == cell_kd.dtype == torch.float32
    assert signals.shape == (shape[0], 4, *grid) and cell_kd.shape == (shape[0], 1, *grid)
    torch.testing.assert_close(signals.double(), want_signals, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cell_kd.double(), want_kd, rtol=1e-5, atol=1e-5)
    assert not signals.requires_grad


@pytest.mark.parametrize("kind", ["l1", "l2", "charbonnier"])
def test_cell_kd_gradient_is_spec_formula(kind):
    shape, grid = (2, 3, 7, 9), (3, 4)
    S = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    T = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(shape, dtype=torch.float64)
    _, cell_kd = reference.difficulty_signals(S, T, Y, grid, kind)
    G = torch.randn_like(cell_kd)
    dS, dT = torch.autograd.grad(cell_kd, (S, T), G)
    rows = torch.tensor([h * grid[0] // shape[2] for h in range(shape[2])])
    cols = torch.tensor([w * grid[1] // shape[3] for w in range(shape[3])])
    G_pix = G[:, :, rows][:, :, :, cols]
    want = G_pix * torch.from_numpy(_ell_grad((S - T).detach().numpy(), kind))
    torch.testing.assert_close(dS, want)
    torch.testing.assert_close(dT, -want)


def test_l1_gradient_is_zero_where_student_equals_teacher():
    S = torch.randn(1, 2, 4, 4, requires_grad=True)
    T = S.detach().clone()
    T[0, 0, 0, 0] += 1.0
    _, cell_kd = reference.difficulty_signals(S, T, torch.randn(1, 2, 4, 4), (2, 2), "l1")
    (dS,) = torch.autograd.grad(cell_kd.sum(), S)
    assert dS[0, 0, 0, 0] == -1 and dS.abs().sum() == 1


@pytest.mark.parametrize("kind", ["l2", "charbonnier"])
def test_cell_kd_gradcheck(kind):
    S = torch.randn(2, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    T = torch.randn(2, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    Y = torch.randn(2, 2, 5, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s, t: reference.difficulty_signals(s, t, Y, (2, 3), kind)[1], (S, T))


def test_variance_is_sound_for_large_offsets():
    """A flat bright region with tiny texture: naive E[x^2]-E[x]^2 in fp32 would cancel to noise."""
    Y = 1000 + 1e-2 * torch.randn(1, 1, 64, 64, dtype=torch.float64)
    S = T = Y.float()
    signals, _ = reference.difficulty_signals(S, T, Y.float(), (1, 1))
    g = Y.float().double()[0, 0]
    torch.testing.assert_close(signals[0, 1, 0, 0].double(), g.var(unbiased=False), rtol=1e-4, atol=1e-6)


def test_low_precision_inputs_give_float32_outputs():
    S, T, Y = (torch.randn(2, 3, 6, 6, dtype=torch.bfloat16) for _ in range(3))
    signals, cell_kd = reference.difficulty_signals(S, T, Y, (2, 2))
    assert signals.dtype == cell_kd.dtype == torch.float32
    loss = reference.fused_weighted_kd(S, T)
    assert loss.dtype == torch.float32


def weighted_kd_by_loops(S, T, w_pix, kind, reduction):
    loss = (w_pix * _ell((S - T).double().numpy(), kind)).sum()
    return loss / S.numel() if reduction == "mean" else loss


@pytest.mark.parametrize("kind", ["l1", "l2", "charbonnier"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "weight_shape",
    [None, (2, 1, 7, 9), (7, 9), (1, 3, 7, 9), (2, 3, 7, 9), (2, 1, 3, 4), (3, 4), (1, 1, 7, 9 // 2), (2, 1, 1, 1)],
)
def test_fused_weighted_kd_matches_loops(kind, reduction, weight_shape):
    B, C, H, W = 2, 3, 7, 9
    S, T = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    weight = None if weight_shape is None else torch.rand(weight_shape)
    got = reference.fused_weighted_kd(S, T, weight, kd_loss=kind, reduction=reduction)
    if weight is None:
        w_pix = np.ones((B, C, H, W))
    elif tuple(weight_shape[-2:]) == (H, W):
        w_pix = np.broadcast_to(weight.double().numpy(), (B, C, H, W))
    else:
        gh, gw = weight_shape[-2:]
        wg = np.broadcast_to(weight.double().numpy(), (B, 1, gh, gw))
        w_pix = np.zeros((B, 1, H, W))
        for h, w in itertools.product(range(H), range(W)):
            w_pix[:, :, h, w] = wg[:, :, h * gh // H, w * gw // W]
    want = weighted_kd_by_loops(S, T, w_pix, kind, reduction)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert math.isclose(got.item(), want, rel_tol=1e-5, abs_tol=1e-6)


def test_grid_weighted_kd_equals_weight_times_cell_kd():
    S, T, Y = (torch.randn(2, 3, 10, 13) for _ in range(3))
    weight = torch.rand(2, 1, 4, 5)
    _, cell_kd = reference.difficulty_signals(S, T, Y, (4, 5), "charbonnier")
    direct = reference.fused_weighted_kd(S, T, weight, kd_loss="charbonnier")
    torch.testing.assert_close(direct, (weight * cell_kd).sum() / S.numel())


@pytest.mark.parametrize("weight_shape", [(2, 1, 5, 6), (2, 1, 2, 3)])
def test_fused_weighted_kd_gradcheck(weight_shape):
    S = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    T = torch.randn(2, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(weight_shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t, w: reference.fused_weighted_kd(s, t, w, kd_loss="l2"), (S, T, w))
    assert torch.autograd.gradcheck(
        lambda s, t, w: reference.fused_weighted_kd(s, t, w, kd_loss="charbonnier", reduction="sum"), (S, T, w)
    )


# ---------------------------------------------------------------- docs/spec.md §5a


def _fq_inputs(shape, scale, zp, qmin, qmax, ties=True):
    x = torch.randn(shape) * scale * (qmax - qmin) / 3
    if ties:
        # Values exactly on rounding ties ((k + 0.5) * scale) and on the clamp bounds.
        flat = x.view(-1)
        k = torch.randint(qmin - 2, qmax + 2, (flat.numel() // 3,)).float()
        flat[: k.numel()] = (k + 0.5) * scale
        flat[-2] = (qmin - round(zp)) * scale
        flat[-1] = (qmax - round(zp)) * scale
    return x


def _run_fq(fn, x, scale, zp, *args, grad):
    x, scale, zp = (t.clone().requires_grad_() for t in (x, scale, zp))
    y = fn(x, scale, zp, *args)
    y.backward(grad)
    return y, x.grad, scale.grad, zp.grad


@pytest.mark.parametrize("zp", [0.0, 3.0, -2.0, 2.5, -1.5, 3.7, -4.2])
@pytest.mark.parametrize("qrange", [(-8, 7), (0, 255), (-128, 127), (0, 15)])
def test_per_tensor_fake_quant_matches_torch(zp, qrange):
    qmin, qmax = qrange
    if not qmin <= round(zp) <= qmax:
        zp = float(qmin)  # the unsigned ranges keep zp in range
    scale = torch.tensor([0.173])
    x = _fq_inputs((3, 5, 7), 0.173, zp, qmin, qmax)
    grad = torch.randn_like(x)
    zero_point = torch.tensor([zp])
    ours = _run_fq(
        reference.fake_quantize_learnable_per_tensor_affine, x, scale, zero_point, qmin, qmax, 0.7, grad=grad
    )
    theirs = _run_fq(torch._fake_quantize_learnable_per_tensor_affine, x, scale, zero_point, qmin, qmax, 0.7, grad=grad)
    assert torch.equal(ours[0], theirs[0]), "forward must be bitwise equal in fp32"
    assert torch.equal(ours[1], theirs[1])
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[3], theirs[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 3, -1])
def test_per_channel_fake_quant_matches_torch(axis):
    x = torch.randn(4, 5, 3, 6) * 2
    n = x.shape[axis]
    scale = torch.rand(n) * 0.3 + 0.05
    zero_point = torch.tensor([2.5, -1.5, 0.4, -3.6, 7.0, -8.0][:n])
    # plant exact ties along the channel axis
    xt = x.movedim(axis, 0)
    xt[:, 0, 0, 0] = (torch.arange(n) - 2 + 0.5) * scale
    grad = torch.randn_like(x)
    ax = axis % x.dim()
    ours = _run_fq(
        reference.fake_quantize_learnable_per_channel_affine, x, scale, zero_point, ax, -8, 7, 1.3, grad=grad
    )
    theirs = _run_fq(torch._fake_quantize_learnable_per_channel_affine, x, scale, zero_point, ax, -8, 7, 1.3, grad=grad)
    assert torch.equal(ours[0], theirs[0])
    assert torch.equal(ours[1], theirs[1])
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[3], theirs[3], rtol=1e-5, atol=1e-5)


def test_fake_quant_low_precision_follows_fp32():
    x = torch.randn(4, 8)
    scale, zp = torch.tensor([0.1]), torch.tensor([1.0])
    y32 = reference.fake_quantize_learnable_per_tensor_affine(x.bfloat16().float(), scale, zp, -8, 7)
    y16 = reference.fake_quantize_learnable_per_tensor_affine(x.bfloat16(), scale, zp, -8, 7)
    assert y16.dtype == torch.bfloat16
    assert torch.equal(y16, y32.bfloat16())


# ---------------------------------------------------------------- docs/spec.md §5b


def lsq_by_autograd(x, step, offset, bits, signed, axis, g):
    """LSQ/LSQ+ written with the straight-through trick; autograd gives the spec's gradients."""
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    shape = [1] * x.dim()
    if axis is not None:
        shape[axis] = -1

    def grad_scaled(t):  # value t, gradient g * dt
        return (t - g * t).detach() + g * t

    s = grad_scaled(step).reshape(shape)
    o = grad_scaled(offset).reshape(shape) if offset is not None else 0.0
    v = (x - o) / s
    clamped = torch.minimum(torch.maximum(v, torch.tensor(-qn, dtype=x.dtype)), torch.tensor(qp, dtype=x.dtype))
    q = clamped + (torch.round(clamped) - clamped).detach()
    return q * s + o


@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (8, True), (3, False)])
@pytest.mark.parametrize("axis", [None, 0, 1, 2])
@pytest.mark.parametrize("with_offset", [False, True])
def test_lsq_matches_straight_through_autograd(bits, signed, axis, with_offset):
    x = torch.randn(3, 4, 5, dtype=torch.float64) * 2
    n = 1 if axis is None else x.shape[axis]
    step = (torch.rand(n, dtype=torch.float64) + 0.2) * 0.5
    offset = torch.randn(n, dtype=torch.float64) * 0.1 if with_offset else None
    g = 0.37
    leaves = [t.clone().requires_grad_() for t in (x, step) + ((offset,) if with_offset else ())]
    y = reference.lsq_fake_quant(
        leaves[0], leaves[1], leaves[2] if with_offset else None, bits=bits, signed=signed, axis=axis, grad_scale=g
    )
    other = [t.clone().requires_grad_() for t in (x, step) + ((offset,) if with_offset else ())]
    want = lsq_by_autograd(other[0], other[1], other[2] if with_offset else None, bits, signed, axis, g)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(want, other, dy))


def test_lsq_hand_computed_values():
    x = torch.tensor([-3.0, -0.26, 0.25, 0.75, 1.0, 5.0], requires_grad=True)
    step = torch.tensor([0.5], requires_grad=True)
    y = reference.lsq_fake_quant(x, step, bits=3, signed=True, grad_scale=None)  # range [-4, 3]
    # v = [-6, -0.52, 0.5, 1.5, 2, 10]; q = [-4, -1, 0 (tie->even), 2 (tie->even), 2, 3]
    assert y.tolist() == [-2.0, -0.5, 0.0, 1.0, 1.0, 1.5]
    y.backward(torch.ones_like(y))
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 0]
    # dstep = -Qn + (q - v) inside + Qp = -4 + (-0.48) + (-0.5) + 0.5 + 0 + 3
    assert step.grad.item() == pytest.approx(-4 - 0.48 - 0.5 + 0.5 + 0 + 3)


def test_lsq_grad_scale_modes():
    x = torch.randn(4, 6)
    step = torch.tensor([0.3])
    grads = {}
    for mode in ("lsq", None, 0.25):
        s = step.clone().requires_grad_()
        reference.lsq_fake_quant(x, s, bits=4, signed=True, grad_scale=mode).sum().backward()
        grads[mode] = s.grad.item()
    assert grads[0.25] == pytest.approx(0.25 * grads[None])
    assert grads["lsq"] == pytest.approx(grads[None] / math.sqrt(24 * 7), rel=1e-6)
    per_axis = torch.rand(6) + 0.1
    s = per_axis.clone().requires_grad_()
    reference.lsq_fake_quant(x, s, bits=4, signed=True, axis=1, grad_scale=None).sum().backward()
    s2 = per_axis.clone().requires_grad_()
    reference.lsq_fake_quant(x, s2, bits=4, signed=True, axis=1).sum().backward()
    torch.testing.assert_close(s2.grad, s.grad / math.sqrt(4 * 7))


def test_lsq_tiny_step_is_clamped():
    y = reference.lsq_fake_quant(torch.tensor([1e-9, 3e-8]), torch.tensor([1e-12]), bits=8, signed=True)
    torch.testing.assert_close(y, torch.tensor([0.0, 3e-8]))


def test_lsq_init_helpers():
    x = torch.tensor([[-1.0, 3.0], [2.0, -6.0]])
    torch.testing.assert_close(reference.lsq_init_step(x, 4, True), torch.tensor([2 * 3.0 / math.sqrt(7)]))
    torch.testing.assert_close(reference.lsq_init_step(x, 4, True, axis=0), torch.tensor([2.0, 4.0]) * 2 / math.sqrt(7))
    step, offset = reference.lsq_plus_init(x, 4, False)
    torch.testing.assert_close(step, torch.tensor([9.0 / 15]))
    torch.testing.assert_close(offset, torch.tensor([-6.0]))
    y = reference.lsq_fake_quant(x, step, offset, bits=4, signed=False)
    # (assert_close returns None, so these must be two statements, not joined by `and`)
    torch.testing.assert_close(y.min(), torch.tensor(-6.0))
    torch.testing.assert_close(y.max(), torch.tensor(3.0))


def test_public_ops_reach_reference_backend():
    S, T, Y = (torch.randn(1, 3, 6, 6) for _ in range(3))
    sig, ck = spark_ext.difficulty_signals(S, T, Y, (2, 3), backend="reference")
    want_sig, want_ck = reference.difficulty_signals(S, T, Y, (2, 3))
    assert torch.equal(sig, want_sig) and torch.equal(ck, want_ck)
    assert torch.equal(spark_ext.fused_weighted_kd(S, T, backend="reference"), reference.fused_weighted_kd(S, T))


def test_reference_ops_compile_fullgraph():
    """The reference backend is plain PyTorch: it must trace without graph breaks."""
    S, T, Y = (torch.randn(2, 3, 7, 9) for _ in range(3))
    S.requires_grad_()

    def spark_path(s, t, y, w):
        _, cell_kd = spark_ext.difficulty_signals(s, t, y, (3, 4), "charbonnier", backend="reference")
        return (w * cell_kd).sum() / s.numel() + spark_ext.fused_weighted_kd(s, t, backend="reference")

    w = torch.rand(2, 1, 3, 4)
    compiled = torch.compile(spark_path, fullgraph=True, backend="aot_eager")
    got = compiled(S, T, Y, w)
    (g_got,) = torch.autograd.grad(got, S)
    want = spark_path(S, T, Y, w)
    (g_want,) = torch.autograd.grad(want, S)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)

    x = torch.randn(4, 6, requires_grad=True)
    step = torch.tensor([0.2], requires_grad=True)

    def quant(x, step):
        a = spark_ext.lsq_fake_quant(x, step, bits=4, signed=True, backend="reference")
        b = spark_ext.fake_quantize_learnable_per_tensor_affine(x, step, torch.zeros(1), -8, 7, backend="reference")
        return (a * b).sum()

    got = torch.compile(quant, fullgraph=True, backend="aot_eager")(x, step)
    grads = torch.autograd.grad(got, (x, step))
    want = quant(x, step)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grads, torch.autograd.grad(want, (x, step)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_difficulty_signals_compiles_with_inductor(dtype):
    """The compiled-reference peer of the benchmarks: inductor's CPU code generator, not only aot_eager.

    Regression: an ``index_add`` cell sum (float64 scatter-add) failed in inductor's CPU codegen.
    """
    S, T, Y = (torch.randn(2, 3, 13, 11, dtype=dtype) for _ in range(3))
    S.requires_grad_()
    compiled = torch.compile(reference.difficulty_signals, fullgraph=True)
    got_signals, got_kd = compiled(S, T, Y, (4, 3), "l2")
    want_signals, want_kd = reference.difficulty_signals(S, T, Y, (4, 3), "l2")
    torch.testing.assert_close(got_signals, want_signals)
    torch.testing.assert_close(got_kd, want_kd)
    grad_out = torch.randn_like(want_kd)
    torch.testing.assert_close(
        torch.autograd.grad(got_kd, S, grad_out)[0], torch.autograd.grad(want_kd, S, grad_out)[0]
    )


def test_cell_bounds_agree_with_cell_index():
    for size, cells in [(7, 7), (13, 4), (100, 8), (5, 1), (31, 6)]:
        index = reference.cell_index(size, cells)
        for cell, (start, stop) in enumerate(reference.cell_bounds(size, cells)):
            assert torch.equal((index == cell).nonzero().flatten(), torch.arange(start, stop))
