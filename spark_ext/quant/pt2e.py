"""``PT2ELearnableFakeQuantize``: a learnable fake quantize for torchao's PT2E QAT flow, on spark_ext's ops.

torchao's PT2E flow (``torch.export`` -> ``prepare_qat_pt2e`` -> train ->
``convert_pt2e``) only accepts, in a ``QuantizationSpec``, fake-quantize
constructors whose class derives from ``torchao.quantization.pt2e.FakeQuantizeBase``,
and ``convert_pt2e`` only turns such modules into quantize / dequantize nodes.
This class is that kind of module, with the API of torchao's
``torchao.quantization.pt2e.LearnableFakeQuantize`` (same constructor, toggles,
forward semantics, ``calculate_qparams``), and two differences:

* the fake quantization runs :func:`spark_ext.fake_quantize_learnable_per_tensor_affine`
  / :func:`spark_ext.fake_quantize_learnable_per_channel_affine` (fused
  C++/CUDA kernels, fp16/bf16 backward) instead of ``torch._fake_quantize_learnable_*``;
* the ``observer_enabled`` / ``fake_quant_enabled`` flag buffers are read from
  the device only after they were written (torchao's module reads
  ``observer_enabled[0]`` and ``fake_quant_enabled[0]`` every forward: two host
  syncs per quantizer per step on a GPU).

``scale`` / ``zero_point`` are Parameters from construction (shape ``[1]``,
resized in place to the channel count on the first observed batch; torchao's
start as ``None``), so an optimizer may be built before the first forward.
As in torchao, they do not require grad until :meth:`enable_range_learning`.

Use (needs the ``[torchao]`` extra)::

    from torchao.quantization.pt2e import MovingAverageMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec
    from spark_ext.quant.pt2e import PT2ELearnableFakeQuantize

    act = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                           observer_or_fake_quant_ctr=PT2ELearnableFakeQuantize.with_args(
                               observer=MovingAverageMinMaxObserver, use_grad_scaling=True))
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

try:
    from torchao.quantization.pt2e import FakeQuantizeBase
    from torchao.quantization.pt2e import LearnableFakeQuantize as _TorchaoLearnableFakeQuantize
    from torchao.quantization.pt2e.utils import to_underlying_dtype
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "spark_ext.quant.pt2e needs torchao (PT2E quantization): pip install 'spark_ext[torchao]'"
    ) from exc

from .fake_quantize import learnable_fake_quant, read_flag

__all__ = ["PT2ELearnableFakeQuantize", "disable_range_learning", "enable_range_learning"]


class PT2ELearnableFakeQuantize(FakeQuantizeBase):
    """Learnable-scale fake quantize for torchao PT2E QAT, computed with spark_ext's ops.

    Args (as ``torchao.quantization.pt2e.LearnableFakeQuantize``):
        observer: torchao PT2E observer class or ``with_args`` factory
            (``MovingAverageMinMaxObserver``, ``MovingAveragePerChannelMinMaxObserver``, ...).
        quant_min, quant_max: ints, ``quant_min < quant_max``, within the
            observer dtype's range, and ``quant_min <= 0 <= quant_max``
            (spark_ext's ops). ``prepare_qat_pt2e`` passes the spec's values.
        use_grad_scaling: scale / zero-point gradients times
            ``1 / sqrt(X.numel() * quant_max)``.
        backend: spark_ext backend for the ops (``None`` = process default / auto).
        **observer_kwargs: for ``observer`` (``dtype``, ``qscheme``, ``ch_axis``, ...).

    Modes (uint8 ``[1]`` buffers): ``observer_enabled`` (1 at start): the
    observer sees each input and its qparams overwrite scale / zero_point;
    ``learning_enabled`` (0): scale / zero_point require grad;
    ``fake_quant_enabled`` (1): quantize, else return X. Until the first
    observation the forward always observes (the qparams are not set yet).

    Forward: ``X`` float32/float16/bfloat16, any shape (per channel:
    ``X.shape[ch_axis]`` channels). Returns X's shape and dtype,
    differentiable w.r.t. X, scale and zero_point.
    """

    scale: nn.Parameter
    zero_point: nn.Parameter

    def __init__(
        self,
        observer,
        quant_min: int = 0,
        quant_max: int = 255,
        use_grad_scaling: bool = False,
        backend: Optional[str] = None,
        **observer_kwargs,
    ) -> None:
        super().__init__()
        for value, name in ((quant_min, "quant_min"), (quant_max, "quant_max")):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if not quant_min <= 0 <= quant_max or quant_min >= quant_max:
            raise ValueError(
                f"need quant_min <= 0 <= quant_max and quant_min < quant_max, got quant_min={quant_min}, "
                f"quant_max={quant_max}"
            )
        if not isinstance(use_grad_scaling, bool):
            raise TypeError(f"use_grad_scaling must be a bool, got {use_grad_scaling!r}")
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.use_grad_scaling = use_grad_scaling
        self.backend = backend
        observer_kwargs["quant_min"] = quant_min
        observer_kwargs["quant_max"] = quant_max
        self.activation_post_process = observer(**observer_kwargs)
        self.dtype = self.activation_post_process.dtype
        info = torch.iinfo(to_underlying_dtype(self.dtype))  # quint8 -> uint8, ...
        if quant_min < info.min or quant_max > info.max:
            raise ValueError(
                f"[quant_min, quant_max] = [{quant_min}, {quant_max}] is outside the range "
                f"[{info.min}, {info.max}] of the observer dtype {self.dtype}"
            )
        self.qscheme = self.activation_post_process.qscheme
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)
        self.is_dynamic = False
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.zero_point = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.register_buffer("learning_enabled", torch.tensor([0], dtype=torch.uint8))
        self.register_buffer("eps", torch.tensor([torch.finfo(torch.float32).eps]))
        self._initialized = False

    # ------------------------------------------------------------ toggles (torchao's)

    def enable_range_learning(self) -> None:
        """Learn scale / zero_point by backprop; stop the observer."""
        self.learning_enabled[0] = 1
        self.disable_observer()
        self.scale.requires_grad = True
        self.zero_point.requires_grad = True

    def disable_range_learning(self) -> None:
        self.learning_enabled[0] = 0
        self.scale.requires_grad = False
        self.zero_point.requires_grad = False

    def enable_observer(self, enabled: bool = True) -> None:
        """Observer on (which also stops range learning, as in torchao) or off."""
        self.observer_enabled[0] = 1 if enabled else 0
        if enabled:
            self.disable_range_learning()

    def disable_observer(self) -> None:
        self.enable_observer(False)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for ``convert_pt2e``: scale clamped to >= eps, zero point rounded, clamped, int64."""
        self.scale.data.clamp_(min=self.eps)  # a tensor bound: no .item() sync
        zero_point = self.zero_point.detach().round().clamp(self.quant_min, self.quant_max).long()
        return self.scale.detach(), zero_point

    def extra_repr(self) -> str:
        return (
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, dtype={self.dtype}, qscheme={self.qscheme}, "
            f"ch_axis={self.ch_axis}, use_grad_scaling={self.use_grad_scaling}, initialized={self._initialized}"
        )

    # ------------------------------------------------------------ forward

    def _copy_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        for param, value in ((self.scale, scale), (self.zero_point, zero_point)):
            value = value.detach().to(device=param.device, dtype=torch.float32).reshape(-1)
            if value.shape != param.shape:  # first batch of a per-channel quantizer: keep the Parameter object
                param.data = torch.empty(value.shape, dtype=param.dtype, device=param.device)
            param.data.copy_(value)
        self._initialized = True

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if not self._initialized or read_flag(self, "observer_enabled"):
            self.activation_post_process(X.detach())
            self._copy_qparams(*self.activation_post_process.calculate_qparams())
        if not read_flag(self, "fake_quant_enabled"):
            return X
        return learnable_fake_quant(self, X)

    # -------------------------------------------------------- state dicts

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Take the incoming per-channel size; a loaded state counts as observed.
        for name in ("scale", "zero_point"):
            incoming = state_dict.get(prefix + name)
            param = getattr(self, name)
            if isinstance(incoming, torch.Tensor) and incoming.dim() == 1 and incoming.shape != param.shape:
                param.data = torch.empty(incoming.shape, dtype=param.dtype, device=param.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if prefix + "scale" in state_dict:
            self._initialized = True


def enable_range_learning(module: nn.Module) -> None:
    """``model.apply(enable_range_learning)``: for spark_ext's and torchao's learnable PT2E fake quantizers."""
    if isinstance(module, (PT2ELearnableFakeQuantize, _TorchaoLearnableFakeQuantize)):
        module.enable_range_learning()


def disable_range_learning(module: nn.Module) -> None:
    """``model.apply(disable_range_learning)``: for spark_ext's and torchao's learnable PT2E fake quantizers."""
    if isinstance(module, (PT2ELearnableFakeQuantize, _TorchaoLearnableFakeQuantize)):
        module.disable_range_learning()
