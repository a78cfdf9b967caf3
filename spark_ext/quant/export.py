"""The three QAT routes to ONNX QuantizeLinear / DequantizeLinear (QDQ) models that onnxruntime runs.

* :func:`export_onnx`: a model converted with :func:`~spark_ext.quant.quantize_model`
  (spark_ext's LSQ layers);
* :func:`export_prepared_onnx`: a torch.ao eager model after ``prepare_qat`` (e.g. with
  :func:`~spark_ext.quant.qat_qconfig`'s :class:`~spark_ext.quant.LearnableFakeQuantize`), exported as it
  computes in eval mode;
* :func:`export_pt2e_onnx`: torchao's ``convert_pt2e`` output, through ``torch.export``.

Each refuses a model of another route with a ``ValueError`` / ``TypeError`` that names the right one.

``export_onnx``: every quantized layer becomes, in the ONNX graph,

* input activation: ``QuantizeLinear -> DequantizeLinear`` (per tensor, the
  learned step as scale, zero point 0; LSQ+ offsets as a float ``Sub`` before and
  ``Add`` after), preceded by a ``Clip`` only when the layer's integer range is
  narrower than the integer type (e.g. 6 bits in int8; 2 or 3 bits in INT4, where it is
  written as ``Max``, ``Min``: onnxruntime's Clip-QuantizeLinear fusion fails on 4-bit types);
* weight: an integer initializer (the weight's integer levels, computed here
  with the fake-quant's own float32 math) and a per-output-channel
  ``DequantizeLinear``;
* the float ``Conv`` / ``ConvTranspose`` / ``Gemm`` / ``MatMul`` on the dequantized operands
  (a :class:`~spark_ext.quant.QuantConvBn2d` is one ``Conv``: its BN is folded into the integer
  weight's levels, taken from the BN-scaled weight it trains, and into the bias; no
  ``BatchNormalization`` node),

which is the QDQ format ONNX Runtime and other backends fuse into integer
kernels. Integer types: int8 / uint8 for 5..8 bits; for 2..4 bits INT4 / UINT4
(``int4=True``, ONNX opset >= 21; onnxruntime >= 1.20 runs them on CPU) or
int8 / uint8 holding the 4-bit levels (``int4=False``). More than 8 bits is
refused; opsets 18 (torch's exporter writes none older) up to the installed onnx's newest.
The graph computes what the fake-quantized model computes: each
quantized value is the same grid point, up to float rounding at exact ties
(at most one quantization step, and rare).

Needs the ``[export]`` extra (onnx, onnxscript for torch's ONNX exporter;
onnxruntime to run the result).
"""

from __future__ import annotations

import copy
import itertools
import os
import warnings
from typing import Union

import torch
from torch import nn
from torch.nn import functional as F

from ..atomic import atomic_path
from ..reference import LSQ_MIN_STEP
from .layers import _HOOK_DICTS, QUANT_LAYERS, QuantConvBn2d, QuantConvTranspose2d, QuantLinear
from .quantizer import LSQQuantizer

__all__ = ["export_onnx", "export_prepared_onnx", "export_pt2e_onnx", "run_onnx"]

# torch's ONNX exporter writes opset 18 and above; its conversion to older opsets fails on these graphs
# (Shape, QuantizeLinear adapters) and would silently keep opset 18.
MIN_OPSET = 18
# onnxruntime's graph pass (on from ORT_ENABLE_BASIC) that rewrites a Conv's / Gemm's float bias as int32 at
# scale s_x * s_w. It does not check the range: a bias beyond 2**31 - 1 steps saturates, silently.
ORT_BIAS_PASS = "WeightBiasQuantization"
MIN_INT4_OPSET = 21


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"export_onnx needs {module.split('.')[0]}: pip install 'spark_ext[export]'") from exc


def _int_dtype(signed: bool) -> torch.dtype:
    """The integer type of the exported graph; 2..4-bit operands are retyped to INT4 / UINT4 afterwards."""
    return torch.int8 if signed else torch.uint8


def _int_range(dtype: torch.dtype) -> tuple[int, int]:
    info = torch.iinfo(dtype)
    return info.min, info.max


def _int4_range(signed: bool) -> tuple[int, int]:
    """The range of ONNX INT4 / UINT4 (torch has no such dtype)."""
    return (-8, 7) if signed else (0, 15)


