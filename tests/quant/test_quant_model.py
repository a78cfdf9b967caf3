"""quantize_model: conversion of nested / shared / grouped layers, float64 forward check, QAT, errors."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from spark_ext.quant import LSQQuantizer, QuantConv2d, QuantLinear, QuantReport, quantize_model


class Block(nn.Module):
    def __init__(self, shared):
        super().__init__()
        self.shared = shared  # registered first: comes before dw in registration order
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x):
        return self.shared(F.relu(self.dw(x)))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1)
        shared = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False, padding_mode="reflect")
        self.body = nn.ModuleList([Block(shared), Block(shared)])
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.tail = nn.Linear(32, 4)

    def forward(self, x):
        x = F.relu(self.head(x))
        for block in self.body:
            x = block(x)
        return self.tail(self.pool(x).flatten(1))


def mlp():
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))


# ---------------------------------------------------------------- float64 oracle


def fq64(x, step, bits, signed, axis=None):
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    s = step if axis is None else step.reshape([-1] + [1] * (x.dim() - 1))
    return torch.round((x / s).clamp(-qn, qp)) * s


def lsq_step64(x, bits, signed, per_row=False):
    qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    rows = x.reshape(x.shape[0], -1) if per_row else x.reshape(1, -1)
    return 2 * rows.abs().mean(1) / math.sqrt(qp)


def hook_reference(model, bits):
    """Make the float64 float ``model`` compute LSQ-quantized layers independently.

    A forward hook on every Conv2d / Linear replaces its output by the
    quantized computation; steps are initialised per layer object on its first
    call (the first-batch init, shared layers once), signedness from that input.
    """
    state = {}

    def hook(layer, inputs, _output):
        x = inputs[0]
        wb, ab = bits[layer]
        if layer not in state:
            signed = bool((x < 0).any())
            state[layer] = (lsq_step64(layer.weight, wb, True, per_row=True), lsq_step64(x, ab, signed), signed)
        w_step, a_step, signed = state[layer]
        xq, wq = fq64(x, a_step, ab, signed), fq64(layer.weight, w_step, wb, True, axis=0)
        if isinstance(layer, nn.Linear):
            return F.linear(xq, wq, layer.bias)
        return layer._conv_forward(xq, wq, layer.bias)

    for m in model.modules():
        if type(m) in (nn.Conv2d, nn.Linear):
            m.register_forward_hook(hook)
    return model


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
def test_quantized_forward_matches_float64(kind):
    model = (SmallCNN() if kind == "cnn" else mlp()).double()
    ref = copy.deepcopy(model)
    report = quantize_model(model, w_bits=4, a_bits=3)
    assert report.model is model
    names = {e.name: (e.w_bits, e.a_bits) for e in report}
    ref_modules = dict(ref.named_modules())
    hook_reference(ref, {ref_modules[n]: b for n, b in names.items()})
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64) if kind == "cnn" else torch.randn(6, 10, dtype=torch.float64)
    for _ in range(2):  # second batch: steps from the first batch are reused
        torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-9)
        x = x * 1.5


def test_cnn_conversion_report():
    model = SmallCNN()
    report = quantize_model(model)
    assert isinstance(report, QuantReport)
    assert [tuple(e)[:4] for e in report] == [
        ("head", "Conv2d", 8, 8),
        ("body.0.shared", "Conv2d", 4, 4),
        ("body.0.dw", "Conv2d", 4, 4),
        ("body.1.dw", "Conv2d", 4, 4),
        ("tail", "Linear", 8, 8),
    ]
    assert report[0].note == "first" and report[-1].note == "last"
    assert report[1].note == "shared: body.1.shared"
    # The shared conv is converted once and stays shared; options are kept.
    assert model.body[0].shared is model.body[1].shared
    assert isinstance(model.body[0].shared, QuantConv2d) and model.body[0].shared.padding_mode == "reflect"
    assert model.body[0].dw.groups == 8 and isinstance(model.tail, QuantLinear)
    text = str(report)
    assert text.splitlines()[0].split() == ["name", "kind", "w_bits", "a_bits", "note"]
    assert "body.0.shared  Conv2d  4       4       shared: body.1.shared" in text
    assert text.endswith("5 layer(s) quantized, 0 left float")
    model(torch.randn(1, 3, 8, 8)).sum().backward()
    # One weight and one input quantizer per distinct layer.
    assert sum(isinstance(m, LSQQuantizer) for m in model.modules()) == 10


def test_skip_first_last_and_inplace():
    model = SmallCNN()
    params = {id(p) for p in model.parameters()}
    report = quantize_model(model, w_bits=3, a_bits=5, skip=["head", "body.*.dw"], first_last_bits=None, inplace=False)
    assert type(model.head) is nn.Conv2d and type(model.tail) is nn.Linear  # original untouched
    q = report.model
    assert q is not model and type(q.head) is nn.Conv2d and type(q.body[0].dw) is nn.Conv2d
    assert isinstance(q.tail, QuantLinear) and (q.tail.w_bits, q.tail.a_bits) == (3, 5)
    assert {id(p) for p in q.parameters()}.isdisjoint(params)  # a deep copy
    entries = {e.name: e for e in report}
    assert entries["head"].note == "skipped; first" and entries["head"].w_bits is None
    assert entries["body.1.dw"].note == "skipped"
    assert str(report).endswith("2 layer(s) quantized, 3 left float")
    # The skipped first layer is still "first": the second layer gets the normal bits.
    r = quantize_model(SmallCNN(), skip="head")
    assert (r[1].w_bits, r[1].a_bits) == (4, 4) and (r[-1].w_bits, r[-1].a_bits) == (8, 8)
    # A shared module is skipped when any of its names matches.
    r = quantize_model(SmallCNN(), skip="body.1.shared")
    assert r[1].w_bits is None and r[1].note.startswith("skipped")


def test_weight_only_and_one_layer_model():
    model = nn.Sequential(nn.Linear(4, 4))
    report = quantize_model(model, w_bits=4, a_bits=None)
    assert (report[0].w_bits, report[0].a_bits, report[0].note) == (8, None, "first; last")
    assert model[0].input_quantizer is None


def test_qat_reduces_loss_and_moves_steps():
    torch.manual_seed(0)
    model = mlp()
    quantize_model(model, w_bits=4, a_bits=4)
    x = torch.randn(128, 10)
    y = torch.sin(x[:, :3] * 2) + x[:, 3:6] ** 2
    model(x)  # first batch initialises the steps, so they can be recorded
    steps0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("step")}
    assert len(steps0) == 6
    steps = [p for n, p in model.named_parameters() if n.endswith("step")]
    others = [p for n, p in model.named_parameters() if not n.endswith("step")]
    # Steps are small numbers (~1e-2): they get a smaller Adam learning rate.
    opt = torch.optim.Adam([{"params": others}, {"params": steps, "lr": 1e-3}], lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    moved = [n for n, p in model.named_parameters() if n.endswith("step") and not torch.allclose(p, steps0[n])]
    assert len(moved) == 6


def test_model_state_dict_roundtrip():
    src = SmallCNN()
    quantize_model(src)
    dst = copy.deepcopy(src)  # uninitialised quantizers
    x = torch.randn(2, 3, 8, 8)
    y = src(x)
    with torch.no_grad():
        for p in src.parameters():
            p.mul_(1.01)  # values that dst cannot re-derive
    y = src(x)
    fresh = SmallCNN()
    quantize_model(fresh)
    fresh.load_state_dict(src.state_dict())  # strict
    torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)
    dst.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(dst(x), y, rtol=0, atol=0)


def test_quantize_model_errors():
    with pytest.raises(
        ValueError,
        match="nothing to quantize: Sequential has no nn.Conv1d / nn.Conv2d / nn.ConvTranspose2d / nn.Linear submodule",
    ):
        quantize_model(nn.Sequential(nn.ReLU()))
    done = mlp()
    quantize_model(done)
    with pytest.raises(ValueError, match=r"no nn.Conv1d .* nn.Linear submodule \(3 layer\(s\) are already quantized\)"):
        quantize_model(done)
    with pytest.raises(ValueError, match=r"w_bits must be in \[2, 16\] \(unsupported bit width\), got 1"):
        quantize_model(mlp(), w_bits=1)
    with pytest.raises(ValueError, match="a_bits must be in .* got 32"):
        quantize_model(mlp(), a_bits=32)
    with pytest.raises(ValueError, match="first_last_bits must be in .* got 0"):
        quantize_model(mlp(), first_last_bits=0)
    with pytest.raises(TypeError, match="w_bits must be an int or None, got 3.5"):
        quantize_model(mlp(), w_bits=3.5)
    with pytest.raises(ValueError, match="w_bits and a_bits are both None"):
        quantize_model(mlp(), w_bits=None, a_bits=None)
    with pytest.raises(ValueError, match=r"model is itself an nn.Linear.*QuantLinear.from_float"):
        quantize_model(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be an nn.Module, got int"):
        quantize_model(3)
    with pytest.raises(TypeError, match="skip must contain strings"):
        quantize_model(mlp(), skip=["0", 2])
    with pytest.raises(TypeError, match="skip must be a module name, an fnmatch pattern or a sequence of them, got 5"):
        quantize_model(mlp(), skip=5)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        quantize_model(mlp(), inplace="yes")
    with pytest.raises(ValueError, match=r"nothing to quantize: skip=\['\*'\] left all 3 candidate layer\(s\) float"):
        quantize_model(mlp(), skip="*")
    with pytest.warns(
        UserWarning,
        match=r"skip pattern\(s\) \['nope'\] matched no nn.Conv1d / nn.Conv2d / nn.ConvTranspose2d / nn.Linear",
    ):
        quantize_model(mlp(), skip=["nope"])
    with pytest.raises(TypeError, match="layer_bits must be a mapping of module name patterns to bits, got list"):
        quantize_model(mlp(), layer_bits=[("0", 8)])
    with pytest.raises(TypeError, match=r"layer_bits keys must be module names or fnmatch patterns \(str\), got 0"):
        quantize_model(mlp(), layer_bits={0: 8})
    with pytest.raises(ValueError, match=r"layer_bits\['0'\] must be in \[2, 16\] \(unsupported bit width\), got 1"):
        quantize_model(mlp(), layer_bits={"0": 1})
    with pytest.raises(TypeError, match=r"layer_bits\['0'\] must be an int, got None"):
        quantize_model(mlp(), layer_bits={"0": None})
    with pytest.raises(
        ValueError, match=r"layer_bits\['0'\] must have the keys 'w_bits' and/or 'a_bits', got \{'bits': 4\}"
    ):
        quantize_model(mlp(), layer_bits={"0": {"bits": 4}})
    with pytest.raises(ValueError, match=r"layer_bits\['0'\]\['a_bits'\] must be in \[2, 16\]"):
        quantize_model(mlp(), layer_bits={"0": {"a_bits": 17}})
    with pytest.raises(ValueError, match=r"layer_bits\['0'\] leaves both operands float: use skip='0'"):
        quantize_model(mlp(), layer_bits={"0": {"w_bits": None, "a_bits": None}})
    with pytest.warns(UserWarning, match=r"layer_bits pattern\(s\) \['nope\.\*'\] matched no nn.Conv1d"):
        quantize_model(mlp(), layer_bits={"nope.*": 8})


# ------------------------------------------------ more layer kinds, per-layer bits


class Codec(nn.Module):
    """A 1-D encoder and a 2-D decoder with a transposed-conv upsampler (restoration-decoder style)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv1d(2, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1))
        self.up = nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1)
        self.tail = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):  # x [B, 2, 64]
        h = F.relu(self.head(x)).reshape(x.shape[0], 4, 8, 8)
        return self.tail(F.relu(self.up(F.relu(self.body(h)))))


