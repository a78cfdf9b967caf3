"""Triton backend of ``difficulty_signals`` (docs/spec.md §2): its own checks.

The checks every backend passes (forward and gradients against the reference
over shapes, grids, layouts and dtypes; opcheck; torch.compile) run for this
backend in tests/ops/test_difficulty.py; here: launch configurations,
determinism, 64-bit offsets, bfloat16 rounding, dispatch, the sm_90
ahead-of-time compile, and the CUDA tests.

Without a GPU every kernel runs under Triton's interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small. The oracle is
:func:`spark_ext.reference.difficulty_signals` run in float64 on the same
input values (the reference itself is checked against explicit loops in
tests/ops/test_reference.py). Tolerances:

* signals: docs/spec.md §2's 1e-4 relative + 1e-6 absolute;
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

from kd_helpers import KINDS, check, check_signals, gpu_like, images, ref_forward, ref_grads  # noqa: E402, F401  (gpu_like: fixture)

# --------------------------------------------------------------------------
# helpers (shared ones in tests/kd_helpers.py)
# --------------------------------------------------------------------------


def triton_signals(S, T, Y, grid, kind):
    return spark_ext.difficulty_signals(S, T, Y, grid, kind, backend="triton")


# --------------------------------------------------------------------------
# launch configurations
# --------------------------------------------------------------------------


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
        sig, kd = k.difficulty_signals(S, T, Y, grid, "l2", config=config)
        check_signals(sig, sig64)
        check(kd, kd_same, kd64, f"cell_kd {config}")
        kd_only = k.cell_kd(S, T, grid, "l2", config=config)
        assert torch.equal(kd_only, kd), config  # same arithmetic with and without signals


# --------------------------------------------------------------------------
# determinism, 64-bit offsets
# --------------------------------------------------------------------------


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
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            3.4028234e38,
            -3.4028234e38,
            3.3961e38,
            1e-45,
            -1e-40,
            1.00390625,
            1.01171875,
        ]
    )
    x = torch.cat([bits.view(torch.float32), specials, torch.randn(1000)])
    x = torch.cat([x, (x.view(torch.int32) & ~0xFFFF | 0x8000).view(torch.float32)])  # exact ties
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _to_bf16_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096)
    want = x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


# --------------------------------------------------------------------------
# dispatch, ahead-of-time compilation
# --------------------------------------------------------------------------


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
      "kd_ptr": "*fp32", "part_ptr": "*fp32"},
      {"KIND": 0, "SIGNALS": True, "DIRECT": False, "NC": 4, "BH": 4, "BW": 16},
      i64=("ssb", "stb", "syb", "NCELLS"))
MERGE_PTRS = {"part_ptr": "*fp32", "sig_ptr": "*fp32", "kd_ptr": "*fp32"}
build(D._difficulty_merge_kernel, MERGE_PTRS, {"SIGNALS": True, "BLOCK": 256})
build(D._difficulty_merge_kernel, MERGE_PTRS, {"SIGNALS": False, "BLOCK": 256})
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
    "shape,grid",
    [((4, 3, 128, 96), (8, 8)), ((2, 3, 67, 129), (5, 7)), ((2, 3, 64, 64), (64, 64)), ((16, 3, 64, 80), (1, 1))],
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
