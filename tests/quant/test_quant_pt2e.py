"""PT2ELearnableFakeQuantize: same QAT losses as torchao's LearnableFakeQuantize in prepare_qat_pt2e, convert_pt2e."""

import copy

import pytest
import torch
from torch import nn

pt2e = pytest.importorskip("torchao.quantization.pt2e", reason="needs the [torchao] extra")
from torchao.quantization.pt2e import LearnableFakeQuantize as TorchaoLFQ  # noqa: E402
from torchao.quantization.pt2e import (  # noqa: E402
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    enable_range_learning,  # noqa: E402  (torchao's own helper)
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e  # noqa: E402
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer  # noqa: E402

from spark_ext.quant import LearnableFakeQuantize as TorchAOEagerLFQ  # noqa: E402
from spark_ext.quant.pt2e import PT2ELearnableFakeQuantize  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def specs(cls, weight_scheme):
    act = QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=cls.with_args(observer=MovingAverageMinMaxObserver, use_grad_scaling=True),
    )
    per_channel = weight_scheme == torch.per_channel_symmetric
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-127,
        quant_max=127,
        qscheme=weight_scheme,
        ch_axis=0 if per_channel else None,
        observer_or_fake_quant_ctr=cls.with_args(
            observer=MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver,
            use_grad_scaling=True,
        ),
    )
    return act, weight


class ConvQuantizer(Quantizer):
    """Annotates every conv: input activation and weight quantized, output activation quantized."""

    def __init__(self, act, weight):
        super().__init__()
        self.act, self.weight = act, weight

    def annotate(self, model):
        for node in model.graph.nodes:
            if node.op == "call_function" and node.target in (torch.ops.aten.conv2d.default,):
                x, w = node.args[0], node.args[1]
                node.meta["quantization_annotation"] = QuantizationAnnotation(
                    input_qspec_map={x: self.act, w: self.weight}, output_qspec=self.act, _annotated=True
                )
        return model

    def validate(self, model):
        pass


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def prepared(base, cls, weight_scheme, x):
    exported = torch.export.export(copy.deepcopy(base), (x,)).module()
    return prepare_qat_pt2e(exported, ConvQuantizer(*specs(cls, weight_scheme)))


@pytest.mark.parametrize("weight_scheme", [torch.per_channel_symmetric, torch.per_tensor_symmetric])
def test_prepare_qat_pt2e_same_losses_as_torchao_and_convert(weight_scheme):
    torch.manual_seed(0)
    base = Net()
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    theirs, ours = (
        prepared(base, TorchaoLFQ, weight_scheme, x),
        prepared(base, PT2ELearnableFakeQuantize, weight_scheme, x),
    )
    fqs = [m for m in ours.modules() if isinstance(m, PT2ELearnableFakeQuantize)]
    assert len(fqs) == 6 and not any(type(m) is TorchaoLFQ for m in ours.modules())
    for m in (theirs, ours):
        m(x)  # observe: torchao creates its scale / zero point Parameters on the first forward
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (theirs, ours)]
    for step in range(5):
        if step == 2:  # observer estimates first, then learn the ranges
            for m in (theirs, ours):
                m.apply(enable_range_learning)
        losses, grads = [], []
        for m, opt in zip((theirs, ours), opts):
            opt.zero_grad()
            loss = (m(x) - target).square().mean()
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
            opt.step()
        # The forward is bitwise torch's learnable fake quant (docs/spec.md §5a): identical losses.
        assert torch.equal(losses[0], losses[1]), step
        assert sorted(grads[0]) == sorted(grads[1])
        if step >= 2:
            assert sum(k.endswith(".scale") for k in grads[1]) == 6
        for k in grads[0]:
            torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-6, msg=k)
    for m in fqs:
        assert m.scale.requires_grad and int(m.observer_enabled) == 0

    converted = convert_pt2e(ours)
    targets = [n.target for n in converted.graph.nodes if n.op == "call_function"]
    assert not any(isinstance(m, PT2ELearnableFakeQuantize) for m in converted.modules())
    qd = torch.ops.quantized_decomposed
    # Activations (input, conv1 out, relu out, conv2 out) quantized; weights stored quantized (folded).
    assert targets.count(qd.quantize_per_tensor.default) == 4
    dq_weight = qd.dequantize_per_channel.default if weight_scheme == torch.per_channel_symmetric else None
    dequantized = targets.count(qd.dequantize_per_tensor.default) + targets.count(qd.dequantize_per_channel.default)
    assert dequantized == 6 and (dq_weight is None or targets.count(dq_weight) == 2)
    y = converted(x)
    # The converted model computes the same grid as the fake-quantized one.
    torch.testing.assert_close(y, ours(x), rtol=0, atol=1e-5)


