"""LSQQuantizer: data-driven init, forward against float64, switches, state dicts, errors."""

import io
import math

import pytest
import torch

from spark_ext.quant import LSQQuantizer


def qrange(bits, signed):
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def per_channel(t, axis, ndim):
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def fq64(x, step, offset, bits, signed, axis):
    """Independent float64 LSQ fake quantization: round_half_even(clamp((x-o)/s)) * s + o."""
    qn, qp = qrange(bits, signed)
    x = x.double()
    s = step.double()
    o = torch.zeros_like(s) if offset is None else offset.double()
    if axis is not None:
        s, o = per_channel(s, axis, x.dim()), per_channel(o, axis, x.dim())
    else:
        s, o = s.reshape(()), o.reshape(())
    return torch.round(((x - o) / s).clamp(-qn, qp)) * s + o


def rows64(x, axis):
    x = x.double()
    return x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("axis", [None, 0, 1, -1])
def test_lsq_init_and_forward_match_float64(signed, axis):
    x = torch.randn(6, 5, 7) * 3
    q = LSQQuantizer(4, signed, per_channel_axis=axis)
    y = q(x)
    assert q.is_initialized and bool(q.initialized)
    _, qp = qrange(4, signed)
    a = None if axis is None else axis % 3
    expected = 2 * rows64(x, a).abs().mean(1) / math.sqrt(qp)
    torch.testing.assert_close(q.step.detach().double(), expected, rtol=1e-6, atol=0)
    assert q.step.shape == ((1,) if axis is None else (x.shape[axis],))
    ref = fq64(x, q.step.detach(), None, 4, signed, a)
    torch.testing.assert_close(y.double(), ref, rtol=0, atol=1e-5)
    assert y.dtype == x.dtype and y.shape == x.shape


@pytest.mark.parametrize("axis", [None, 1])
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_plus_init(axis, signed):
    x = torch.rand(4, 3, 5) * 2 + 0.5  # all positive: offset matters
    q = LSQQuantizer(3, signed, per_channel_axis=axis, learn_offset=True)
    y = q(x)
    qn, qp = qrange(3, signed)
    lo, hi = rows64(x, axis).aminmax(dim=1)
    step = (hi - lo) / (qp + qn)
    torch.testing.assert_close(q.step.detach().double(), step, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.offset.detach().double(), lo + qn * step, rtol=1e-6, atol=1e-7)
    # The grid spans [min, max] exactly: both ends are representable.
    torch.testing.assert_close(
        y.double(), fq64(x, q.step.detach(), q.offset.detach(), 3, signed, axis), rtol=0, atol=1e-5
    )
    assert set(q.state_dict()) == {"step", "offset", "initialized", "is_signed"}


def test_signed_none_decides_from_first_batch():
    pos = LSQQuantizer(4, None)
    assert pos.signed is None and "signed=None (auto)" in repr(pos)
    pos(torch.rand(10))
    assert pos.signed is False and int(pos.is_signed) == 0 and pos.qrange == (0, 15)
    pos(-torch.rand(10))  # decided once: later negatives do not change it
    assert pos.signed is False
    neg = LSQQuantizer(4, None)
    neg(torch.randn(10))
    assert neg.signed is True and int(neg.is_signed) == 1
    neg.reset()
    assert neg.signed is None and not neg.is_initialized


def test_switches_and_repr():
    x = torch.randn(3, 4)
    q = LSQQuantizer(4, True, per_channel_axis=1)
    q.enabled = False
    assert q(x) is x and not q.is_initialized  # disabled: identity, no init
    q.observe = True
    q(x)
    q(x * 2)
    both = torch.cat([x, x * 2])
    torch.testing.assert_close(q.running_min, both.amin(0))
    torch.testing.assert_close(q.running_max, both.amax(0))
    assert "running_min" not in q.state_dict()  # statistics are not state
    q.enabled = True
    q(x)
    text = repr(q)
    for part in ("bits=4", "signed=True", "per_channel_axis=1", "channels=4", "initialized=True", "observe=True"):
        assert part in text
    q.reset_observer()
    assert q.running_min is None


def test_gradients_reach_step_and_offset():
    x = (torch.randn(5, 6) * 2).requires_grad_()
    q = LSQQuantizer(3, True, per_channel_axis=0, learn_offset=True)
    y = q(x)
    y.backward(torch.randn_like(y))
    assert q.step.grad is not None and q.step.grad.shape == (5,) and q.step.grad.abs().sum() > 0
    assert q.offset.grad is not None and q.offset.grad.shape == (5,)
    assert x.grad is not None


