"""Triton backend of ``fused_weighted_kd`` (SPEC §3) against the reference.

Runs under Triton's interpreter without a GPU (conftest), so shapes are
small. The oracle is :func:`spark_ext.reference.fused_weighted_kd` and its
autograd gradients, in float64 on the same input values; the tolerance is
twice the error the reference makes in the input's own dtype (vs float64)
plus four ulps of the output dtype at the result's scale. bfloat16 runs under
the interpreter as well (see tests/test_difficulty.py's docstring for why that
is meaningful: the kernels round bfloat16 to nearest-even by hand).
"""

import functools

import pytest
import torch

import spark_ext

import kd_helpers
from kd_helpers import KINDS, run

pytest.importorskip("triton")  # the Triton backend's tests need triton (CPU: its interpreter)

images = functools.partial(kd_helpers.images, n=2)


def triton_fn(S, T, w, kind, reduction):
    return spark_ext.fused_weighted_kd(S, T, w, kd_loss=kind, reduction=reduction, backend="triton")


# Triton vs reference (same dtype and float64): loss and every requested gradient.
compare = functools.partial(kd_helpers.compare, triton_fn)


@pytest.fixture
def gpu_like(monkeypatch):
    """GPU-like launch shape under the interpreter: 256-pixel tiles, many programs."""
    from spark_ext.kernels import difficulty as kd_kernels
    from spark_ext.kernels import weighted_kd as wkd_kernels

    for mod in (kd_kernels, wkd_kernels):
        monkeypatch.setattr(mod, "tile_pixels", lambda device, gpu=1024: 256)
        monkeypatch.setattr(mod, "target_programs", lambda device: 64)


# Weight shapes for images [2, 3, 7, 9]: None, per pixel (broadcast over C, over
# B, over both, or none), per cell (grid 3x4, broadcast over B or not).
WEIGHTS = [None, (2, 1, 7, 9), (7, 9), (1, 3, 7, 9), (2, 3, 7, 9), (1, 7, 9), (2, 1, 3, 4), (3, 4), (1, 1, 3, 4)]


