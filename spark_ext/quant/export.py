"""``export_onnx``: a QAT model (``quantize_model`` / the quantized layers) as an ONNX QDQ model.

Every quantized layer becomes, in the ONNX graph,

* input activation: ``QuantizeLinear -> DequantizeLinear`` (per tensor, the
  learned step as scale, zero point 0; LSQ+ offsets as a float ``Sub`` before and
  ``Add`` after), preceded by a ``Clip`` only when the layer's integer range is
  narrower than the integer type (e.g. 6 bits in int8; 2 or 3 bits in INT4, where it is
  written as ``Max``, ``Min``: onnxruntime's Clip-QuantizeLinear fusion fails on 4-bit types);
* weight: an integer initializer (the weight's integer levels, computed here
  with the fake-quant's own float32 math) and a per-output-channel
  ``DequantizeLinear``;
* the float ``Conv`` / ``ConvTranspose`` / ``Gemm`` / ``MatMul`` on the dequantized operands,

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
from typing import Union

import torch
from torch import nn
from torch.nn import functional as F

from ..reference import LSQ_MIN_STEP
from .layers import QUANT_LAYERS, QuantConvTranspose2d, QuantLinear
from .quantizer import LSQQuantizer

__all__ = ["export_onnx", "run_onnx"]

# torch's ONNX exporter writes opset 18 and above; its conversion to older opsets fails on these graphs
# (Shape, QuantizeLinear adapters) and would silently keep opset 18.
MIN_OPSET = 18
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
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().float().clone())
        self.int4_parts: list[str] = []

        wq = layer.weight_quantizer
        w = layer.weight.detach().float()
        if wq is not None and wq.enabled:
            if not wq.is_initialized:
                raise ValueError(f"export_onnx: the weight quantizer of {name!r} is not initialised (run a forward)")
            qn, qp = wq.qrange
            self.w_axis = wq._axis_for(w)
            step = wq.step.detach().float().clamp_min(LSQ_MIN_STEP)
            view = [-1 if d == self.w_axis else 1 for d in range(w.dim())]
            # The fake-quant op's math: round_half_even(clamp(w / step)) (LSQ weights have no offset).
            levels = torch.round((w / step.reshape(view)).clamp(-qn, qp))
            self.w_dtype = _int_dtype(True)
            self.register_buffer("weight_int", levels.to(self.w_dtype))
            self.register_buffer("weight_scale", step)
            self.register_buffer("weight_zero", torch.zeros_like(step, dtype=torch.int64))
            if int4 and wq.bits <= 4:
                self.int4_parts.append("weight")
            self.weight = None
        else:
            self.w_dtype = None
            self.weight = nn.Parameter(w.clone())

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
        raise ValueError(
            f"export_onnx: {type(model).__name__} has no quantized layer; convert it with quantize_model first"
        )
    inside = {id(q) for m in layers for q in (m.weight_quantizer, m.input_quantizer) if q is not None}
    stray = [names[id(m)] for m in twin.modules() if isinstance(m, LSQQuantizer) and id(m) not in inside]
    if stray:
        raise ValueError(f"export_onnx: LSQQuantizer(s) outside a quantized layer cannot be exported: {stray}")
    replacement = {id(m): _QDQLayer(m, names[id(m)], int4) for m in layers}
    for parent in list(twin.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                parent._modules[child_name] = replacement[id(child)]
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
        model: an ``nn.Module`` containing :class:`QuantConv2d` / :class:`QuantConv1d` /
            :class:`QuantConvTranspose2d` / :class:`QuantLinear` layers whose
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
        ValueError: no quantized layer, an uninitialised quantizer, more than 8 bits,
            a quantizer outside a quantized layer, an opset out of range, a ``path`` whose folder
            does not exist, an ``example_input`` the model cannot take.
        TypeError: ``model`` is not an ``nn.Module``, ``example_input`` not a float tensor, ``opset``
            not an int, ``int4`` / ``dynamic`` not bools, ``path`` not a str / PathLike / None.
        ImportError: the ``[export]`` extra is missing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
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
    too_wide = [
        (n, q.bits) for n, q in model.named_modules() if isinstance(q, LSQQuantizer) and q.enabled and q.bits > 8
    ]
    if too_wide:
        raise ValueError(f"export_onnx supports up to 8 bits per operand; these quantizers have more: {too_wide}")
    onnx = _need("onnx")
    newest = onnx.defs.onnx_opset_version()
    if opset > newest:
        raise ValueError(f"opset must be <= {newest} (the newest the installed onnx knows), got {opset}")
    _need("onnxscript")
    _need("torch.ao.quantization.fx._decomposed")  # registers torch.ops.quantized_decomposed

    twin, int4_layers = _twin(model, int4)
    device = next(itertools.chain(twin.parameters(), twin.buffers())).device
    x = example_input.detach().float().to(device)
    try:  # a clear error before torch.export's long one
        with torch.no_grad():
            twin(x)
    except (RuntimeError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"example_input of shape {tuple(example_input.shape)} does not run through the model: {first_line}"
        ) from exc
    dynamic_shapes = None
    if dynamic:
        auto = torch.export.Dim.AUTO
        dynamic_shapes = ({d: auto for d in range(x.dim()) if d != 1},)
    program = torch.onnx.export(
        twin,
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
        raise ValueError(f"export_onnx: torch's ONNX exporter wrote opset {written}, not opset {opset}")
    if int4_layers:
        _to_int4(proto, int4_layers)
    onnx.checker.check_model(proto)
    if path is not None:
        _save_atomically(onnx, proto, os.fspath(path))
    return proto


def _save_atomically(onnx, proto, path: str) -> None:
    """``onnx.save`` to a temporary file beside ``path``, then rename it over ``path``."""
    import uuid

    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")  # created with the usual permissions
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
            data if isinstance(data, bytes) else os.fspath(data), providers=["CPUExecutionProvider"]
        )
    (out,) = session.run(None, {session.get_inputs()[0].name: x.detach().float().cpu().numpy()})
    return torch.from_numpy(out)
