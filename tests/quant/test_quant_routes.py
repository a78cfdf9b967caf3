"""The three QAT routes to onnxruntime, end to end on torchvision-style ResNet-18 and MobileNetV2.

The models are the hand-built copies of torchvision's quantizable ``resnet18`` / ``mobilenet_v2`` in
spark_ext/benchmarks/qat_models.py (torchvision's wheel does not import next to this torch), at 10 classes on 32x32
inputs. Each is trained a step through one route, exported, and run by onnxruntime with its graph
optimisations off (each node as the ONNX spec defines it) and on (QDQ groups fused into integer
kernels, which requantize with their own rounding).

Tolerance: onnxruntime without graph optimisations computes the model's grid points, but its float
rounding differs (convolution order; in torch.ao's route the BN folded into the weight and bias where
the QAT module divides and normalises), so a value within ~1e-6 of a rounding boundary can land on
the neighbouring level, and in these 20-50-layer nets such one-level flips reach the output: the
bound is 5e-2 of the largest output of the PyTorch model (measured up to 1.4e-2; 1e-6 without a
flip). The fused run (onnxruntime's default optimisations) is held to the same bound, with its
``WeightBiasQuantization`` pass off: that pass rewrites each float bias as int32 at the input's step
times the weight's, and these barely trained nets have biases of up to 1e10 such steps, which it
saturates (the outputs then differed by up to 65 % of the largest; the export warns, see
``int32_bias_overflows``).
"""

import copy
import dataclasses

import pytest
import torch

onnx = pytest.importorskip("onnx", reason="needs the [export] extra")
ort = pytest.importorskip("onnxruntime", reason="needs the [export] extra")
pytest.importorskip("onnxscript", reason="needs the [export] extra")

from spark_ext.benchmarks.qat_models import MobileNetV2, ResNet18  # noqa: E402
from spark_ext.quant import (  # noqa: E402
    LearnableFakeQuantize,
    export_onnx,
    export_prepared_onnx,
    export_pt2e_onnx,
    qat_qconfig,
    quantize_model,
)
from spark_ext.quant.export import ORT_BIAS_PASS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")

MODELS = {"resnet18": ResNet18, "mobilenet_v2": MobileNetV2}
UNFUSED_TOL = 5e-2


def _data():
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32), torch.randn(2, 10)


def _train(model, x, target, steps=1):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), target).backward()
        opt.step()


def _onnxruntime(proto, x, fused):
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"], disabled_optimizers=[ORT_BIAS_PASS]
    )
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _check(proto, x, ref):
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and ops.count("QuantizeLinear") >= 5
    scale = float(ref.abs().max())
    unfused = float((_onnxruntime(proto, x, fused=False) - ref).abs().max())
    fused_out = _onnxruntime(proto, x, fused=True)
    fused = float((fused_out - ref).abs().max())
    mean = float((fused_out - ref).abs().mean()) / float(ref.abs().mean())
    print(
        f"max |diff| / max |ref|: unfused {unfused / scale:.3g}, fused {fused / scale:.3g}; fused mean rel {mean:.3g}"
    )
    assert unfused <= UNFUSED_TOL * scale and fused <= UNFUSED_TOL * scale


@pytest.mark.parametrize("name", sorted(MODELS))
def test_quantize_model_route(name):
    x, target = _data()
    model = MODELS[name](num_classes=10)
    report = quantize_model(model, w_bits=8, a_bits=8)
    assert report.bn_folds and all(f.folded for f in report.bn_folds)  # every conv -> BN pair, blocks too
    _train(model, x, target)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    _check(export_onnx(model, x), x, ref)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_ao_prepare_qat_route(name):
    from torch.ao.quantization import disable_observer, prepare_qat

    x, target = _data()
    model = MODELS[name](num_classes=10).train()
    model.fuse_model(is_qat=True)
    model.qconfig = qat_qconfig(activation_bits=8, weight_bits=8)
    prepare_qat(model, inplace=True)
    with torch.no_grad():
        model(x)  # the observers set the first scales
    model.apply(lambda m: m.enable_param_learning() if isinstance(m, LearnableFakeQuantize) else None)
    _train(model, x, target)
    model.eval().apply(disable_observer)
    with torch.no_grad():
        ref = model(x)
    _check(export_prepared_onnx(model, x), x, ref)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pt2e_route(name):
    pytest.importorskip("torchao.quantization.pt2e", reason="needs the [torchao] extra")
    from torchao.quantization.pt2e import (
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        enable_range_learning,
        move_exported_model_to_eval,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from spark_ext.quant.pt2e import PT2ELearnableFakeQuantize

    default = xiq.get_default_x86_inductor_quantization_config(is_qat=True)

    def ours(spec, observer):
        ctr = PT2ELearnableFakeQuantize.with_args(observer=observer, use_grad_scaling=True)
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=ctr)

    config = dataclasses.replace(
        default,
        input_activation=ours(default.input_activation, MovingAverageMinMaxObserver),
        weight=ours(default.weight, MovingAveragePerChannelMinMaxObserver),
    )
    x, target = _data()
    exported = torch.export.export(MODELS[name](num_classes=10), (x,)).module()
    model = prepare_qat_pt2e(exported, xiq.X86InductorQuantizer().set_global(config))
    with torch.no_grad():
        model(x)
    model.apply(enable_range_learning)
    _train(model, x, target)
    converted = convert_pt2e(model)
    move_exported_model_to_eval(converted)
    with torch.no_grad():
        ref = converted(x)
    _check(export_pt2e_onnx(converted, x), x, ref)