def test_conv1d_convtranspose_and_layer_bits():
    torch.manual_seed(0)
    model = Codec().double()
    x = torch.randn(3, 2, 64, dtype=torch.float64)
    float_out = model(x)
    quant = quantize_model(
        model, w_bits=4, a_bits=4, inplace=False, layer_bits={"body.0": {"a_bits": 6}, "body.*": 5, "up": 3}
    ).model
    rows = {
        (e.name, e.kind, e.w_bits, e.a_bits, e.note)
        for e in quantize_model(
            copy.deepcopy(model), layer_bits={"body.0": {"a_bits": 6}, "body.*": 5, "up": 3, "tail": {"w_bits": None}}
        )
    }
    assert rows == {
        ("head", "Conv1d", 8, 8, "first"),
        ("body.0", "Conv2d", 4, 6, "layer_bits 'body.0'"),  # the first matching pattern wins
        ("body.2", "Conv2d", 5, 5, "layer_bits 'body.*'"),
        ("up", "ConvTranspose2d", 3, 3, "layer_bits 'up'"),
        ("tail", "Conv2d", None, 8, "last; layer_bits 'tail'"),  # overrides first_last_bits
    }
    kinds = [type(m).__name__ for m in quant.modules() if hasattr(m, "weight_quantizer")]
    assert kinds == ["QuantConv1d", "QuantConv2d", "QuantConv2d", "QuantConvTranspose2d", "QuantConv2d"]
    assert quant.up.weight_quantizer.per_channel_axis == 1 and quant.up.weight_quantizer.step.shape == (4,)
    quant.double()
    y = quant(x)
    # Independent float64 oracle: hooks quantize each float layer's input and weight.
    ref = copy.deepcopy(model)
    bits = {"head": 8, "body.0": (4, 6), "body.2": 5, "up": 3, "tail": 8}
    for name, b in bits.items():
        wb, ab = b if isinstance(b, tuple) else (b, b)
        layer = ref.get_submodule(name)
        axis = 1 if isinstance(layer, nn.ConvTranspose2d) else 0
        w = layer.weight.detach()
        wstep = lsq_step64(w.movedim(axis, 0), wb, True, per_row=True)
        layer.weight.data = fq64(w.movedim(axis, 0), wstep, wb, True, axis=0).movedim(0, axis)

        def pre(mod, args, ab=ab):
            (inp,) = args
            signed = bool((inp < 0).any())
            return (fq64(inp, lsq_step64(inp, ab, signed), ab, signed),)

        layer.register_forward_pre_hook(pre)
    torch.testing.assert_close(y, ref(x), rtol=1e-9, atol=1e-9)
    # Close to the float model at these bit widths, and the steps train.
    assert (y - float_out).abs().max() < 0.5 * float_out.abs().max()
    y.square().mean().backward()
    assert quant.up.weight_quantizer.step.grad.shape == (4,) and quant.head.input_quantizer.step.grad is not None


