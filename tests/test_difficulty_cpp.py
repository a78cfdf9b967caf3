"""C++ CPU backend (``cpp``) of ``difficulty_signals`` (SPEC §2) against the reference.

The kernels are in csrc/cpu/difficulty_cpu.cpp (ops
``spark_ext::difficulty_forward``, ``cell_kd_forward``, ``cell_kd_backward``).
Oracle and tolerances as for the Triton backend (tests/kd_helpers.py):
signals to 1e-4 relative + 1e-6 absolute of float64; ``cell_kd`` and
gradients within twice the reference's own same-dtype error plus 4 ulps.
"""

import pytest
import torch

import spark_ext
from spark_ext import _extension
from spark_ext.ops import BackendUnavailableError, _dispatch

from kd_helpers import KINDS, check, check_signals, images, ref_forward, ref_grads

if _extension.cpp_unavailable() is not None:
    pytest.skip(f"C++ library unavailable: {_extension.cpp_unavailable()}", allow_module_level=True)


def cpp_signals(S, T, Y, grid, kind):
    return spark_ext.difficulty_signals(S, T, Y, grid, kind, backend="cpp")


CASES = [
    ((1, 1, 1, 1), (1, 1)),
    ((2, 3, 7, 9), (3, 4)),  # grid divides neither H nor W
    ((2, 3, 7, 9), (7, 9)),  # full resolution: every pixel its own cell
    ((2, 3, 7, 9), (1, 1)),
    ((3, 1, 33, 65), (5, 7)),
    ((3, 1, 33, 65), (33, 65)),
    ((3, 1, 33, 65), (1, 1)),
    ((1, 2, 1, 5), (1, 2)),  # one-row image: both replicate borders at once
]


@pytest.mark.parametrize("shape,grid", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_and_backward_match_reference(shape, grid, kind):
    S, T, Y = images(shape)
    s, t = S.clone().requires_grad_(), T.clone().requires_grad_()
    sig, kd = cpp_signals(s, t, Y, grid, kind)
    assert sig.shape == (shape[0], 4, *grid) and kd.shape == (shape[0], 1, *grid)
    assert sig.dtype == kd.dtype == torch.float32 and not sig.requires_grad
    sig64, kd_same, kd64 = ref_forward(S, T, Y, grid, kind)
    check_signals(sig, sig64)
    check(kd, kd_same, kd64, "cell_kd")
    G = torch.randn(shape[0], 1, *grid)  # random grad_output
    ds, dt = torch.autograd.grad(kd, (s, t), G)
    (rs, rt), (rs64, rt64) = ref_grads(S, T, G, grid, kind, torch.float32)
    check(ds, rs, rs64, "dS")
    check(dt, rt, rt64, "dT")
    assert torch.equal(dt, -ds)


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts_give_bitwise_identical_results(layout):
    """Strides change addresses only (read in place): results equal the contiguous run's bit for bit."""
    shape, grid = (2, 3, 7, 9), (3, 4)
    S, T, Y = images(shape, layout=layout)
    assert not S.is_contiguous()
    Sc, Tc, Yc = (x.contiguous() for x in (S, T, Y))
    G = torch.randn(2, 1, *grid)
    outs = []
    for a, b, c in ((S, T, Y), (Sc, Tc, Yc)):
        s, t = a.detach().requires_grad_(), b.detach().requires_grad_()
        sig, kd = cpp_signals(s, t, c, grid, "charbonnier")
        ds, dt = torch.autograd.grad(kd, (s, t), G)
        outs.append((sig, kd, ds, dt))
    for got, want in zip(*outs):
        assert torch.equal(got, want)
    sig64, _, _ = ref_forward(Sc, Tc, Yc, grid, "charbonnier")
    check_signals(outs[0][0], sig64)
    if layout == "channels_last":
        assert outs[0][2].is_contiguous(memory_format=torch.channels_last)  # dS follows S's layout


def test_expanded_stride_zero_upstream_gradient():
    shape, grid = (2, 3, 7, 9), (3, 4)
    S, T, Y = images(shape)
    for G in (torch.randn(1, 1, *grid).expand(2, 1, *grid), torch.tensor(0.37).expand(2, 1, *grid)):
        s = S.clone().requires_grad_()
        _, kd = cpp_signals(s, T, Y, grid, "l1")
        (ds,) = torch.autograd.grad(kd, s, G)
        (rs, _), (rs64, _) = ref_grads(S, T, G.contiguous(), grid, "l1", torch.float32)
        check(ds, rs, rs64, "dS with expanded G")
    # kd.sum().backward(): the upstream gradient autograd passes is an expanded scalar.
    s = S.clone().requires_grad_()
    cpp_signals(s, T, Y, grid, "l2")[1].sum().backward()
    (rs, _), (rs64, _) = ref_grads(S, T, torch.ones(2, 1, *grid), grid, "l2", torch.float32)
    check(s.grad, rs, rs64, "dS of kd.sum()")


def test_gradients_only_where_required():
    S, T, Y = images((2, 3, 7, 9))
    s, y = S.clone().requires_grad_(), Y.clone().requires_grad_()
    sig, kd = cpp_signals(s, T, y, (3, 4), "l2")
    assert not sig.requires_grad and kd.requires_grad
    kd.sum().backward()
    assert s.grad is not None and y.grad is None
    t = T.clone().requires_grad_()
    _, kd = cpp_signals(S, t, Y, (3, 4), "l2")
    kd.sum().backward()
    (_, rt), (_, rt64) = ref_grads(S, T, torch.ones(2, 1, 3, 4), (3, 4), "l2", torch.float32)
    check(t.grad, rt, rt64, "dT alone")
    ops = torch.ops.spark_ext
    ds, dt = ops.cell_kd_backward(torch.ones(2, 1, 3, 4), S, T, "l2", False, True)
    assert ds.shape == (0,) and dt.shape == S.shape


def test_bitwise_deterministic_across_runs_and_threads():
    S, T, Y = images((2, 3, 45, 61))
    before = [x.clone() for x in (S, T, Y)]
    G = torch.randn(2, 1, 2, 3)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 1, 2, 3):
            torch.set_num_threads(n)
            s = S.clone().requires_grad_()
            sig, kd = cpp_signals(s, T, Y, (2, 3), "charbonnier")
            (ds,) = torch.autograd.grad(kd, s, G)
            runs.append((sig, kd, ds))
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)
    for x, x0 in zip((S, T, Y), before):
        assert torch.equal(x, x0)


