"""Triton backend of ``difficulty_signals`` (SPEC §2) against the reference.

Without a GPU every kernel runs under Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small. The oracle is
:func:`spark_ext.reference.difficulty_signals` run in float64 on the same
input values (the reference itself is checked against explicit loops in
tests/test_reference.py). Tolerances:

* signals: SPEC §2's 1e-4 relative + 1e-6 absolute;
* ``cell_kd`` and gradients: twice the error the reference makes in the
  input's own dtype (vs float64), plus four ulps of the output dtype at the
  result's scale (helpers in tests/kd_helpers.py).

bfloat16 runs under the interpreter too: Triton's interpreter truncates when
it converts float32 to bfloat16 (GPUs round to nearest-even), so the kernels
round bfloat16 by hand (``kernels/_utils.py: cast_out``), which makes the
interpreter and the GPU store the same bits; the tests below check that those
bits are the reference's.
"""

import os
import tempfile

import pytest
import torch

import spark_ext
from spark_ext.ops import BackendUnavailableError

triton = pytest.importorskip("triton")  # the Triton backend's tests need triton (CPU: its interpreter)
import triton.language as tl  # noqa: E402

from spark_ext.kernels._utils import cast_out  # noqa: E402

from kd_helpers import KINDS, check, check_signals, images, ref_forward, ref_grads  # noqa: E402

LOW = [torch.float16, torch.bfloat16]


# --------------------------------------------------------------------------
# helpers (shared ones in tests/kd_helpers.py)
# --------------------------------------------------------------------------


def triton_signals(S, T, Y, grid, kind):
    return spark_ext.difficulty_signals(S, T, Y, grid, kind, backend="triton")


@pytest.fixture
def gpu_like(monkeypatch):
    """Launch configuration as on a GPU (small tiles, row-band splits, merge kernel).

    Under the interpreter the launchers pick one big tile and never split a
    cell; this fixture makes them pick 256-pixel tiles and aim for 64
    programs, so the multi-tile Chan merge, the split partials and the merge
    kernel all run.
    """
    from spark_ext.kernels import difficulty as kd_kernels
    from spark_ext.kernels import weighted_kd as wkd_kernels

    for mod in (kd_kernels, wkd_kernels):
        monkeypatch.setattr(mod, "tile_pixels", lambda device, gpu=1024: 256)
        monkeypatch.setattr(mod, "target_programs", lambda device: 64)


# --------------------------------------------------------------------------
# forward and backward against the reference
# --------------------------------------------------------------------------

CASES = [
    ((1, 1, 1, 1), (1, 1)),
    ((2, 3, 7, 9), (3, 4)),  # grid divides neither H nor W
    ((2, 3, 7, 9), (7, 9)),  # full resolution: every pixel its own cell
    ((2, 3, 7, 9), (1, 1)),
    ((3, 1, 33, 65), (5, 7)),
    ((3, 1, 33, 65), (33, 65)),
    ((3, 1, 33, 65), (1, 1)),
]


