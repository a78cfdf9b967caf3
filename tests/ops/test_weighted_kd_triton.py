"""Triton backend of ``fused_weighted_kd`` (docs/spec.md §3): its own checks.

The checks every backend passes (loss and gradients against the reference
over weight shapes, reductions, layouts and dtypes; opcheck; torch.compile)
run for this backend in tests/ops/test_weighted_kd.py; here: GPU-like
launch configurations and determinism under the interpreter, and the CUDA
tests. Runs under Triton's interpreter without a GPU (conftest), so shapes
are small. The oracle is :func:`spark_ext.reference.fused_weighted_kd` and its
autograd gradients, in float64 on the same input values; the tolerance is
twice the error the reference makes in the input's own dtype (vs float64)
plus four ulps of the output dtype at the result's scale. bfloat16 runs under
the interpreter as well (see tests/ops/test_difficulty_triton.py's docstring for why that
is meaningful: the kernels round bfloat16 to nearest-even by hand).
"""

import functools

import pytest
import torch

import spark_ext

import kd_helpers
from kd_helpers import KINDS, gpu_like, run  # noqa: F401  (gpu_like: fixture)

pytest.importorskip("triton")  # the Triton backend's tests need triton (CPU: its interpreter)

images = functools.partial(kd_helpers.images, n=2)


def triton_fn(S, T, w, kind, reduction):
    return spark_ext.fused_weighted_kd(S, T, w, kd_loss=kind, reduction=reduction, backend="triton")


# Triton vs reference (same dtype and float64): loss and every requested gradient.
compare = functools.partial(kd_helpers.compare, triton_fn)


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
