"""Large outputs of the C++ CPU kernels come from the huge-page allocator (csrc/cpu/huge_page_allocator.h).

The test-only ops ``spark_ext::huge_page_allocations`` (outputs that took the
huge-page path since the last call) and ``spark_ext::set_huge_page_threshold``
(0 turns the path off) show which path ran; values are compared bit for bit
with the path off, which is the allocation the kernels used before.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spark_ext import _extension

if _extension.cpp_unavailable() is not None:
    pytest.skip(f"C++ library unavailable: {_extension.cpp_unavailable()}", allow_module_level=True)

ops = torch.ops.spark_ext
HUGE_PAGE = 2 << 20
ON_LINUX = sys.platform.startswith("linux")
needs_linux = pytest.mark.skipif(not ON_LINUX, reason="huge-page outputs are Linux only")


@pytest.fixture
def threshold():
    """The library's threshold (restored afterwards); tests lower it to keep their tensors small."""
    before = ops.huge_page_threshold()
    ops.huge_page_allocations()  # clear the count
    yield before
    ops.set_huge_page_threshold(before)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _fake_quant_calls():
    x = torch.randn(2, 8, 96, 96, generator=_gen(1)) * 2  # 589 KiB
    xc = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=_gen(2))
    s, o, zp = torch.tensor([0.3]), torch.tensor([0.05]), torch.tensor([1.0])
    s8, zp8 = torch.rand(8, generator=_gen(3)) * 0.3 + 0.1, torch.randint(-3, 3, (8,), generator=_gen(4)).float()
    return {
        "lsq": lambda: ops.lsq_fake_quant(x, s, o, None, 8, 7, 0.1),
        "lsq channels_last per channel": lambda: ops.lsq_fake_quant(xc, s8, None, 1, 8, 7, 0.1),
        "lsq_backward": lambda: ops.lsq_fake_quant_backward(dy, x, s, o, None, 8, 7, 0.1),
        "fq": lambda: ops.fake_quantize_learnable(x, s, zp, None, -8, 7, 1.0),
        "fq_backward channels_last": lambda: ops.fake_quantize_learnable_backward(dy, xc, s8, zp8, 1, -8, 7, 1.0),
    }


def _kd_calls():
    S, T = (torch.randn(2, 3, 80, 96, generator=_gen(i)) for i in (5, 6))  # 180 KiB each
    G = torch.randn(2, 1, 4, 4, generator=_gen(7))
    w = torch.rand(2, 1, 80, 96, generator=_gen(8))  # dweight: 60 KiB
    S_cl = S.contiguous(memory_format=torch.channels_last)
    return {
        "cell_kd_backward": lambda: ops.cell_kd_backward(G, S, T, "l1", True, True),
        "cell_kd_backward channels_last": lambda: ops.cell_kd_backward(G, S_cl, T, "l2", True, False),
        "fused_weighted_kd_backward": lambda: ops.fused_weighted_kd_backward(
            torch.tensor(1.3), S, T, w, "charbonnier", "mean", True, True, True
        ),
    }


CALLS = {**_fake_quant_calls(), **_kd_calls()}


MIN_BYTES = 32 << 10  # every N-sized output of CALLS is at least this large; parameter gradients are far smaller


def _tensors(out):
    """The N-sized outputs (not the per-channel parameter gradients)."""
    return [t for t in (out if isinstance(out, tuple) else (out,)) if t.numel() * t.element_size() >= MIN_BYTES]


@needs_linux
@pytest.mark.parametrize("name", sorted(CALLS))
def test_large_outputs_take_the_huge_page_path_with_the_same_bits(threshold, name):
    ops.set_huge_page_threshold(0)
    before = _tensors(CALLS[name]())  # the default CPU allocator, as before the huge-page path
    assert ops.huge_page_allocations() == 0
    ops.set_huge_page_threshold(MIN_BYTES)
    after = _tensors(CALLS[name]())
    assert ops.huge_page_allocations() == len(after) > 0
    for b, a in zip(before, after):
        assert a.data_ptr() % HUGE_PAGE == 0
        assert a.stride() == b.stride() and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


def test_outputs_below_the_threshold_use_the_default_allocator(threshold):
    x = torch.randn(100, 100, generator=_gen())  # 39 KiB
    ops.set_huge_page_threshold(max(threshold, 1 << 20))
    y = ops.lsq_fake_quant(x, torch.tensor([0.1]), None, None, 8, 7, 1.0)
    dx, _, _ = ops.lsq_fake_quant_backward(torch.ones_like(x), x, torch.tensor([0.1]), None, None, 8, 7, 1.0)
    assert ops.huge_page_allocations() == 0
    assert y.shape == dx.shape == x.shape