def test_empty_batch():
    S, T, Y = (torch.randn(0, 3, 5, 6) for _ in range(3))
    s = S.clone().requires_grad_()
    sig, kd = cpp_signals(s, T, Y, (2, 3), "l1")
    assert sig.shape == (0, 4, 2, 3) and kd.shape == (0, 1, 2, 3)
    (ds,) = torch.autograd.grad(kd.sum(), s)
    assert ds.shape == S.shape


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_inputs(dtype, kind):
    shape, grid = (2, 3, 7, 9), (3, 4)
    S, T, Y = images(shape, dtype=dtype)
    s = S.clone().requires_grad_()
    sig, kd = cpp_signals(s, T, Y, grid, kind)
    assert sig.dtype == kd.dtype == torch.float32
    sig64, kd_same, kd64 = ref_forward(S, T, Y, grid, kind)
    check_signals(sig, sig64)
    check(kd, kd_same, kd64, "cell_kd")
    G = torch.randn(2, 1, *grid)
    (ds,) = torch.autograd.grad(kd, s, G)
    assert ds.dtype == dtype
    (rs, _), (rs64, _) = ref_grads(S, T, G, grid, kind, dtype)
    check(ds, rs, rs64, f"dS {dtype}")
    if kind != "charbonnier":  # l1/l2: the same float32 value rounded once, to nearest-even
        assert torch.equal(ds, rs)


@pytest.mark.parametrize("grid", [(1, 1), (3, 2)])
def test_variance_is_sound_for_a_big_cell_with_a_large_offset(grid):
    """SPEC §2: big cells of 1000 + noise agree with float64 to 1e-4 rel + 1e-6 abs."""
    H = W = 1024 if grid == (1, 1) else 257
    Y = 1000 + 0.01 * torch.randn(1, 1, H, W)
    S = Y + 0.1 * torch.randn(1, 1, H, W)
    sig, _ = cpp_signals(S, Y.clone(), Y, grid, "l1")
    sig64, _, _ = ref_forward(S, Y, Y, grid, "l1")
    check_signals(sig, sig64)
    g = Y[:, 0]
    naive = ((g * g).mean() - g.mean() ** 2).abs().item()
    if grid == (1, 1):
        assert abs(naive - sig64[0, 1].item()) > 1e-4 * sig64[0, 1].item()  # the trap is real


# --------------------------------------------------------------------------
# torch.library, torch.compile, dispatch
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l1", "charbonnier"])
def test_opcheck(kind):
    S, T, Y = (x.requires_grad_() for x in images((2, 3, 7, 9)))
    ops = torch.ops.spark_ext
    torch.library.opcheck(ops.difficulty_forward.default, (S, T, Y, 3, 4, kind))
    torch.library.opcheck(ops.cell_kd_forward.default, (S, T, 7, 9, kind))
    Sd, Td = S.detach(), T.detach().contiguous(memory_format=torch.channels_last)
    G = torch.randn(1, 1, 3, 4).expand(2, 1, 3, 4)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(ops.cell_kd_backward.default, (G, Sd, Td, kind, *need))


def test_compile_fullgraph_forward_and_backward():
    S, T, Y = images((2, 3, 7, 9))
    w = torch.rand(2, 1, 3, 4)

    def step(s, t, y):
        sig, kd = spark_ext.difficulty_signals(s, t, y, (3, 4), "l2", backend="cpp")
        return (w * kd).sum() + sig.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        s, t = S.clone().requires_grad_(), T.clone().requires_grad_()
        loss = fn(s, t, Y)
        loss.backward()
        results.append((loss.detach(), s.grad, t.grad))
    for got, want in zip(*results):
        assert torch.equal(got, want)


def test_dispatch_rules():
    S, T, Y = images((1, 1, 4, 4))
    # auto picks the C++ kernels for CPU float32/16/bf16 and the reference for float64.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert _dispatch.resolve("difficulty_signals", "auto", S.to(dtype))[0] == "cpp"
    assert _dispatch.resolve("difficulty_signals", "auto", S.double())[0] == "reference"
    with pytest.raises(BackendUnavailableError, match="float64"):
        cpp_signals(S.double(), T.double(), Y.double(), (2, 2), "l1")
    with pytest.raises(ValueError, match="grid Gh"):
        cpp_signals(S, T, Y, (5, 2), "l1")
    # The raw op checks its arguments too.
    with pytest.raises(ValueError, match="grid"):
        torch.ops.spark_ext.difficulty_forward(S, T, Y, 5, 2, "l1")
    with pytest.raises(ValueError, match="kd_loss"):
        torch.ops.spark_ext.cell_kd_forward(S, T, 2, 2, "huber")