class _QDQLayer(nn.Module):
    """Export-only twin of a quantized layer: integer weight + DequantizeLinear, Q/DQ on the input."""

    def __init__(self, layer: nn.Module, name: str, int4: bool) -> None:
        super().__init__()
        self.name = name
        self.kind = type(layer)
        # A float layer on the meta device gives the conv's padding logic (padding modes, output
        # padding); it is kept out of the module tree so its meta parameters are not exported.
        object.__setattr__(self, "_float", layer._FLOAT(**layer._layer_args(layer), device="meta"))
        bias, keep = layer.bias, None
        with torch.no_grad():
            w = layer.weight_to_quantize().detach().float()
            if isinstance(layer, QuantConvBn2d):  # the eval-mode layer: BN folded into the weight and the bias
                s, s_used = layer.bn_scale()
                keep = (s / s_used).float().reshape(-1, 1, 1, 1)  # 1, or 0 on channels whose BN factor is 0
                bias = layer.folded_bias()
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.int4_parts: list[str] = []

        wq = layer.weight_quantizer
        if wq is not None and wq.enabled:
            if not wq.is_initialized:
                raise ValueError(f"export_onnx: the weight quantizer of {name!r} is not initialised (run a forward)")
            qn, qp = wq.qrange
            self.w_axis = wq._axis_for(w)
            step = wq.step.detach().float().clamp_min(LSQ_MIN_STEP)
            view = [-1 if d == self.w_axis else 1 for d in range(w.dim())]
            # The fake-quant op's math: round_half_even(clamp(w / step)) (LSQ weights have no offset).
            levels = torch.round((w / step.reshape(view)).clamp(-qn, qp))
            if keep is not None:
                levels = levels * keep
            self.w_dtype = _int_dtype(True)
            self.register_buffer("weight_int", levels.to(self.w_dtype))
            self.register_buffer("weight_scale", step)
            self.register_buffer("weight_zero", torch.zeros_like(step, dtype=torch.int64))
            if int4 and wq.bits <= 4:
                self.int4_parts.append("weight")
            self.weight = None
        else:
            self.w_dtype = None
            self.weight = nn.Parameter(w * keep if keep is not None else w.clone())

        aq = layer.input_quantizer
        self.a_dtype = None
        if aq is not None and aq.enabled:
            if not aq.is_initialized:
                raise ValueError(f"export_onnx: the input quantizer of {name!r} is not initialised (run a forward)")
            qn, qp = aq.qrange
            retype = int4 and aq.bits <= 4
            self.a_dtype = _int_dtype(aq.signed)
            self.a_scale = float(aq.step.detach().float().clamp_min(LSQ_MIN_STEP))
            # Clip only when the levels do not fill the integer type the graph quantizes to (INT4 / UINT4
            # once retyped): QuantizeLinear saturates to that type's range, not to the layer's.
            lo, hi = _int4_range(aq.signed) if retype else _int_range(self.a_dtype)
            self.a_clip = None if (-qn, qp) == (lo, hi) else (-qn * self.a_scale, qp * self.a_scale)
            self.a_offset = None if aq.offset is None else float(aq.offset.detach().float())
            if retype:
                self.int4_parts.append("input")

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.a_dtype is None:
            return x
        dtype = self.a_dtype
        if self.a_offset is not None:
            x = x - self.a_offset
        if self.a_clip is not None:
            x = x.clamp(*self.a_clip)
        qd = torch.ops.quantized_decomposed
        info = torch.iinfo(dtype)
        q = qd.quantize_per_tensor(x, self.a_scale, 0, info.min, info.max, dtype)
        x = qd.dequantize_per_tensor(q, self.a_scale, 0, info.min, info.max, dtype)
        if self.a_offset is not None:
            x = x + self.a_offset
        return x

    def _weight(self) -> torch.Tensor:
        if self.w_dtype is None:
            return self.weight
        info = torch.iinfo(self.w_dtype)
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            self.weight_int, self.weight_scale, self.weight_zero, self.w_axis, info.min, info.max, self.w_dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = self._input(x), self._weight()
        if self.kind is QuantLinear:
            return F.linear(x, w, self.bias)
        if self.kind is QuantConvTranspose2d:
            f = self._float
            pad = f._output_padding(x, None, f.stride, f.padding, f.kernel_size, 2, f.dilation)
            return F.conv_transpose2d(x, w, self.bias, f.stride, f.padding, pad, f.groups, f.dilation)
        return self._float._conv_forward(x, w, self.bias)


def _twin(model: nn.Module, int4: bool) -> tuple[nn.Module, dict[str, list[str]]]:
    """A float32 eval copy of ``model`` with every quantized layer replaced by its :class:`_QDQLayer`."""
    twin = copy.deepcopy(model).float().eval()
    names = {id(m): n for n, m in twin.named_modules()}
    layers = [m for m in twin.modules() if isinstance(m, QUANT_LAYERS)]
    if not layers:
        raise ValueError(f"export_onnx: {type(model).__name__} has no quantized layer; {_other_route(model)}")
    inside = {id(q) for m in layers for q in (m.weight_quantizer, m.input_quantizer) if q is not None}
    stray = [names[id(m)] for m in twin.modules() if isinstance(m, LSQQuantizer) and id(m) not in inside]
    if stray:
        raise ValueError(f"export_onnx: LSQQuantizer(s) outside a quantized layer cannot be exported: {stray}")
    replacement = {id(m): _QDQLayer(m, names[id(m)], int4) for m in layers}
    _swap(twin, replacement)
    int4_layers = {r.name: r.int4_parts for r in replacement.values() if r.int4_parts}
    return twin, int4_layers