@pytest.mark.parametrize("wshape", WEIGHTS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(wshape, kind):
    S, T = images((2, 3, 7, 9))
    w = None if wshape is None else torch.rand(wshape) + 0.5
    compare(S, T, w, kind, "mean")


@pytest.mark.parametrize("shape,wshape", [((1, 1, 1, 1), (1, 1)), ((1, 1, 1, 1), None), ((3, 1, 33, 65), (3, 1, 33, 65)), ((3, 1, 33, 65), (3, 1, 5, 7))])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_odd_shapes_and_reductions(shape, wshape, reduction):
    S, T = images(shape)
    w = None if wshape is None else torch.rand(wshape)
    compare(S, T, w, "l2", reduction)


NEEDS = [(True, False, False), (False, True, False), (False, False, True), (True, False, True)]


@pytest.mark.parametrize(
    "wshape,need",
    [(w, n) for w in [(2, 1, 7, 9), (7, 9), None, (2, 1, 3, 4)] for n in NEEDS if w is not None or n[0] or n[1]],
    ids=str,
)
def test_only_requested_gradients(wshape, need):
    S, T = images((2, 3, 7, 9))
    w = None if wshape is None else torch.rand(wshape)
    compare(S, T, w, "charbonnier", "mean", need)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts_give_bitwise_identical_results(layout):
    """Input strides (student, teacher, a transposed or stride-0 weight) change addresses only."""
    S, T = images((2, 3, 7, 9), layout=layout)
    Sc, Tc = S.contiguous(), T.contiguous()
    weights = [
        torch.rand(2, 1, 9, 7).transpose(-1, -2),  # non-contiguous per-pixel weight
        torch.rand(1, 1, 7, 9).expand(2, 1, 7, 9),  # stride-0 batch dim, gradient keeps [2,1,7,9]
        torch.rand(2, 1, 4, 3).transpose(-1, -2),  # non-contiguous grid weight
    ]
    g = torch.tensor(0.7)
    for w in weights:
        a = run(triton_fn, S, T, w, "l1", "mean", g)
        b = run(triton_fn, Sc, Tc, w.contiguous(), "l1", "mean", g)
        assert torch.equal(a[0], b[0])
        for x, y in zip(a[1], b[1]):
            assert torch.equal(x, y)
        compare(S, T, w, "l1", "mean")
    _, (ds, _, _) = run(triton_fn, S, T, weights[0], "l1", "mean", g)
    if layout == "channels_last":
        assert ds.is_contiguous(memory_format=torch.channels_last)  # dS follows S's layout


@pytest.mark.parametrize("wshape", [(2, 1, 30, 47), (30, 47), None, (2, 1, 4, 5)], ids=str)
def test_gpu_like_launch_configuration(gpu_like, wshape):
    S, T = images((2, 3, 30, 47))
    w = None if wshape is None else torch.rand(wshape)
    compare(S, T, w, "l1", "sum")


def test_bitwise_deterministic_and_inputs_untouched(gpu_like):
    S, T = images((2, 3, 30, 47))
    w = torch.rand(30, 47)
    before = [x.clone() for x in (S, T, w)]
    g = torch.tensor(1.3)
    a = run(triton_fn, S, T, w, "charbonnier", "mean", g)
    b = run(triton_fn, S, T, w, "charbonnier", "mean", g)
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
    for x, x0 in zip((S, T, w), before):
        assert torch.equal(x, x0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision(dtype, kind):
    S, T = images((2, 3, 7, 9), dtype=dtype)
    for w in (torch.rand(2, 1, 7, 9, dtype=dtype), torch.rand(7, 9, dtype=torch.float32), torch.rand(2, 1, 3, 4, dtype=dtype)):
        _, grads = compare(S, T, w, kind, "mean")
        assert grads[0].dtype == dtype and grads[2].dtype == w.dtype


# --------------------------------------------------------------------------
# torch.library, torch.compile
# --------------------------------------------------------------------------


def test_opcheck():
    S, T = (x.requires_grad_() for x in images((2, 3, 7, 9)))
    ops = torch.ops.spark_ext
    for w in (None, torch.rand(2, 1, 7, 9, requires_grad=True), torch.rand(7, 9).expand(2, 3, 7, 9)):
        torch.library.opcheck(ops.triton_weighted_kd.default, (S, T, w, "l2", "mean"))
    Sd, Td = S.detach().contiguous(memory_format=torch.channels_last), T.detach()
    w = torch.rand(1, 3, 7, 9)
    g = torch.randn(())
    for need in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(ops.triton_weighted_kd_backward.default, (g, Sd, Td, w, "charbonnier", "sum", *need))
    torch.library.opcheck(ops.triton_weighted_kd_backward.default, (g, Sd, Td, None, "l1", "mean", True, True, False))


def test_compile_fullgraph_forward_and_backward():
    S, T, Y = images((2, 3, 7, 9), n=3)
    wp = torch.rand(2, 1, 7, 9, requires_grad=True)
    wg = torch.rand(2, 1, 3, 4, requires_grad=True)

    def step(s, t, y):
        # The SPARK path: signals + cell KD in one pass, a grid-weighted KD loss, backward.
        _, cell_kd = spark_ext.difficulty_signals(s, t, y, (3, 4), "l1", backend="triton")
        spark = (wg * cell_kd).sum() / s.numel()
        return spark + spark_ext.fused_weighted_kd(s, t, wp, kd_loss="l2", backend="triton") + spark_ext.fused_weighted_kd(
            s, t, wg, backend="triton"
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        s, t = S.clone().requires_grad_(), T.clone().requires_grad_()
        wp.grad = wg.grad = None
        loss = fn(s, t, Y)
        loss.backward()
        results.append((loss.detach(), s.grad, t.grad, wp.grad.clone(), wg.grad.clone()))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_grid_weight_path_equals_weight_times_cell_kd():
    """SPEC §3: with grid weights the loss is sum(weight * cell_kd) / N."""
    S, T, Y = images((2, 3, 7, 9), n=3)
    w = torch.rand(2, 1, 3, 4)
    _, cell_kd = spark_ext.difficulty_signals(S, T, Y, (3, 4), "charbonnier", backend="triton")
    loss = spark_ext.fused_weighted_kd(S, T, w, kd_loss="charbonnier", backend="triton")
    assert torch.equal(loss, (w * cell_kd).sum() / S.numel())


# --------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("wshape", [None, (4, 1, 96, 130), (96, 130), (4, 3, 96, 130), (4, 1, 8, 8), (8, 8)], ids=str)
def test_cuda_matrix(wshape, layout, kind, dtype):
    S, T = images((4, 3, 96, 130), dtype=dtype, layout=layout, device="cuda")
    w = None if wshape is None else torch.rand(wshape, device="cuda", dtype=dtype)
    compare(S, T, w, kind, "mean")
    a = run(triton_fn, S, T, w, kind, "mean", torch.tensor(1.0, device="cuda"))
    b = run(triton_fn, S, T, w, kind, "mean", torch.tensor(1.0, device="cuda"))
    assert torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


@pytest.mark.cuda
def test_cuda_large_mean_reduction():
    S, T = images((16, 3, 512, 512), device="cuda")
    w = torch.rand(16, 1, 512, 512, device="cuda")
    compare(S, T, w, "l1", "mean")


@pytest.mark.cuda
def test_cuda_compile_inductor():
    S, T = images((2, 3, 64, 64), device="cuda")
    w = torch.rand(2, 1, 64, 64, device="cuda", requires_grad=True)

    def step(s, t):
        return spark_ext.fused_weighted_kd(s, t, w, kd_loss="charbonnier", backend="triton") * 3

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        s = S.clone().requires_grad_()
        w.grad = None
        loss = fn(s, T)
        loss.backward()
        results.append((loss.detach(), s.grad, w.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)