@pytest.mark.parametrize(
    "cfg",
    [
        dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, output_padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=(2, 3), groups=2, bias=False, dilation=2),
    ],
    ids=["stride-outpad", "groups-dilation"],
)
def test_quant_conv_transpose_matches_float64(cfg):
    from spark_ext.quant import QuantConvTranspose2d

    layer = nn.ConvTranspose2d(**cfg).double()
    q = QuantConvTranspose2d.from_float(layer, w_bits=4, a_bits=5).double()
    assert q.weight is layer.weight
    for name in ("stride", "padding", "output_padding", "dilation", "groups", "kernel_size"):
        assert getattr(q, name) == getattr(layer, name)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    y = q(x, output_size=None)
    w = layer.weight.movedim(1, 0)
    w_fq = fq64(w, lsq_step64(w, 4, True, per_row=True), 4, True, axis=0).movedim(0, 1)
    x_fq = fq64(x, lsq_step64(x, 5, True), 5, True)
    ref = F.conv_transpose2d(
        x_fq, w_fq, layer.bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation
    )
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    # output_size picks the output padding as torch's layer does.
    if cfg.get("stride", 1) > 1:
        size = [s - 1 for s in layer(x).shape[2:]]  # output_padding 0 instead of 1
        assert q(x, output_size=size).shape[2:] == layer(x, output_size=size).shape[2:]
    f = q.to_float()
    assert type(f) is nn.ConvTranspose2d and f.output_padding == layer.output_padding
    torch.testing.assert_close(f.weight, w_fq, rtol=0, atol=1e-12)