@pytest.mark.parametrize("shape,grid", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_reference(shape, grid, kind):
    S, T, Y = images(shape)
    sig, kd = triton_signals(S, T, Y, grid, kind)
    assert sig.shape == (shape[0], 4, *grid) and kd.shape == (shape[0], 1, *grid)
    assert sig.dtype == kd.dtype == torch.float32
    sig64, kd_same, kd64 = ref_forward(S, T, Y, grid, kind)
    check_signals(sig, sig64)
    check(kd, kd_same, kd64, "cell_kd")


@pytest.mark.parametrize("shape,grid", [CASES[0], CASES[1], CASES[2], CASES[4], CASES[6]])
@pytest.mark.parametrize("kind", KINDS)
def test_backward_matches_reference(shape, grid, kind):
    S, T, Y = images(shape)
    s, t = S.clone().requires_grad_(), T.clone().requires_grad_()
    G = torch.randn(shape[0], 1, *grid)  # grad_output != 1
    _, kd = triton_signals(s, t, Y, grid, kind)
    ds, dt = torch.autograd.grad(kd, (s, t), G)
    (rs, rt), (rs64, rt64) = ref_grads(S, T, G, grid, kind, torch.float32)
    check(ds, rs, rs64, "dS")
    check(dt, rt, rt64, "dT")
    assert torch.equal(dt, -ds)


@pytest.mark.parametrize(
    "shape,grid,kind",
    [
        ((2, 2, 37, 41), (1, 1), "l1"),  # one cell per image: row-band splits + merge kernel
        ((2, 2, 37, 41), (3, 5), "l2"),  # several tiles per cell, unequal cells
        ((1, 2, 9, 70), (9, 70), "charbonnier"),  # NC > 1 cells per program, across cell rows
        ((1, 1, 40, 300), (2, 1), "l1"),  # cells wider than the 128-pixel tile row
    ],
)
def test_gpu_like_launch_configuration(gpu_like, shape, grid, kind):
    S, T, Y = images(shape)
    sig, kd = triton_signals(S, T, Y, grid, kind)
    sig64, kd_same, kd64 = ref_forward(S, T, Y, grid, kind)
    check_signals(sig, sig64)
    check(kd, kd_same, kd64, "cell_kd")


def test_explicit_launch_configurations_agree():
    """Every (tile, cells-per-program, split) choice computes the same statistics."""
    from spark_ext.kernels import difficulty as k

    S, T, Y = images((1, 2, 13, 11))
    grid = (3, 4)  # cells of 4-5 rows x 2-3 columns
    sig64, kd_same, kd64 = ref_forward(S, T, Y, grid, "l2")
    # (BH, BW, NC, NSPLIT, ROWS_PER_SPLIT)
    for config in [(8, 4, 1, 1, 5), (2, 2, 1, 1, 5), (2, 2, 4, 3, 2), (1, 2, 2, 5, 1), (8, 4, 16, 1, 5)]:
        sig, kd = k.difficulty_forward(S, T, Y, grid, "l2", config=config)
        check_signals(sig, sig64)
        check(kd, kd_same, kd64, f"cell_kd {config}")
        kd_only = k.cell_kd_forward(S, T, grid, "l2", config=config)
        assert torch.equal(kd_only, kd), config  # same arithmetic with and without signals


# --------------------------------------------------------------------------
# layouts, upstream gradients, determinism
# --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_layouts_give_bitwise_identical_results(layout):
    """Strides change addresses only: results equal the contiguous run's bit for bit."""
    shape, grid = (2, 3, 7, 9), (3, 4)
    S, T, Y = images(shape, layout=layout)
    assert not S.is_contiguous()
    Sc, Tc, Yc = (x.contiguous() for x in (S, T, Y))
    G = torch.randn(2, 1, *grid)
    outs = []
    for a, b, c in ((S, T, Y), (Sc, Tc, Yc)):
        s, t = a.detach().requires_grad_(), b.detach().requires_grad_()  # detach keeps the strides
        sig, kd = triton_signals(s, t, c, grid, "charbonnier")
        ds, dt = torch.autograd.grad(kd, (s, t), G)
        outs.append((sig, kd, ds, dt))
    for got, want in zip(*outs):
        assert torch.equal(got, want)
    if layout == "channels_last":
        assert outs[0][2].is_contiguous(memory_format=torch.channels_last)  # dS follows S's layout


def test_expanded_stride_zero_upstream_gradient():
    shape, grid = (2, 3, 7, 9), (3, 4)
    S, T, Y = images(shape)
    for G in (torch.randn(1, 1, *grid).expand(2, 1, *grid), torch.tensor(0.37).expand(2, 1, *grid)):
        s = S.clone().requires_grad_()
        _, kd = triton_signals(s, T, Y, grid, "l1")
        (ds,) = torch.autograd.grad(kd, s, G)
        (rs, _), (rs64, _) = ref_grads(S, T, G.contiguous(), grid, "l1", torch.float32)
        check(ds, rs, rs64, "dS with expanded G")


def test_gradients_only_where_required_and_signals_carry_none():
    S, T, Y = images((2, 3, 7, 9))
    s, y = S.clone().requires_grad_(), Y.clone().requires_grad_()
    sig, kd = triton_signals(s, T, y, (3, 4), "l2")
    assert not sig.requires_grad and kd.requires_grad
    kd.sum().backward()
    assert s.grad is not None and y.grad is None
    t = T.clone().requires_grad_()
    _, kd = triton_signals(S, t, Y, (3, 4), "l2")
    kd.sum().backward()
    (rs, rt), _ = ref_grads(S, T, torch.ones(2, 1, 3, 4), (3, 4), "l2", torch.float32)
    check(t.grad, rt, rt, "dT alone")
    with torch.no_grad():
        _, kd = triton_signals(s, t, Y, (3, 4), "l2")
    assert not kd.requires_grad


def test_bitwise_deterministic_and_inputs_untouched(gpu_like):
    S, T, Y = images((2, 3, 21, 33))
    before = [x.clone() for x in (S, T, Y)]
    runs = []
    for _ in range(2):
        s = S.clone().requires_grad_()
        sig, kd = triton_signals(s, T, Y, (2, 3), "charbonnier")
        (ds,) = torch.autograd.grad(kd, s, torch.randn(2, 1, 2, 3, generator=torch.Generator().manual_seed(1)))
        runs.append((sig, kd, ds))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    for x, x0 in zip((S, T, Y), before):
        assert torch.equal(x, x0)


def test_channel_offsets_beyond_int32():
    """A channel stride of 2^30 with C = 3: channel 2 starts 2^31 elements in.

    An int32 ``channel * stride`` wraps there (the kernels used to read and
    write at a negative offset and crash). The 4 GiB float16 buffer is only
    allocated, and only three of its elements are touched, so the untouched
    pages are never committed and this runs on a small machine.
    """
    stride = 2**30
    base = torch.empty(2 * stride + 1, dtype=torch.float16)
    base[::stride] = torch.randn(3).half()
    S = base.as_strided((1, 3, 1, 1), (1, stride, 1, 1))
    T, Y = images((1, 3, 1, 1), dtype=torch.float16, n=2)
    s = S.requires_grad_()
    G = torch.tensor(0.75).reshape(1, 1, 1, 1)
    sig, kd = triton_signals(s, T, Y, (1, 1), "l2")
    (ds,) = torch.autograd.grad(kd, s, G)
    Sc = S.detach().contiguous()
    sig64, kd_same, kd64 = ref_forward(Sc, T, Y, (1, 1), "l2")
    check_signals(sig, sig64)
    check(kd, kd_same, kd64, "cell_kd")
    (rs, _), (rs64, _) = ref_grads(Sc, T, G, (1, 1), "l2", torch.float16)
    check(ds, rs, rs64, "dS")


# --------------------------------------------------------------------------
# precision
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_inputs(dtype, kind):
    shape, grid = (2, 3, 7, 9), (3, 4)
    S, T, Y = images(shape, dtype=dtype)
    s = S.clone().requires_grad_()
    sig, kd = triton_signals(s, T, Y, grid, kind)
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


@triton.jit
def _to_bf16_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, cast_out(tl.load(x_ptr + offs, mask=m, other=0.0), 2), mask=m)


