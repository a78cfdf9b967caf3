"""Non-finite and degenerate inputs give the same answer on every backend.

NaN, inf and values whose squares overflow float32 must propagate to the
outputs they touch, and only to those: a cell holding one NaN pixel is NaN
(with the Laplacian, its neighbouring cells too), the other cells are not;
a NaN element of a fake-quantized tensor is NaN in its own output only.
Degenerate shapes (no channels, an empty batch) return what the reference
returns. The oracle is the reference, whose own confinement is checked
against explicit expectations here.
"""

import pytest
import torch

import spark_ext

from kd_helpers import BACKEND_PARAMS

ALL_BACKENDS = [pytest.param("reference", id="reference")] + BACKEND_PARAMS


def same_nonfinite_and_close(got, want, rtol=1e-4, atol=1e-5, exact_kind=True):
    """Same non-finite positions (with ``exact_kind``: the same NaN and inf, inf signs too); finite entries close.

    Without ``exact_kind`` a NaN may stand for an inf: an overflow in float32 can
    give inf - inf where the float64 oracle gives inf.
    """
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)), "non-finite positions differ"
    if exact_kind:
        assert torch.equal(got.isnan(), want.isnan()), "NaN positions differ"
        assert torch.equal(got[got.isinf()], want[want.isinf()]), "inf positions or signs differ"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=rtol, atol=atol)


def signals_and_grads(backend, s, t, y, grid, kind="l1"):
    s, t = s.detach().requires_grad_(), t.detach().requires_grad_()
    signals, cell_kd = spark_ext.difficulty_signals(s, t, y, grid, kind, backend=backend)
    g = torch.linspace(0.5, 1.5, cell_kd.numel()).reshape(cell_kd.shape)
    ds, dt = torch.autograd.grad(cell_kd, (s, t), g)
    return signals, cell_kd, ds, dt


# ---------------------------------------------------------- difficulty_signals


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_channels_return_like_the_reference(backend):
    # Triton used to read each cell's shift from the empty target: SIGSEGV.
    s, t, y = (torch.rand(2, 0, 4, 4) for _ in range(3))
    signals, cell_kd = spark_ext.difficulty_signals(s, t, y, (2, 2), backend=backend)
    assert signals.shape == (2, 4, 2, 2) and signals.dtype == torch.float32
    assert cell_kd.shape == (2, 1, 2, 2) and cell_kd.dtype == torch.float32
    assert torch.all(signals.isnan()), "means over no channels"
    assert torch.equal(cell_kd, torch.zeros_like(cell_kd)), "an empty sum"


@pytest.mark.parametrize("where", ["student", "target"])
def test_reference_confines_a_nan_pixel_to_its_cells(where):
    # One-hot sums spread NaN * 0 = NaN to every cell of the image.
    s, t, y = (torch.rand(2, 3, 8, 8) for _ in range(3))
    {"student": s, "target": y}[where][0, 1, 1, 1] = float("nan")  # cell (0, 0) of a 2x2 grid, with its neighbours
    signals, cell_kd = spark_ext.difficulty_signals(s, t, y, (2, 2), backend="reference")
    bad = ~torch.isfinite(signals[0])
    assert torch.all(torch.isfinite(signals[1])) and torch.all(torch.isfinite(cell_kd[1]))
    if where == "target":
        # lap_var: the pixel and its 4 neighbours, all in cell (0, 0); pix_var, recon_err: cell (0, 0).
        assert bad[:3].nonzero().tolist() == [[0, 0, 0], [1, 0, 0], [2, 0, 0]]
        assert not bad[3].any() and torch.all(torch.isfinite(cell_kd))
    else:
        # recon_err, kd_gap and cell_kd of cell (0, 0) only.
        assert bad.nonzero().tolist() == [[2, 0, 0], [3, 0, 0]]
        assert (~torch.isfinite(cell_kd[0, 0])).nonzero().tolist() == [[0, 0]]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e25])
@pytest.mark.parametrize("where", ["student", "teacher", "target"])
def test_non_finite_pixel_matches_the_reference(backend, value, where):
    # Triton reported a cell holding 1e25, inf or NaN as flat: variances 0.
    s, t, y = (torch.rand(2, 3, 9, 10) for _ in range(3))
    images = {"student": s, "teacher": t, "target": y}
    images[where][1, 2, 4, 0] = value  # on a cell border of a 3x4 grid, at the image's left edge
    images[where][0, 0, 8, 9] = value  # the bottom-right corner
    got = signals_and_grads(backend, s, t, y, (3, 4))
    want = signals_and_grads("reference", s.double(), t.double(), y.double(), (3, 4))
    want = [want[0].float(), want[1].float(), want[2].float(), want[3].float()]
    for g, w in zip(got, want):
        same_nonfinite_and_close(g, w)
    if where == "target":
        # The cells holding the value are not flat: their variances are not finite.
        assert not torch.isfinite(got[0][1, :2, 1, 0]).any() and not torch.isfinite(got[0][0, :2, 2, 3]).any()
        assert torch.isfinite(got[0][0, :2, 0, 0]).all()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_in_grid_kd_and_signals_is_confined_per_image(backend):
    s, t, y = (torch.rand(3, 2, 16, 16) for _ in range(3))
    s[1, 0, 5, 5] = float("nan")
    signals, cell_kd = spark_ext.difficulty_signals(s, t, y, (4, 4), backend=backend)
    assert torch.isfinite(signals[[0, 2]]).all() and torch.isfinite(cell_kd[[0, 2]]).all()
    assert (~torch.isfinite(cell_kd[1, 0])).nonzero().tolist() == [[1, 1]]


