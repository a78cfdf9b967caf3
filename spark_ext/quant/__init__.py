"""Quantization-aware training (QAT) and post-training quantization (PTQ) toolkit (docs/spec.md §5c).

* :class:`LSQQuantizer` — learnable LSQ / LSQ+ fake quantizer (data-driven init).
* :class:`QuantConv1d`, :class:`QuantConv2d`, :class:`QuantConvTranspose2d`,
  :class:`QuantLinear` — float layers with per-output-channel weight and
  per-tensor input-activation quantization (``from_float`` / ``to_float``).
* :func:`quantize_model` — swap every ``nn.Conv1d`` / ``nn.Conv2d`` /
  ``nn.ConvTranspose2d`` / ``nn.Linear`` of a model (per-layer bits by name
  pattern; a ``Conv2d`` -> ``BatchNorm2d`` pair becomes one :class:`QuantConvBn2d`),
  returning a :class:`QuantReport`; :func:`freeze_bn_stats` / :func:`update_bn_stats`
  for ``model.apply``.
* :func:`calibrate` — PTQ: set every step from data by min-max or MSE search.
* :class:`LearnableFakeQuantize` — drop-in for ``torch.ao.quantization._LearnableFakeQuantize``
  running spark_ext's fused learnable fake-quant ops.
* :func:`qat_qconfig` — a torch.ao ``QConfig`` of those (bit widths, per-channel / per-tensor weights,
  signed / unsigned activations) for ``prepare_qat``.
* :func:`export_onnx` / :func:`run_onnx` — the QAT model as ONNX QuantizeLinear / DequantizeLinear
  (``[export]`` extra), run with onnxruntime; :func:`export_prepared_onnx` for a torch.ao
  ``prepare_qat`` model, :func:`export_pt2e_onnx` for a torchao ``convert_pt2e`` model.
* ``spark_ext.quant.pt2e.PT2ELearnableFakeQuantize`` — for torchao's PT2E QAT flow
  (``[torchao]`` extra; imported on its own because it imports torchao).

Typical use::

    from spark_ext.quant import quantize_model, calibrate
    report = quantize_model(model, w_bits=4, a_bits=4)    # in place; print(report) for the table
    calibrate(model, calib_batches, method="mse")          # PTQ baseline (or skip: first batch inits)
    # ... train model as usual (QAT): the steps are ordinary parameters
"""

from .calibrate import calibrate
from .convert import BNFold, QuantEntry, QuantReport, quantize_model
from .export import export_onnx, export_prepared_onnx, export_pt2e_onnx, run_onnx
from .fake_quantize import LearnableFakeQuantize
from .layers import (
    QuantConv1d,
    QuantConv2d,
    QuantConvBn2d,
    QuantConvTranspose2d,
    QuantLinear,
    freeze_bn_stats,
    update_bn_stats,
)
from .qconfig import qat_qconfig
from .quantizer import LSQQuantizer

__all__ = [
    "BNFold",
    "LSQQuantizer",
    "LearnableFakeQuantize",
    "QuantConv1d",
    "QuantConv2d",
    "QuantConvBn2d",
    "QuantConvTranspose2d",
    "QuantEntry",
    "QuantLinear",
    "QuantReport",
    "calibrate",
    "export_onnx",
    "export_prepared_onnx",
    "export_pt2e_onnx",
    "freeze_bn_stats",
    "qat_qconfig",
    "quantize_model",
    "run_onnx",
    "update_bn_stats",
]
