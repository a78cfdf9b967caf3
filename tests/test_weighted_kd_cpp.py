"""C++ CPU backend (``cpp``) of ``fused_weighted_kd`` (SPEC §3) against the reference.

Kernels in csrc/cpu/difficulty_cpu.cpp (``spark_ext::weighted_kd_forward`` /
``weighted_kd_backward``; grid weights through ``spark_ext::cell_kd_forward``).
Oracle and tolerances as for the Triton backend (tests/kd_helpers.py).
"""

import functools

import pytest
import torch

import spark_ext
from spark_ext import _extension

import kd_helpers
from kd_helpers import KINDS, run

if _extension.cpp_unavailable() is not None:
    pytest.skip(f"C++ library unavailable: {_extension.cpp_unavailable()}", allow_module_level=True)

images = functools.partial(kd_helpers.images, n=2)


def cpp_fn(S, T, w, kind, reduction):
    return spark_ext.fused_weighted_kd(S, T, w, kd_loss=kind, reduction=reduction, backend="cpp")


compare = functools.partial(kd_helpers.compare, cpp_fn)

# Weight shapes for images [2, 3, 7, 9]: None, per pixel (every broadcast
# pattern over B and C), per cell (grid 3x4, broadcast over B or not).
WEIGHTS = [
    None,
    (2, 1, 7, 9),
    (7, 9),
    (1, 7, 9),
    (3, 7, 9),
    (1, 1, 7, 9),
    (1, 3, 7, 9),
    (2, 3, 7, 9),
    (2, 1, 3, 4),
    (3, 4),
    (1, 1, 3, 4),
]


