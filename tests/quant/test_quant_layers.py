"""QuantConv2d / QuantLinear: from_float keeps the layer, forward against float64, to_float, errors."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from spark_ext.quant import QuantConv2d, QuantLinear


def fq64(x, step, bits, signed, axis=None):
    """Independent float64 LSQ fake quantization (no offset)."""
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    x = x.double()
    s = step.double().reshape([-1 if d == axis else 1 for d in range(x.dim())] if axis is not None else [])
    return torch.round((x / s).clamp(-qn, qp)) * s


def lsq_step64(x, bits, signed, axis=None):
    qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    x = x.double()
    rows = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return 2 * rows.abs().mean(1) / math.sqrt(qp)


def conv64(x, w, b, layer):
    """float64 conv with the layer's options, written without the layer's own forward."""
    if layer.padding_mode != "zeros":
        ph, pw = layer.padding
        x = F.pad(x, (pw, pw, ph, ph), mode=layer.padding_mode)
        padding = 0
    else:
        padding = layer.padding
    return F.conv2d(x, w, None if b is None else b.double(), layer.stride, padding, layer.dilation, layer.groups)


CONVS = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, bias=False, stride=2),
    dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, padding=2, dilation=2),  # depthwise
    dict(in_channels=4, out_channels=5, kernel_size=(3, 1), padding=(1, 0), padding_mode="reflect"),
    dict(in_channels=4, out_channels=5, kernel_size=3, padding=1, padding_mode="circular"),
    dict(in_channels=4, out_channels=5, kernel_size=3, padding=1, padding_mode="replicate", bias=False),
]


@pytest.mark.parametrize(
    "cfg", CONVS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k not in ("in_channels",))
)
def test_quant_conv_matches_float64(cfg):
    layer = nn.Conv2d(**cfg).double()
    q = QuantConv2d.from_float(layer, w_bits=4, a_bits=3)
    assert q.weight is layer.weight and q.bias is layer.bias  # shared, not copied
    for name in ("stride", "padding", "dilation", "groups", "padding_mode", "kernel_size"):
        assert getattr(q, name) == getattr(layer, name)
    q.double()  # steps in float64 too, so the check below is exact up to float64 rounding
    x = torch.randn(2, cfg["in_channels"], 7, 9, dtype=torch.float64)
    y = q(x)
    # Independent: init steps from the formula, quantize, convolve.
    w_step = lsq_step64(layer.weight, 4, True, axis=0)
    a_step = lsq_step64(x, 3, True)
    torch.testing.assert_close(q.weight_quantizer.step.detach(), w_step, rtol=1e-12, atol=0)
    torch.testing.assert_close(q.input_quantizer.step.detach(), a_step, rtol=1e-12, atol=0)
    ref = conv64(fq64(x, a_step, 3, True), fq64(layer.weight, w_step, 4, True, axis=0), layer.bias, layer)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


def test_quant_conv_float32_forward_backward():
    layer = nn.Conv2d(3, 4, 3, padding=1)
    q = QuantConv2d.from_float(layer, w_bits=4, a_bits=4)
    x = torch.rand(2, 3, 5, 5, requires_grad=True)  # non-negative: input decided unsigned
    y = q(x)
    assert y.dtype == torch.float32 and y.shape == (2, 4, 5, 5)
    assert q.input_quantizer.signed is False and q.weight_quantizer.signed is True
    y.square().mean().backward()
    for t in (x, layer.weight, layer.bias, q.weight_quantizer.step, q.input_quantizer.step):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert q.weight_quantizer.step.grad.shape == (4,)


def test_quant_linear_matches_float64():
    layer = nn.Linear(7, 5).double()
    q = QuantLinear.from_float(layer, w_bits=3, a_bits=5).double()
    x = torch.randn(2, 3, 7, dtype=torch.float64)  # extra leading dims
    y = q(x)
    w_step = lsq_step64(layer.weight, 3, True, axis=0)
    a_step = lsq_step64(x, 5, True)
    ref = fq64(x, a_step, 5, True) @ fq64(layer.weight, w_step, 3, True, axis=0).T + layer.bias
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert "w_bits=3, a_bits=5" in repr(q)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_to_float_folds_quantized_weight(kind):
    layer = (
        nn.Conv2d(3, 4, 3, groups=1, padding=1, padding_mode="reflect")
        if kind == "conv"
        else nn.Linear(6, 4, bias=False)
    )
    q = (QuantConv2d if kind == "conv" else QuantLinear).from_float(layer, w_bits=4, a_bits=4)
    x = torch.randn(2, 3, 6, 6) if kind == "conv" else torch.randn(5, 6)
    q(x)  # initialises both quantizers
    f = q.to_float()
    assert type(f) is type(layer)
    assert f.weight is not q.weight and f.weight.data_ptr() != q.weight.data_ptr()
    torch.testing.assert_close(f.weight, q.quantized_weight().detach(), rtol=0, atol=0)
    if kind == "conv":
        assert f.padding_mode == "reflect" and f.padding == layer.padding
        assert f.bias is not layer.bias
        torch.testing.assert_close(f.bias, layer.bias)
    else:
        assert f.bias is None
    # Same output as the quant layer without input quantization.
    q.input_quantizer.enabled = False
    torch.testing.assert_close(f(x), q(x), rtol=0, atol=0)
    # The weight levels: at most 2^4 distinct values per output channel.
    assert all(row.unique().numel() <= 16 for row in f.weight.detach().reshape(f.weight.shape[0], -1))


def test_from_float_keeps_mode_hooks_and_rng():
    layer = nn.Linear(4, 3)
    layer.eval()
    calls = []
    layer.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    state = torch.get_rng_state()
    q = QuantLinear.from_float(layer)
    assert torch.equal(state, torch.get_rng_state())  # no random init of a throwaway weight
    assert not q.training
    q(torch.randn(2, 4))
    assert calls == ["QuantLinear"]


def test_partial_quantization():
    layer = nn.Linear(4, 3)
    wo = QuantLinear.from_float(layer, w_bits=4, a_bits=None)
    assert wo.input_quantizer is None and wo.a_bits is None and wo.w_bits == 4
    x = torch.randn(2, 4)
    torch.testing.assert_close(wo(x), F.linear(x, wo.quantized_weight(), layer.bias))
    ao = QuantConv2d(2, 2, 1, w_bits=None, a_bits=6)
    assert ao.weight_quantizer is None and ao.quantized_weight() is ao.weight
    assert set(ao.state_dict()) == {
        "weight",
        "bias",
        "input_quantizer.step",
        "input_quantizer.initialized",
        "input_quantizer.is_signed",
    }


def test_layer_errors():
    with pytest.raises(TypeError, match=r"QuantConv2d.from_float expects an nn.Conv2d or a subclass that keeps"):
        QuantConv2d.from_float(nn.Linear(2, 2))

    class OwnForwardConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    class OwnConvForward(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, weight - weight.mean(), bias)

    for layer_type in (OwnForwardConv, OwnConvForward):
        with pytest.raises(TypeError, match=f"got .*{layer_type.__name__}"):
            QuantConv2d.from_float(layer_type(2, 2, 1))
    with pytest.raises(ValueError, match="uninitialised LazyConv2d: run a forward first"):
        QuantConv2d.from_float(nn.LazyConv2d(2, 1))
    with pytest.raises(TypeError, match="QuantLinear.from_float expects an nn.Linear"):
        QuantLinear.from_float(QuantLinear(2, 2))
    with pytest.raises(ValueError, match="w_bits and a_bits are both None"):
        QuantLinear(2, 2, w_bits=None, a_bits=None)
    with pytest.raises(ValueError, match=r"w_bits must be in \[2, 16\] \(unsupported bit width\), got 1"):
        QuantLinear.from_float(nn.Linear(2, 2), w_bits=1)
    with pytest.raises(TypeError, match="a_bits must be an int or None, got 4.0"):
        QuantConv2d.from_float(nn.Conv2d(2, 2, 1), a_bits=4.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        QuantLinear.from_float(nn.Linear(2, 2), bogus=1)