def test_bfloat16_rounding_matches_torch_bit_for_bit():
    """``cast_out`` (hand-rolled round-to-nearest-even) gives torch's bfloat16 bits.

    Random bit patterns cover normals, subnormals, ties, both signs; plus
    zeros, infinities, NaNs, the largest finite float and values that round
    up to infinity. (Triton's own float32 -> bfloat16 cast in the interpreter
    truncates instead, which is why the kernels do not use it.)
    """
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), dtype=torch.int64).to(torch.int32)
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4028234e38, -3.4028234e38, 3.3961e38, 1e-45, -1e-40, 1.00390625, 1.01171875]
    )
    x = torch.cat([bits.view(torch.float32), specials, torch.randn(1000)])
    x = torch.cat([x, (x.view(torch.int32) & ~0xFFFF | 0x8000).view(torch.float32)])  # exact ties
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _to_bf16_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    want = x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_variance_is_sound_for_a_big_cell_with_a_large_offset():
    """SPEC §2: a 2^20-pixel cell of 1000 + noise agrees with float64 to 1e-4 rel + 1e-6 abs.

    In float32 a naive ``mean(g^2) - mean(g)^2`` of these values is pure
    rounding noise (0 here); the kernel's shifted, Chan-merged statistics keep
    about six digits.
    """
    H = W = 1024
    Y = 1000 + 0.01 * torch.randn(1, 1, H, W)
    S = Y + 0.1 * torch.randn(1, 1, H, W)
    T = Y.clone()
    sig, _ = triton_signals(S, T, Y, (1, 1), "l1")
    sig64, _, _ = ref_forward(S, T, Y, (1, 1), "l1")
    check_signals(sig, sig64)
    g = Y[:, 0]
    naive = ((g * g).mean() - g.mean() ** 2).abs().item()
    assert abs(naive - sig64[0, 1].item()) > 1e-4 * sig64[0, 1].item()  # the trap is real


