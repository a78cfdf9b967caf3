"""LSQ / LSQ+ fake quantization (docs/spec.md §5b): compiled backends against the reference.

The reference (spark_ext.reference, checked against an independent autograd
formulation in test_reference.py) is the oracle. The compiled kernels compute
the same float32 formulas, so forward outputs and input gradients must be
*bitwise* equal to it for every dtype; step/offset gradients are reductions
and agree up to summation order (tolerance scaled by the sum of |terms|).
"""

from __future__ import annotations

import math

import pytest
import torch
from cpu_isa import assert_same_bits_on_every_cpu_isa
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense

import spark_ext
from spark_ext import _extension, reference

from grad_layouts import GRAD_SHAPE, grad_layouts

LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(scope="module", autouse=True)
def _library():
    _extension.load()  # a build or load failure fails these tests (it must work in CI)


def run(x, step, offset, dy, backend, **kw):
    """(y, dx, dstep, doffset) of lsq_fake_quant on fresh leaves."""
    # detach() (not clone()) keeps x's exact strides, gaps included
    leaves = [t.detach().requires_grad_() for t in (x, step) + ((offset,) if offset is not None else ())]
    x_, s_ = leaves[:2]
    o_ = leaves[2] if offset is not None else None
    y = spark_ext.lsq_fake_quant(x_, s_, o_, backend=backend, **kw)
    grads = torch.autograd.grad(y, leaves, dy)
    return (y,) + tuple(grads) + ((None,) if offset is None else ())


def grad_tol(x, dy, step):
    """Summation-order tolerance for a step/offset gradient: a few ulps of sum |dy| * (Qp + |x|/step)."""
    scale = (dy.float().abs() * (x.float().abs() / step.float().min() + 1)).sum().item()
    return 1e-6 * scale + 1e-6


def check(x, step, offset, dy, *, dtype_tol=None, **kw):
    want = run(x, step, offset, dy, "reference", **kw)
    got = run(x, step, offset, dy, "cpp", **kw)
    assert got[0].dtype == x.dtype and got[0].shape == x.shape
    assert torch.equal(got[0], want[0]), "forward must be bitwise equal to the reference"
    assert torch.equal(got[1], want[1]), "dx must be bitwise equal to the reference"
    tol = grad_tol(x, dy, step)
    for g, w in zip(got[2:], want[2:]):
        if w is None:
            assert g is None
            continue
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g.float(), w.float(), rtol=dtype_tol or 1e-5, atol=tol)
    return got, want


