"""export_onnx: the QAT model as ONNX QDQ, run by onnxruntime on CPU, against the fake-quantized model."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

onnx = pytest.importorskip("onnx", reason="needs the [export] extra")
ort = pytest.importorskip("onnxruntime", reason="needs the [export] extra")
pytest.importorskip("onnxscript", reason="needs the [export] extra")

from spark_ext.quant import LSQQuantizer, QuantConv2d, quantize_model  # noqa: E402
from spark_ext.quant.export import ORT_BIAS_PASS, export_onnx, int32_bias_overflows, run_onnx  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2))  # nested: the layer is 'body.0'
        self.up = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1)
        self.tail = nn.Conv2d(8, 3, 3, padding=1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.head(x))
        y = self.tail(F.relu(self.up(F.relu(self.body(h))))) + F.interpolate(x, scale_factor=2.0)
        return self.fc(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def quant_net(**kw):
    torch.manual_seed(0)
    model = Net()
    quantize_model(model, **kw)
    model(torch.rand(2, 3, 12, 12))  # initialises every quantizer
    return model.eval()


def codes_of_model(model, x):
    """Integer levels of every input-quantizer output of the fake-quantized model, by layer name."""
    codes, hooks = {}, []
    for name, m in model.named_modules():
        q = getattr(m, "input_quantizer", None)
        if isinstance(q, LSQQuantizer):

            def hook(mod, args, out, name=name):
                o = 0.0 if mod.offset is None else mod.offset.detach()
                codes[name] = torch.round((out.detach() - o) / mod.step.detach())

            hooks.append(q.register_forward_hook(hook))
    with torch.no_grad():
        y = model(x)
    for h in hooks:
        h.remove()
    return y, codes


def codes_of_onnx(proto, x, fused):
    """Run with every QuantizeLinear output added as a graph output: ``(output, {layer: codes})``.

    ``fused``: onnxruntime's default graph optimisations (QDQ groups fused into integer kernels,
    which requantize with their own rounding); else none (each node as the ONNX spec defines it).
    """
    from spark_ext.quant.export import _scope

    extra = onnx.ModelProto()
    extra.CopyFrom(proto)
    names = {}
    for node in list(extra.graph.node):
        if node.op_type == "QuantizeLinear":  # cast: numpy has no 4-bit type
            wide = node.output[0] + "_int32"
            extra.graph.node.append(onnx.helper.make_node("Cast", [node.output[0]], [wide], to=onnx.TensorProto.INT32))
            names[wide] = _scope(node)
            extra.graph.output.append(onnx.helper.make_tensor_value_info(wide, onnx.TensorProto.INT32, None))
    options = ort.SessionOptions()
    if not fused:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(
        extra.SerializeToString(), options, providers=["CPUExecutionProvider"], disabled_optimizers=[ORT_BIAS_PASS]
    )
    outs = sess.run(None, {"input": x.numpy()})
    got = {
        names[o.name]: torch.from_numpy(v.astype("int64")).double()
        for o, v in zip(sess.get_outputs(), outs)
        if o.name in names
    }
    return torch.from_numpy(outs[0]), got


@pytest.mark.parametrize(
    "kw, int4",
    [
        (dict(w_bits=8, a_bits=8, first_last_bits=None, a_learn_offset=True), False),  # LSQ+ offsets: Sub/Add
        (dict(w_bits=4, a_bits=4, layer_bits={"tail": {"a_bits": 6}, "up": {"w_bits": 3}}), True),
    ],
    ids=["w8a8-lsq+", "w4a4-int4-mixed"],
)
def test_onnxruntime_matches_fake_quant(tmp_path, kw, int4):
    model = quant_net(**kw)
    path = tmp_path / "model.onnx"
    proto = export_onnx(model, torch.rand(1, 3, 12, 12), path, int4=int4)
    assert path.is_file()
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 5 and ops.count("DequantizeLinear") == 10
    types = {i.name: i.data_type for i in proto.graph.initializer}
    weight_types = {
        n.input[0].split("__")[0]: types[n.input[0]]
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in types
    }
    T = onnx.TensorProto
    if int4:
        assert sorted(weight_types.values()) == sorted([T.INT4] * 3 + [T.INT8] * 2)  # head / fc: first / last, 8-bit
        assert "Clip" in ops  # the 6-bit activation in int8
    else:
        assert set(weight_types.values()) == {T.INT8} and "Clip" not in ops
        assert "Sub" in ops  # the offsets (the exporter may fold some into Add)

    # Another input size (dynamic shapes). Each node as the ONNX spec defines it: every quantized
    # activation is the fake-quantized model's level (a tie may round the other way: one level,
    # rarely), and the output equals the model's up to float rounding.
    x = torch.rand(2, 3, 10, 14)
    y_ref, codes_ref = codes_of_model(model, x)
    y, codes = codes_of_onnx(proto, x, fused=False)
    assert sorted(codes) == sorted(codes_ref)
    for name in codes_ref:
        diff = (codes[name] - codes_ref[name].double()).abs()
        assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3, name
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    # onnxruntime's default (fused integer kernels): each layer's levels within one of the model's;
    # a level that requantization rounds the other way moves the next layers' inputs too.
    y_fused, codes_fused = codes_of_onnx(proto, x, fused=True)
    for name in codes_ref:
        diff = (codes_fused[name] - codes_ref[name].double()).abs()
        assert diff.max() <= 1 and (diff > 0).double().mean() < 0.1, name
    print(
        f"fused: output max |diff| {float((y_fused - y_ref).abs().max()):.4g}, "
        f"mean {float((y_fused - y_ref).abs().mean()):.3g}"
    )
    assert (y_fused - y_ref).abs().mean() < float(model.fc.input_quantizer.step)
    torch.testing.assert_close(run_onnx(path, x), y_fused)


def test_export_errors():
    model = quant_net(w_bits=8, a_bits=8)
    x = torch.rand(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"has no quantized layer; convert it with quantize_model \(export_onnx\)"):
        export_onnx(Net(), x)
    with pytest.raises(ValueError, match=r"int4=True needs opset >= 21 .* got opset=18"):
        export_onnx(model, x, opset=18)
    with pytest.raises(ValueError, match="opset must be >= 18"):
        export_onnx(model, x, opset=11)
    with pytest.raises(TypeError, match="example_input must be a float tensor"):
        export_onnx(model, torch.ones(1, 3, 8, 8, dtype=torch.int64))
    fresh = Net()
    quantize_model(fresh)
    with pytest.raises(ValueError, match="the weight quantizer of 'head' is not initialised"):
        export_onnx(fresh, x)
    wide = Net()
    quantize_model(wide, w_bits=12, a_bits=8, first_last_bits=None)
    with pytest.raises(ValueError, match=r"up to 8 bits per operand; .*\('head.weight_quantizer', 12\)"):
        export_onnx(wide, x)
    stray = nn.Sequential(LSQQuantizer(8, True), model)
    stray(x)
    with pytest.raises(ValueError, match=r"outside a quantized layer cannot be exported: \['0'\]"):
        export_onnx(stray, x)


@pytest.mark.parametrize(
    "bits, int4",
    [(b, True) for b in (2, 3, 4)] + [(b, False) for b in range(2, 9)],
    ids=lambda v: str(v) if not isinstance(v, bool) else ("int4" if v else "int8"),
)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_every_bit_width_matches_onnxruntime_beyond_the_learned_range(bits, int4, signed):
    # 2- and 3-bit activations in INT4 lost their Clip: QuantizeLinear saturates to INT4's range, not the
    # layer's, so inputs beyond the learned range came out whole steps away from the fake-quant model.
    torch.manual_seed(bits)
    identity = nn.Conv2d(3, 3, 1, bias=False)  # a node in front of the quantizer, as in a real network
    nn.init.dirac_(identity.weight)
    quantized = QuantConv2d(3, 4, 3, padding=1, w_bits=bits, a_bits=bits, a_signed=signed)
    model = nn.Sequential(identity, quantized).eval()
    with torch.no_grad():
        model(torch.rand(2, 3, 8, 8) - (0.5 if signed else 0.0))  # learns a range of about +-0.5 / [0, 1]
    quantizer = quantized.input_quantizer
    qn, qp = quantizer.qrange
    step = float(quantizer.step)
    x = (qn + qp) * step * torch.randn(2, 3, 9, 7)
    assert (x > qp * step).any() and (x < -qn * step).any(), "the input must leave the learned range both ways"
    proto = export_onnx(model, torch.rand(1, 3, 8, 8), int4=int4)
    type_bits = 4 if int4 and bits <= 4 else 8
    ops = {n.op_type for n in proto.graph.node}
    # In front of an INT4 / UINT4 QuantizeLinear the clip is Max, Min (onnxruntime fails on Clip there).
    assert ({"Max", "Min"} <= ops if type_bits == 4 else "Clip" in ops) == (bits < type_bits)
    with torch.no_grad():
        want = model(x)
    torch.testing.assert_close(run_onnx(proto, x), want, rtol=1e-5, atol=1e-5)


def test_export_options_are_honoured_or_refused(tmp_path):
    model = quant_net(w_bits=8, a_bits=8)
    x = torch.rand(1, 3, 8, 8)
    newest = onnx.defs.onnx_opset_version()
    # torch's exporter writes opset 18 and above: an older one came back silently as opset 18.
    for opset in (13, 17):
        with pytest.raises(ValueError, match=f"opset must be >= 18 .*got {opset}"):
            export_onnx(model, x, opset=opset, int4=False)
    with pytest.raises(ValueError, match=f"opset must be <= {newest} .*got 99"):
        export_onnx(model, x, opset=99)
    with pytest.raises(TypeError, match="opset must be an int, got '21'"):
        export_onnx(model, x, opset="21")
    with pytest.raises(ValueError, match=r"example_input of shape \(1, 4, 8, 8\) does not run through the model"):
        export_onnx(model, torch.rand(1, 4, 8, 8))
    with pytest.raises(TypeError, match="dynamic must be a bool, got 'no'"):
        export_onnx(model, x, dynamic="no")
    with pytest.raises(TypeError, match="path must be a str, an os.PathLike or None, got int"):
        export_onnx(model, x, 3)
    with pytest.raises(ValueError, match="path: the folder .*missing does not exist"):
        export_onnx(model, x, tmp_path / "missing" / "m.onnx")
    with pytest.raises(ValueError, match="path must name a file"):
        export_onnx(model, x, tmp_path)
    for opset, int4 in ((18, False), (22, True)):
        path = tmp_path / f"m{opset}.onnx"
        path.write_text("an older file")
        proto = export_onnx(model, x, path, opset=opset, int4=int4)
        assert [o.version for o in proto.opset_import if o.domain == ""] == [opset]
        assert onnx.load(path) == proto  # replaced whole, no temporary file left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m18.onnx", "m22.onnx"]
    # dynamic=False: the example's shape is fixed in the graph; True: every dim but the channels is free.
    dims = {}
    for dynamic in (False, True):
        proto = export_onnx(model, x, opset=18, int4=False, dynamic=dynamic)
        dims[dynamic] = [d.dim_value or d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[False] == [1, 3, 8, 8]
    with pytest.raises(TypeError, match="x must be a float tensor"):
        run_onnx(proto, x.numpy())
    with pytest.raises(TypeError, match="model_or_path must be an onnx.ModelProto or a path, got int"):
        run_onnx(3, x)
    assert dims[True][1] == 3 and all(isinstance(d, str) for i, d in enumerate(dims[True]) if i != 1)


def test_a_bias_beyond_int32_steps_is_reported_and_run_onnx_keeps_it_exact():
    # onnxruntime's WeightBiasQuantization pass rewrites the float bias of a DQ -> Conv -> Q group as int32 at
    # s_x * s_w without a range check: a bias of more than 2**31 - 1 such steps saturated, and the fused
    # output was silently wrong.
    torch.manual_seed(0)
    conv, head = QuantConv2d(2, 3, 3, padding=1), QuantConv2d(3, 1, 1)
    model = nn.Sequential(conv, head)
    x = torch.rand(1, 2, 6, 6)
    model(x)  # the quantizers initialise their steps from a first batch; then set them
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([50.0, -40.0, 0.25]))
        conv.input_quantizer.step.fill_(1e-3)
        conv.weight_quantizer.step.fill_(1e-6)  # 50 / (1e-3 * 1e-6) = 5e10 steps
        head.input_quantizer.step.fill_(0.5)  # holds +-50: the saturated bias (about 2.1) is visible after it
    model.eval()
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match=f"does not fit int32.*disabled_optimizers=\\['{ORT_BIAS_PASS}'\\]"):
        proto = export_onnx(model, x)
    assert [name for name, _ in int32_bias_overflows(proto)] and len(int32_bias_overflows(proto)) == 1
    default = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    wrong = torch.from_numpy(default.run(None, {default.get_inputs()[0].name: x.numpy()})[0])
    assert (wrong - ref).abs().max() > 1  # what onnxruntime's default optimisations do to it
    torch.testing.assert_close(run_onnx(proto, x), ref, rtol=1e-4, atol=1e-4)