# --------------------------------------------------------------------------
# torch.library, torch.compile, dispatch
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l1", "charbonnier"])
def test_opcheck(kind):
    S, T, Y = (x.requires_grad_() for x in images((2, 3, 7, 9)))
    ops = torch.ops.spark_ext
    torch.library.opcheck(ops.triton_difficulty_signals.default, (S, T, Y, 3, 4, kind))
    torch.library.opcheck(ops.triton_cell_kd.default, (S, T, 7, 9, kind))
    Sd, Td = S.detach(), T.detach().contiguous(memory_format=torch.channels_last)
    G = torch.randn(1, 1, 3, 4).expand(2, 1, 3, 4)
    for need in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(ops.triton_cell_kd_backward.default, (G, Sd, Td, kind, *need))


def test_compile_fullgraph_forward_and_backward():
    S, T, Y = images((2, 3, 7, 9))
    w = torch.rand(2, 1, 3, 4)

    def step(s, t, y):
        sig, kd = spark_ext.difficulty_signals(s, t, y, (3, 4), "l2", backend="triton")
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
    from spark_ext.ops import _dispatch

    # auto never picks Triton for CPU tensors; forcing it runs the interpreter.
    assert _dispatch.resolve("difficulty_signals", "auto", S)[0] != "triton"
    assert _dispatch.resolve("difficulty_signals", "triton", S)[0] == "triton"
    with pytest.raises(BackendUnavailableError, match="float32, float16 or bfloat16"):
        triton_signals(S.double(), T.double(), Y.double(), (2, 2), "l1")
    with pytest.raises(ValueError, match="grid Gh"):
        triton_signals(S, T, Y, (5, 1), "l1")


AOT_SCRIPT = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from spark_ext.kernels import difficulty as D, weighted_kd as WK

target = GPUTarget("cuda", 90, 32)
count = 0

def build(fn, ptrs, consts, i64=()):
    global count
    sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n == "DIV" else ("i64" if n in i64 else "i32"))
           for n in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=target,
                       options={"num_warps": 4, "enable_fp_fusion": False})
    assert k.asm.get("cubin"), fn.__name__
    count += 1

# Every dtype and every KD kind (one kind per dtype keeps the run short).
for dt, kind in (("fp32", 2), ("fp16", 1), ("bf16", 0)):
    out = {"fp32": 0, "fp16": 1, "bf16": 2}[dt]
    io = {"s_ptr": "*" + dt, "t_ptr": "*" + dt, "y_ptr": "*" + dt, "w_ptr": "*" + dt,
          "ds_ptr": "*" + dt, "dt_ptr": "*" + dt, "dw_ptr": "*" + dt}
    f32 = {"sig_ptr": "*fp32", "kd_ptr": "*fp32", "part_ptr": "*fp32", "g_ptr": "*fp32"}
    for signals in (True, False):
        for direct in (True, False):
            build(D._difficulty_fwd_kernel, {**io, **f32},
                  {"KIND": kind, "SIGNALS": signals, "DIRECT": direct, "NC": 1, "BH": 2, "BW": 128})
    build(D._difficulty_fwd_kernel, {**io, **f32},
          {"KIND": kind, "SIGNALS": True, "DIRECT": True, "NC": 256, "BH": 1, "BW": 1})
    build(D._cell_kd_bwd_kernel, {**io, **f32},
          {"KIND": kind, "NEED_S": True, "NEED_T": True, "OUT": out, "BH": 8, "BW": 128})
    build(WK._wkd_fwd_kernel, {**io, **f32}, {"KIND": kind, "HAS_W": True, "BH": 8, "BW": 128})
    build(WK._wkd_bwd_kernel, {**io, **f32},
          {"KIND": kind, "HAS_W": True, "NEED_S": True, "NEED_T": True, "NEED_W": True,
           "OUT": out, "OUT_W": out, "BH": 8, "BW": 128})
