"""C++ CPU backend (``cpp``) of ``fused_weighted_kd`` (docs/spec.md §3): its own checks.

Kernels in csrc/cpu/weighted_kd_cpu.cpp (``spark_ext::fused_weighted_kd`` /
``fused_weighted_kd_backward``; grid weights through ``spark_ext::cell_kd``).
The checks every backend passes (loss and gradients against the reference over
weight shapes, layouts and dtypes; opcheck; torch.compile) run for this
backend in tests/ops/test_weighted_kd.py; here: raw-op outputs,
determinism across thread counts, empty inputs, dispatch.
"""

import functools

import pytest
import torch
from cpu_isa import assert_same_bits_on_every_cpu_isa

import spark_ext
from spark_ext import _extension

import kd_helpers
from kd_helpers import run

if _extension.cpp_unavailable() is not None:
    pytest.skip(f"C++ library unavailable: {_extension.cpp_unavailable()}", allow_module_level=True)

images = functools.partial(kd_helpers.images, n=2)


def cpp_fn(S, T, w, kind, reduction):
    return spark_ext.fused_weighted_kd(S, T, w, kd_loss=kind, reduction=reduction, backend="cpp")


def test_raw_backward_skips_unrequested_outputs():
    S, T = images((2, 3, 7, 9))
    w = torch.rand(2, 1, 7, 9)
    ds, dt, dw = torch.ops.spark_ext.fused_weighted_kd_backward(
        torch.tensor(1.0), S, T, w, "l1", "sum", False, True, False
    )
    assert ds.shape == (0,) and dw.shape == (0,) and dt.shape == S.shape


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


# --------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------


def test_auto_picks_cpp_on_cpu():
    from spark_ext.ops import _dispatch

    S = torch.randn(1, 1, 2, 2)
    assert _dispatch.resolve("fused_weighted_kd", "auto", S)[0] == "cpp"
    assert _dispatch.resolve("fused_weighted_kd", "auto", S.double())[0] == "reference"


def test_every_cpu_isa_gives_the_same_bits(tmp_path):
    """The default, AVX2 and AVX-512 builds of the row loops (csrc/cpu/kd_row_impl.h) give identical bits."""
    body = """
for dt in (torch.float32, torch.bfloat16):
    # W = 300: a full 256-element block, whole 16-lane vectors and a scalar tail.
    S = torch.randn(2, 3, 5, 300, generator=gen).to(dt)
    T = torch.randn(2, 3, 5, 300, generator=gen).to(dt)
    S[0, 0, 0, :4] = T[0, 0, 0, :4]  # d = 0: ell'(0) = 0
    for w in (None, torch.rand(2, 1, 5, 300, generator=gen)):
        for kind in ("l1", "l2", "charbonnier"):
            key = (str(dt), w is None, kind)
            out[key] = (torch.ops.spark_ext.fused_weighted_kd(S, T, w, kind, "mean"),
                        torch.ops.spark_ext.fused_weighted_kd_backward(
                            torch.tensor(0.7), S, T, w, kind, "mean", True, True, w is not None))
"""
    assert_same_bits_on_every_cpu_isa(body, tmp_path)


def test_hessian_vector_product_is_refused_on_cpp_and_computed_by_the_reference():
    S, T = torch.rand(2, 3, 6, 7), torch.rand(2, 3, 6, 7)
    w, v = torch.rand(6, 7), torch.randn(2, 3, 6, 7)

    def hvp(backend):
        s = S.clone().requires_grad_()
        loss = spark_ext.fused_weighted_kd(s, T, w, kd_loss="l2", backend=backend)
        (g,) = torch.autograd.grad(loss, s, create_graph=True)
        return torch.autograd.grad((g * v).sum(), s)[0]

    with pytest.raises(RuntimeError, match="fused_weighted_kd has no second derivative"):
        hvp("cpp")
    # l2, mean: the gradient is 2 w (S - T) / N, so the HVP is 2 w v / N.
    torch.testing.assert_close(hvp("reference"), 2 * w * v / S.numel())