@pytest.mark.parametrize("wshape", WEIGHTS, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(wshape, kind):
    S, T = images((2, 3, 7, 9))
    w = None if wshape is None else torch.rand(wshape) + 0.5
    compare(S, T, w, kind, "mean")


@pytest.mark.parametrize(
    "shape,wshape",
    [
        ((1, 1, 1, 1), (1, 1)),
        ((1, 1, 1, 1), None),
        ((3, 1, 33, 65), (3, 1, 33, 65)),
        ((3, 1, 33, 65), (33, 65)),
        ((3, 1, 33, 65), (3, 1, 5, 7)),
        ((3, 1, 33, 65), (33, 65 // 2)),  # grid, not per pixel
    ],
    ids=str,
)
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


def test_raw_backward_skips_unrequested_outputs():
    S, T = images((2, 3, 7, 9))
    w = torch.rand(2, 1, 7, 9)
    ds, dt, dw = torch.ops.spark_ext.weighted_kd_backward(torch.tensor(1.0), S, T, w, "l1", "sum", False, True, False)
    assert ds.shape == (0,) and dw.shape == (0,) and dt.shape == S.shape


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts_give_bitwise_identical_results(layout):
    """Input strides (student, teacher, a transposed or stride-0 weight) change addresses only."""
    S, T = images((2, 3, 7, 9), layout=layout)
    Sc, Tc = S.contiguous(), T.contiguous()
    weights = [
        torch.rand(2, 1, 9, 7).transpose(-1, -2),  # non-contiguous per-pixel weight
        torch.rand(1, 1, 7, 9).expand(2, 1, 7, 9),  # stride-0 batch dim, gradient keeps [2,1,7,9]
        torch.rand(7, 9).expand(2, 3, 7, 9),  # stride 0 on B and C
        torch.rand(2, 1, 4, 3).transpose(-1, -2),  # non-contiguous grid weight
    ]
    g = torch.tensor(0.7)
    for w in weights:
        a = run(cpp_fn, S, T, w, "l1", "mean", g)
        b = run(cpp_fn, Sc, Tc, w.contiguous(), "l1", "mean", g)
        assert torch.equal(a[0], b[0])
        for x, y in zip(a[1], b[1]):
            assert torch.equal(x, y)
        compare(S, T, w, "l1", "mean")
    _, (ds, _, _) = run(cpp_fn, S, T, weights[0], "l1", "mean", g)
    if layout == "channels_last":
        assert ds.is_contiguous(memory_format=torch.channels_last)  # dS follows S's layout


def test_bitwise_deterministic_across_runs_and_threads():
    S, T = images((2, 3, 30, 47))
    w = torch.rand(30, 47)
    before = [x.clone() for x in (S, T, w)]
    g = torch.tensor(1.3)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 1, 2, 3):
            torch.set_num_threads(n)
            runs.append(run(cpp_fn, S, T, w, "charbonnier", "mean", g))
    finally:
        torch.set_num_threads(threads)
    for loss, grads in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and all(torch.equal(x, y) for x, y in zip(grads, runs[0][1]))
    for x, x0 in zip((S, T, w), before):
        assert torch.equal(x, x0)


def test_empty_inputs():
    S, T = images((0, 3, 5, 6))
    w = torch.rand(0, 1, 5, 6, requires_grad=True)
    s = S.clone().requires_grad_()
    loss = cpp_fn(s, T, w, "l1", "sum")
    assert loss.item() == 0.0
    ds, dw = torch.autograd.grad(loss, (s, w))
    assert ds.shape == S.shape and dw.shape == w.shape
    assert torch.isnan(cpp_fn(S, T, None, "l1", "mean"))  # 0 / 0, as the reference


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision(dtype, kind):
    S, T = images((2, 3, 7, 9), dtype=dtype)
    for w in (
        torch.rand(2, 1, 7, 9, dtype=dtype),
        torch.rand(7, 9, dtype=torch.float32),
        torch.rand(1, 3, 7, 9, dtype=torch.float64),
        torch.rand(2, 1, 3, 4, dtype=dtype),
    ):
        _, grads = compare(S, T, w, kind, "mean")
        assert grads[0].dtype == dtype and grads[2].dtype == w.dtype


# --------------------------------------------------------------------------
# torch.library, torch.compile
# --------------------------------------------------------------------------


def test_opcheck():
    S, T = (x.requires_grad_() for x in images((2, 3, 7, 9)))
    ops = torch.ops.spark_ext
    for w in (None, torch.rand(2, 1, 7, 9, requires_grad=True), torch.rand(7, 9).expand(2, 3, 7, 9)):
        torch.library.opcheck(ops.weighted_kd_forward.default, (S, T, w, "l2", "mean"))
    Sd, Td = S.detach().contiguous(memory_format=torch.channels_last), T.detach()
    w = torch.rand(1, 3, 7, 9)
    g = torch.randn(())
    for need in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(ops.weighted_kd_backward.default, (g, Sd, Td, w, "charbonnier", "sum", *need))
    torch.library.opcheck(ops.weighted_kd_backward.default, (g, Sd, Td, None, "l1", "mean", True, True, False))


def test_compile_fullgraph_forward_and_backward():
    S, T, Y = kd_helpers.images((2, 3, 7, 9), n=3)
    wp = torch.rand(2, 1, 7, 9, requires_grad=True)
    wg = torch.rand(2, 1, 3, 4, requires_grad=True)

    def step(s, t, y):
        # The SPARK path: signals + cell KD in one pass, a grid-weighted KD loss, backward.
        _, cell_kd = spark_ext.difficulty_signals(s, t, y, (3, 4), "l1", backend="cpp")
        spark = (wg * cell_kd).sum() / s.numel()
        per_pixel = spark_ext.fused_weighted_kd(s, t, wp, kd_loss="l2", backend="cpp")
        return spark + per_pixel + spark_ext.fused_weighted_kd(s, t, wg, backend="cpp")

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
    S, T, Y = kd_helpers.images((2, 3, 7, 9), n=3)
    w = torch.rand(2, 1, 3, 4)
    _, cell_kd = spark_ext.difficulty_signals(S, T, Y, (3, 4), "charbonnier", backend="cpp")
    loss = spark_ext.fused_weighted_kd(S, T, w, kd_loss="charbonnier", backend="cpp")
    assert torch.equal(loss, (w * cell_kd).sum() / S.numel())


def test_auto_picks_cpp_on_cpu():
    from spark_ext.ops import _dispatch

    S = torch.randn(1, 1, 2, 2)
    assert _dispatch.resolve("fused_weighted_kd", "auto", S)[0] == "cpp"
    assert _dispatch.resolve("fused_weighted_kd", "auto", S.double())[0] == "reference"