# 64-bit strides (tensors beyond 2^31 elements) and the small kernels.
build(D._difficulty_fwd_kernel, {"s_ptr": "*fp32", "t_ptr": "*fp32", "y_ptr": "*fp32", "sig_ptr": "*fp32",
      "kd_ptr": "*fp32", "part_ptr": "*fp32"}, {"KIND": 0, "SIGNALS": True, "DIRECT": False, "NC": 4, "BH": 4, "BW": 16},
      i64=("ssb", "stb", "syb", "NCELLS"))
build(D._difficulty_merge_kernel, {"part_ptr": "*fp32", "sig_ptr": "*fp32", "kd_ptr": "*fp32"}, {"SIGNALS": True, "BLOCK": 256})
build(D._difficulty_merge_kernel, {"part_ptr": "*fp32", "sig_ptr": "*fp32", "kd_ptr": "*fp32"}, {"SIGNALS": False, "BLOCK": 256})
build(WK._sum_partials_kernel, {"part_ptr": "*fp32", "out_ptr": "*fp32"}, {"BLOCK": 1024})
build(WK._wkd_bwd_kernel, {"g_ptr": "*fp32", "s_ptr": "*fp32", "t_ptr": "*fp32", "w_ptr": "*fp64", "ds_ptr": "*fp32",
      "dt_ptr": "*fp32", "dw_ptr": "*fp64"}, {"KIND": 0, "HAS_W": True, "NEED_S": False, "NEED_T": False,
      "NEED_W": True, "OUT": 0, "OUT_W": 3, "BH": 8, "BW": 128})
print("compiled", count)
"""


def test_kernels_compile_for_sm90_without_a_gpu():
    """The real Triton compiler (not the interpreter) accepts every kernel variant, down to sm_90 cubin.

    The interpreter runs the kernels as Python and misses what only the
    compiler checks (types, layouts, constexpr rules); this compiles them all
    ahead of time for an H100 target in a subprocess without TRITON_INTERPRET.
    """
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = env.get("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "spark_ext_triton_aot"))
    done = subprocess.run([sys.executable, "-c", AOT_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "compiled 29" in done.stdout, done.stdout


# --------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize(
    "shape,grid", [((4, 3, 128, 96), (8, 8)), ((2, 3, 67, 129), (5, 7)), ((2, 3, 64, 64), (64, 64)), ((16, 3, 64, 80), (1, 1))]
)
def test_cuda_matrix(shape, grid, kind, layout, dtype):
    S, T, Y = images(shape, dtype=dtype, layout=layout, device="cuda")
    s = S.detach().requires_grad_()
    sig, kd = triton_signals(s, T, Y, grid, kind)
    sig64, kd_same, kd64 = ref_forward(S.detach(), T, Y, grid, kind)
    check_signals(sig, sig64)
    check(kd, kd_same, kd64, "cell_kd")
    G = torch.randn(shape[0], 1, *grid, device="cuda")
    (ds,) = torch.autograd.grad(kd, s, G)
    (rs, _), (rs64, _) = ref_grads(S, T, G, grid, kind, dtype)
    check(ds, rs, rs64, "dS")
    sig2, kd2 = triton_signals(s, T, Y, grid, kind)
    assert torch.equal(sig, sig2) and torch.equal(kd, kd2)


@pytest.mark.cuda
@pytest.mark.parametrize("grid", [(1, 1), (2, 1)])
def test_cuda_variance_big_cells(grid):
    """Cells of 2^20 pixels (and 2^19) on the GPU launch configuration (row-band splits)."""
    Y = 1000 + 0.01 * torch.randn(2, 3, 1024, 1024, device="cuda")
    S = Y + 0.1 * torch.randn_like(Y)
    sig, _ = triton_signals(S, Y, Y, grid, "l1")
    sig64, _, _ = ref_forward(S, Y, Y, grid, "l1")
    check_signals(sig, sig64)


@pytest.mark.cuda
def test_cuda_compile_inductor():
    S, T, Y = images((2, 3, 64, 64), device="cuda")

    def step(s, t, y):
        sig, kd = spark_ext.difficulty_signals(s, t, y, (8, 8), "charbonnier", backend="triton")
        return kd.square().sum() + sig.sum()

    compiled = torch.compile(step, fullgraph=True)
    results = []
    for fn in (compiled, step):
        s = S.clone().requires_grad_()
        loss = fn(s, T, Y)
        loss.backward()
        results.append((loss.detach(), s.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
