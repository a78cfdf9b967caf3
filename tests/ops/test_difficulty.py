"""``difficulty_signals`` (docs/spec.md §2) against the reference: the checks every backend passes.

Each test runs once per backend: ``triton`` (under Triton's interpreter
without a GPU, conftest sets TRITON_INTERPRET=1; skipped when triton is not
importable) and ``cpp`` (the C++ CPU kernels of csrc/cpu/difficulty_cpu.cpp;
skipped when the C++ library is unavailable). The test id starts with the
backend. Backend-specific checks (Triton launch configurations, bfloat16
rounding, sm_90 compilation; C++ thread-count determinism, empty batches;
dispatch rules) are in tests/ops/test_difficulty_triton.py and tests/ops/test_difficulty_cpp.py.

The oracle is :func:`spark_ext.reference.difficulty_signals` run in float64
on the same input values (the reference itself is checked against explicit
loops in tests/ops/test_reference.py). Tolerances (tests/kd_helpers.py):

* signals: docs/spec.md §2's 1e-4 relative + 1e-6 absolute;
* ``cell_kd`` and gradients: twice the error the reference makes in the
  input's own dtype (vs float64), plus four ulps of the output dtype at the
  result's scale.
"""

import pytest
import torch

import spark_ext

from kd_helpers import (
    BACKEND_PARAMS,
    KINDS,
    check,
    check_signals,
    images,
    per_backend,
    ref_forward,
    ref_grads,
    signals_fn,
)

# Raw torch.library ops of each backend: (forward with signals, cell_kd only, cell_kd backward).
OPS = {
    "triton": ("difficulty_signals_triton", "cell_kd_triton", "cell_kd_backward_triton"),
    "cpp": ("difficulty_signals", "cell_kd", "cell_kd_backward"),
}

CASES = [
    ((1, 1, 1, 1), (1, 1)),
    ((2, 3, 7, 9), (3, 4)),  # grid divides neither H nor W
    ((2, 3, 7, 9), (7, 9)),  # full resolution: every pixel its own cell
    ((2, 3, 7, 9), (1, 1)),
    ((3, 1, 33, 65), (5, 7)),
    ((3, 1, 33, 65), (33, 65)),
    ((3, 1, 33, 65), (1, 1)),
]
ONE_ROW = ((1, 2, 1, 5), (1, 2))  # one-row image: both replicate borders at once
# Under the interpreter two of the cases check the forward pass only (keeps the run short).
TRITON_FORWARD_ONLY = (CASES[3], CASES[5])


@pytest.mark.parametrize("kind", KINDS)
@per_backend(
    "shape,grid,grads",
    {
        "triton": [(*c, "fwd" if c in TRITON_FORWARD_ONLY else "fwd+bwd") for c in CASES],
        "cpp": [(*c, "fwd+bwd") for c in CASES + [ONE_ROW]],
    },
)
def test_forward_and_backward_match_reference(backend, shape, grid, grads, kind):
    S, T, Y = images(shape)
    s, t = (S.clone().requires_grad_(), T.clone().requires_grad_()) if grads == "fwd+bwd" else (S, T)
    sig, kd = signals_fn(backend)(s, t, Y, grid, kind)
    assert sig.shape == (shape[0], 4, *grid) and kd.shape == (shape[0], 1, *grid)
    assert sig.dtype == kd.dtype == torch.float32 and not sig.requires_grad
    sig64, kd_same, kd64 = ref_forward(S, T, Y, grid, kind)
    check_signals(sig, sig64)
    check(kd, kd_same, kd64, "cell_kd")
    if grads == "fwd":
        return
    G = torch.randn(shape[0], 1, *grid)  # grad_output != 1
    ds, dt = torch.autograd.grad(kd, (s, t), G)
    (rs, rt), (rs64, rt64) = ref_grads(S, T, G, grid, kind, torch.float32)
    check(ds, rs, rs64, "dS")
    check(dt, rt, rt64, "dT")
    assert torch.equal(dt, -ds)