@needs_linux
def test_default_threshold_is_glibcs_largest_mmap_threshold(threshold):
    if os.environ.get("SPARK_EXT_HUGE_PAGES") == "0":
        pytest.skip("SPARK_EXT_HUGE_PAGES=0 in this environment")
    assert threshold == 32 << 20  # docs/design.md, "Huge-page outputs": why not lower


def test_empty_and_gappy_inputs_keep_empty_like_layouts(threshold):
    ops.set_huge_page_threshold(1)  # every non-empty output takes the path (on Linux)
    S = torch.randn(2, 3, 10, 40, generator=_gen())[:, :, :, ::2]  # gaps: empty_like infers dense strides
    T = torch.randn(2, 3, 10, 20, generator=_gen(1))
    G = torch.randn(2, 1, 2, 2, generator=_gen(2))
    ds, dt = ops.cell_kd_backward(G, S, T, "l1", True, True)
    assert ds.stride() == torch.empty_like(S).stride() and dt.stride() == T.stride()
    ops.set_huge_page_threshold(0)
    ds0, dt0 = ops.cell_kd_backward(G, S, T, "l1", True, True)
    assert torch.equal(ds, ds0) and torch.equal(dt, dt0)
    empty = ops.lsq_fake_quant(torch.empty(0, 5), torch.tensor([0.1]), None, None, 8, 7, 1.0)
    assert empty.shape == (0, 5)


@needs_linux
def test_a_huge_page_output_resizes_and_frees_like_any_tensor(threshold):
    ops.set_huge_page_threshold(64 << 10)
    x = torch.randn(256, 256, generator=_gen())  # 256 KiB
    y = ops.lsq_fake_quant(x, torch.tensor([0.1]), None, None, 8, 7, 1.0)
    assert ops.huge_page_allocations() == 1
    expected = y.clone()
    y.resize_(512, 256)  # grows through the storage's allocator: the huge-page path again, data kept
    assert ops.huge_page_allocations() == 1 and y.data_ptr() % HUGE_PAGE == 0
    assert torch.equal(y[:256], expected)
    y[256:] = 1.0
    y.resize_(10, 10)  # keeps the first 100 elements of the storage
    first = expected.flatten()[:100].view(10, 10)
    assert torch.equal(y, first)
    z = y.clone().add_(1)  # an ordinary tensor afterwards
    assert torch.equal(z, first + 1)
    del y  # freed by the allocator's deleter (RSS over many iterations: see docs/design.md)


def test_set_threshold_rejects_a_negative_value():
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        ops.set_huge_page_threshold(-1)


def _child(code: str, value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARK_EXT_HUGE_PAGES": value}
    if _extension._state["how"] == "AOT":
        env["SPARK_EXT_NO_JIT"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_environment_switch_turns_the_path_off_and_rejects_other_values():
    code = (
        "import torch, spark_ext\n"
        "from spark_ext import _extension\n"
        "_extension.load()\n"
        "print('threshold', torch.ops.spark_ext.huge_page_threshold())\n"
        "print('doctor', _extension.huge_page_status())\n"
    )
    off = _child(code, "0")
    assert off.returncode == 0, off.stderr[-3000:]
    assert "threshold 0" in off.stdout and "doctor off (SPARK_EXT_HUGE_PAGES=0)" in off.stdout
    # the library alone this time (faster than importing spark_ext): it is what reads the variable
    library = _extension._state["path"]
    bad = _child(f"import torch\ntorch.ops.load_library({library!r})\ntorch.ops.spark_ext.huge_page_threshold()", "yes")
    assert bad.returncode != 0
    assert "SPARK_EXT_HUGE_PAGES must be 0 (off) or 1 (on, the default), got 'yes'" in bad.stderr


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("always [madvise] never\n", "active for"),
        ("[always] madvise never\n", "active for"),
        ("always madvise [never]\n", "transparent_hugepage is 'never'"),
    ],
)
def test_doctor_line_reads_the_kernel_setting(tmp_path, text, says):
    setting = tmp_path / "enabled"
    setting.write_text(text)
    line = _extension.huge_page_status(setting)
    if ON_LINUX and ops.huge_page_threshold() > 0:
        assert says in line
        assert "unreadable" in _extension.huge_page_status(tmp_path / "missing")