# ----------------------------------------------------------- fused_weighted_kd


def wkd_and_grads(backend, s, t, w, kind, reduction):
    leaves = [x.detach().requires_grad_() for x in (s, t, w)]
    loss = spark_ext.fused_weighted_kd(*leaves, kd_loss=kind, reduction=reduction, backend=backend)
    return (loss,) + torch.autograd.grad(loss * 0.7, leaves)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("wshape", [(7, 9), (2, 1, 7, 9), (1, 1, 3, 4)])
@pytest.mark.parametrize("kind", ["l1", "charbonnier"])
def test_weighted_kd_non_finite_gradients_match_the_reference(backend, wshape, kind):
    s, t = torch.rand(2, 3, 7, 9), torch.rand(2, 3, 7, 9)
    w = torch.rand(wshape)
    s[0, 1, 2, 3] = float("nan")
    t[1, 2, 6, 8] = float("inf")
    got = wkd_and_grads(backend, s, t, w, kind, "sum")
    want = [g.float() for g in wkd_and_grads("reference", s.double(), t.double(), w.double(), kind, "sum")]
    assert torch.isnan(got[0])
    for g, w_ in zip(got[1:], want[1:]):
        same_nonfinite_and_close(g, w_)
    if wshape != (1, 1, 3, 4):  # per pixel: only the two pixels' gradients can be non-finite
        bad = (~torch.isfinite(got[1]) | ~torch.isfinite(got[2])).nonzero().tolist()
        assert set(map(tuple, bad)) <= {(0, 1, 2, 3), (1, 2, 6, 8)}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("wshape", [(1, 1, 5, 6), (5, 6), (1, 3, 5, 6), (1, 1, 2, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch_gives_zero_gradients(backend, wshape, reduction):
    # Triton gave a NaN weight gradient for B = 0 with "mean".
    s, t, w = torch.rand(0, 3, 5, 6), torch.rand(0, 3, 5, 6), torch.rand(wshape)
    loss, ds, dt, dw = wkd_and_grads(backend, s, t, w, "l1", reduction)
    want = wkd_and_grads("reference", s, t, w, "l1", reduction)[0]
    if reduction == "sum":
        assert torch.equal(loss, want) and float(loss) == 0.0
    else:  # 0 / 0, like torch's own mean over no elements
        assert loss.isnan() and want.isnan()
    assert ds.shape == s.shape and dt.shape == t.shape
    assert torch.equal(dw, torch.zeros_like(w))


# ------------------------------------------------------------------ LSQ / LSQ+


@pytest.mark.parametrize("axis", [None, 1])
def test_lsq_non_finite_inputs_match_the_reference(axis):
    from spark_ext import _extension

    if _extension.cpp_unavailable():
        pytest.skip(f"C++ library unavailable: {_extension.cpp_unavailable()}")
    x = torch.randn(3, 4, 5)
    x[0, 1, 2], x[1, 2, 3], x[2, 3, 4] = float("nan"), float("inf"), -float("inf")
    n = 1 if axis is None else 4
    step, offset = torch.rand(n) * 0.2 + 0.05, torch.randn(n) * 0.1
    dy = torch.randn_like(x)
    results = {}
    for backend in ("cpp", "reference"):
        leaves = [v.detach().requires_grad_() for v in (x, step, offset)]
        y = spark_ext.lsq_fake_quant(*leaves, bits=4, signed=True, axis=axis, backend=backend)
        results[backend] = (y,) + torch.autograd.grad(y, leaves, dy)
    for g, w in zip(results["cpp"], results["reference"]):
        same_nonfinite_and_close(g, w, rtol=1e-5, atol=1e-5)
    y = results["reference"][0]
    assert y[0, 1, 2].isnan() and torch.isfinite(y[1, 2, 3]) and torch.isfinite(y[2, 3, 4])
    assert int(y.isnan().sum()) == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lsq_rejects_a_non_finite_offset(bad):
    # Validated before dispatch, so for every backend.
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="offset must be finite"):
        spark_ext.lsq_fake_quant(x, torch.tensor([0.1]), torch.tensor([bad]), bits=4, signed=True, backend="reference")