def test_optimizer_built_before_init_keeps_parameter():
    q = LSQQuantizer(4, True, per_channel_axis=0)  # channel count unknown: placeholder [1]
    step = q.step
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    x = torch.randn(3, 8)
    q(x).square().sum().backward()
    assert q.step is step and q.step.shape == (3,)
    before = q.step.detach().clone()
    opt.step()
    assert not torch.equal(before, q.step.detach())


def test_overshooting_step_is_clamped_not_an_error():
    q = LSQQuantizer(4, True)
    x = torch.randn(16)
    q(x)
    with torch.no_grad():
        q.step.fill_(-0.5)  # what an aggressive optimizer step can do
    y = q(x)
    assert 0 < float(q.step.detach()) <= 1e-8 and torch.isfinite(y).all()
    with torch.no_grad():
        q.step.fill_(float("nan"))
    with pytest.raises(ValueError, match="step must be finite and > 0"):
        q(x)


def _roundtrip(src, dst):
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    return dst


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=4, signed=True),
        dict(bits=4, signed=True, per_channel_axis=0),
        dict(bits=5, signed=None, per_channel_axis=1, learn_offset=True),
        dict(bits=8, signed=None),
    ],
)
def test_state_dict_roundtrips(kwargs):
    x = torch.randn(4, 6) + 0.3
    # Uninitialised -> fresh: stays uninitialised, then initialises from its first batch.
    fresh = _roundtrip(LSQQuantizer(**kwargs), LSQQuantizer(**kwargs))
    assert not fresh.is_initialized
    # Initialised -> fresh (a per-channel step of unknown size is adopted).
    src = LSQQuantizer(**kwargs)
    src(x)
    with torch.no_grad():
        src.step.mul_(1.37)  # something the fresh one could not re-derive from x
    dst = _roundtrip(src, LSQQuantizer(**kwargs))
    assert dst.is_initialized and dst.signed == src.signed
    assert dst.step.shape == src.step.shape
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    # Uninitialised -> initialised: forgets its values and re-initialises.
    _roundtrip(LSQQuantizer(**kwargs), dst)
    assert not dst.is_initialized
    dst(x * 3)
    assert dst.is_initialized and not torch.equal(dst.step.detach(), src.step.detach())


def test_state_dict_with_known_channels():
    src = LSQQuantizer(4, True, per_channel_axis=0, num_channels=3)
    assert src.step.shape == (3,)
    blank = LSQQuantizer(4, True, per_channel_axis=0)  # placeholder [1], uninitialised
    dst = _roundtrip(blank, LSQQuantizer(4, True, per_channel_axis=0, num_channels=3))
    assert dst.step.shape == (3,) and not dst.is_initialized
    src(torch.randn(3, 5))
    dst = _roundtrip(src, LSQQuantizer(4, True, per_channel_axis=0, num_channels=3))
    torch.testing.assert_close(dst.step, src.step)


def test_state_dict_errors():
    signed = LSQQuantizer(4, True)
    signed(torch.randn(8))
    with pytest.raises(
        RuntimeError, match="is_signed: the state is signed but this LSQQuantizer was built with signed=False"
    ):
        LSQQuantizer(4, False).load_state_dict(signed.state_dict())
    chan = LSQQuantizer(4, True, per_channel_axis=0)
    chan(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="size mismatch for step"):
        LSQQuantizer(4, True).load_state_dict(chan.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch for step"):
        LSQQuantizer(4, True, per_channel_axis=0, num_channels=5).load_state_dict(chan.state_dict())


def test_set_qparams_and_range():
    q = LSQQuantizer(4, True, per_channel_axis=0)
    q.set_range(torch.tensor([-8.0, -1.0]), torch.tensor([1.0, 7.0]))
    torch.testing.assert_close(q.step.detach(), torch.tensor([1.0, 1.0]))  # max(-lo/8, hi/7)
    assert q.is_initialized
    u = LSQQuantizer(2, False)
    u.set_range(torch.tensor([-5.0]), torch.tensor([6.0]))
    torch.testing.assert_close(u.step.detach(), torch.tensor([2.0]))  # hi / 3
    auto = LSQQuantizer(4, None, learn_offset=True)
    auto.set_range(torch.tensor([-1.0]), torch.tensor([2.0]))
    assert auto.signed is True
    torch.testing.assert_close(auto.step.detach(), torch.tensor([0.2]))  # 3 / 15
    torch.testing.assert_close(auto.offset.detach(), torch.tensor([-1.0 + 8 * 0.2]))
    z = LSQQuantizer(4, True)
    z(torch.zeros(5))  # all-zero input: tiny positive step instead of an error
    assert 0 < float(z.step.detach()) <= 1e-8


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"bits must be in \[2, 16\] \(unsupported bit width\), got 1"):
        LSQQuantizer(1, True)
    with pytest.raises(ValueError, match="got 17"):
        LSQQuantizer(17, True)
    with pytest.raises(TypeError, match="bits must be an int, got '4'"):
        LSQQuantizer("4", True)
    with pytest.raises(TypeError, match="bits must be an int, got True"):
        LSQQuantizer(True, True)
    with pytest.raises(TypeError, match="signed must be a bool or None, got 'yes'"):
        LSQQuantizer(4, "yes")
    with pytest.raises(TypeError, match="per_channel_axis must be an int or None, got 1.5"):
        LSQQuantizer(4, True, per_channel_axis=1.5)
    with pytest.raises(TypeError, match="learn_offset must be a bool, got 1"):
        LSQQuantizer(4, True, learn_offset=1)
    with pytest.raises(ValueError, match="num_channels=3 needs per_channel_axis"):
        LSQQuantizer(4, True, num_channels=3)
    with pytest.raises(ValueError, match="num_channels must be a positive int or None, got 0"):
        LSQQuantizer(4, True, per_channel_axis=0, num_channels=0)
    with pytest.raises(ValueError, match="grad_scale must be 'lsq', a positive float or None, got 'x'"):
        LSQQuantizer(4, True, grad_scale="x")
    with pytest.raises(ValueError, match="grad_scale must be a finite number > 0, got -1"):
        LSQQuantizer(4, True, grad_scale=-1.0)
    with pytest.raises(TypeError, match="dtype must be a floating dtype, got torch.int32"):
        LSQQuantizer(4, True, dtype=torch.int32)


