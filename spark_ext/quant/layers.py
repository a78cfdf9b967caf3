"""``QuantConv1d`` / ``QuantConv2d`` / ``QuantConvTranspose2d`` / ``QuantLinear``: float layers with LSQ
fake quantization (docs/spec.md §5c).

Each layer quantizes

* its weight per output channel, signed, LSQ (no offset): axis 0 of
  ``[C_out, C_in/groups, *k]`` (convs) or ``[out, in]`` (linear); axis 1 of a
  transposed conv's ``[C_in, C_out/groups, kH, kW]`` (with ``groups > 1`` the
  ``C_out/groups`` steps are shared by the groups: output channels ``j`` and
  ``j + C_out/groups`` use one step), and
* its input activation per tensor, with ``a_signed`` (``None`` = decided from
  the first batch) and optionally an LSQ+ offset,

then runs the ordinary float convolution / matmul on the fake-quantized
values. Both are subclasses of the float layer, so ``weight`` / ``bias`` and
every conv option (stride, padding and padding modes, dilation, groups) work
unchanged; the quantizers add ``weight_quantizer.*`` and ``input_quantizer.*``
entries to the state dict.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.lazy import LazyModuleMixin

from .._validation import check_bits
from .quantizer import LSQQuantizer

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def overridden_forward(layer_type: type, float_type: type) -> Optional[str]:
    """The forward method (``"forward"`` or a conv's ``"_conv_forward"``) that ``layer_type`` redefines.

    ``None`` when ``layer_type`` (a subclass of ``float_type``) computes with
    ``float_type``'s own methods, i.e. it can be quantized like ``float_type``.
    """
    for method in ("forward", "_conv_forward"):
        if getattr(layer_type, method, None) is not getattr(float_type, method, None):
            return method
    return None


class _QuantMixin:
    """Shared quantizer set-up, ``from_float`` plumbing and reporting."""

    _FLOAT: type = nn.Module
    weight_quantizer: Optional[LSQQuantizer]
    input_quantizer: Optional[LSQQuantizer]

    # Weight axis that holds the output channels (1 for transposed convs).
    _WEIGHT_AXIS = 0

    def _init_quantizers(
        self,
        out_features: int,
        w_bits: Optional[int],
        a_bits: Optional[int],
        a_signed: Optional[bool],
        a_learn_offset: bool,
        grad_scale: Union[str, float, None],
        backend: Optional[str],
        device,
    ) -> None:
        w_bits = check_bits(w_bits, "w_bits", allow_none=True)
        a_bits = check_bits(a_bits, "a_bits", allow_none=True)
        # Remembered so from_float can rebuild the quantizers on the real device.
        self._quant_options = (out_features, w_bits, a_bits, a_signed, a_learn_offset, grad_scale, backend)
        if w_bits is None and a_bits is None:
            raise ValueError("w_bits and a_bits are both None: the layer would not quantize anything")
        # Step parameters are float32 for float32/fp16/bf16 layers (LSQ's scaled
        # step gradients are ~1e-4 relative and would underflow in fp16), float64
        # for float64 layers.
        step_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        common = dict(grad_scale=grad_scale, backend=backend, device=device, dtype=step_dtype)
        wq = None
        if w_bits is not None:
            wq = LSQQuantizer(w_bits, True, per_channel_axis=self._WEIGHT_AXIS, num_channels=out_features, **common)
        aq = None
        if a_bits is not None:
            aq = LSQQuantizer(a_bits, a_signed, learn_offset=a_learn_offset, **common)
        self.weight_quantizer = wq
        self.input_quantizer = aq

    def _rebuild_quantizers(self, device) -> None:
        self._init_quantizers(*self._quant_options, device)

    @property
    def w_bits(self) -> Optional[int]:
        return None if self.weight_quantizer is None else self.weight_quantizer.bits

    @property
    def a_bits(self) -> Optional[int]:
        return None if self.input_quantizer is None else self.input_quantizer.bits

    def extra_repr(self) -> str:
        # The mixin comes first in the MRO: super() is the float layer's repr.
        return f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}"

    def weight_to_quantize(self) -> torch.Tensor:
        """The tensor the weight quantizer sees: ``weight`` (scaled by the BN factor in :class:`QuantConvBn2d`)."""
        return self.weight

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward uses it: fake-quantized when the weight quantizer is enabled.

        Same shape and dtype as ``weight``; differentiable w.r.t. the weight and the step.
        Initialises the weight quantizer from the weight if it has not been yet.
        """
        wq = self.weight_quantizer
        if wq is None or not wq.enabled:
            return self.weight_to_quantize()
        return wq.fake_quant(self.weight_to_quantize())

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def _weight_for_forward(self) -> torch.Tensor:
        # Through the module call so that observe / hooks on the quantizer apply.
        w = self.weight_to_quantize()
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    @classmethod
    def _check_float(cls, layer: nn.Module) -> None:
        # A subclass that keeps the float forward computes what the float layer
        # computes, so the quantized layer replaces it; one with its own forward
        # (weight standardisation, a fixed transform) would be silently changed.
        if not isinstance(layer, cls._FLOAT) or overridden_forward(type(layer), cls._FLOAT) is not None:
            raise TypeError(
                f"{cls.__name__}.from_float expects an nn.{cls._FLOAT.__name__} or a subclass that keeps its "
                f"forward, got {type(layer).__module__}.{type(layer).__qualname__}"
            )
        if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
            raise ValueError(
                f"{cls.__name__}.from_float got an uninitialised {type(layer).__qualname__}: run a forward first"
            )

    def _adopt(self, layer: nn.Module) -> None:
        """Share ``layer``'s parameters (same objects: optimizers and weight tying keep working), mode and hooks."""
        self.weight = layer.weight
        self.bias = layer.bias
        self.train(layer.training)
        for name in _HOOK_DICTS:
            src, dst = getattr(layer, name, None), getattr(self, name, None)
            if src is not None and dst is not None:
                dst.update(src)

    def _float_copy_params(self, layer: nn.Module) -> nn.Module:
        with torch.no_grad():
            w = self.quantized_weight().detach().clone()
        layer.weight = nn.Parameter(w, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            layer.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        layer.train(self.training)
        return layer

    @classmethod
    def _layer_args(cls, layer: nn.Module) -> dict:
        """The float class's constructor arguments (shapes and options) that rebuild ``layer``."""
        raise NotImplementedError  # pragma: no cover - defined by each layer

    @classmethod
    def from_float(cls, layer: nn.Module, w_bits: Optional[int] = 4, a_bits: Optional[int] = 4, **kwargs):
        """A quantized layer computing ``layer``'s convolution / matmul on quantized operands.

        Shares ``layer``'s weight and bias Parameters (no copy), keeps every
        layer option (for convs: stride, padding and padding mode, dilation,
        groups), the train/eval mode and the forward hooks. ``kwargs``: the
        keyword-only constructor options (``a_signed``, ``a_learn_offset``,
        ``grad_scale``, ``backend``). The quantizers start uninitialised
        (first forward, :func:`calibrate`, or a state dict sets them).
        """
        cls._check_float(layer)
        # Built on the meta device: the throwaway weight costs no memory and no
        # random numbers (so converting a model does not move the RNG stream).
        q = cls(
            **cls._layer_args(layer), device="meta", dtype=layer.weight.dtype, w_bits=w_bits, a_bits=a_bits, **kwargs
        )
        q._rebuild_quantizers(layer.weight.device)
        q._adopt(layer)
        return q

    def to_float(self) -> nn.Module:
        """A plain float layer with the fake-quantized weight folded in (new, detached Parameters).

        Input-activation quantization cannot be folded into a float layer and is
        dropped; read ``input_quantizer.step`` / ``offset`` to export it.
        """
        layer = self._FLOAT(**self._layer_args(self), device="meta", dtype=self.weight.dtype)
        return self._float_copy_params(layer)


def _conv_layer_args(layer: nn.Module) -> dict:
    return dict(
        in_channels=layer.in_channels,
        out_channels=layer.out_channels,
        kernel_size=layer.kernel_size,
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=layer.groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
    )


class _QuantConv(_QuantMixin):
    """Constructor and forward shared by :class:`QuantConv1d` and :class:`QuantConv2d` (same float signature)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        w_bits: Optional[int] = 4,
        a_bits: Optional[int] = 4,
        a_signed: Optional[bool] = None,
        a_learn_offset: bool = False,
        grad_scale: Union[str, float, None] = "lsq",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode, device, dtype
        )
        self._init_quantizers(out_channels, w_bits, a_bits, a_signed, a_learn_offset, grad_scale, backend, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # _conv_forward applies padding_mode (reflect / replicate / circular) itself.
        return self._conv_forward(self._quantize_input(x), self._weight_for_forward(), self.bias)

    @classmethod
    def _layer_args(cls, layer: nn.Module) -> dict:
        return _conv_layer_args(layer)


class QuantConv2d(_QuantConv, nn.Conv2d):
    """``nn.Conv2d`` with per-output-channel LSQ weights and per-tensor LSQ input activations.

    Constructor: ``nn.Conv2d``'s arguments, then keyword-only
    ``w_bits=4, a_bits=4`` (each 2..16, or ``None`` for no quantization of that
    operand), ``a_signed=None`` (input range signed / unsigned / decided from
    the first batch), ``a_learn_offset=False`` (LSQ+ on the input),
    ``grad_scale="lsq"`` and ``backend=None`` (for both quantizers).

    Forward: ``x [B, C_in, H, W]`` (or unbatched ``[C_in, H, W]``) ->
    ``conv(fq_a(x), fq_w(weight)) + bias`` in x's dtype. Differentiable w.r.t.
    x, weight, bias and the quantizers' steps (and offset).
    """

    _FLOAT = nn.Conv2d


class QuantConv1d(_QuantConv, nn.Conv1d):
    """``nn.Conv1d`` with per-output-channel LSQ weights and per-tensor LSQ input activations.

    Constructor: ``nn.Conv1d``'s arguments, then the keyword-only options of
    :class:`QuantConv2d`. Forward: ``x [B, C_in, L]`` (or ``[C_in, L]``) ->
    ``conv1d(fq_a(x), fq_w(weight)) + bias`` in x's dtype; differentiable
    w.r.t. x, weight, bias and the steps (and offset).
    """

    _FLOAT = nn.Conv1d


class QuantConvTranspose2d(_QuantMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` with per-output-channel LSQ weights and per-tensor LSQ input activations.

    The weight ``[C_in, C_out/groups, kH, kW]`` is quantized along axis 1
    (``C_out/groups`` steps; with ``groups > 1`` each step is shared by the
    matching output channel of every group). Constructor:
    ``nn.ConvTranspose2d``'s arguments, then the keyword-only options of
    :class:`QuantConv2d`. Forward: ``x [B, C_in, H, W]`` (or unbatched), optional
    ``output_size`` as in torch -> ``conv_transpose2d(fq_a(x), fq_w(weight)) +
    bias`` in x's dtype; differentiable w.r.t. x, weight, bias and the steps.
    """

    _FLOAT = nn.ConvTranspose2d
    _WEIGHT_AXIS = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        output_padding=0,
        groups: int = 1,
        bias: bool = True,
        dilation=1,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        w_bits: Optional[int] = 4,
        a_bits: Optional[int] = 4,
        a_signed: Optional[bool] = None,
        a_learn_offset: bool = False,
        grad_scale: Union[str, float, None] = "lsq",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            output_padding,
            groups,
            bias,
            dilation,
            padding_mode,
            device,
            dtype,
        )
        self._init_quantizers(
            out_channels // groups, w_bits, a_bits, a_signed, a_learn_offset, grad_scale, backend, device
        )

    def forward(self, x: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        # As nn.ConvTranspose2d.forward, on the quantized operands.
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return F.conv_transpose2d(
            self._quantize_input(x),
            self._weight_for_forward(),
            self.bias,
            self.stride,
            self.padding,
            output_padding,
            self.groups,
            self.dilation,
        )

    @classmethod
    def _layer_args(cls, layer: nn.ConvTranspose2d) -> dict:
        args = _conv_layer_args(layer)
        args["output_padding"] = layer.output_padding
        return args


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` with per-output-feature LSQ weights and per-tensor LSQ input activations.

    Constructor: ``nn.Linear``'s arguments, then the keyword-only options of
    :class:`QuantConv2d`. Forward: ``x [..., in_features]`` ->
    ``fq_a(x) @ fq_w(weight).T + bias`` in x's dtype; differentiable w.r.t.
    x, weight, bias and the steps (and offset).
    """

    _FLOAT = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        w_bits: Optional[int] = 4,
        a_bits: Optional[int] = 4,
        a_signed: Optional[bool] = None,
        a_learn_offset: bool = False,
        grad_scale: Union[str, float, None] = "lsq",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_quantizers(out_features, w_bits, a_bits, a_signed, a_learn_offset, grad_scale, backend, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quantize_input(x), self._weight_for_forward(), self.bias)

    @classmethod
    def _layer_args(cls, layer: nn.Linear) -> dict:
        return dict(in_features=layer.in_features, out_features=layer.out_features, bias=layer.bias is not None)


def foldable_bn_problem(bn: nn.Module, out_channels: int) -> Optional[str]:
    """Why ``bn`` cannot be folded into a conv with ``out_channels`` outputs, or ``None`` when it can."""
    if not isinstance(bn, nn.BatchNorm2d) or type(bn).forward is not nn.BatchNorm2d.forward:
        return f"{type(bn).__qualname__} is not an nn.BatchNorm2d (or a subclass that keeps its forward)"
    if bn.running_mean is None or bn.running_var is None:
        return "the BatchNorm2d has no running statistics (track_running_stats=False)"
    if bn.num_features != out_channels:
        return f"the BatchNorm2d has {bn.num_features} features, the conv {out_channels} output channels"
    return None


class QuantConvBn2d(QuantConv2d):
    """A ``Conv2d`` followed by a ``BatchNorm2d``, trained with the BN folded into the quantized weight.

    The arithmetic of torch.ao's fused ``ConvBn2d`` QAT module (its approximate forward), with
    LSQ quantizers. Per output channel ``c``, with the BN's running statistics,

        s[c] = bn.weight[c] / sqrt(bn.running_var[c] + bn.eps)
        y = bn(conv(fq_a(x), fq_w(weight * s)) / s + bias)

    ``bn`` is the float ``nn.BatchNorm2d`` (the model's own module after
    :meth:`from_conv_bn`). In training ``bn`` normalises with the batch's
    statistics, which the division by ``s`` hands it unscaled, and updates its
    running statistics; in eval (or after :meth:`freeze_bn_stats`) it uses the
    running ones, so ``y = conv(fq_a(x), fq_w(weight * s)) + (bias - running_mean) * s
    + bn.bias``: a conv whose quantized weight already holds the BN, which is
    what :func:`~spark_ext.quant.export_onnx` writes (no BatchNormalization node). The
    weight quantizer sees ``weight * s`` (per channel, so its steps follow the BN scale).

    A channel whose ``s`` is 0 (``bn.weight`` zero: the zero-initialised last BN of a
    residual block) is computed with ``s = 1`` in the weight and the division; its output
    is ``bn.bias`` either way (torch.ao's module divides by zero there and returns NaN).

    Constructor: ``nn.Conv2d``'s arguments and the keyword-only options of
    :class:`QuantConv2d`, then ``eps`` / ``momentum`` of a new ``bn``. Forward: ``x [B, C_in, H, W]``
    -> ``[B, C_out, H', W']`` in x's dtype, differentiable w.r.t. x, weight, bias, the BN's
    affine parameters and the steps. State dict: the conv's keys, the quantizers' and ``bn.*``.
    """

    def __init__(self, *args, eps: float = 1e-5, momentum: Optional[float] = 0.1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bn = nn.BatchNorm2d(self.out_channels, eps, momentum, device=self.weight.device, dtype=self.weight.dtype)
        self.bn_frozen = False

    @classmethod
    def from_conv_bn(
        cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, w_bits: Optional[int] = 4, a_bits: Optional[int] = 4, **kwargs
    ) -> QuantConvBn2d:
        """The quantized, BN-folding layer of ``conv`` followed by ``bn``.

        Shares ``conv``'s weight and bias and holds ``bn`` itself (its parameters and running
        statistics keep training); ``kwargs`` as in :meth:`QuantConv2d.from_float`.
        """
        problem = foldable_bn_problem(bn, conv.out_channels) if isinstance(conv, nn.Conv2d) else None
        if problem is not None:
            raise ValueError(f"{cls.__name__}.from_conv_bn: {problem}")
        q = cls.from_float(conv, w_bits, a_bits, **kwargs)
        q.bn = bn
        return q

    def bn_scale(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, s_used)``, both ``[C_out]``: the BN factor ``bn.weight / sqrt(running_var + eps)`` and the
        factor the forward scales the weight by (``s`` with zeros replaced by 1). Differentiable w.r.t.
        ``bn.weight``."""
        bn = self.bn
        gamma = torch.ones_like(bn.running_var) if bn.weight is None else bn.weight
        s = gamma / torch.sqrt(bn.running_var + bn.eps)
        return s, torch.where(s == 0, torch.ones_like(s), s)

    def folded_bias(self) -> torch.Tensor:
        """``(bias - running_mean) * s + bn.bias``, ``[C_out]``: the bias of the conv with the BN folded in."""
        bn = self.bn
        s, _ = self.bn_scale()
        bias = bn.running_mean.neg() if self.bias is None else self.bias - bn.running_mean
        return bias * s + (0.0 if bn.bias is None else bn.bias)

    def weight_to_quantize(self) -> torch.Tensor:
        _, s_used = self.bn_scale()
        return self.weight * s_used.reshape(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, s_used = self.bn_scale()
        y = self._conv_forward(self._quantize_input(x), self._weight_for_forward(), None)
        if not self.bn.training:
            # Running statistics: the folded conv itself (the same function, in the exported graph's
            # arithmetic, so the model and its ONNX export round alike). s / s_used is 1, or 0 where s is.
            return y * (s / s_used).reshape(-1, 1, 1) + self.folded_bias().reshape(-1, 1, 1)
        y = y / s_used.reshape(-1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(-1, 1, 1)
        return self.bn(y)

    def freeze_bn_stats(self) -> QuantConvBn2d:
        """Stop updating the BN's running statistics and normalise with them, also in training mode."""
        self.bn_frozen = True
        self.bn.train(False)
        return self

    def update_bn_stats(self) -> QuantConvBn2d:
        """Undo :meth:`freeze_bn_stats`: in training mode the BN uses and updates batch statistics again."""
        self.bn_frozen = False
        self.bn.train(self.training)
        return self

    def train(self, mode: bool = True) -> QuantConvBn2d:
        super().train(mode)
        if self.bn_frozen:  # model.train() must not unfreeze the statistics
            self.bn.train(False)
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + (", bn_frozen=True" if self.bn_frozen else "")

    def to_float(self) -> nn.Conv2d:
        """A float ``nn.Conv2d`` (with a bias) computing the eval-mode layer without input quantization: the
        fake-quantized BN-scaled weight times ``s / s_used`` (0 on zero-``s`` channels) and :meth:`folded_bias`."""
        args = dict(self._layer_args(self), bias=True)
        layer = nn.Conv2d(**args, device="meta", dtype=self.weight.dtype)
        with torch.no_grad():
            s, s_used = self.bn_scale()
            w = self.quantized_weight() * (s / s_used).reshape(-1, 1, 1, 1)
            layer.weight = nn.Parameter(w.detach().clone(), requires_grad=self.weight.requires_grad)
            layer.bias = nn.Parameter(self.folded_bias().detach().clone())
        layer.train(self.training)
        return layer


def freeze_bn_stats(module: nn.Module) -> None:
    """``model.apply(freeze_bn_stats)``: freeze the BN statistics of every :class:`QuantConvBn2d`
    (torch.ao's ``torch.ao.nn.intrinsic.qat.freeze_bn_stats`` for these layers)."""
    if isinstance(module, QuantConvBn2d):
        module.freeze_bn_stats()


def update_bn_stats(module: nn.Module) -> None:
    """``model.apply(update_bn_stats)``: undo :func:`freeze_bn_stats`."""
    if isinstance(module, QuantConvBn2d):
        module.update_bn_stats()


# Every quantized layer class (isinstance checks in calibrate / export).
QUANT_LAYERS = (QuantConv1d, QuantConv2d, QuantConvTranspose2d, QuantLinear)
