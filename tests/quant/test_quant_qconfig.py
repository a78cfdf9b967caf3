"""qat_qconfig: a torch.ao QConfig of spark_ext's LearnableFakeQuantize for prepare_qat -> train -> convert."""

import copy
import warnings

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

from spark_ext.quant import LearnableFakeQuantize, qat_qconfig

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.c2 = nn.Conv2d(8, 3, 3, padding=1)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        return self.dequant(self.c2(self.relu(self.c1(self.quant(x)))))


def hand_assembled_8bit():
    act = LearnableFakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
        use_grad_scaling=True,
    )
    weight = LearnableFakeQuantize.with_args(
        observer=tq.MovingAveragePerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        use_grad_scaling=True,
    )
    return tq.QConfig(activation=act, weight=weight)


def enable_param_learning(m):
    if isinstance(m, LearnableFakeQuantize):
        m.enable_param_learning()


def train(base, qconfig, x, target, steps=4):
    model = copy.deepcopy(base).train()
    model.qconfig = qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tq.prepare_qat(model, inplace=True)
    with torch.no_grad():
        model(x)  # the observers set the first scales
    model.apply(enable_param_learning)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return model, torch.stack(losses)


def test_8_bit_is_the_hand_assembled_qconfig():
    ours, hand = qat_qconfig(), hand_assembled_8bit()
    for mine, theirs in ((ours.activation, hand.activation), (ours.weight, hand.weight)):
        assert mine.p.func is theirs.p.func is LearnableFakeQuantize
        assert mine.p.keywords == theirs.p.keywords
    torch.manual_seed(0)
    base, x, target = ConvNet(), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    _, losses_ours = train(base, ours, x, target)
    _, losses_hand = train(base, hand, x, target)
    assert torch.equal(losses_ours, losses_hand)


@pytest.mark.parametrize(
    "kw, act_range, act_dtype, weight_range, weight_scheme",
    [
        ({}, (0, 255), torch.quint8, (-128, 127), torch.per_channel_symmetric),
        ({"activation_bits": 4, "weight_bits": 4}, (0, 15), torch.quint8, (-8, 7), torch.per_channel_symmetric),
        ({"activation_bits": 6, "signed_activations": True}, (-32, 31), torch.qint8, (-128, 127), None),
        ({"weight_bits": 2, "per_channel_weights": False}, (0, 255), torch.quint8, (-2, 1), torch.per_tensor_symmetric),
    ],
)
def test_prepare_qat_train_convert(kw, act_range, act_dtype, weight_range, weight_scheme):
    torch.manual_seed(0)
    base, x, target = ConvNet(), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    model, losses = train(base, qat_qconfig(**kw), x, target)
    assert torch.isfinite(losses).all()
    act, weight = model.quant.activation_post_process, model.c1.weight_fake_quant
    assert isinstance(act, LearnableFakeQuantize) and isinstance(weight, LearnableFakeQuantize)
    assert (act.quant_min, act.quant_max, act.dtype) == (*act_range, act_dtype)
    assert (weight.quant_min, weight.quant_max, weight.dtype) == (*weight_range, torch.qint8)
    assert weight.qscheme == (weight_scheme or torch.per_channel_symmetric)
    per_channel = weight.qscheme == torch.per_channel_symmetric
    assert weight.scale.shape == ((8,) if per_channel else (1,))
    assert weight.scale.grad is not None and act.scale.grad is not None  # the ranges were learnt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = tq.convert(model.eval())
    assert isinstance(quantized.c1, torch.ao.nn.quantized.Conv2d)
    if act_dtype == torch.quint8:  # CPU quantized convs (x86 / oneDNN) take quint8 inputs only
        assert quantized(x).shape == x.shape


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"activation_bits must be in \[2, 8\].*got 9"):
        qat_qconfig(activation_bits=9)
    with pytest.raises(ValueError, match=r"weight_bits must be in \[2, 8\].*got 1"):
        qat_qconfig(weight_bits=1)
    with pytest.raises(TypeError, match="weight_bits must be an int in"):
        qat_qconfig(weight_bits=4.0)
    with pytest.raises(TypeError, match="activation_bits must be an int in"):
        qat_qconfig(activation_bits=True)
    with pytest.raises(TypeError, match="signed_activations must be a bool, got 1"):
        qat_qconfig(signed_activations=1)
    with pytest.raises(TypeError, match="per_channel_weights must be a bool"):
        qat_qconfig(per_channel_weights="yes")
    with pytest.raises(TypeError, match="grad_scaling must be a bool"):
        qat_qconfig(grad_scaling=None)
    with pytest.raises(TypeError, match="fake_quant must be a torch.ao FakeQuantizeBase subclass"):
        qat_qconfig(fake_quant=nn.Identity)
    with pytest.raises(TypeError):
        qat_qconfig(8)  # keyword-only