def test_quant_conv1d_matches_float64():
    from spark_ext.quant import QuantConv1d

    layer = nn.Conv1d(3, 5, 4, stride=2, padding=2, padding_mode="reflect").double()
    q = QuantConv1d.from_float(layer, w_bits=3, a_bits=4).double()
    x = torch.rand(2, 3, 11, dtype=torch.float64)  # unsigned input range
    y = q(x)
    assert q.input_quantizer.signed is False
    w_fq = fq64(layer.weight, lsq_step64(layer.weight, 3, True, per_row=True), 3, True, axis=0)
    x_fq = fq64(x, lsq_step64(x, 4, False), 4, False)
    ref = F.conv1d(F.pad(x_fq, (2, 2), mode="reflect"), w_fq, layer.bias, 2)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_calibrate_covers_conv1d_and_conv_transpose(method):
    from spark_ext.quant import calibrate

    model = quantize_model(Codec(), w_bits=4, a_bits=4).model
    calibrate(model, [torch.randn(2, 2, 64) for _ in range(2)], method=method)
    up, head = model.up.weight_quantizer, model.head.weight_quantizer
    assert up.is_initialized and up.step.shape == (4,) and head.step.shape == (4,)
    # Transposed conv: one step per output channel (weight axis 1); minmax covers each channel's range.
    if method == "minmax":
        rows = model.up.weight.detach().movedim(1, 0).reshape(4, -1)
        expected = torch.maximum(-rows.amin(1) / 8, rows.amax(1) / 7)  # signed 4-bit: Qn = 8, Qp = 7
        torch.testing.assert_close(up.step.detach(), expected, rtol=1e-6, atol=0)


