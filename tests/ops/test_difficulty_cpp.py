"""C++ CPU backend (``cpp``) of ``difficulty_signals`` (docs/spec.md §2): its own checks.

The kernels are in csrc/cpu/difficulty_cpu.cpp (ops
``spark_ext::difficulty_signals``, ``cell_kd``, ``cell_kd_backward``).
The checks every backend passes (forward and gradients against the reference
over shapes, grids, layouts and dtypes; opcheck; torch.compile) run for this
backend in tests/ops/test_difficulty.py; here: raw-op outputs,
determinism across thread counts, empty batches, dispatch.
"""

import pytest
import torch

import spark_ext
from spark_ext import _extension
from spark_ext.ops import BackendUnavailableError, _dispatch

from kd_helpers import images

if _extension.cpp_unavailable() is not None:
    pytest.skip(f"C++ library unavailable: {_extension.cpp_unavailable()}", allow_module_level=True)


def cpp_signals(S, T, Y, grid, kind):
    return spark_ext.difficulty_signals(S, T, Y, grid, kind, backend="cpp")


def test_raw_backward_skips_unrequested_outputs():
    S, T = images((2, 3, 7, 9), n=2)
    ds, dt = torch.ops.spark_ext.cell_kd_backward(torch.ones(2, 1, 3, 4), S, T, "l2", False, True)
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


# --------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------


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
        torch.ops.spark_ext.difficulty_signals(S, T, Y, 5, 2, "l1")
    with pytest.raises(ValueError, match="kd_loss"):
        torch.ops.spark_ext.cell_kd(S, T, 2, 2, "huber")
