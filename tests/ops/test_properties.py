"""Property-based checks (hypothesis): every fast backend equals the reference on random inputs.

The hand-picked shapes of the per-op tests cover the known edge cases; these
draw shapes, grids, bit widths and axes at random so that combinations nobody
thought of are exercised too. Example counts stay small: the Triton kernels
run under the interpreter on CPU.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spark_ext
from spark_ext import reference

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _available(op, backend):
    return backend in spark_ext.registered_backends(op)


@st.composite
def images_and_grid(draw):
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    grid = (draw(st.integers(1, h)), draw(st.integers(1, w)))
    seed = draw(st.integers(0, 2**31 - 1))
    return (b, c, h, w), grid, seed


@pytest.mark.skipif(not _available("difficulty_signals", "triton"), reason="triton backend not registered")
@SETTINGS
@given(case=images_and_grid(), kd_loss=st.sampled_from(["l1", "l2", "charbonnier"]), channels_last=st.booleans())
def test_difficulty_signals_triton_equal_reference(case, kd_loss, channels_last):
    shape, grid, seed = case
    gen = torch.Generator().manual_seed(seed)
    S, T, Y = (torch.randn(shape, generator=gen).to(DEVICE) for _ in range(3))
    if channels_last:
        S, T, Y = (t.to(memory_format=torch.channels_last) for t in (S, T, Y))
    S.requires_grad_()
    sig, ck = spark_ext.difficulty_signals(S, T, Y, grid, kd_loss, backend="triton")
    want_sig, want_ck = reference.difficulty_signals(S.double(), T.double(), Y.double(), grid, kd_loss)
    torch.testing.assert_close(sig.double(), want_sig, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ck.double(), want_ck, rtol=1e-4, atol=1e-4)
    G = torch.randn(ck.shape, generator=gen).to(DEVICE)
    (dS,) = torch.autograd.grad(ck, S, G)
    S64 = S.detach().double().requires_grad_()
    (want_dS,) = torch.autograd.grad(
        reference.difficulty_signals(S64, T.double(), Y.double(), grid, kd_loss)[1], S64, G.double()
    )
    torch.testing.assert_close(dS.double(), want_dS, rtol=1e-5, atol=1e-5)


def _lsq_backend():
    for name in ("cuda", "cpp"):
        if _available("lsq_fake_quant", name):
            try:
                spark_ext.lsq_fake_quant(
                    torch.ones(1, device=DEVICE), torch.ones(1, device=DEVICE), bits=4, signed=True, backend=name
                )
                return name
            except spark_ext.BackendUnavailableError:
                continue
    return None


LSQ_BACKEND = _lsq_backend()


@pytest.mark.skipif(LSQ_BACKEND is None, reason="compiled library not available")
@SETTINGS
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    axis_pick=st.integers(-1, 3),
    with_offset=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_compiled_lsq_equals_reference(shape, bits, signed, axis_pick, with_offset, seed):
    axis = None if axis_pick < 0 or axis_pick >= len(shape) else axis_pick
    gen = torch.Generator().manual_seed(seed)
    n = 1 if axis is None else shape[axis]
    x = (torch.randn(shape, generator=gen) * 2).to(DEVICE)
    step = (torch.rand(n, generator=gen) * 0.5 + 0.05).to(DEVICE)
    offset = (torch.randn(n, generator=gen) * 0.1).to(DEVICE) if with_offset else None
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    results = []
    for backend in (LSQ_BACKEND, "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, step) + ((offset,) if with_offset else ())]
        y = spark_ext.lsq_fake_quant(
            leaves[0],
            leaves[1],
            leaves[2] if with_offset else None,
            bits=bits,
            signed=signed,
            axis=axis,
            backend=backend,
        )
        results.append((y,) + torch.autograd.grad(y, leaves, dy))
    ours, ref = results
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
    for got, want in zip(ours[2:], ref[2:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(LSQ_BACKEND is None, reason="compiled library not available")
@SETTINGS
@given(
    # torch's own backward fails on 1-D inputs (it returns a 0-d scale
    # gradient), so the comparison with torch starts at 2-D.
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=4),
    axis_pick=st.integers(0, 3),
    zero_point=st.floats(-6, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_compiled_per_channel_fake_quant_equals_torch(shape, axis_pick, zero_point, seed):
    axis = axis_pick % len(shape)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE)
    n = shape[axis]
    scale = (torch.rand(n, generator=gen) * 0.4 + 0.05).to(DEVICE)
    zp = torch.full((n,), zero_point).to(DEVICE)
    dy = torch.randn(shape, generator=gen).to(DEVICE)
    results = []
    for fn in (
        lambda *a: spark_ext.fake_quantize_learnable_per_channel_affine(*a, backend=LSQ_BACKEND),
        torch._fake_quantize_learnable_per_channel_affine,
    ):
        leaves = [t.clone().requires_grad_() for t in (x, scale, zp)]
        y = fn(leaves[0], leaves[1], leaves[2], axis, -8, 7, 1.0)
        results.append((y,) + torch.autograd.grad(y, leaves, dy))
    ours, theirs = results
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    for got, want in zip(ours[2:], theirs[2:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
