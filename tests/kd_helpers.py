"""Helpers shared by the backend tests of ``difficulty_signals`` and ``fused_weighted_kd``.

Used by tests/ops/test_difficulty.py and tests/ops/test_weighted_kd.py
(the checks every backend passes, parametrised over the backend) and by the
backend-specific tests/ops/test_difficulty_triton.py and tests/ops/test_weighted_kd_triton.py
(Triton) and tests/ops/test_difficulty_cpp.py and tests/ops/test_weighted_kd_cpp.py
(C++). The oracle is :mod:`spark_ext.reference` run in float64 on the
same input values. Tolerances:

* signals: docs/spec.md §2's 1e-4 relative + 1e-6 absolute;
* ``cell_kd``, losses and gradients: twice the error the reference makes in
  the input's own dtype (vs float64), plus four ulps of the output dtype at
  the result's scale.
"""

import functools

import pytest
import torch

import spark_ext
from spark_ext import reference

KINDS = ["l1", "l2", "charbonnier"]

# --------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------

BACKENDS = ("triton", "cpp")


@functools.cache
def backend_unavailable(backend):
    """Why ``backend``'s tests cannot run here, or None."""
    if backend == "triton":
        try:
            import triton  # noqa: F401  (without a GPU: its interpreter, TRITON_INTERPRET set by conftest)
        except ImportError as e:
            return f"triton is not importable ({e}): the Triton backend's tests need it"
        return None
    if backend == "cpp":
        from spark_ext import _extension

        why = _extension.cpp_unavailable()
        return None if why is None else f"C++ library unavailable: {why}"
    raise ValueError(backend)


def _marks(backend):
    why = backend_unavailable(backend)
    return [pytest.mark.skip(reason=why)] if why else []


# ``@pytest.mark.parametrize("backend", BACKEND_PARAMS)``: one test per backend,
# skipped with the reason where unavailable.
BACKEND_PARAMS = [pytest.param(b, marks=_marks(b), id=b) for b in BACKENDS]


def per_backend(argnames, cases):
    """``parametrize`` arguments for ``"backend," + argnames`` from ``{backend: [case tuple, ...]}``.

    For checks whose case list differs between the backends; ids start with the backend.
    """
    params = []
    for b in BACKENDS:
        for case in cases[b]:
            params.append(pytest.param(b, *case, marks=_marks(b), id="-".join([b, *map(str, case)])))
    return pytest.mark.parametrize("backend," + argnames, params)


def signals_fn(backend):
    """``difficulty_signals(S, T, Y, grid, kind)`` on ``backend``."""
    return functools.partial(spark_ext.difficulty_signals, backend=backend)


def weighted_kd_fn(backend):
    """``fused_weighted_kd(S, T, w, kind, reduction)`` on ``backend``."""

    def fn(S, T, w, kind, reduction):
        return spark_ext.fused_weighted_kd(S, T, w, kd_loss=kind, reduction=reduction, backend=backend)

    return fn


@pytest.fixture
def gpu_like(monkeypatch):
    """Triton launch configuration as on a GPU (small tiles, row-band splits, merge kernel).

    Under the interpreter the launchers pick one big tile and never split a
    cell; this fixture makes them pick 256-pixel tiles and aim for 64
    programs, so the multi-tile Chan merge, the split partials and the merge
    kernel all run. (Import it into a test module to use it.)
    """
    from spark_ext.kernels import difficulty as kd_kernels
    from spark_ext.kernels import weighted_kd as wkd_kernels

    for mod in (kd_kernels, wkd_kernels):
        monkeypatch.setattr(mod, "tile_pixels", lambda device, gpu=1024: 256)
        monkeypatch.setattr(mod, "target_programs", lambda device: 64)