def test_no_host_sync_flags_and_toggles():
    fq = PT2ELearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8)
    theirs = TorchaoLFQ(MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8)
    x = torch.rand(4, 5) * 3
    assert fq.scale is None and fq.zero_point is None  # as torchao's, until the first forward
    assert torch.equal(fq(x), theirs(x))
    assert fq.scale.shape == (1,) and not fq.scale.requires_grad
    # In range-learning mode, once the flags were read, a forward does not index the flag buffers again
    # (torchao's reads observer_enabled[0] and fake_quant_enabled[0]: a host sync each on a GPU). The op's
    # own step check reads values only on CPU, where there is no device to wait for.
    fq.enable_range_learning()
    fq(x)
    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in ("__getitem__",)}

    def spy(name):
        def read(self, *args):
            reads.append(name)
            return originals[name](self, *args)

        return read

    for name in originals:
        setattr(torch.Tensor, name, spy(name))
    try:
        y = fq(x)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    assert reads == [] and y.requires_grad
    # A toggle (a buffer write) is seen by the next forward.
    fq.disable_fake_quant()
    assert fq(x) is x
    fq.enable_fake_quant()
    assert fq(x) is not x
    assert int(fq.learning_enabled) == 1 and int(fq.observer_enabled) == 0 and fq.scale.requires_grad
    fq.enable_observer()
    assert int(fq.learning_enabled) == 0 and not fq.scale.requires_grad
    scale, zp = fq.calculate_qparams()
    assert zp.dtype == torch.int64 and scale.shape == (1,)


def test_per_channel_resizes_and_state_dict():
    cls = PT2ELearnableFakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        quant_min=-127,
        quant_max=127,
        dtype=torch.int8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    fq = cls()
    w = torch.randn(6, 3, 3, 3)
    fq(w)
    param = fq.scale
    assert fq.scale.shape == (6,)
    fq(w)
    assert fq.scale is param
    fresh = cls()
    fresh.load_state_dict(fq.state_dict())
    fresh.disable_observer(), fq.disable_observer()
    assert torch.equal(fresh(w), fq(w))


def test_constructor_errors():
    obs = MovingAverageMinMaxObserver
    with pytest.raises(TypeError, match="quant_max must be an int, got 255.0"):
        PT2ELearnableFakeQuantize(obs, quant_max=255.0)
    # ValueError (torchao's class asserts): a deliberate difference, docs/quantization.md.
    with pytest.raises(ValueError, match="need quant_min <= 0 <= quant_max and quant_min < quant_max, got quant_min=3"):
        PT2ELearnableFakeQuantize(obs, quant_min=3, quant_max=255)
    with pytest.raises(
        ValueError, match=r"\[0, 300\] is outside the range \[0, 255\] of the observer dtype torch.uint8"
    ):
        PT2ELearnableFakeQuantize(obs, quant_min=0, quant_max=300, dtype=torch.uint8)
    with pytest.raises(TypeError, match="use_grad_scaling must be a bool"):
        PT2ELearnableFakeQuantize(obs, use_grad_scaling=1)


def test_torchaos_enable_range_learning_switches_ours_on():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = prepared(Net(), PT2ELearnableFakeQuantize, torch.per_channel_symmetric, x)
    model(x)
    model.apply(enable_range_learning)  # torchao.quantization.pt2e's: an isinstance check on its class
    fqs = [m for m in model.modules() if isinstance(m, PT2ELearnableFakeQuantize)]
    assert len(fqs) == 6
    assert all(int(m.learning_enabled) == 1 and int(m.observer_enabled) == 0 for m in fqs)
    assert all(m.scale.requires_grad and m.zero_point.requires_grad for m in fqs)


