"""The C++ CPU kernels run on torch's intra-op threads, with the same bits at any thread count.

Every kernel hands its shape-fixed tasks to ``cpu::parallel_tasks``
(csrc/cpu/parallel.h), which records the distinct threads that ran them; the
test-only op ``spark_ext::cpu_threads_used`` returns that count and clears it.
A library compiled without OpenMP would still give the right results, on one
thread: these tests are what catch it.
"""

from __future__ import annotations

import pytest
import torch

from spark_ext import _extension

if _extension.cpp_unavailable() is not None:
    pytest.skip(f"C++ library unavailable: {_extension.cpp_unavailable()}", allow_module_level=True)

ops = torch.ops.spark_ext


def _images(shape, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def _fake_quant_cases():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 20000, generator=gen) * 2  # per tensor: 5 row-mode tasks
    xc = (torch.randn(4, 16, 24, 24, generator=gen) * 2).contiguous(memory_format=torch.channels_last)  # period mode
    dy, dyc = torch.randn(x.shape, generator=gen), torch.randn(xc.shape, generator=gen)
    s1, o1 = torch.tensor([0.3]), torch.tensor([0.05])
    s16, o16 = torch.rand(16, generator=gen) * 0.3 + 0.1, torch.randn(16, generator=gen) * 0.1
    zp1, zp16 = torch.tensor([1.0]), torch.randint(-3, 3, (16,), generator=gen).float()
    return {
        "lsq_forward per tensor": lambda: ops.lsq_fake_quant(x, s1, o1, None, 8, 7, 0.1),
        "lsq_backward per tensor": lambda: ops.lsq_fake_quant_backward(dy, x, s1, o1, None, 8, 7, 0.1),
        "lsq_forward per channel": lambda: ops.lsq_fake_quant(xc, s16, o16, 1, 8, 7, 0.1),
        "lsq_backward per channel": lambda: ops.lsq_fake_quant_backward(dyc, xc, s16, o16, 1, 8, 7, 0.1),
        "fq_forward per tensor": lambda: ops.fake_quantize_learnable(x, s1, zp1, None, -8, 7, 1.0),
        "fq_backward per tensor": lambda: ops.fake_quantize_learnable_backward(dy, x, s1, zp1, None, -8, 7, 1.0),
        "fq_forward per channel": lambda: ops.fake_quantize_learnable(xc, s16, zp16, 1, -8, 7, 1.0),
        "fq_backward per channel": lambda: ops.fake_quantize_learnable_backward(dyc, xc, s16, zp16, 1, -8, 7, 1.0),
    }


def _kd_cases():
    S, T, Y = _images((2, 3, 64, 64), 3)
    G = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    w = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    return {
        "difficulty_signals": lambda: ops.difficulty_signals(S, T, Y, 4, 4, "l1"),
        "cell_kd": lambda: ops.cell_kd(S, T, 4, 4, "l2"),
        "cell_kd_backward": lambda: ops.cell_kd_backward(G, S, T, "l1", True, True),
        "fused_weighted_kd": lambda: ops.fused_weighted_kd(S, T, w, "charbonnier", "mean"),
        "fused_weighted_kd_backward": lambda: ops.fused_weighted_kd_backward(
            torch.tensor(1.3), S, T, w, "charbonnier", "mean", True, True, True
        ),
    }


CASES = {**_fake_quant_cases(), **_kd_cases()}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_build_reports_openmp_where_torch_uses_it():
    fields = dict(kv.split("=", 1) for kv in ops.build_info().split(";"))
    assert fields["openmp"] == ("1" if torch.backends.openmp.is_available() else "0")


@pytest.mark.parametrize("name", list(CASES))
def test_tasks_run_on_every_thread_given_and_the_bits_do_not_change(name, restore_threads):
    call = CASES[name]
    results = {}
    for n_threads in (1, 2, 3):
        torch.set_num_threads(n_threads)
        ops.cpu_threads_used()  # clears the record
        results[n_threads] = _as_tuple(call())
        used = ops.cpu_threads_used()
        # 3 threads: at least 2 (a case may hold fewer tasks than threads).
        assert used == n_threads if n_threads < 3 else used >= 2, (name, n_threads, used)
    for n_threads in (2, 3):
        for a, b in zip(results[1], results[n_threads]):
            assert torch.equal(a, b), (name, n_threads)


def test_the_record_counts_distinct_threads_and_clears_when_read(restore_threads):
    torch.set_num_threads(2)
    ops.cpu_threads_used()
    assert ops.cpu_threads_used() == 0
    for _ in range(3):
        CASES["lsq_forward per tensor"]()
    assert ops.cpu_threads_used() == 2
    assert ops.cpu_threads_used() == 0