def images(shape, dtype=torch.float32, layout="contiguous", n=3, device=None):
    """``n`` random ``[B, C, H, W]`` tensors in the given memory layout (``device=None``: torch's default device)."""
    B, C, H, W = shape
    out = []
    for _ in range(n):
        if layout == "contiguous":
            x = torch.randn(shape, device=device)
        elif layout == "channels_last":
            x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
        elif layout == "sliced":  # non-dense view: offset, step-2 columns, a sliced channel
            x = torch.randn(B, C + 1, H + 2, 2 * W + 1, device=device)[:, 1:, 1 : H + 1, 1::2]
        else:
            raise ValueError(layout)
        out.append(x.to(dtype) if dtype != torch.float32 else x)
    return out


def check(got, ref_same, ref64, what):
    """``got`` within twice the same-dtype reference's own error (vs float64) + 4 ulps."""
    got64, ref64 = got.double(), ref64.double()
    err = (got64 - ref64).abs().max().item() if got.numel() else 0.0
    ref_err = (ref_same.double() - ref64).abs().max().item() if got.numel() else 0.0
    scale = ref64.abs().max().item() if got.numel() else 0.0
    allowed = 2 * ref_err + 4 * torch.finfo(got.dtype).eps * scale + 1e-30
    assert err <= allowed, f"{what}: max error {err:.3g} > allowed {allowed:.3g} (reference's own {ref_err:.3g})"


# --------------------------------------------------------------------------
# difficulty_signals (docs/spec.md §2)
# --------------------------------------------------------------------------


def check_signals(sig, ref64):
    torch.testing.assert_close(sig.double(), ref64.double(), rtol=1e-4, atol=1e-6)


def ref_forward(S, T, Y, grid, kind):
    """(signals64, cell_kd in the reference's own precision, cell_kd64)."""
    sig64, kd64 = reference.difficulty_signals(S.double(), T.double(), Y.double(), grid, kind)
    _, kd_same = reference.difficulty_signals(S, T, Y, grid, kind)
    return sig64, kd_same, kd64


def ref_grads(S, T, G, grid, kind, dtype):
    """Reference ``(dS, dT)`` of ``sum(G * cell_kd)`` in ``dtype`` and in float64."""
    out = []
    for dt in (dtype, torch.float64):
        s = S.detach().to(dt).requires_grad_()
        t = T.detach().to(dt).requires_grad_()
        _, kd = reference.difficulty_signals(s, t, s.detach(), grid, kind)
        out.append(torch.autograd.grad(kd, (s, t), G.to(kd.dtype)))
    return out


# --------------------------------------------------------------------------
# fused_weighted_kd (docs/spec.md §3)
# --------------------------------------------------------------------------


def run(fn, S, T, w, kind, reduction, g, need=(True, True, True)):
    """Loss and the gradients of ``g * loss`` w.r.t. the inputs flagged in ``need``."""
    leaves = []
    args = []
    for x, n in zip((S, T, w), need):
        if x is None:
            args.append(None)
            continue
        x = x.detach().requires_grad_(n)  # detach keeps strides
        args.append(x)
        if n:
            leaves.append(x)
    loss = fn(*args, kind, reduction)
    grads = torch.autograd.grad(loss, leaves, g) if leaves else ()
    return loss, grads


def ref_fn(S, T, w, kind, reduction):
    return reference.fused_weighted_kd(S, T, w, kd_loss=kind, reduction=reduction)


def compare(fn, S, T, w, kind, reduction, need=(True, True, True), g=None):
    """``fn`` vs the reference (same dtype and float64): loss and every requested gradient."""
    g = torch.randn((), device=S.device) if g is None else g  # grad_output != 1
    need = tuple(n and x is not None for n, x in zip(need, (S, T, w)))
    loss, grads = run(fn, S, T, w, kind, reduction, g, need)
    rloss, rgrads = run(ref_fn, S, T, w, kind, reduction, g, need)
    up = lambda x: None if x is None else x.detach().double()  # noqa: E731
    rloss64, rgrads64 = run(ref_fn, up(S), up(T), up(w), kind, reduction, g.double(), need)
    assert loss.dtype == torch.float32 and loss.shape == ()
    check(loss, rloss, rloss64, "loss")
    for name, got, want, want64 in zip(("dS", "dT", "dweight"), grads, rgrads, rgrads64):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        check(got, want, want64, name)
    return loss, grads