def planted(shape, step, qn, qp, dtype=torch.float32, seed=0):
    """Random values over the range and beyond, with exact ties (k + 0.5) * step and the clamp bounds."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=gen) * (qn + qp + 6) - qn - 3) * step
    flat = x.view(-1)
    k = torch.randint(-qn - 2, qp + 2, (flat.numel() // 4,), generator=gen).float()
    flat[: k.numel()] = (k + 0.5) * step
    flat[-1], flat[-2] = -qn * step, qp * step
    return x.to(dtype)


@pytest.mark.parametrize(
    "bits,signed", [(2, True), (2, False), (4, True), (4, False), (8, True), (8, False), (16, True)]
)
@pytest.mark.parametrize("grad_scale", ["lsq", 0.37, None])
def test_per_tensor_matches_reference(bits, signed, grad_scale):
    qn, qp = reference.lsq_range(bits, signed)
    step = torch.tensor([0.0625]) if bits < 16 else torch.tensor([2.0**-12])
    x = planted((3, 7, 11), step.item(), qn, qp)
    dy = torch.randn_like(x) * 3
    check(x, step, None, dy, bits=bits, signed=signed, grad_scale=grad_scale)
    offset = torch.tensor([-0.3125])  # LSQ+; exact in fp32
    check(x, step, offset, dy, bits=bits, signed=signed, grad_scale=grad_scale)


@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1])
@pytest.mark.parametrize("with_offset", [False, True])
def test_per_channel_matches_reference(axis, with_offset):
    x = torch.randn(4, 6, 5, 7) * 2
    n = x.shape[axis]
    step = torch.rand(n) * 0.3 + 0.05
    offset = torch.randn(n) * 0.2 if with_offset else None
    # exact ties on every channel (no offset: then (k + 0.5) * step is an exact tie)
    if not with_offset:
        xt = x.movedim(axis, 0)
        xt[:, 0, 0, 0] = 2.5 * step
        xt[:, 1, 0, 0] = -3.5 * step
    dy = torch.randn_like(x)
    check(x, step, offset, dy, bits=4, signed=True, axis=axis, grad_scale=0.5)
    check(x, step, offset, dy, bits=3, signed=False, axis=axis, grad_scale="lsq")


@pytest.mark.parametrize(
    "shape,axis",
    [
        ((70001,), None),  # several fixed-size chunks plus a ragged tail
        ((3, 40000), 0),  # rows longer than one chunk
        ((2, 3, 5000), 1),  # row mode, inner >= 64 (NCHW activations)
        ((4096, 3), 1),  # period mode, narrow: C * inner < 256 (last axis)
        ((37, 2, 300), 1),  # period mode, wide: C * inner > 256
        ((5, 20000), 1),  # period mode, several column blocks (C > chunk)
        ((1, 1, 1, 1), None),
        ((1, 5), 1),
    ],
)
def test_shapes_cover_every_kernel_path(shape, axis):
    x = torch.randn(shape) * 3
    n = 1 if axis is None else shape[axis]
    step = torch.rand(n) * 0.5 + 0.1
    offset = torch.randn(n) * 0.1
    dy = torch.randn_like(x)
    check(x, step, offset, dy, bits=4, signed=False, axis=axis)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("axis", [None, 1])
def test_low_precision(dtype, axis):
    x32 = torch.randn(3, 8, 9, 5) * 2
    x = x32.to(dtype)
    n = 1 if axis is None else x.shape[axis]
    step = torch.rand(n) * 0.2 + 0.1
    offset = torch.randn(n) * 0.1
    dy = torch.randn_like(x)
    got, _ = check(x, step, offset, dy, bits=4, signed=True, axis=axis)
    # Same math as float32 on the upcast input: within the dtype's rounding of the result.
    y32 = reference.lsq_fake_quant(x.float(), step, offset, bits=4, signed=True, axis=axis)
    torch.testing.assert_close(got[0].float(), y32, rtol=torch.finfo(dtype).eps, atol=0)
    # step/offset gradients in their own dtype (here float32) also for low-precision x
    assert got[2].dtype == torch.float32
    s16 = step.to(dtype)
    got16 = run(x, s16, offset.to(dtype), dy, "cpp", bits=4, signed=True, axis=axis)
    assert got16[2].dtype == dtype and got16[3].dtype == dtype


def test_offset_gradient_has_the_offsets_dtype_and_shape():
    """docs/spec.md §5: step and offset gradients each in their own dtype, also from the raw op (no autograd cast)."""
    x = torch.randn(4, 5) * 3
    step, offset = torch.tensor([0.25]), torch.tensor(0.1, dtype=torch.float16)  # 1-D float32, 0-D float16
    dy = torch.randn_like(x)
    bwd = torch.ops.spark_ext.lsq_fake_quant_backward
    _, dstep, doffset = bwd(dy, x, step, offset, None, 8, 7, 1.0)
    assert dstep.dtype == torch.float32 and dstep.shape == (1,)
    assert doffset.dtype == torch.float16 and doffset.shape == ()
    _, empty_dstep, empty_doffset = bwd(torch.empty(0, 5), torch.empty(0, 5), step, offset, None, 8, 7, 1.0)
    assert empty_doffset.dtype == torch.float16 and empty_doffset.shape == ()
    want = run(x, step, offset, dy, "reference", bits=4, signed=True, grad_scale=None)
    # one float16 rounding of float32 sums that differ only in summation order: at most one ulp apart
    torch.testing.assert_close(doffset, want[3], rtol=torch.finfo(torch.float16).eps, atol=0)
    torch.library.opcheck(bwd.default, (dy, x, step, offset, None, 8, 7, 1.0))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced", "expanded_grad"])
@pytest.mark.parametrize("axis", [None, 1])
def test_layouts(layout, axis):
    base = torch.randn(2, 6, 5, 7)
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed":
        x = base.transpose(2, 3)
    elif layout == "sliced":
        x = torch.randn(2, 6, 5, 14)[..., ::2]
    else:
        x = base
    n = 1 if axis is None else x.shape[axis]
    step, offset = torch.rand(n) * 0.3 + 0.1, torch.randn(n) * 0.1
    dy = torch.ones(()).expand(x.shape) if layout == "expanded_grad" else torch.randn(x.shape)
    got, _ = check(x, step, offset, dy, bits=4, signed=True, axis=axis)
    if is_non_overlapping_and_dense(x):
        assert got[0].stride() == x.stride() and got[1].stride() == x.stride()


def test_empty_input():
    for shape, axis in (((0, 4), None), ((0, 4), 1), ((3, 0, 2), 0)):
        x = torch.empty(shape)
        n = 1 if axis is None else shape[axis]
        step = torch.full((n,), 0.1)
        got, _ = check(x, step, torch.zeros(n), torch.empty(shape), bits=4, signed=True, axis=axis)
        assert got[0].shape == shape and torch.all(got[2] == 0)


def test_tiny_step_is_clamped_in_the_kernel():
    x = torch.tensor([1e-9, 3e-8, -2e-8, 5.0])
    step = torch.tensor([1e-12])
    check(x, step, None, torch.ones(4), bits=8, signed=True)


def test_deterministic_whatever_the_thread_count():
    x = torch.randn(3, 64, 33, 17)
    step, offset = torch.rand(64) * 0.2 + 0.05, torch.randn(64) * 0.1
    dy = torch.randn_like(x)
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (threads, 1, threads):
            torch.set_num_threads(n_threads)
            for axis in (None, 1, 3):
                s, o = (
                    (step, offset)
                    if axis == 1
                    else (step[:1], offset[:1])
                    if axis is None
                    else (step[:17], offset[:17])
                )
                results.append((n_threads, axis, run(x, s, o, dy, "cpp", bits=4, signed=True, axis=axis)))
    finally:
        torch.set_num_threads(threads)
    by_axis = {}
    for _, axis, res in results:
        by_axis.setdefault(axis, []).append(res)
    for runs in by_axis.values():
        for other in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


def test_lsq_grad_scale_uses_elements_per_step():
    x = torch.randn(4, 6)
    step = torch.rand(6) + 0.1
    dy = torch.randn_like(x)
    plain = run(x, step, None, dy, "cpp", bits=4, signed=True, axis=1, grad_scale=None)
    lsq = run(x, step, None, dy, "cpp", bits=4, signed=True, axis=1, grad_scale="lsq")
    torch.testing.assert_close(lsq[2], plain[2] / math.sqrt(4 * 7))


def test_direct_op_rejects_bad_arguments():
    op = torch.ops.spark_ext.lsq_fake_quant
    x = torch.randn(4, 5)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        op(x.int(), torch.ones(1), None, None, 8, 7, 1.0)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        op(x.double(), torch.ones(1), None, None, 8, 7, 1.0)
    with pytest.raises(ValueError, match="parameters must hold 5 values"):
        op(x, torch.ones(4), None, 1, 8, 7, 1.0)
    with pytest.raises(ValueError, match="axis must be in"):
        op(x, torch.ones(5), None, 2, 8, 7, 1.0)
    with pytest.raises(ValueError, match="quant_min"):
        op(x, torch.ones(1), None, None, 2**22, 7, 1.0)


@pytest.mark.parametrize("with_offset", [False, True])
def test_double_backward_is_refused_on_cpp_and_torch_func_grad_works(with_offset):
    x = torch.randn(4, 6) * 2
    step = torch.full((6,), 0.3)
    offset = torch.full((6,), 0.1) if with_offset else None
    c = torch.linspace(0.5, 1.5, 24).reshape(4, 6)

    def loss(backend):
        return lambda x, step: (
            spark_ext.lsq_fake_quant(x, step, offset, bits=4, signed=True, axis=1, backend=backend) * c
        ).sum()

    w = x.clone().requires_grad_()
    (gw,) = torch.autograd.grad(loss("cpp")(w, step), w, create_graph=True)
    with pytest.raises(RuntimeError, match="lsq_fake_quant has no second derivative"):
        torch.autograd.grad((gw * w).sum(), w)
    w = x.clone().requires_grad_()
    (gw,) = torch.autograd.grad(loss("reference")(w, step), w, create_graph=True)
    (g,) = torch.autograd.grad((gw * w).sum(), w)
    assert torch.equal(g, gw.detach())
    for backend in ("cpp", "reference"):
        got = torch.func.grad(loss(backend), argnums=(0, 1))(x, step)
        leaves = [x.clone().requires_grad_(), step.clone().requires_grad_()]
        assert all(torch.equal(a, b) for a, b in zip(got, torch.autograd.grad(loss(backend)(*leaves), leaves)))


def test_float64_falls_back_to_the_reference():
    x = torch.randn(3, 4, dtype=torch.float64)
    y = spark_ext.lsq_fake_quant(x, torch.tensor([0.1], dtype=torch.float64), bits=4, signed=True)
    assert y.dtype == torch.float64
    with pytest.raises(spark_ext.BackendUnavailableError, match="float64"):
        spark_ext.lsq_fake_quant(x, torch.tensor([0.1]), bits=4, signed=True, backend="cpp")


def test_opcheck():
    x = torch.randn(2, 3, 5, 4)
    step, offset = torch.rand(3) + 0.1, torch.randn(3) * 0.1
    fwd = torch.ops.spark_ext.lsq_fake_quant.default
    bwd = torch.ops.spark_ext.lsq_fake_quant_backward.default
    for args in (
        (x.requires_grad_(), step.requires_grad_(), offset.requires_grad_(), 1, 8, 7, 0.3),
        (x, step[:1], None, None, 0, 15, 1.0),
        (x.contiguous(memory_format=torch.channels_last), step, None, 1, 2, 1, 0.5),
    ):
        torch.library.opcheck(fwd, args)
    dy = torch.randn(2, 3, 5, 4)
    # the backward op is not differentiable itself (no double backward): plain inputs
    torch.library.opcheck(bwd, (dy, x.detach(), step.detach(), offset.detach(), 1, 8, 7, 0.3))
    torch.library.opcheck(bwd, (dy, x.detach(), step[:1].detach(), None, None, 8, 7, 0.3))


def test_compile_fullgraph_forward_and_backward():
    x = torch.randn(2, 4, 6, 5, requires_grad=True)
    step = (torch.rand(4) * 0.2 + 0.1).requires_grad_()
    offset = (torch.randn(4) * 0.1).requires_grad_()

    def f(x, step, offset):
        y = spark_ext.lsq_fake_quant(x, step, offset, bits=4, signed=True, axis=1, backend="cpp")
        return (y * y).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(x, step, offset)
    g_got = torch.autograd.grad(got, (x, step, offset))
    want = f(x, step, offset)
    g_want = torch.autograd.grad(want, (x, step, offset))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- CUDA


def cuda_check(x, step, offset, dy, **kw):
    dev = torch.device("cuda")
    cpu = run(x, step, offset, dy, "reference", **kw)
    got = run(
        x.to(dev),
        step.to(dev),
        None if offset is None else offset.to(dev),
        dy.to(dev),
        "cuda",
        **kw,
    )
    assert torch.equal(got[0].cpu(), cpu[0]) and torch.equal(got[1].cpu(), cpu[1])
    tol = grad_tol(x, dy, step)
    for g, w in zip(got[2:], cpu[2:]):
        if w is not None:
            torch.testing.assert_close(g.cpu().float(), w.float(), rtol=1e-5, atol=tol)
    return got


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", (torch.float32,) + LOW)
@pytest.mark.parametrize(
    "shape,axis",
    [
        ((3, 7, 11), None),
        ((70001,), None),
        ((4, 6, 5, 7), 0),
        ((4, 6, 5, 7), 1),
        ((4, 6, 5, 7), 3),
        ((3, 40000), 0),
        ((5, 20000), 1),
        ((37, 2, 300), 1),
        ((0, 4), 1),
    ],
)
def test_cuda_matches_reference(dtype, shape, axis):
    x = (torch.randn(shape) * 3).to(dtype)
    n = 1 if axis is None else shape[axis]
    step, offset = torch.rand(n) * 0.3 + 0.05, torch.randn(n) * 0.1
    dy = torch.randn(shape).to(dtype)
    for bits, signed in ((2, True), (4, False), (8, True)):
        cuda_check(x, step, offset, dy, bits=bits, signed=signed, axis=axis)
        cuda_check(x, step, None, dy, bits=bits, signed=signed, axis=axis, grad_scale=None)


@pytest.mark.cuda
def test_cuda_layouts_determinism_and_compile():
    x = torch.randn(2, 6, 5, 7).contiguous(memory_format=torch.channels_last)
    step, offset = torch.rand(6) * 0.3 + 0.1, torch.randn(6) * 0.1
    dy = torch.randn(2, 6, 5, 7)
    a = cuda_check(x, step, offset, dy, bits=4, signed=True, axis=1)
    b = cuda_check(x, step, offset, dy, bits=4, signed=True, axis=1)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert a[0].stride() == x.stride()
    cuda_check(x[..., ::2], step, offset, dy[..., ::2], bits=4, signed=True, axis=1)
    xc = x.cuda().requires_grad_()
    f = torch.compile(lambda t, s: spark_ext.lsq_fake_quant(t, s, bits=4, signed=True, axis=1).sum(), fullgraph=True)
    f(xc, step.cuda().requires_grad_()).backward()
    args = (xc.detach(), step.cuda(), offset.cuda(), 1, 8, 7, 0.3)
    torch.library.opcheck(torch.ops.spark_ext.lsq_fake_quant.default, args)


@pytest.mark.cuda
@pytest.mark.slow
def test_cuda_more_than_2_31_elements():
    free, _ = torch.cuda.mem_get_info()
    n = 2**31 + 1001
    if free < n * 2 * 4 + (1 << 30):  # x, dy and dx in bf16 plus partials
        pytest.skip("not enough GPU memory")
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda").uniform_(-3, 3)
    step = torch.tensor([0.25], device="cuda")
    y = torch.ops.spark_ext.lsq_fake_quant(x, step, None, None, 8, 7, 1.0)
    tail = slice(n - 4096, n)
    want = reference.lsq_fake_quant(x[tail].cpu(), step.cpu(), bits=4, signed=True)
    assert torch.equal(y[tail].cpu(), want)
    del y
    dx, dstep, _ = torch.ops.spark_ext.lsq_fake_quant_backward(torch.ones_like(x), x, step, None, None, 8, 7, 1.0)
    xf = x[tail].float()
    assert torch.equal(dx[tail], ((xf >= -2.0) & (xf <= 1.75)).to(torch.bfloat16))
    want_step = torch.zeros((), dtype=torch.float64, device="cuda")
    for i in range(0, n, 2**28):  # float64 sum of the step terms, chunk by chunk
        v = x[i : i + 2**28].double() / 0.25
        q = v.clamp(-8, 7).round()
        want_step += torch.where((v >= -8) & (v <= 7), q - v, torch.where(v < -8, -8.0, 7.0)).sum()
    torch.testing.assert_close(dstep.double().reshape(()), want_step, rtol=1e-4, atol=1e-2 * math.sqrt(n))


def test_every_cpu_isa_gives_the_same_bits(tmp_path):
    """The default, AVX2 and AVX-512 builds of the CPU loops compute identical bits (both op families)."""
    body = """