class Small(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = torch.nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def test_narrow_ranges_are_clipped_and_match_each_route():
    """4-bit activations held in uint8: QuantizeLinear saturates to 0..255 only, so each route clamps first."""
    from torch.ao.quantization import disable_observer, prepare_qat

    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8) * 3  # far beyond the 4-bit range
    model = Small().train()
    model.qconfig = qat_qconfig(activation_bits=4, weight_bits=4)
    prepare_qat(model, inplace=True)
    with torch.no_grad():
        model(x)
    model.eval().apply(disable_observer)
    with torch.no_grad():
        ref = model(x)
    proto = export_prepared_onnx(model, x)
    assert "Clip" in [n.op_type for n in proto.graph.node]
    torch.testing.assert_close(_onnxruntime(proto, x, fused=False), ref, rtol=1e-4, atol=1e-4)

    pytest.importorskip("torchao.quantization.pt2e", reason="needs the [torchao] extra")
    from torchao.quantization.pt2e import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

    from spark_ext.quant.pt2e import PT2ELearnableFakeQuantize

    act = QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=15,
        qscheme=torch.per_tensor_affine,
        observer_or_fake_quant_ctr=PT2ELearnableFakeQuantize.with_args(observer=MovingAverageMinMaxObserver),
    )
    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-7,
        quant_max=7,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        observer_or_fake_quant_ctr=PT2ELearnableFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver),
    )

    class ConvQuantizer(Quantizer):
        def annotate(self, gm):
            for node in gm.graph.nodes:
                if node.op == "call_function" and node.target == torch.ops.aten.conv2d.default:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={node.args[0]: act, node.args[1]: weight}, output_qspec=act, _annotated=True
                    )
            return gm

        def validate(self, gm):
            pass

    prepared = prepare_qat_pt2e(torch.export.export(Small(), (x,)).module(), ConvQuantizer())
    prepared(x)
    with pytest.raises(ValueError, match=r"still holds fake quantizes .*call convert_pt2e\(model\) first"):
        export_pt2e_onnx(prepared, x)
    converted = convert_pt2e(prepared)
    with torch.no_grad():
        ref = converted(x)
    proto = export_pt2e_onnx(converted, x)
    assert "Clip" in [n.op_type for n in proto.graph.node]
    torch.testing.assert_close(_onnxruntime(proto, x, fused=False), ref, rtol=1e-4, atol=1e-4)


def test_each_export_names_the_route_a_model_needs():
    from torch.ao.quantization import prepare_qat

    x = torch.randn(1, 3, 8, 8)
    ours = Small()
    quantize_model(ours)
    ours(x)
    prepared = Small().train()
    prepared.qconfig = qat_qconfig()
    prepare_qat(prepared, inplace=True)
    prepared(x)
    with pytest.raises(ValueError, match="torch.ao prepare_qat model: use export_prepared_onnx"):
        export_onnx(prepared, x)
    with pytest.raises(ValueError, match="quantize_model layers: use export_onnx"):
        export_prepared_onnx(ours, x)
    with pytest.raises(TypeError, match="GraphModule from convert_pt2e, got Small: .* use export_onnx"):
        export_pt2e_onnx(ours, x)
    with pytest.raises(ValueError, match="no torch.ao fake quantize; convert it with quantize_model"):
        export_prepared_onnx(Small(), x)
    converted = torch.ao.quantization.convert(copy.deepcopy(prepared).eval())
    with pytest.raises(ValueError, match=r"torch.ao convert\(\) model .* export the prepare_qat model"):
        export_onnx(converted, x)


def test_timm_model_through_quantize_model_and_export():
    """A timm ResNet (conv -> BN pairs in its blocks) through quantize_model, a training step and export_onnx.

    timm imports torchvision (timm.layers.create_norm); where torchvision does not import next to torch
    (the CPU wheels here), this skips with that reason."""
    timm = pytest.importorskip("timm", reason="needs timm (which needs a torchvision matching torch)")
    x, target = _data()
    model = timm.create_model("resnet18", num_classes=10)
    report = quantize_model(model, w_bits=8, a_bits=8)
    assert sum(f.folded for f in report.bn_folds) >= 20
    _train(model, x, target)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    _check(export_onnx(model, x), x, ref)


@pytest.mark.parametrize("w_bits", [4, None])
def test_folded_bn_exports_as_one_conv_even_with_a_zero_bn_weight(w_bits):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight[1] = 0.0  # a zero-initialised BN weight: its channel is the BN bias
        model[1].bias.uniform_(0.1, 0.3)
    quantize_model(model, w_bits=w_bits, a_bits=8)
    x = torch.randn(2, 3, 8, 8)
    model(x)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    proto = export_onnx(model, x, int4=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Conv") == 1 and "BatchNormalization" not in ops
    got = _onnxruntime(proto, x, fused=False)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[:, 1], model[0].bn.bias[1].detach().expand_as(got[:, 1]))