class SameForwardConv(nn.Conv2d):
    """A Conv2d subclass with the parent's forward (only a helper method added)."""

    def fan_in(self):
        return self.weight[0].numel()


class StdConv2d(nn.Conv2d):
    """As timm's StdConv2d: standardises the weight per output channel, then convolves."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, eps=1e-6)
        return F.conv2d(x, w.reshape_as(self.weight), self.bias, self.stride, self.padding, self.dilation, self.groups)


class MeanShift(nn.Conv2d):
    """A fixed 1x1 conv that subtracts the RGB mean (no trainable parameters), with its own forward."""

    def __init__(self, mean=(0.4, 0.45, 0.5)):
        super().__init__(3, 3, 1)
        self.weight.data.copy_(torch.eye(3).view(3, 3, 1, 1))
        self.bias.data.copy_(-torch.tensor(mean))
        self.requires_grad_(False)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias)


def test_subclass_keeping_forward_is_quantized_like_its_parent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), SameForwardConv(8, 8, 3, padding=1), nn.Conv2d(8, 3, 1))
    body = model[1]
    plain = nn.Conv2d(8, 8, 3, padding=1)
    plain.load_state_dict(body.state_dict())
    reference = QuantConv2d.from_float(plain, 4, 4)
    report = quantize_model(model)
    assert type(model[1]) is QuantConv2d and model[1].weight is body.weight
    assert report[1] == ("1", "SameForwardConv", 4, 4, "")
    assert str(report).endswith("3 layer(s) quantized, 0 left float")
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(model[1](x), reference(x))
    # Trains like a QuantConv2d: the weight step gets a gradient and moves.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = model[1].weight_quantizer.step.detach().clone()
    model(torch.randn(2, 3, 6, 6)).square().mean().backward()
    assert model[1].weight_quantizer.step.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(model[1].weight_quantizer.step, step)


def test_subclass_overriding_forward_is_left_float_and_reported():
    torch.manual_seed(0)
    model = nn.Sequential(MeanShift(), StdConv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 3, 1))
    x = torch.randn(1, 3, 6, 6)
    expected = model(x)
    report = quantize_model(model, first_last_bits=8)
    assert type(model[0]) is MeanShift and type(model[1]) is StdConv2d
    assert list(report) == [
        ("0", "MeanShift", None, None, "subclass MeanShift overrides forward: left float"),
        ("1", "StdConv2d", None, None, "subclass StdConv2d overrides forward: left float"),
        ("2", "Conv2d", 8, 8, "first"),  # the first layer that can be quantized
        ("3", "Conv2d", 8, 8, "last"),
    ]
    table = str(report)
    assert "subclass StdConv2d overrides forward: left float" in table
    assert table.endswith("2 layer(s) quantized, 2 left float")
    assert len(report.skipped) == 2
    with torch.no_grad():
        model[2].weight_quantizer.enabled = model[2].input_quantizer.enabled = False
        model[3].weight_quantizer.enabled = model[3].input_quantizer.enabled = False
    torch.testing.assert_close(model(x), expected)  # the float subclasses still compute their own forward


def test_layers_that_cannot_be_swapped_are_reported():
    class ConvForwardOverride(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, weight.flip(-1), bias)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.lazy = nn.LazyConv2d(4, 1)
            self.odd = ConvForwardOverride(4, 4, 1)
            self.proj = nn.Linear(8, 8)

    report = quantize_model(Attention(), first_last_bits=None)
    assert [(e.name, e.w_bits, e.note) for e in report] == [
        ("attn.out_proj", None, "nn.MultiheadAttention's out_proj (its forward is never called): left float"),
        ("lazy", None, "uninitialised LazyConv2d: left float (run a forward first)"),
        (
            "odd",
            None,
            "subclass test_layers_that_cannot_be_swapped_are_reported.<locals>.ConvForwardOverride "
            "overrides _conv_forward: left float",
        ),
        ("proj", 4, "first; last"),
    ]
    assert str(report).endswith("1 layer(s) quantized, 3 left float")
    with pytest.raises(
        ValueError,
        match=r"nothing to quantize: Sequential has no .* submodule \(left float: subclass "
        r"StdConv2d overrides forward: left float\)",
    ):
        quantize_model(nn.Sequential(StdConv2d(3, 3, 1)))
    with pytest.raises(ValueError, match=r"model is itself an nn.Conv2d \(a SameForwardConv\).*QuantConv2d.from_float"):
        quantize_model(SameForwardConv(3, 3, 1))


class FrozenMeanShift(nn.Conv2d):
    """basicsr's MeanShift: the parent's forward, frozen weights (a fixed transform)."""

    def __init__(self, mean=(0.4, 0.45, 0.5)):
        super().__init__(3, 3, 1)
        self.weight.data.copy_(torch.eye(3).view(3, 3, 1, 1))
        self.bias.data.copy_(-torch.tensor(mean))
        self.requires_grad_(False)


def test_subclass_with_frozen_weights_is_left_float_and_reported():
    model = nn.Sequential(FrozenMeanShift(), nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 3, 1))
    report = quantize_model(model, first_last_bits=8)
    assert type(model[0]) is FrozenMeanShift
    assert list(report)[0] == (
        "0",
        "FrozenMeanShift",
        None,
        None,
        "subclass FrozenMeanShift has frozen weights (a fixed transform): left float",
    )
    assert str(report).endswith("2 layer(s) quantized, 1 left float")
