"""``PT2ELearnableFakeQuantize``: a learnable fake quantize for torchao's PT2E QAT flow, on spark_ext's ops.

torchao's PT2E flow (``torch.export`` -> ``prepare_qat_pt2e`` -> train ->
``convert_pt2e``) only accepts, in a ``QuantizationSpec``, fake-quantize
constructors whose class derives from ``torchao.quantization.pt2e.FakeQuantizeBase``,
and ``convert_pt2e`` only turns such modules into quantize / dequantize nodes.
This class is that kind of module, with the API of torchao's
``torchao.quantization.pt2e.LearnableFakeQuantize`` (same constructor, toggles,
forward semantics, ``calculate_qparams``), and three differences:

* the fake quantization runs :func:`spark_ext.fake_quantize_learnable_per_tensor_affine`
  / :func:`spark_ext.fake_quantize_learnable_per_channel_affine` (fused
  C++/CUDA kernels, fp16/bf16 backward) instead of ``torch._fake_quantize_learnable_*``;
* the ``observer_enabled`` / ``fake_quant_enabled`` flag buffers are read from
  the device only after they were written (torchao's module reads
  ``observer_enabled[0]`` and ``fake_quant_enabled[0]`` every forward: two host
  syncs per quantizer per step on a GPU);
* a learnable scale an optimizer step drove below ``eps`` (or <= 0) is clamped
  back to ``eps`` before the next forward, as torch.ao's ``_LearnableFakeQuantize``
  does and as ``calculate_qparams`` / ``convert_pt2e`` do in both classes
  (torchao's forward computes with the negative scale, a mirrored grid that
  its own ``convert_pt2e`` then replaces by ``eps``).

It subclasses torchao's class, so torchao's helpers
(``model.apply(torchao.quantization.pt2e.enable_range_learning)``) and
``isinstance`` checks see it (:mod:`spark_ext.quant.pt2e` re-exports
``enable_range_learning`` / ``disable_range_learning``). As in torchao, ``scale`` / ``zero_point`` are
``None`` until the first forward creates them (per channel: one per channel),
and they require grad only after :meth:`enable_range_learning`. Bad
``quant_min`` / ``quant_max`` raise ``ValueError`` / ``TypeError`` (torchao's
raise ``AssertionError``, which ``python -O`` strips).

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
    from torchao.quantization.pt2e import FakeQuantizeBase, disable_range_learning, enable_range_learning
    from torchao.quantization.pt2e import LearnableFakeQuantize as TorchaoLearnableFakeQuantize
    from torchao.quantization.pt2e.utils import to_underlying_dtype
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "spark_ext.quant.pt2e needs torchao (PT2E quantization): pip install 'spark_ext[torchao]'"
    ) from exc

from .fake_quantize import learnable_fake_quant, read_flag

__all__ = ["PT2ELearnableFakeQuantize", "disable_range_learning", "enable_range_learning"]


class PT2ELearnableFakeQuantize(TorchaoLearnableFakeQuantize):
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

    scale: Optional[nn.Parameter]
    zero_point: Optional[nn.Parameter]

    def __init__(
        self,
        observer,
        quant_min: int = 0,
        quant_max: int = 255,
        use_grad_scaling: bool = False,
        backend: Optional[str] = None,
        **observer_kwargs,
    ) -> None:
        # torchao's __init__ is skipped: its checks are asserts; everything else it sets is set here.
        FakeQuantizeBase.__init__(self)
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
        self.scale = None  # created by the first forward (or a loaded state dict), as in torchao
        self.zero_point = None
        self.register_buffer("learning_enabled", torch.tensor([0], dtype=torch.uint8))
        self.register_buffer("eps", torch.tensor([torch.finfo(torch.float32).eps]))
        self._initialized = False

    # The toggles (enable_range_learning, enable_observer, enable_fake_quant, ...) are torchao's.

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

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if not self._initialized or read_flag(self, "observer_enabled"):
            self.activation_post_process(X.detach())
            scale, zero_point = self.activation_post_process.calculate_qparams()
            self._initialize_or_update_qparams(scale.to(torch.float32), zero_point)
        else:
            # An optimizer step may have driven a learnt scale <= 0: back to eps, as torch.ao's module does.
            # Through .data (no autograd version bump); a tensor bound, so no host sync.
            self.scale.data.clamp_(min=self.eps)
        if not read_flag(self, "fake_quant_enabled"):
            return X
        try:
            return learnable_fake_quant(self, X)
        except ValueError as exc:  # a NaN / inf scale or a NaN zero point (CPU; a GPU asserts on the device)
            name = str(exc).split(" ", 1)[0]
            if name not in ("scale", "zero_point"):
                raise
            values = getattr(self, name).detach().flatten()
            bad = (~torch.isfinite(values) if name == "scale" else torch.isnan(values)).nonzero().flatten().tolist()
            if not bad:
                raise
            raise ValueError(
                f"{type(self).__name__} (qscheme={self.qscheme}, ch_axis={self.ch_axis}): {name} of channel(s) "
                f"{bad[:4]}{' ...' if len(bad) > 4 else ''} is {values[bad[0]].item()}: the training diverged"
            ) from None

    # -------------------------------------------------------- state dicts

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Create (before the first forward) or resize (per channel) scale / zero_point to the incoming
        # shape, keeping existing Parameter objects; a loaded state counts as observed.
        for name in ("scale", "zero_point"):
            incoming = state_dict.get(prefix + name)
            param = getattr(self, name)
            if not isinstance(incoming, torch.Tensor):
                continue
            if param is None:
                device = self.eps.device
                setattr(self, name, nn.Parameter(torch.empty(incoming.shape, device=device), requires_grad=False))
            elif incoming.dim() == 1 and incoming.shape != param.shape:
                param.data = torch.empty(incoming.shape, dtype=param.dtype, device=param.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.scale is not None and prefix + "scale" in state_dict:
            learning = bool(self.learning_enabled[0] == 1)
            self.scale.requires_grad = self.zero_point.requires_grad = learning
            self._initialized = True