def _scope(node) -> str:
    """The module path the exporter recorded for an ONNX node (``""`` at the top level)."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            # Cumulative paths, outermost first, the op last: ['', 'body', 'body.0', 'quantize_per_tensor_1'].
            scopes = ast.literal_eval(prop.value)
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def _to_int4(model_proto, int4_layers: dict[str, list[str]]) -> None:
    """Retype the Q/DQ nodes (and integer weights) of the layers in ``int4_layers`` to INT4 / UINT4.

    Each retyped tensor gets a new initializer, so constants the exporter shares
    between layers stay as they were for the others.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model_proto.graph
    inits = {i.name: i for i in graph.initializer}
    to4 = {TensorProto.INT8: TensorProto.INT4, TensorProto.UINT8: TensorProto.UINT4}
    found: dict[str, set[str]] = {name: set() for name in int4_layers}
    producer = {out: node for node in graph.node for out in node.output}
    clips = set()  # the Clip nodes in front of retyped QuantizeLinear nodes

    def retype_input(node, index: int, tag: str) -> None:
        src = inits.get(node.input[index])
        if src is None or src.data_type not in to4:
            raise RuntimeError(
                f"export_onnx: int4: input {index} of {node.name or node.op_type} is not an int8 initializer"
            )
        values = numpy_helper.to_array(src).astype(np.int64)
        new_name = f"{src.name}__{tag}_int4"
        if new_name not in inits:
            new = helper.make_tensor(new_name, to4[src.data_type], values.shape, values.ravel().tolist())
            graph.initializer.append(new)
            inits[new_name] = new
        node.input[index] = new_name

    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        layer = _scope(node)
        if layer not in int4_layers:
            continue
        is_weight = node.op_type == "DequantizeLinear" and node.input[0] in inits
        part = "weight" if is_weight else "input"
        if part not in int4_layers[layer]:
            continue
        tag = layer.replace(".", "_") + "_" + part
        if is_weight:
            retype_input(node, 0, tag)
        elif node.op_type == "QuantizeLinear" and getattr(producer.get(node.input[0]), "op_type", "") == "Clip":
            clips.add(node.input[0])
        if len(node.input) > 2:
            retype_input(node, 2, tag)
        found[layer].add(f"{part}:{node.op_type}")
    for layer, parts in int4_layers.items():
        want = {
            f"{p}:{op}"
            for p in parts
            for op in (("DequantizeLinear",) if p == "weight" else ("QuantizeLinear", "DequantizeLinear"))
        }
        if found[layer] != want:
            raise RuntimeError(
                f"export_onnx: int4: could not find the Q/DQ nodes of layer {layer!r} in the exported graph "
                f"(found {sorted(found[layer])}, expected {sorted(want)}); export with int4=False"
            )
    if clips:
        _clips_as_max_min(graph, clips)
    # Drop the exporter's intermediate type annotations (now stale) and unused initializers.
    graph.ClearField("value_info")
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(keep)


def _clips_as_max_min(graph, outputs: set[str]) -> None:
    """Rewrite the ``Clip`` nodes producing ``outputs`` as ``Max`` then ``Min`` (the same values): onnxruntime's
    Clip-QuantizeLinear fusion fails on an INT4 / UINT4 zero point, and torch's exporter writes Min / Max as Clip."""
    from onnx import helper

    nodes = []
    for node in graph.node:
        if node.op_type == "Clip" and node.output[0] in outputs:
            x, lo, hi = node.input
            low = f"{node.output[0]}__max"
            nodes.append(helper.make_node("Max", [x, lo], [low], name=f"{node.name}_max"))
            nodes.append(helper.make_node("Min", [low, hi], [node.output[0]], name=f"{node.name}_min"))
        else:
            nodes.append(node)
    graph.ClearField("node")
    graph.node.extend(nodes)


def _other_route(model: nn.Module) -> str:
    """Which export function takes ``model``, for the errors of the others."""
    from torch.ao.quantization import FakeQuantizeBase

    if isinstance(model, torch.fx.GraphModule) and _quant_nodes(model.graph):
        return "it is a torchao convert_pt2e model: use export_pt2e_onnx"
    if any(isinstance(m, QUANT_LAYERS) for m in model.modules()):
        return "it has quantize_model layers: use export_onnx"
    if any(isinstance(m, FakeQuantizeBase) or _is_torchao_fake_quant(m) for m in model.modules()):
        if isinstance(model, torch.fx.GraphModule):
            return "it is a torchao prepare_qat_pt2e model: call convert_pt2e(model) and use export_pt2e_onnx"
        return "it is a torch.ao prepare_qat model: use export_prepared_onnx"
    if _ao_quantized_modules(model):
        return (
            "it is a torch.ao convert() model (quantized tensors, which torch's ONNX exporter cannot write): "
            "export the prepare_qat model before convert with export_prepared_onnx"
        )
    return (
        "convert it with quantize_model (export_onnx), torch.ao prepare_qat (export_prepared_onnx) "
        "or torchao's PT2E flow (export_pt2e_onnx) first"
    )