def test_sgd_momentum_driving_a_scale_negative_trains_like_torchao():
    """torchao's module keeps training when an optimizer step drives a scale <= 0; ours clamps it to eps (as
    torch.ao's module does) instead of raising, and matches torchao's losses while torchao's scales are > 0."""
    torch.manual_seed(0)
    base = Net()
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    theirs, ours = (
        prepared(base, cls, torch.per_tensor_symmetric, x) for cls in (TorchaoLFQ, PT2ELearnableFakeQuantize)
    )
    for m in (theirs, ours):
        m(x)
        m.apply(enable_range_learning)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (theirs, ours)]

    def scales(m):
        return torch.cat([p.detach().flatten() for n, p in m.named_parameters() if n.endswith(".scale")])

    matched_steps = 0
    for _ in range(15):
        theirs_positive = bool((scales(theirs) > 0).all())
        losses = []
        for m, opt in zip((theirs, ours), opts):
            opt.zero_grad()
            loss = (m(x) - target).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        assert torch.isfinite(losses[1])
        if theirs_positive and matched_steps == _:
            torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
            matched_steps += 1
    assert 3 <= matched_steps < 15  # the recipe drives one of torchao's scales negative after a few steps
    assert (scales(theirs) < 0).any()
    eps = torch.finfo(torch.float32).eps
    ours(x)
    assert (scales(ours) >= eps).all()


def test_non_finite_scale_error_names_the_module_and_channel():
    fq = PT2ELearnableFakeQuantize(
        MovingAveragePerChannelMinMaxObserver,
        quant_min=-127,
        quant_max=127,
        dtype=torch.int8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
    )
    w = torch.randn(6, 3)
    fq(w)
    fq.enable_range_learning()
    fq.scale.data[2] = float("nan")
    with pytest.raises(ValueError, match=r"PT2ELearnableFakeQuantize .*: scale of channel\(s\) \[2\] is nan"):
        fq(w)
    fq.scale.data[2] = float("inf")
    with pytest.raises(ValueError, match=r"ch_axis=0\): scale of channel\(s\) \[2\] is inf"):
        fq(w)
    act = PT2ELearnableFakeQuantize(MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.uint8)
    act(w)
    act.enable_range_learning()
    act.zero_point.data[0] = float("nan")
    with pytest.raises(ValueError, match=r"per_tensor_affine, ch_axis=-1\): zero_point of channel\(s\) \[0\] is nan"):
        act(w)


def test_torch_ao_class_in_a_pt2e_spec_is_a_clear_type_error():
    spec = QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=TorchAOEagerLFQ.with_args(observer=MovingAverageMinMaxObserver),
    )
    x = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(Net(), (x,)).module()
    with pytest.raises(TypeError, match="use spark_ext.quant.pt2e.PT2ELearnableFakeQuantize"):
        prepare_qat_pt2e(exported, ConvQuantizer(spec, spec))


def test_x86_inductor_quantizer_recipe_with_torchaos_helper():
    """torchao's recipe: X86InductorQuantizer(is_qat=True) with the learnable class in its specs, torchao's
    enable_range_learning, SGD + momentum, convert_pt2e: ours switches on and trains as torchao's."""
    import dataclasses

    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    default = xiq.get_default_x86_inductor_quantization_config(is_qat=True)

    def config(cls):
        def swap(spec, observer):
            ctr = cls.with_args(observer=observer, use_grad_scaling=True)
            return dataclasses.replace(spec, observer_or_fake_quant_ctr=ctr)

        return dataclasses.replace(
            default,
            input_activation=swap(default.input_activation, MovingAverageMinMaxObserver),
            weight=swap(default.weight, MovingAveragePerChannelMinMaxObserver),
        )

    torch.manual_seed(0)
    base = Net()
    x, target = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    models = []
    for cls in (TorchaoLFQ, PT2ELearnableFakeQuantize):
        exported = torch.export.export(copy.deepcopy(base), (x,)).module()
        model = prepare_qat_pt2e(exported, xiq.X86InductorQuantizer().set_global(config(cls)))
        model(x)
        model.apply(enable_range_learning)
        fqs = [m for m in model.modules() if isinstance(m, cls)]
        assert len(fqs) == 4 and all(int(m.learning_enabled) == 1 and m.scale.requires_grad for m in fqs)
        models.append(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
    for _ in range(3):
        losses = []
        for m, opt in zip(models, opts):
            opt.zero_grad()
            loss = (m(x) - target).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    theirs_scales = [p for n, p in models[0].named_parameters() if n.endswith(".scale")]
    assert len(theirs_scales) == 4 and all((p > 0).all() for p in theirs_scales)  # a recipe torchao trains sanely
    converted = convert_pt2e(models[1])
    assert not any(isinstance(m, PT2ELearnableFakeQuantize) for m in converted.modules())
    assert converted(x).shape == x.shape