for dt in (torch.float32, torch.float16, torch.bfloat16):
    x = (torch.randn(3, 40, 7, 33, generator=gen) * 2).to(dt)
    dy = torch.randn(3, 40, 7, 33, generator=gen).to(dt)
    for axis in (None, 1, 3):
        n = 1 if axis is None else x.shape[axis]
        s = torch.rand(n, generator=gen) * 0.3 + 0.05
        o = torch.randn(n, generator=gen) * 0.2
        key = (str(dt), axis)
        out[key + ("lsq",)] = (torch.ops.spark_ext.lsq_fake_quant(x, s, o, axis, 8, 7, 0.1),
                               torch.ops.spark_ext.lsq_fake_quant_backward(dy, x, s, o, axis, 8, 7, 0.1))
        out[key + ("fq",)] = (torch.ops.spark_ext.fake_quantize_learnable(x, s, o * 10, axis, -8, 7, 0.7),
                              torch.ops.spark_ext.fake_quantize_learnable_backward(dy, x, s, o * 10, axis, -8, 7, 0.7))
"""
    assert_same_bits_on_every_cpu_isa(body, tmp_path)


@pytest.mark.parametrize("case", range(len(grad_layouts(GRAD_SHAPE))))
@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("x_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_of_any_layout_is_read_in_place(case, axis, x_layout, dtype):
    name, dy = grad_layouts(GRAD_SHAPE, dtype)[case]
    x = (torch.randn(GRAD_SHAPE) * 2).to(dtype)
    if x_layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    n = 1 if axis is None else x.shape[axis]
    step, offset = torch.rand(n) * 0.3 + 0.1, torch.randn(n) * 0.1
    got, _ = check(x, step, offset, dy, bits=4, signed=True, axis=axis)
    dense = run(x, step, offset, torch.empty_like(x).copy_(dy), "cpp", bits=4, signed=True, axis=axis)
    for a, b in zip(got, dense):
        assert torch.equal(a, b), f"{name}: results must not depend on the gradient's layout"


def test_backward_makes_no_copy_of_a_broadcast_gradient():
    x = torch.randn(GRAD_SHAPE)
    step, offset = torch.tensor([0.2]), torch.tensor([0.01])
    for dy in (torch.ones(()).expand(x.shape), torch.randn(1, 6, 40, 70).expand(x.shape)):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            torch.ops.spark_ext.lsq_fake_quant_backward(dy, x, step, offset, None, 8, 7, 1.0)
        copies = [
            e
            for e in prof.events()
            if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")
            and list(x.shape) in [list(s) for s in e.input_shapes]
        ]
        assert not copies, [(e.name, e.input_shapes) for e in copies]