def test_forward_and_method_errors():
    with pytest.raises(ValueError, match="per_channel_axis=2 is out of range for a 2-D input"):
        LSQQuantizer(4, True, per_channel_axis=2)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="cannot quantize a 0-D tensor"):
        LSQQuantizer(4, True, per_channel_axis=0)(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"num_channels=4\) got an input with 3 channels along axis 0"):
        LSQQuantizer(4, True, per_channel_axis=0, num_channels=4)(torch.randn(3, 4))
    with pytest.raises(RuntimeError, match="has not seen data yet"):
        LSQQuantizer(4, None).qrange
    with pytest.raises(RuntimeError, match="set_qparams needs the signedness decided"):
        LSQQuantizer(4, None).set_qparams(torch.ones(1))
    with pytest.raises(ValueError, match=r"learn_offset=True\) requires an offset"):
        LSQQuantizer(4, True, learn_offset=True).set_qparams(torch.ones(1))
    with pytest.raises(ValueError, match=r"learn_offset=False\) takes no offset"):
        LSQQuantizer(4, True).set_qparams(torch.ones(1), torch.zeros(1))
    with pytest.raises(ValueError, match="a per-tensor LSQQuantizer needs one step, got shape"):
        LSQQuantizer(4, True).set_qparams(torch.ones(2))
    with pytest.raises(ValueError, match="step must have 3 elements, got shape"):
        LSQQuantizer(4, True, per_channel_axis=0, num_channels=3).set_qparams(torch.ones(2))
    with pytest.raises(ValueError, match="offset must have the step's shape"):
        LSQQuantizer(4, True, per_channel_axis=0, learn_offset=True).set_qparams(torch.ones(2), torch.zeros(3))


@pytest.mark.parametrize(
    "kwargs", [{"signed": None}, {"signed": True, "per_channel_axis": 0}, {"signed": None, "learn_offset": True}]
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_first_batch_is_an_error_and_leaves_the_quantizer_uninitialised(kwargs, bad):
    # Issue 10, defect 11: a NaN first batch stored a NaN step and the quantizer stayed initialised.
    q = LSQQuantizer(4, **kwargs)
    x = torch.randn(3, 8)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="cannot initialise from a tensor holding NaN or inf"):
        q(x)
    assert not q.is_initialized and int(q.initialized) == 0
    assert q.signed is None if kwargs["signed"] is None else q.signed
    good = torch.randn(3, 8)
    y = q(good)  # the next finite batch initialises as if it were the first
    want = LSQQuantizer(4, **kwargs)(good)
    assert q.is_initialized and torch.equal(y, want)


def test_set_qparams_rejects_non_finite_values():
    q = LSQQuantizer(4, True, learn_offset=True)
    with pytest.raises(ValueError, match="step must be finite"):
        q.set_qparams(torch.tensor([float("nan")]), torch.zeros(1))
    with pytest.raises(ValueError, match="offset must be finite"):
        q.set_qparams(torch.ones(1), torch.tensor([float("inf")]))
    assert not q.is_initialized