# --------------------------------------------------------------------------
# layouts, upstream gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_layouts_give_bitwise_identical_results(backend, layout):
    """Strides change addresses only: results equal the contiguous run's bit for bit."""
    shape, grid = (2, 3, 7, 9), (3, 4)
    S, T, Y = images(shape, layout=layout)
    assert not S.is_contiguous()
    Sc, Tc, Yc = (x.contiguous() for x in (S, T, Y))
    G = torch.randn(2, 1, *grid)
    outs = []
    for a, b, c in ((S, T, Y), (Sc, Tc, Yc)):
        s, t = a.detach().requires_grad_(), b.detach().requires_grad_()  # detach keeps the strides
        sig, kd = signals_fn(backend)(s, t, c, grid, "charbonnier")
        ds, dt = torch.autograd.grad(kd, (s, t), G)
        outs.append((sig, kd, ds, dt))
    for got, want in zip(*outs):
        assert torch.equal(got, want)
    sig64, _, _ = ref_forward(Sc, Tc, Yc, grid, "charbonnier")
    check_signals(outs[0][0], sig64)
    if layout == "channels_last":
        assert outs[0][2].is_contiguous(memory_format=torch.channels_last)  # dS follows S's layout


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_expanded_stride_zero_upstream_gradient(backend):
    fn = signals_fn(backend)
    shape, grid = (2, 3, 7, 9), (3, 4)
    S, T, Y = images(shape)
    for G in (torch.randn(1, 1, *grid).expand(2, 1, *grid), torch.tensor(0.37).expand(2, 1, *grid)):
        s = S.clone().requires_grad_()
        _, kd = fn(s, T, Y, grid, "l1")
        (ds,) = torch.autograd.grad(kd, s, G)
        (rs, _), (rs64, _) = ref_grads(S, T, G.contiguous(), grid, "l1", torch.float32)
        check(ds, rs, rs64, "dS with expanded G")
    # kd.sum().backward(): the upstream gradient autograd passes is an expanded scalar.
    s = S.clone().requires_grad_()
    fn(s, T, Y, grid, "l2")[1].sum().backward()
    (rs, _), (rs64, _) = ref_grads(S, T, torch.ones(2, 1, *grid), grid, "l2", torch.float32)
    check(s.grad, rs, rs64, "dS of kd.sum()")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_gradients_only_where_required_and_signals_carry_none(backend):
    fn = signals_fn(backend)
    S, T, Y = images((2, 3, 7, 9))
    s, y = S.clone().requires_grad_(), Y.clone().requires_grad_()
    sig, kd = fn(s, T, y, (3, 4), "l2")
    assert not sig.requires_grad and kd.requires_grad
    kd.sum().backward()
    assert s.grad is not None and y.grad is None
    t = T.clone().requires_grad_()
    _, kd = fn(S, t, Y, (3, 4), "l2")
    kd.sum().backward()
    (_, rt), (_, rt64) = ref_grads(S, T, torch.ones(2, 1, 3, 4), (3, 4), "l2", torch.float32)
    # Triton has always been held to the float32 reference itself (4 ulps), C++ to the usual bound around float64.
    check(t.grad, rt, rt if backend == "triton" else rt64, "dT alone")
    with torch.no_grad():
        _, kd = fn(s, t, Y, (3, 4), "l2")
    assert not kd.requires_grad


# --------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_low_precision_inputs(backend, kind, dtype):
    shape, grid = (2, 3, 7, 9), (3, 4)
    S, T, Y = images(shape, dtype=dtype)
    s = S.clone().requires_grad_()
    sig, kd = signals_fn(backend)(s, T, Y, grid, kind)
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


@per_backend("grid", {"triton": [((1, 1),)], "cpp": [((1, 1),), ((3, 2),)]})
def test_variance_is_sound_for_a_big_cell_with_a_large_offset(backend, grid):
    """docs/spec.md §2: big cells (one of 2^20 pixels) of 1000 + noise agree with float64 to 1e-4 rel + 1e-6 abs.

    In float32 a naive ``mean(g^2) - mean(g)^2`` of these values is pure
    rounding noise (0 here); the kernels' shifted, merged statistics keep
    about six digits.
    """
    H = W = 1024 if grid == (1, 1) else 257
    Y = 1000 + 0.01 * torch.randn(1, 1, H, W)
    S = Y + 0.1 * torch.randn(1, 1, H, W)
    sig, _ = signals_fn(backend)(S, Y.clone(), Y, grid, "l1")
    sig64, _, _ = ref_forward(S, Y, Y, grid, "l1")
    check_signals(sig, sig64)
    g = Y[:, 0]
    naive = ((g * g).mean() - g.mean() ** 2).abs().item()
    if grid == (1, 1):
        assert abs(naive - sig64[0, 1].item()) > 1e-4 * sig64[0, 1].item()  # the trap is real


# --------------------------------------------------------------------------
# torch.library, torch.compile
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l1", "charbonnier"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_opcheck(backend, kind):
    forward, cell_kd, backward = (getattr(torch.ops.spark_ext, name).default for name in OPS[backend])
    S, T, Y = (x.requires_grad_() for x in images((2, 3, 7, 9)))
    torch.library.opcheck(forward, (S, T, Y, 3, 4, kind))
    torch.library.opcheck(cell_kd, (S, T, 7, 9, kind))
    Sd, Td = S.detach(), T.detach().contiguous(memory_format=torch.channels_last)
    G = torch.randn(1, 1, 3, 4).expand(2, 1, 3, 4)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(backward, (G, Sd, Td, kind, *need))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_compile_fullgraph_forward_and_backward(backend):
    S, T, Y = images((2, 3, 7, 9))
    w = torch.rand(2, 1, 3, 4)

    def step(s, t, y):
        sig, kd = spark_ext.difficulty_signals(s, t, y, (3, 4), "l2", backend=backend)
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
