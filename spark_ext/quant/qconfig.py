"""``qat_qconfig``: a ready-made torch.ao ``QConfig`` for eager QAT with spark_ext's ``LearnableFakeQuantize``.

torch.ao's eager flow (``model.qconfig = ...``; ``prepare_qat``; train; ``convert``) takes a ``QConfig``
of two fake-quantize factories. ``qat_qconfig`` builds the usual one (what
``torch.ao.quantization.get_default_qat_qconfig`` is for torch's fixed-scale fake quants)::

    from torch.ao.quantization import prepare_qat, convert
    from spark_ext.quant import qat_qconfig

    model.qconfig = qat_qconfig(activation_bits=8, weight_bits=4)
    prepare_qat(model, inplace=True)
    # ... model(x) once (the observers set the first scales), then
    # model.apply(lambda m: m.enable_param_learning() if hasattr(m, "enable_param_learning") else None)
    # ... train; convert(model.eval())
"""

from __future__ import annotations

import torch
from torch.ao.quantization import (
    FakeQuantizeBase,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
)

from .fake_quantize import LearnableFakeQuantize

__all__ = ["qat_qconfig"]


def _check_bits(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int in [2, 8], got {value!r}")
    if not 2 <= value <= 8:
        raise ValueError(f"{name} must be in [2, 8] (an 8-bit dtype holds the codes), got {value}")
    return value


def _check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def qat_qconfig(
    *,
    activation_bits: int = 8,
    weight_bits: int = 8,
    signed_activations: bool = False,
    per_channel_weights: bool = True,
    grad_scaling: bool = True,
    fake_quant: type = LearnableFakeQuantize,
) -> QConfig:
    """A torch.ao ``QConfig`` with learnable-scale fake quants for activations and weights.

    Args:
        activation_bits, weight_bits: ints in [2, 8]. Codes live in an 8-bit dtype with a narrowed
            range below 8 bits: ``b`` bits unsigned is ``[0, 2**b - 1]`` (``torch.quint8``), signed
            ``[-2**(b-1), 2**(b-1) - 1]`` (``torch.qint8``).
        signed_activations: False (default): unsigned ``quint8`` activations (after a ReLU);
            True: signed ``qint8`` (e.g. residual streams, no ReLU before the quantizer).
            Per-tensor affine either way, range from ``MovingAverageMinMaxObserver``.
        per_channel_weights: True (default): signed symmetric per-output-channel weights
            (``MovingAveragePerChannelMinMaxObserver``, ``ch_axis=0``; ``LearnableFakeQuantize``
            sizes its scales on the first batch); False: one symmetric scale per weight tensor.
        grad_scaling: LSQ gradient scaling of the scale / zero-point gradients
            (``use_grad_scaling``; ``1 / sqrt(numel * quant_max)``).
        fake_quant: the learnable fake-quantize class, :class:`spark_ext.quant.LearnableFakeQuantize`
            (default), or any class with its constructor (e.g. torch's
            ``torch.ao.quantization._LearnableFakeQuantize``, which needs ``channel_len`` set per layer).

    Returns:
        ``QConfig(activation=..., weight=...)`` of ``fake_quant.with_args(...)`` factories.
    """
    activation_bits = _check_bits(activation_bits, "activation_bits")
    weight_bits = _check_bits(weight_bits, "weight_bits")
    _check_bool(signed_activations, "signed_activations")
    _check_bool(per_channel_weights, "per_channel_weights")
    _check_bool(grad_scaling, "grad_scaling")
    if not (isinstance(fake_quant, type) and issubclass(fake_quant, FakeQuantizeBase)):
        raise TypeError(
            f"fake_quant must be a torch.ao FakeQuantizeBase subclass such as spark_ext.quant.LearnableFakeQuantize, "
            f"got {fake_quant!r}"
        )

    if signed_activations:
        act_dtype, act_min, act_max = torch.qint8, -(2 ** (activation_bits - 1)), 2 ** (activation_bits - 1) - 1
    else:
        act_dtype, act_min, act_max = torch.quint8, 0, 2**activation_bits - 1
    activation = fake_quant.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=act_min,
        quant_max=act_max,
        dtype=act_dtype,
        qscheme=torch.per_tensor_affine,
        use_grad_scaling=grad_scaling,
    )
    weight_range = {"quant_min": -(2 ** (weight_bits - 1)), "quant_max": 2 ** (weight_bits - 1) - 1}
    if per_channel_weights:
        weight = fake_quant.with_args(
            observer=MovingAveragePerChannelMinMaxObserver,
            **weight_range,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            ch_axis=0,
            use_grad_scaling=grad_scaling,
        )
    else:
        weight = fake_quant.with_args(
            observer=MovingAverageMinMaxObserver,
            **weight_range,
            dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric,
            use_grad_scaling=grad_scaling,
        )
    return QConfig(activation=activation, weight=weight)
