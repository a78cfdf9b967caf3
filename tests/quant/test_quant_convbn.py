"""Conv-BN folding: QuantConvBn2d against the float conv + BN and torch.ao's ConvBn2d; quantize_model's pair rule."""

import copy

import pytest
import torch
from torch import nn
from torch.ao.nn.intrinsic.qat import ConvBn2d as TorchConvBn2d
from torch.ao.quantization import QConfig

from spark_ext.quant import QuantConv2d, QuantConvBn2d, freeze_bn_stats, quantize_model


def conv_bn(bias=False, out=6):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, out, 3, padding=1, bias=bias)
    bn = nn.BatchNorm2d(out)
    with torch.no_grad():  # non-trivial statistics and affine parameters
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return conv, bn


@pytest.mark.parametrize("bias", [False, True])
def test_eval_equals_the_float_conv_bn_before_training(bias):
    conv, bn = conv_bn(bias)
    float_model = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn)).eval()
    q = QuantConvBn2d.from_conv_bn(conv, bn, w_bits=16, a_bits=16, a_signed=True).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = float_model(x)
        q.weight_quantizer.enabled = q.input_quantizer.enabled = False
        torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-5)
        q.weight_quantizer.enabled = q.input_quantizer.enabled = True
        q.input_quantizer.set_qparams(torch.tensor([2e-4]))  # fine 16-bit grids (LSQ's init is for low bits)
        q.weight_quantizer.set_qparams(torch.full([6], 1e-4))
        torch.testing.assert_close(q(x), ref, rtol=0, atol=2e-3)
        torch.testing.assert_close(q.to_float()(x), ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize("bias", [False, True])
def test_training_forward_grads_and_running_stats_match_torch_ao(bias):
    """torch.ao's fused ConvBn2d with our initialised weight quantizer as its weight fake quant."""
    conv, bn = conv_bn(bias)
    q = QuantConvBn2d.from_conv_bn(copy.deepcopy(conv), copy.deepcopy(bn), w_bits=4, a_bits=None).train()
    x = torch.randn(4, 3, 8, 8)
    q.quantized_weight()  # initialises the weight quantizer (on the BN-scaled weight)
    weight_fq = copy.deepcopy(q.weight_quantizer)
    qconfig = QConfig(activation=nn.Identity, weight=lambda: weight_fq)
    ref = TorchConvBn2d(3, 6, 3, padding=1, bias=bias, qconfig=qconfig).train()
    ref.load_state_dict({**conv.state_dict(), **{f"bn.{k}": v for k, v in bn.state_dict().items()}}, strict=False)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = q(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    for name in ("weight", "bn.weight", "bn.bias") + (("bias",) if bias else ()):
        got, want = q.get_parameter(name).grad, ref.get_parameter(name).grad
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(q.weight_quantizer.step.grad, weight_fq.step.grad, rtol=1e-4, atol=1e-6)
    assert not torch.equal(q.bn.running_mean, bn.running_mean)  # the batch moved the running statistics
    torch.testing.assert_close(q.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(q.bn.running_var, ref.bn.running_var)


def test_freeze_bn_stats_survives_train_and_state_dict_round_trip():
    conv, bn = conv_bn()
    model = nn.Sequential(conv, bn, nn.ReLU())
    report = quantize_model(model, w_bits=4, a_bits=4, first_last_bits=None)
    assert isinstance(model[0], QuantConvBn2d) and isinstance(model[1], nn.Identity)
    assert [tuple(f) for f in report.bn_folds] == [("0", "1", True, "")]
    x = torch.rand(2, 3, 8, 8)
    model.train()(x)
    model.apply(freeze_bn_stats)
    stats = model[0].bn.running_mean.clone()
    model.train()
    assert model[0].training and not model[0].bn.training
    model(x)
    assert torch.equal(model[0].bn.running_mean, stats)

    twin = nn.Sequential(*conv_bn(), nn.ReLU())
    quantize_model(twin, w_bits=4, a_bits=4, first_last_bits=None)
    state = model.state_dict()
    assert "0.bn.running_var" in state and "0.weight_quantizer.step" in state
    twin.load_state_dict(state)
    model.eval(), twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


def test_zero_bn_weight_gives_the_bn_bias_not_nan():
    """A zero-initialised BN weight (the last BN of a residual block): torch.ao's module divides by zero."""
    conv, bn = conv_bn()
    with torch.no_grad():
        bn.weight[2] = 0.0
    q = QuantConvBn2d.from_conv_bn(conv, bn, w_bits=8, a_bits=8)
    x = torch.randn(4, 3, 8, 8)
    for mode in (True, False):
        y = q.train(mode)(x)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y[:, 2], bn.bias[2].expand_as(y[:, 2]), rtol=0, atol=1e-6)
    y.sum().backward()
    assert torch.isfinite(q.weight.grad).all() and torch.isfinite(bn.weight.grad).all()


class Block(nn.Module):
    """torchvision's BasicBlock pattern: the pairs are attributes called in forward, not Sequential neighbours."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv3, self.bn3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.conv4, self.bn4 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + x
        y = self.bn3(self.conv3(y))  # no running statistics: cannot be folded
        z = self.conv4(y)
        return self.bn4(z) + z  # the conv's output has another reader: not a pair


class Untraceable(Block):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x + 1
        return super().forward(x)


def test_pair_rule_in_blocks_and_the_report():
    model = Block()
    report = quantize_model(model, w_bits=8, a_bits=8, first_last_bits=None)
    found = {(f.conv, f.bn): (f.folded, f.why) for f in report.bn_folds}
    assert found == {
        ("conv1", "bn1"): (True, ""),
        ("conv2", "bn2"): (True, ""),
        ("conv3", "bn3"): (False, "the BatchNorm2d has no running statistics (track_running_stats=False)"),
    }
    assert isinstance(model.conv1, QuantConvBn2d) and isinstance(model.bn1, nn.Identity)
    assert type(model.conv3) is QuantConv2d and isinstance(model.bn3, nn.BatchNorm2d)
    assert type(model.conv4) is QuantConv2d and isinstance(model.bn4, nn.BatchNorm2d)
    assert "bn folded: bn1" in str(report) and "2 conv-BN pair(s) folded, 1 not folded" in str(report)

    # Skipped conv: the pair is reported, not folded; fold_bn=False: no pair at all.
    report = quantize_model(Block(), w_bits=8, a_bits=8, skip="conv2")
    assert ("conv2", "bn2", False, "the conv is left float") in report.bn_folds
    model = Block()
    assert quantize_model(model, fold_bn=False).bn_folds == [] and type(model.conv1) is QuantConv2d

    # A model torch.fx cannot trace gets the Sequential rule only.
    model = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), Untraceable())
    report = quantize_model(model, w_bits=8, a_bits=8)
    assert [(f.conv, f.folded) for f in report.bn_folds] == [("0", True)]
    assert type(model[2].conv1) is QuantConv2d
    with pytest.raises(TypeError, match="fold_bn must be a bool"):
        quantize_model(Block(), fold_bn=1)


def test_shared_bn_is_not_folded():
    conv, bn = conv_bn()
    model = nn.Sequential(conv, bn, nn.Sequential(bn))  # the BN registered twice
    report = quantize_model(model, w_bits=8, a_bits=8)
    assert report.bn_folds[0].folded is False and "several names" in report.bn_folds[0].why


def test_a_model_without_unpaired_bn_is_not_traced():
    """The trace runs the model's forward (and its hooks) on proxies: only when rule 2 can find something."""
    calls = []

    class Counting(nn.Module):
        def __init__(self, bn: bool):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)) if bn else nn.Conv2d(3, 4, 3)
            self.conv, self.bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4) if bn == "block" else nn.Identity()

        def forward(self, x):
            calls.append(type(x).__name__)
            return self.bn(self.conv(self.body(x)))

    for bn in (False, True):  # no BN; only Sequential pairs
        quantize_model(Counting(bn))
    assert calls == []
    report = quantize_model(Counting("block"))
    assert calls == ["Proxy"] and [f.bn for f in report.bn_folds] == ["body.1", "bn"]