def _is_torchao_fake_quant(module: nn.Module) -> bool:
    try:
        from torchao.quantization.pt2e import FakeQuantizeBase as TorchaoFakeQuantizeBase
    except ImportError:
        return False
    return isinstance(module, TorchaoFakeQuantizeBase)


def _ao_quantized_modules(model: nn.Module) -> list[str]:
    """Names of torch.ao ``convert`` modules (quantized tensors) in ``model``."""
    from torch.ao.nn import quantized as nnq

    kinds = (nnq.Quantize, nnq.Linear, nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.ConvTranspose2d, nnq.QFunctional)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def _check_export_args(example_input, path, opset, dynamic, int4: bool = False):
    """The checks every route shares; returns the onnx module."""
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise TypeError(f"example_input must be a float tensor, got {example_input!r:.80}")
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {opset!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (torch's ONNX exporter cannot write older opsets), got {opset}")
    for value, name in ((int4, "int4"), (dynamic, "dynamic")):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    if path is not None:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path must be a str, an os.PathLike or None, got {type(path).__name__}")
        folder = os.path.dirname(os.path.abspath(os.fspath(path)))
        if not os.path.isdir(folder):
            raise ValueError(f"path: the folder {folder} does not exist")
        if os.path.isdir(path):
            raise ValueError(f"path must name a file, got the folder {os.fspath(path)}")
    if int4 and opset < MIN_INT4_OPSET:
        raise ValueError(
            f"int4=True needs opset >= {MIN_INT4_OPSET} (INT4 / UINT4 QDQ), got opset={opset}; "
            "pass int4=False to keep 4-bit levels in int8"
        )
    onnx = _need("onnx")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ValueError(f"opset must be <= {newest} (the newest the installed onnx knows), got {opset}")
    _need("onnxscript")
    _need("torch.ao.quantization.fx._decomposed")  # registers torch.ops.quantized_decomposed
    return onnx


def _run_example(module, example_input: torch.Tensor, *, as_float: bool = True) -> torch.Tensor:
    """``example_input`` on ``module``'s device (float32 unless ``as_float`` is False), run through it once
    (a clear error before torch.export's long one); returns that input."""
    device = next(itertools.chain(module.parameters(), module.buffers()), torch.empty(0)).device
    x = example_input.detach().to(device)
    x = x.float() if as_float else x
    try:
        with torch.no_grad():
            module(x)
    except (RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"example_input of shape {tuple(example_input.shape)} does not run through the model: {first_line}"
        ) from exc
    return x


def _to_onnx(module_or_program, x: torch.Tensor, opset: int, dynamic: bool):
    """torch's dynamo ONNX exporter on ``(x,)``; every input dim but 1 dynamic when ``dynamic``."""
    dynamic_shapes = None
    if dynamic and not isinstance(module_or_program, torch.export.ExportedProgram):
        auto = torch.export.Dim.AUTO
        dynamic_shapes = ({d: auto for d in range(x.dim()) if d != 1},)
    program = torch.onnx.export(
        module_or_program,
        (x,),
        dynamo=True,
        opset_version=opset,
        input_names=["input"],
        output_names=["output"],
        dynamic_shapes=dynamic_shapes,
        verbose=False,
    )
    proto = program.model_proto
    written = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    if written != [opset]:  # never hand back another opset than the one asked for
        raise ValueError(f"torch's ONNX exporter wrote opset {written}, not opset {opset}")
    return proto


def _constant(graph, name: str):
    """The value of initializer or Constant node ``name`` as a numpy array, or None."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def int32_bias_overflows(proto) -> list[tuple[str, float]]:
    """(node, largest ``|bias| / (s_x s_w)``) of every Conv / Gemm whose float bias does not fit int32 at the
    scale onnxruntime's ``WeightBiasQuantization`` pass gives it (its input's step times its weight's)."""
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    found = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
        if not (dq_x and dq_w and dq_x.op_type == dq_w.op_type == "DequantizeLinear"):
            continue
        s_x, s_w, bias = (_constant(graph, n) for n in (dq_x.input[1], dq_w.input[1], node.input[2]))
        if s_x is None or s_w is None or bias is None or s_x.size != 1:
            continue
        steps = abs(bias.astype("float64")) / (float(s_x.reshape(())) * abs(s_w.astype("float64")))
        if steps.max() > 2**31 - 1:
            found.append((node.name, float(steps.max())))
    return found


def _finish(onnx, proto, path):
    onnx.checker.check_model(proto)
    overflows = int32_bias_overflows(proto)
    if overflows:
        name, steps = max(overflows, key=lambda item: item[1])
        warnings.warn(
            f"the float bias of {len(overflows)} layer(s) does not fit int32 at the input's step times the "
            f"weight's ({name}: {steps:.3g} steps): onnxruntime's {ORT_BIAS_PASS} graph pass saturates it; run "
            f"with onnxruntime.InferenceSession(..., disabled_optimizers=[{ORT_BIAS_PASS!r}]) (run_onnx does)",
            stacklevel=3,
        )
    if path is not None:
        with atomic_path(path) as tmp:
            onnx.save(proto, os.fspath(tmp))
    return proto


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: Union[str, os.PathLike, None] = None,
    *,
    opset: int = 21,
    int4: bool = True,
    dynamic: bool = True,
):
    """Write ``model`` (with quantized layers) as an ONNX QDQ model; return the ``onnx.ModelProto``.

    Args:
        model: an ``nn.Module`` containing :class:`QuantConv2d` / :class:`QuantConvBn2d` /
            :class:`QuantConv1d` / :class:`QuantConvTranspose2d` / :class:`QuantLinear` layers whose
            quantizers are initialised (one forward, :func:`calibrate`, or a loaded
            state). Not modified (a float32 eval-mode copy is exported). Other
            modules must be exportable by ``torch.onnx.export(dynamo=True)``.
        example_input: one float tensor the model takes (its shape fixes the rank).
        path: where to write the ``.onnx`` file (``None``: only return it); written to a temporary
            name in the same folder and renamed, so an existing file is replaced only by a complete model.
        opset: ONNX opset, from 18 (the lowest torch's exporter writes) to the installed onnx's newest;
            4-bit types need >= 21. The returned model has exactly this opset.
        int4: store 2..4-bit operands as INT4 / UINT4 (needs opset >= 21); else in int8 / uint8.
        dynamic: every input dim except dim 1 (channels) may change at run time; ``False``: the
            example input's shape is fixed.

    Raises:
        ValueError: no quantized layer (the message names the export function of a torch.ao or
            PT2E model), an uninitialised quantizer, more than 8 bits,
            a quantizer outside a quantized layer, an opset out of range, a ``path`` whose folder
            does not exist, an ``example_input`` the model cannot take.
        TypeError: ``model`` is not an ``nn.Module``, ``example_input`` not a float tensor, ``opset``
            not an int, ``int4`` / ``dynamic`` not bools, ``path`` not a str / PathLike / None.
        ImportError: the ``[export]`` extra is missing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    onnx = _check_export_args(example_input, path, opset, dynamic, int4)
    too_wide = [
        (n, q.bits) for n, q in model.named_modules() if isinstance(q, LSQQuantizer) and q.enabled and q.bits > 8
    ]
    if too_wide:
        raise ValueError(f"export_onnx supports up to 8 bits per operand; these quantizers have more: {too_wide}")

    twin, int4_layers = _twin(model, int4)
    x = _run_example(twin, example_input)
    try:
        proto = _to_onnx(twin, x, opset, dynamic)
    except ValueError as exc:
        raise ValueError(f"export_onnx: {exc}") from exc
    if int4_layers:
        _to_int4(proto, int4_layers)
    return _finish(onnx, proto, path)


# ---------------------------------------------------------------- torch.ao prepare_qat models

_INT_DTYPES = {torch.quint8: torch.uint8, torch.qint8: torch.int8, torch.uint8: torch.uint8, torch.int8: torch.int8}
_PER_CHANNEL_SCHEMES = (torch.per_channel_affine, torch.per_channel_symmetric)


def _fake_quant_qparams(fq: nn.Module, name: str):
    """``(scale, zero_point, quant_min, quant_max, integer dtype)`` a torch.ao fake quantize computes with now."""
    dtype = _INT_DTYPES.get(fq.dtype)
    if dtype is None:
        raise ValueError(
            f"export_prepared_onnx: {name!r} fake-quantizes to {fq.dtype}; only 8-bit integer types export"
        )
    scale = fq.scale.detach().float().clamp_min(torch.finfo(torch.float32).eps)
    zero_point = fq.zero_point.detach().float().round().clamp(fq.quant_min, fq.quant_max).long()
    if fq.qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric):
        zero_point = torch.zeros_like(zero_point)
    return scale, zero_point, fq.quant_min, fq.quant_max, dtype


def _fake_quant_enabled(fq: nn.Module) -> bool:
    return bool(fq.fake_quant_enabled[0] == 1)


class _ActivationQDQ(nn.Module):
    """A per-tensor torch.ao fake quantize as QuantizeLinear -> DequantizeLinear (Clip first for a narrow range)."""

    def __init__(self, fq: nn.Module, name: str) -> None:
        super().__init__()
        if fq.qscheme not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            raise ValueError(
                f"export_prepared_onnx: the activation fake quantize {name!r} is {fq.qscheme}; only per-tensor exports"
            )
        scale, zero_point, self.qmin, self.qmax, self.dtype = _fake_quant_qparams(fq, name)
        self.scale, self.zero_point = float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])
        lo, hi = _int_range(self.dtype)
        narrow = (self.qmin, self.qmax) != (lo, hi)
        self.clip = (
            ((self.qmin - self.zero_point) * self.scale, (self.qmax - self.zero_point) * self.scale) if narrow else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip is not None:
            x = x.clamp(*self.clip)
        qd = torch.ops.quantized_decomposed
        q = qd.quantize_per_tensor(x, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)
        return qd.dequantize_per_tensor(q, self.scale, self.zero_point, self.qmin, self.qmax, self.dtype)


class _WeightedQDQ(nn.Module):
    """A torch.ao QAT conv / linear (BN folded, ReLU fused) with its weight as integer levels + DequantizeLinear.

    ``float_layer``: the module's ``to_float()`` (a conv / linear, or a fused Sequential of one and its ReLU),
    whose weight holds the BN in ``ConvBn*`` modules; ``fq``: its ``weight_fake_quant``.
    """

    def __init__(self, float_layer: nn.Module, fq: nn.Module, name: str) -> None:
        super().__init__()
        parts = list(float_layer) if isinstance(float_layer, nn.Sequential) else [float_layer]
        layer, after = parts[0], parts[1:]
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            raise ValueError(
                f"export_prepared_onnx: cannot export {name!r} ({type(float_layer).__qualname__}): only QAT "
                "convs and linears (with fused BN / ReLU) have a weight fake quantize that exports"
            )
        self.after = nn.Sequential(*after) if after else None
        w = layer.weight.detach().float()
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())
        object.__setattr__(self, "_float", layer.to("meta"))  # its options; kept out of the exported tree
        self.per_channel = fq.qscheme in _PER_CHANNEL_SCHEMES
        self.w_dtype = None
        if _fake_quant_enabled(fq):
            scale, zero_point, qmin, qmax, self.w_dtype = _fake_quant_qparams(fq, name)
            self.qmin, self.qmax = qmin, qmax
            if self.per_channel:
                self.axis = fq.ch_axis % w.dim()
                fake = torch.fake_quantize_per_channel_affine(w, scale, zero_point.int(), self.axis, qmin, qmax)
                view = [-1 if d == self.axis else 1 for d in range(w.dim())]
                levels = torch.round(fake / scale.reshape(view)) + zero_point.reshape(view)
            else:
                s, z = float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0])
                levels = torch.round(torch.fake_quantize_per_tensor_affine(w, s, z, qmin, qmax) / s) + z
                scale, zero_point = scale.reshape(-1)[:1], zero_point.reshape(-1)[:1]
            # The levels the fake quantize computes (its own rounding), stored as integers.
            self.register_buffer("weight_int", levels.to(self.w_dtype))
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero", zero_point)
            self.weight = None
        else:
            self.weight = nn.Parameter(w.clone())

    def _weight(self) -> torch.Tensor:
        if self.w_dtype is None:
            return self.weight
        qd = torch.ops.quantized_decomposed
        if self.per_channel:
            return qd.dequantize_per_channel(
                self.weight_int, self.weight_scale, self.weight_zero, self.axis, self.qmin, self.qmax, self.w_dtype
            )
        s, z = float(self.weight_scale), int(self.weight_zero)
        return qd.dequantize_per_tensor(self.weight_int, s, z, self.qmin, self.qmax, self.w_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._weight()
        y = (
            F.linear(x, w, self.bias)
            if isinstance(self._float, nn.Linear)
            else self._float._conv_forward(x, w, self.bias)
        )
        return y if self.after is None else self.after(y)


def _swap(model: nn.Module, replacement: dict[int, nn.Module]) -> None:
    """Put ``replacement[id(child)]`` in place of every such child, under every name."""
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                parent._modules[child_name] = replacement[id(child)]


def _prepared_twin(model: nn.Module) -> nn.Module:
    """A float32 eval copy of a torch.ao ``prepare_qat`` model as it computes with fixed qparams: each QAT
    conv / linear a :class:`_WeightedQDQ`, each other fake quantize an :class:`_ActivationQDQ` (an
    ``nn.Identity`` when its fake quant is off), each bare observer an ``nn.Identity``."""
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase

    if any(isinstance(m, (*QUANT_LAYERS, LSQQuantizer)) for m in model.modules()) or isinstance(
        model, torch.fx.GraphModule
    ):
        raise ValueError(f"export_prepared_onnx: {_other_route(model)}")
    twin = copy.deepcopy(model).float().eval()
    names = {id(m): n for n, m in twin.named_modules()}
    weighted = [m for m in twin.modules() if isinstance(getattr(m, "weight_fake_quant", None), FakeQuantizeBase)]
    weight_fqs = {id(m.weight_fake_quant) for m in weighted}
    fakes = [m for m in twin.modules() if isinstance(m, FakeQuantizeBase) and id(m) not in weight_fqs]
    if not weighted and not fakes:
        raise ValueError(
            f"export_prepared_onnx: {type(model).__name__} has no torch.ao fake quantize; {_other_route(model)}"
        )
    # Activations first: a QAT module's own output fake quantize (its activation_post_process, called by
    # a forward hook) then moves to its replacement with the hooks.
    replacement: dict[int, nn.Module] = {}
    for m in fakes:
        replacement[id(m)] = _ActivationQDQ(m, names[id(m)]) if _fake_quant_enabled(m) else nn.Identity()
    for m in twin.modules():
        if isinstance(m, ObserverBase) and id(m) not in replacement:
            replacement[id(m)] = nn.Identity()
    _swap(twin, replacement)
    replacement = {}
    for m in weighted:
        if not hasattr(m, "to_float"):
            raise ValueError(f"export_prepared_onnx: cannot export {names[id(m)]!r} ({type(m).__qualname__})")
        twin_layer = _WeightedQDQ(m.to_float(), m.weight_fake_quant, names[id(m)])
        if "activation_post_process" in m._modules:
            twin_layer.activation_post_process = m.activation_post_process
        for hooks in _HOOK_DICTS:
            getattr(twin_layer, hooks).update(getattr(m, hooks))
        replacement[id(m)] = twin_layer
    _swap(twin, replacement)
    return twin


def export_prepared_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: Union[str, os.PathLike, None] = None,
    *,
    opset: int = 21,
    dynamic: bool = True,
):
    """Write a torch.ao eager QAT model (after ``prepare_qat``, trained) as an ONNX QDQ model; return the proto.

    The graph is the prepared model in eval mode with its current qparams: each fake quantize on an
    activation (``activation_post_process`` of a module, a ``QuantStub``, a ``FloatFunctional``) becomes
    ``QuantizeLinear -> DequantizeLinear`` (per tensor; a ``Clip`` first when its
    ``[quant_min, quant_max]`` is narrower than int8 / uint8), and each QAT conv / linear one ``Conv`` /
    ``Gemm`` on an integer weight and a ``DequantizeLinear`` (per channel or per tensor), its BN folded
    (torch.ao's ``ConvBn*`` / ``ConvBnReLU*``, from ``to_float()``) and its fused ReLU after it. The
    weight's levels are the fake quantize's own. The model is not modified; compare it with the ONNX
    model in eval mode with the observers off (``model.apply(torch.ao.quantization.disable_observer)``,
    else its next forward moves the scales).

    This route exports the fake-quant graph rather than ``torch.ao.quantization.convert``'s model: the
    converted modules hold quantized tensors, which torch's ONNX exporter (``dynamo=True``) cannot
    write. Codes live in int8 / uint8 (no INT4). Fake quantizes with ``fake_quant_enabled`` off
    pass values through.

    Args: as :func:`export_onnx` (no ``int4``).

    Raises:
        ValueError: no torch.ao fake quantize (the message names the export function of a
            ``quantize_model`` or PT2E model), a per-channel activation fake quantize, a fake quantize to a
            dtype other than (q)int8 / (q)uint8, a QAT module other than a conv / linear, the checks of
            :func:`export_onnx`.
        TypeError, ImportError: as :func:`export_onnx`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    onnx = _check_export_args(example_input, path, opset, dynamic)
    twin = _prepared_twin(model)
    x = _run_example(twin, example_input)
    try:
        proto = _to_onnx(twin, x, opset, dynamic)
    except ValueError as exc:
        raise ValueError(f"export_prepared_onnx: {exc}") from exc
    return _finish(onnx, proto, path)


# ---------------------------------------------------------------- torchao PT2E models


def _quant_nodes(graph) -> list:
    """The quantize / dequantize nodes (``torch.ops.quantized_decomposed``) of an FX graph."""
    return [
        n
        for n in graph.nodes
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "quantized_decomposed"
    ]


def _clamp_narrow_quantize(gm: torch.fx.GraphModule) -> None:
    """Insert a clamp before every per-tensor quantize whose ``[quant_min, quant_max]`` is narrower than its
    dtype: ONNX QuantizeLinear saturates to the dtype's range only (torch's exporter drops the narrower one)."""
    qpt = torch.ops.quantized_decomposed.quantize_per_tensor
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (qpt.default,):
            continue
        x, scale, zero_point, qmin, qmax, dtype = node.args[:6]
        if (qmin, qmax) == _int_range(dtype):
            continue
        with gm.graph.inserting_before(node):
            low, high = (qmin - zero_point) * scale, (qmax - zero_point) * scale
            clamped = gm.graph.call_function(torch.ops.aten.clamp.default, (x, low, high))
        node.replace_input_with(x, clamped)
    gm.graph.lint()
    gm.recompile()


def export_pt2e_onnx(
    model: torch.fx.GraphModule,
    example_input: torch.Tensor,
    path: Union[str, os.PathLike, None] = None,
    *,
    opset: int = 21,
    dynamic: bool = True,
):
    """Write torchao's ``convert_pt2e`` output as an ONNX QDQ model; return the ``onnx.ModelProto``.

    ``convert_pt2e`` already holds its quantization as ``quantized_decomposed`` quantize / dequantize
    nodes (weights as integer constants, BN folded by ``prepare_qat_pt2e``); a copy is put in eval mode
    (torchao's ``move_exported_model_to_eval``: dropout off, BN on running statistics), a clamp is
    inserted before each per-tensor quantize whose range is narrower than its 8-bit dtype, and the
    copy goes through ``torch.export`` and torch's ONNX exporter. ``dynamic`` asks for every input dim
    but 1 to be dynamic (``Dim.AUTO``): dims the captured graph fixed stay fixed. Codes live in
    int8 / uint8. Args otherwise as :func:`export_onnx` (no ``int4``).

    Raises:
        TypeError: ``model`` is not a ``torch.fx.GraphModule`` (the message names the export function
            of a ``quantize_model`` or torch.ao model); the other argument errors of :func:`export_onnx`.
        ValueError: a prepared model not converted yet (fake quantizes left: call ``convert_pt2e``),
            a graph without quantize nodes, the checks of :func:`export_onnx`.
        ImportError: the ``[export]`` or ``[torchao]`` extra is missing.
    """
    if not isinstance(model, torch.fx.GraphModule):
        why = _other_route(model) if isinstance(model, nn.Module) else "expected convert_pt2e's output"
        raise TypeError(
            f"export_pt2e_onnx takes a torch.fx.GraphModule from convert_pt2e, got {type(model).__name__}: {why}"
        )
    onnx = _check_export_args(example_input, path, opset, dynamic)
    from torch.ao.quantization import FakeQuantizeBase

    left = [n for n, m in model.named_modules() if isinstance(m, FakeQuantizeBase) or _is_torchao_fake_quant(m)]
    if left:
        raise ValueError(
            f"export_pt2e_onnx: the model still holds fake quantizes ({left[:3]}{' ...' if len(left) > 3 else ''}): "
            "call convert_pt2e(model) first"
        )
    if not _quant_nodes(model.graph):
        raise ValueError(f"export_pt2e_onnx: the graph has no quantize / dequantize node; {_other_route(model)}")
    move_to_eval = _need("torchao.quantization.pt2e").move_exported_model_to_eval
    gm = copy.deepcopy(model)
    move_to_eval(gm)
    _clamp_narrow_quantize(gm)
    x = _run_example(gm, example_input, as_float=False)
    dynamic_shapes = ({d: torch.export.Dim.AUTO for d in range(x.dim()) if d != 1},) if dynamic else None
    try:
        program = torch.export.export(gm, (x,), dynamic_shapes=dynamic_shapes)
        proto = _to_onnx(program, x, opset, dynamic)
    except ValueError as exc:
        raise ValueError(f"export_pt2e_onnx: {exc}") from exc
    return _finish(onnx, proto, path)


def run_onnx(model_or_path, x: torch.Tensor, session=None) -> torch.Tensor:
    """Run an exported model with onnxruntime on CPU: ``x`` float tensor -> float32 CPU tensor.

    ``model_or_path``: an ``onnx.ModelProto`` or a path to a ``.onnx`` file (ignored when ``session``, an
    ``onnxruntime.InferenceSession``, is given)."""
    ort = _need("onnxruntime")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x!r:.80}")
    if session is None and not (
        isinstance(model_or_path, (str, os.PathLike)) or hasattr(model_or_path, "SerializeToString")
    ):
        raise TypeError(f"model_or_path must be an onnx.ModelProto or a path, got {type(model_or_path).__name__}")
    if session is None:
        data = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else model_or_path.SerializeToString()
        session = ort.InferenceSession(
            data if isinstance(data, bytes) else os.fspath(data),
            providers=["CPUExecutionProvider"],
            disabled_optimizers=[ORT_BIAS_PASS],  # int32_bias_overflows
        )
    (out,) = session.run(None, {session.get_inputs()[0].name: x.detach().float().cpu().numpy()})
    return torch.from_numpy(out)
