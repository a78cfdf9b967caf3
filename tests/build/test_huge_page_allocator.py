"""Large outputs of the C++ CPU kernels come from the huge-page allocator (csrc/cpu/huge_page_allocator.h).

The test-only ops ``spark_ext::huge_page_allocations`` (outputs that took the
huge-page path since the last call) and ``spark_ext::set_huge_page_threshold``
(0 turns the path off) show which path ran; values are compared bit for bit
with the path off, which is the allocation the kernels used before. Freed
huge-page outputs are cached for reuse (``huge_page_cache_bytes``,
``set_huge_page_cache_limit``, ``empty_huge_page_cache``): reuse is seen in the
outputs' addresses.
"""

from __future__ import annotations

import io
import os
import pickle
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import spark_ext
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


@pytest.fixture
def cache():
    """An empty cache with the library's limit (restored, and emptied, afterwards)."""
    limit = ops.huge_page_cache_limit()
    ops.empty_huge_page_cache()
    yield limit
    ops.set_huge_page_cache_limit(limit)
    ops.empty_huge_page_cache()


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


def _child(code: str, value: str, **more_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARK_EXT_HUGE_PAGES": value, **more_env}
    if _extension._state["how"] == "AOT":
        env["SPARK_EXT_NO_JIT"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
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


# --------------------------------------------------------------------------
# The cache of freed huge-page outputs
# --------------------------------------------------------------------------

MIB = 1 << 20


def _lsq(x):
    return ops.lsq_fake_quant(x, torch.tensor([0.1]), None, None, 8, 7, 1.0)


def _input(mib: float, seed: int = 0) -> torch.Tensor:
    return torch.randn(int(mib * MIB) // 4, generator=_gen(seed))


@needs_linux
def test_a_freed_output_is_reused_and_one_in_use_never(threshold, cache):
    ops.set_huge_page_threshold(MIB)
    x1, x2, x3 = (_input(1, seed) for seed in (1, 2, 3))  # 1 MiB each: one 2 MiB block per output
    y1 = _lsq(x1)
    y2 = _lsq(x2)  # y1 is in use: a new block
    assert y2.data_ptr() != y1.data_ptr() and ops.huge_page_cache_bytes() == 0
    freed = y1.data_ptr()
    del y1
    assert ops.huge_page_cache_bytes() == HUGE_PAGE
    y3 = _lsq(x3)
    assert y3.data_ptr() == freed and ops.huge_page_cache_bytes() == 0
    y4 = _lsq(x1)  # y2 and y3 are in use, the cache is empty: a new block
    assert y4.data_ptr() not in (y2.data_ptr(), y3.data_ptr())
    assert ops.huge_page_allocations() == 4
    ops.set_huge_page_threshold(0)
    for y, x in ((y2, x2), (y3, x3), (y4, x1)):
        assert torch.equal(y, _lsq(x))


@needs_linux
@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_reused_block_is_written_whole(threshold, cache, name):
    ops.set_huge_page_threshold(MIN_BYTES)
    first = _tensors(CALLS[name]())
    blocks = {t.data_ptr() for t in first}
    for t in first:
        t.fill_(float("nan"))  # what a reused block holds: any previous contents
    del t, first
    again = _tensors(CALLS[name]())
    assert {t.data_ptr() for t in again} == blocks
    ops.set_huge_page_threshold(0)
    for a, b in zip(again, _tensors(CALLS[name]())):
        assert torch.equal(a, b)


@needs_linux
def test_resize_into_a_reused_block_reads_zeros_past_the_old_contents(threshold, cache):
    ops.set_huge_page_threshold(256 << 10)
    stale = _lsq(_input(1.5, seed=1)).fill_(float("nan"))  # a 2 MiB block full of NaN
    y = _lsq(_input(0.5, seed=2))  # another 2 MiB block
    expected, block = y.clone(), stale.data_ptr()
    del stale  # cached
    y.resize_(2 * y.numel())  # 1 MiB: the same size class, so the cached block
    assert y.data_ptr() == block
    assert torch.equal(y[: expected.numel()], expected)
    assert torch.equal(y[expected.numel() :], torch.zeros(expected.numel()))


@needs_linux
def test_the_limit_bounds_the_cache_least_recently_freed_out_first(threshold, cache):
    ops.set_huge_page_threshold(MIB)
    x = _input(1)
    ops.set_huge_page_cache_limit(2 * HUGE_PAGE)
    outputs = [_lsq(x) for _ in range(4)]
    addresses = [y.data_ptr() for y in outputs]
    for i in range(4):
        outputs[i] = None  # freed in order 0, 1, 2, 3: 2 and 3 stay cached
    assert ops.huge_page_cache_bytes() == 2 * HUGE_PAGE
    assert [_lsq(x).data_ptr() for _ in range(2)] == [addresses[3], addresses[3]]  # each freed again at once
    ops.set_huge_page_cache_limit(HUGE_PAGE)
    assert ops.huge_page_cache_bytes() == HUGE_PAGE
    big = _lsq(_input(3))  # a 4 MiB block: over the limit, unmapped when freed
    del big
    assert ops.huge_page_cache_bytes() == HUGE_PAGE
    assert ops.set_huge_page_cache_limit(0) == HUGE_PAGE  # returns the previous limit
    assert ops.huge_page_cache_bytes() == 0
    y = _lsq(x)
    del y
    assert ops.huge_page_cache_bytes() == 0  # limit 0: no caching


@needs_linux
def test_empty_cache_releases_every_cached_block_and_no_output_in_use(threshold, cache):
    ops.set_huge_page_threshold(MIB)
    x = _input(1)
    kept = _lsq(x)
    freed = [_lsq(_input(mib)) for mib in (1, 3)]  # 2 and 4 MiB blocks
    del freed[:]
    assert ops.huge_page_cache_bytes() == 3 * HUGE_PAGE
    assert "holds 6 MiB of freed outputs for reuse" in _extension.huge_page_cache_status()
    assert _extension.empty_huge_page_cache() == 3 * HUGE_PAGE
    assert ops.huge_page_cache_bytes() == 0 and ops.empty_huge_page_cache() == 0
    ops.set_huge_page_threshold(0)
    assert torch.equal(kept, _lsq(x))  # still valid, and freed (cached) as usual afterwards
    del kept
    assert ops.huge_page_cache_bytes() == HUGE_PAGE


def test_cache_limit_rejects_bad_values(cache):
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        ops.set_huge_page_cache_limit(-1)
    with pytest.raises(ValueError, match="nbytes must be >= 0, got -1"):
        _extension.set_huge_page_cache_limit(-1)
    with pytest.raises(TypeError, match="nbytes must be an int, got 1.5"):
        _extension.set_huge_page_cache_limit(1.5)
    assert _extension.set_huge_page_cache_limit(0) == cache
    assert "off (limit 0" in _extension.huge_page_cache_status()


@needs_linux
def test_outputs_freed_on_other_threads_are_never_shared(threshold, cache):
    ops.set_huge_page_threshold(MIB)
    inputs = [_input(1, seed) for seed in range(3)]
    ops.set_huge_page_threshold(0)
    expected = [_lsq(x) for x in inputs]
    ops.set_huge_page_threshold(MIB)
    ops.set_huge_page_cache_limit(2 * HUGE_PAGE)  # fewer blocks than outputs alive: reuse and eviction both
    handed = queue.Queue(maxsize=4)
    errors = []

    def produce(i):
        for _ in range(30):
            y = _lsq(inputs[i])
            if not torch.equal(y, expected[i]):
                errors.append(f"producer {i}: output differs when made")
            handed.put((i, y))
            del y

    def consume():  # frees every output on this thread, after checking it was not overwritten meanwhile
        for _ in range(3 * 30):
            i, y = handed.get()
            if not torch.equal(y, expected[i]):
                errors.append(f"producer {i}: output overwritten while in use")

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(3)] + [threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not errors
    assert ops.huge_page_cache_bytes() <= 2 * HUGE_PAGE


@needs_linux
def test_pickled_saved_and_shared_outputs_survive_their_block_being_reused(threshold, cache):
    ops.set_huge_page_threshold(MIB)
    x = _input(1)
    y = _lsq(x)
    expected = y.clone()
    pickled = pickle.dumps(y)
    saved = io.BytesIO()
    torch.save(y, saved)
    block = y.data_ptr()
    y.share_memory_()  # moves the data to shared memory: the block goes back to the cache
    assert y.data_ptr() != block and ops.huge_page_cache_bytes() == HUGE_PAGE
    other = _lsq(-x)  # takes the block
    assert other.data_ptr() == block
    saved.seek(0)
    for restored in (pickle.loads(pickled), torch.load(saved), y):
        assert torch.equal(restored, expected)


@needs_linux
def test_compiled_forward_and_backward_match_eager_with_the_cache(threshold, cache):
    ops.set_huge_page_threshold(0)
    x = torch.randn(4, 8, 64, 64, generator=_gen())  # 512 KiB
    step = torch.tensor([0.1])

    def step_fn(x, step):
        y = spark_ext.lsq_fake_quant(x, step, bits=4, signed=True, backend="cpp")
        return spark_ext.lsq_fake_quant(y * 1.5, step, bits=4, signed=True, backend="cpp").square().sum()

    def grads(fn):
        leaves = [x.clone().requires_grad_(), step.clone().requires_grad_()]
        return torch.autograd.grad(fn(*leaves), leaves)

    expected = grads(step_fn)
    ops.set_huge_page_threshold(64 << 10)
    compiled = torch.compile(step_fn, fullgraph=True, backend="aot_eager")
    ops.huge_page_allocations()
    for _ in range(3):  # later iterations reuse the first one's blocks
        got = grads(compiled)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert ops.huge_page_allocations() >= 3 * 4  # two forwards, two backwards per iteration


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


@needs_linux
def test_resident_memory_stays_within_the_limit_over_many_sizes(threshold, cache):
    ops.set_huge_page_threshold(MIB)
    ops.set_huge_page_cache_limit(8 * MIB)
    x = _input(24)
    sizes = [k * HUGE_PAGE // 4 for k in range(1, 13)]  # 12 size classes, 156 MiB of blocks in all
    _lsq(x[:MIB])  # warm-up: the first call's own allocations are not the cache's
    before = _rss_mib()
    for _ in range(2):
        for n in sizes:
            _lsq(x[:n])  # freed at once; no two outputs share a size class
    grown = _rss_mib() - before
    assert ops.huge_page_cache_bytes() <= 8 * MIB
    assert grown < 8 + 24  # the limit plus slack; unbounded, the cache would hold 156 MiB


def test_environment_sets_the_cache_limit_and_rejects_other_values():
    code = f"import torch\ntorch.ops.load_library({_extension._state['path']!r})\n"
    code += "print('limit', torch.ops.spark_ext.huge_page_cache_limit())\n"
    three = _child(code, "1", SPARK_EXT_HUGE_PAGE_CACHE_MIB="3")
    assert three.returncode == 0, three.stderr[-3000:]
    assert f"limit {3 * MIB if ON_LINUX else 0}" in three.stdout
    bad = _child(code, "1", SPARK_EXT_HUGE_PAGE_CACHE_MIB="lots")
    if ON_LINUX:
        assert bad.returncode != 0
        assert "SPARK_EXT_HUGE_PAGE_CACHE_MIB must be a whole number of MiB" in bad.stderr
        assert "got 'lots'" in bad.stderr


@needs_linux
def test_doctor_prints_what_the_cache_holds(capsys, threshold, cache):
    from spark_ext.cli import main

    ops.set_huge_page_threshold(MIB)
    y = _lsq(_input(1))
    del y
    assert main(["doctor"]) == 0
    assert f"  huge-page cache: holds 2 MiB of freed outputs for reuse, limit {cache / MIB:g} MiB\n" in (
        capsys.readouterr().out
    )
    ops.set_huge_page_threshold(0)
    assert _extension.huge_page_cache_status().startswith("unused (huge-page outputs off)")
