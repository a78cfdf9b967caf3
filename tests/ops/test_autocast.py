"""Every op's outputs keep the dtypes docs/spec.md gives them under ``torch.autocast``.

Autocast casts the inputs of listed ops (matmul, einsum, ...) to float16 /
bfloat16. Our ops must not inherit that: ``difficulty_signals`` returns
float32 signals and ``cell_kd``, ``fused_weighted_kd`` a float32 loss, and
the fake-quantization ops x's dtype, whatever the autocast state, on every
backend (the reference's ``cell_kd`` came back in
bfloat16). Runs on CPU autocast (bfloat16 and float16); the CUDA variant is
marked ``cuda``.
"""

import pytest
import torch

import spark_ext

from kd_helpers import BACKEND_PARAMS

KD_BACKENDS = [pytest.param("reference", id="reference")] + BACKEND_PARAMS


def _cpp_or_skip(backend):
    from spark_ext import _extension

    if backend == "cpp" and _extension.cpp_unavailable():
        pytest.skip(f"C++ library unavailable: {_extension.cpp_unavailable()}")


@pytest.mark.parametrize("backend", KD_BACKENDS)
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_kd_ops_return_float32_under_autocast(backend, autocast_dtype, input_dtype):
    s, t, y = (torch.rand(2, 3, 6, 7).to(input_dtype).requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=autocast_dtype):
        signals, cell_kd = spark_ext.difficulty_signals(s, t, y, (2, 3), backend=backend)
        pixel = spark_ext.fused_weighted_kd(s, t, torch.rand(6, 7), backend=backend)
        grid = spark_ext.fused_weighted_kd(s, t, torch.rand(2, 1, 2, 3), backend=backend)
    for out in (signals, cell_kd, pixel, grid):
        assert out.dtype == torch.float32
    want_signals, want_kd = spark_ext.difficulty_signals(s, t, y, (2, 3), backend=backend)
    assert torch.equal(signals, want_signals) and torch.equal(cell_kd, want_kd)
    (cell_kd.sum() + pixel + grid).backward()
    assert s.grad.dtype == input_dtype and t.grad.dtype == input_dtype


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16])
def test_fake_quant_ops_keep_x_dtype_under_autocast(backend, input_dtype):
    _cpp_or_skip(backend)
    x = (torch.randn(3, 4, 5) * 2).to(input_dtype).requires_grad_()
    step, scale, zp = torch.tensor([0.1]), torch.rand(4) * 0.2 + 0.05, torch.zeros(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [
            spark_ext.lsq_fake_quant(x, step, bits=4, signed=True, backend=backend),
            spark_ext.fake_quantize_learnable_per_tensor_affine(x, scale[:1], zp[:1], -8, 7, backend=backend),
            spark_ext.fake_quantize_learnable_per_channel_affine(x, scale, zp, 1, -8, 7, backend=backend),
        ]
    for out in outs:
        assert out.dtype == input_dtype
    sum(o.float().sum() for o in outs).backward()
    assert x.grad.dtype == input_dtype


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_cuda_autocast_output_dtypes(backend):
    s, t, y = (torch.rand(2, 3, 6, 7, device="cuda") for _ in range(3))
    x = torch.randn(3, 4, 5, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        if backend != "cuda":
            signals, cell_kd = spark_ext.difficulty_signals(s, t, y, (2, 3), backend=backend)
            loss = spark_ext.fused_weighted_kd(s, t, torch.rand(2, 1, 2, 3, device="cuda"), backend=backend)
            assert signals.dtype == cell_kd.dtype == loss.dtype == torch.float32
        if backend != "triton":
            out = spark_ext.lsq_fake_quant(x, torch.tensor([0.1], device="cuda"), bits=4, signed=True, backend=backend)
            assert out.dtype == torch.float32
