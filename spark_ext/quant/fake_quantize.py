"""``LearnableFakeQuantize``: torch.ao's learnable FakeQuantize, running spark_ext's drop-in ops (docs/spec.md §5a).

A replacement for ``torch.ao.quantization._LearnableFakeQuantize`` in a
``QConfig``: same constructor arguments, attributes, buffers, parameters and
state-dict keys (``scale``, ``zero_point``, ``fake_quant_enabled``,
``observer_enabled``, ``static_enabled``, ``learning_enabled``, ``eps``,
``activation_post_process.*``), the same toggles and the same forward
semantics, but the fake quantization goes through
:func:`spark_ext.fake_quantize_learnable_per_tensor_affine` /
:func:`spark_ext.fake_quantize_learnable_per_channel_affine` (fused C++/CUDA
kernels, fp16/bf16 backward). A torch.ao eager QAT pipeline
(``prepare_qat`` -> train -> ``convert``) needs no other change::

    qconfig = QConfig(
        activation=LearnableFakeQuantize.with_args(observer=MovingAverageMinMaxObserver,
                                                   quant_min=0, quant_max=255),
        weight=LearnableFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver,
                                               quant_min=-128, quant_max=127, dtype=torch.qint8,
                                               qscheme=torch.per_channel_symmetric))

Differences from torch's module (all where torch's would fail or sync):

* A per-channel instance built with ``channel_len=-1`` (torch requires the
  channel count up front, which a QConfig shared by layers of different widths
  cannot give) resizes ``scale`` / ``zero_point`` to the observer's channel
  count on the first observed batch, and to the incoming shape when a state
  dict is loaded. The Parameter objects are kept, so optimizers still hold them.
* On a GPU the ``*_enabled`` flags are read from the buffers only when a
  buffer has been written since the last read (tracked by the tensor's version
  counter), so a forward does not synchronise with the device every call; a
  flag written through ``.data`` there is not seen (use the toggles). On CPU
  they are read every call, as torch reads them.
* Bad arguments raise ``ValueError`` (torch raises ``AssertionError``).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from torch import nn
from torch.ao.quantization import FakeQuantizeBase
from torch.ao.quantization.observer import _PartialWrapper

from .. import ops

_PER_CHANNEL = (torch.per_channel_symmetric, torch.per_channel_affine)


def read_flag(module: nn.Module, name: str) -> bool:
    """``module.<name>[0] == 1`` for a uint8 flag buffer.

    A CPU flag is read every call, as torch's module reads it (a write through
    ``.data`` is seen too). A flag on a GPU is re-read only after the buffer
    was written (tracked by the tensor's version counter), so a forward does
    not synchronise with the device every call; a write through ``.data``,
    which bypasses the version counter, is then not seen: use the toggles
    (``toggle_fake_quant`` ...) or write the buffer itself.
    """
    t = getattr(module, name)
    if t.device.type == "cpu" and not torch.compiler.is_compiling():
        return t.item() == 1
    if t.is_inference():  # built under torch.inference_mode(): no version counter to track
        return bool(t[0] == 1)
    cache = module.__dict__.setdefault("_flag_cache", {})
    cached = cache.get(name)
    if cached is not None and cached[0] is t and cached[1] == t._version:
        return cached[2]
    value = bool(t[0] == 1)
    cache[name] = (t, t._version, value)
    return value


_SYMMETRIC = (torch.per_channel_symmetric, torch.per_tensor_symmetric)


def learnable_fake_quant(fq: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """The fake quantization of a learnable FakeQuantize module (torch.ao's or torchao's API): symmetric
    schemes zero the zero point, ``use_grad_scaling`` scales the qparam gradients by
    ``1 / sqrt(X.numel() * quant_max)``, then spark_ext's per-tensor / per-channel op."""
    if fq.qscheme in _SYMMETRIC:
        fq.zero_point.data.zero_()
    grad_factor = 1.0 / (X.numel() * fq.quant_max) ** 0.5 if fq.use_grad_scaling else 1.0
    if fq.qscheme in _PER_CHANNEL:
        return ops.fake_quantize_learnable_per_channel_affine(
            X, fq.scale, fq.zero_point, fq.ch_axis, fq.quant_min, fq.quant_max, grad_factor, backend=fq.backend
        )
    return ops.fake_quantize_learnable_per_tensor_affine(
        X, fq.scale, fq.zero_point, fq.quant_min, fq.quant_max, grad_factor, backend=fq.backend
    )


class _NotAPT2EFakeQuantizeError(TypeError, AttributeError):
    """A TypeError for the user; an AttributeError too, so ``hasattr`` / ``getattr(..., default)`` stay quiet."""


class _EagerFactory(_PartialWrapper):
    """``LearnableFakeQuantize.with_args(...)``: torch.ao's factory. A torchao PT2E ``QuantizationSpec`` reads
    its ``__name__`` (torchao's own factories have one): that read explains which class PT2E needs."""

    @property
    def __name__(self):
        raise _NotAPT2EFakeQuantizeError(
            "spark_ext.quant.LearnableFakeQuantize is for torch.ao's eager QAT flow (QConfig, prepare_qat); "
            "in a torchao PT2E QuantizationSpec use spark_ext.quant.pt2e.PT2ELearnableFakeQuantize"
        )


class LearnableFakeQuantize(FakeQuantizeBase):
    """Learnable-scale fake quantize for torch.ao QAT, computed with spark_ext's ops.

    Args (as ``torch.ao.quantization._LearnableFakeQuantize``):
        observer: observer class (or ``with_args`` factory) that gives the
            static estimates, e.g. ``MovingAverageMinMaxObserver``.
        quant_min, quant_max: integer range, ``quant_min < quant_max`` and
            within the observer dtype's range; spark_ext's ops also need
            ``quant_min <= 0 <= quant_max``.
        scale, zero_point: initial values (floats).
        channel_len: ``-1`` per tensor (or per channel with lazy sizing, see the
            module docstring), else the number of channels.
        use_grad_scaling: scale / zero-point gradients scaled by
            ``1 / sqrt(X.numel() * quant_max)``.
        backend: spark_ext backend for the ops (``None`` = process default / auto).
        **observer_kwargs: forwarded to ``observer`` (``dtype``, ``qscheme``,
            ``ch_axis``, ``averaging_constant``, ...), with quant_min/max added.

    Modes (buffers, uint8 ``[1]``): ``static_enabled`` (1 at start): the
    observer sees every input and its qparams overwrite scale / zero_point;
    ``learning_enabled`` (0 at start): scale and zero_point require grad;
    ``fake_quant_enabled`` (1): quantize the output, else pass X through.
    ``enable_param_learning()`` switches from observing to learning.

    Forward: ``X`` float32/float16/bfloat16, any shape (per channel:
    ``X.shape[ch_axis] == channel count``). Returns X's shape and dtype;
    differentiable w.r.t. X, scale and zero_point (ATen's learnable gradients).
    """

    scale: nn.Parameter
    zero_point: nn.Parameter

    def __init__(
        self,
        observer,
        quant_min: int = 0,
        quant_max: int = 255,
        scale: float = 1.0,
        zero_point: float = 0.0,
        channel_len: int = -1,
        use_grad_scaling: bool = False,
        backend: Optional[str] = None,
        **observer_kwargs,
    ) -> None:
        super().__init__()
        for value, name in ((quant_min, "quant_min"), (quant_max, "quant_max")):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {value!r}")
        if quant_min >= quant_max:
            raise ValueError(
                f"quant_min must be strictly less than quant_max, got quant_min={quant_min}, quant_max={quant_max}"
            )
        if channel_len != -1 and (
            isinstance(channel_len, bool) or not isinstance(channel_len, int) or channel_len <= 0
        ):
            raise ValueError(
                f"channel_len must be -1 (per tensor / sized lazily) or a positive int, got {channel_len!r}"
            )
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.use_grad_scaling = use_grad_scaling
        self.backend = backend
        n = 1 if channel_len == -1 else channel_len
        self.scale = nn.Parameter(torch.full((n,), float(scale)))
        self.zero_point = nn.Parameter(torch.full((n,), float(zero_point)))

        observer_kwargs["quant_min"] = quant_min
        observer_kwargs["quant_max"] = quant_max
        self.activation_post_process = observer(**observer_kwargs)
        info = torch.iinfo(self.activation_post_process.dtype)
        if quant_min < info.min or quant_max > info.max:
            raise ValueError(
                f"[quant_min, quant_max] = [{quant_min}, {quant_max}] is outside the range "
                f"[{info.min}, {info.max}] of the observer dtype {self.activation_post_process.dtype}"
            )
        self.dtype = self.activation_post_process.dtype
        self.qscheme = self.activation_post_process.qscheme
        self.ch_axis = getattr(self.activation_post_process, "ch_axis", -1)

        # Same buffers as torch's module (observer_enabled comes from the base
        # class and, as in torch, is not what gates observation here).
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("static_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("learning_enabled", torch.tensor([0], dtype=torch.uint8))
        # bitwidth = floor(log2(number of levels)), as torch computes it.
        self.bitwidth = (quant_max - quant_min + 1).bit_length() - 1
        self.register_buffer("eps", torch.tensor([torch.finfo(torch.float32).eps]))

    @classmethod
    def with_args(cls, **kwargs):
        """torch.ao's ``with_args``, with a clear TypeError if the factory is put in a torchao PT2E spec."""
        return _EagerFactory(partial(cls, **kwargs))

    # ------------------------------------------------------------ toggles

    def enable_param_learning(self):
        """Learn scale / zero_point by backprop; stop observer updates; fake-quantize."""
        self.toggle_qparam_learning(enabled=True).toggle_fake_quant(enabled=True).toggle_observer_update(enabled=False)
        return self

    def enable_static_estimate(self):
        """Take scale / zero_point from the observer (no learning); fake-quantize."""
        self.toggle_qparam_learning(enabled=False).toggle_fake_quant(enabled=True).toggle_observer_update(enabled=True)
        return self

    def enable_static_observation(self):
        """Observe only: update the observer's statistics and qparams, return X unchanged."""
        self.toggle_qparam_learning(enabled=False).toggle_fake_quant(enabled=False).toggle_observer_update(enabled=True)
        return self

    def toggle_observer_update(self, enabled: bool = True):
        self.static_enabled[0] = int(enabled)
        return self

    def enable_observer(self, enabled: bool = True):
        # torch.ao's disable_observer() helpers call this: it gates the static estimate.
        self.toggle_observer_update(enabled)

    def toggle_qparam_learning(self, enabled: bool = True):
        self.learning_enabled[0] = int(enabled)
        self.scale.requires_grad = enabled
        self.zero_point.requires_grad = enabled
        return self

    def toggle_fake_quant(self, enabled: bool = True):
        self.fake_quant_enabled[0] = int(enabled)
        return self

    def observe_quant_params(self):
        print(f"LearnableFakeQuantize Scale: {self.scale.detach()}")
        print(f"LearnableFakeQuantize Zero Point: {self.zero_point.detach()}")

    def calculate_qparams(self):
        """``(scale, zero_point)`` for ``convert``: scale clamped to >= eps, zero point rounded, clamped, int64."""
        self.scale.data.clamp_(min=self.eps)
        scale = self.scale.detach()
        zero_point = self.zero_point.detach().round().clamp(self.quant_min, self.quant_max).long()
        return scale, zero_point

    def extra_repr(self) -> str:
        return (
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, dtype={self.dtype}, qscheme={self.qscheme}, "
            f"ch_axis={self.ch_axis}, channels={self.scale.numel()}, use_grad_scaling={self.use_grad_scaling}"
        )

    # ------------------------------------------------------------ forward

    def _flag(self, name: str) -> bool:
        return read_flag(self, name)

    def _copy_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        for param, value in ((self.scale, scale), (self.zero_point, zero_point)):
            value = value.to(param.device)
            if self.qscheme in _PER_CHANNEL and value.dim() == 1 and value.shape != param.shape:
                param.data = torch.empty(value.shape, dtype=param.dtype, device=param.device)
            param.data.copy_(value)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if self._flag("static_enabled"):
            self.activation_post_process(X.detach())
            scale, zero_point = self.activation_post_process.calculate_qparams()
            self._copy_qparams(scale, zero_point)
        else:
            # Through .data (as torch does): no autograd version bump, so a module
            # called twice in one graph keeps its saved scale valid. Tensor
            # bound rather than eps.item(): same values, no device sync.
            self.scale.data.clamp_(min=self.eps)

        if not self._flag("fake_quant_enabled"):
            return X
        return learnable_fake_quant(self, X)

    # -------------------------------------------------------- state dicts

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Lazily sized per-channel qparams: take the incoming channel count.
        if self.qscheme in _PER_CHANNEL:
            for name in ("scale", "zero_point"):
                incoming = state_dict.get(prefix + name)
                param = getattr(self, name)
                if isinstance(incoming, torch.Tensor) and incoming.dim() == 1 and incoming.shape != param.shape:
                    param.data = torch.empty(incoming.shape, dtype=param.dtype, device=param.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
