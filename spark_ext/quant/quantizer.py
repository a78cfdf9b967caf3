"""``LSQQuantizer``: a learnable LSQ / LSQ+ fake quantizer module (docs/spec.md §5b, §5c).

The module owns the learnable step (and, for LSQ+, the learnable offset) and
calls the public op :func:`spark_ext.lsq_fake_quant` in its forward. Its
parameters are initialised from the first tensor it quantizes (data-driven
init), or set explicitly by PTQ calibration (:func:`spark_ext.quant.calibrate`)
through :meth:`LSQQuantizer.set_range` / :meth:`LSQQuantizer.set_qparams`.

State (``state_dict`` keys):

* ``step``: float parameter, ``[1]`` per tensor, ``[C]`` per channel.
* ``offset``: same shape, present only with ``learn_offset=True`` (LSQ+).
* ``initialized``: uint8 scalar buffer, 1 once the step holds a real value.
* ``is_signed``: int8 scalar buffer, 1 signed, 0 unsigned, -1 not decided yet
  (``signed=None`` before the first batch).

Running statistics for calibration (``running_min`` / ``running_max``) are
non-persistent buffers: they are not part of the state dict.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .. import ops
from .._validation import check_bits, check_grad_scale
from ..reference import LSQ_MIN_STEP, accumulation_dtype, lsq_range


def _check_bool(value: object, name: str, *, allow_none: bool = False) -> Optional[bool]:
    if value is None and allow_none:
        return None
    if not isinstance(value, bool):
        expected = "a bool or None" if allow_none else "a bool"
        raise TypeError(f"{name} must be {expected}, got {value!r}")
    return value


def _normalise_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"per_channel_axis={axis} is out of range for a {ndim}-D input")
    return axis % ndim


def channel_rows(x: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """``x`` as ``[C, n]`` rows (float32, or float64 for float64 x), one per channel along
    ``axis`` (``[1, N]`` when None). Copies when ``axis != 0`` or x is not contiguous
    (calibration / init only).
    """
    x = x.detach().to(accumulation_dtype(x.dtype))
    if axis is None:
        return x.reshape(1, -1)
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


class LSQQuantizer(nn.Module):
    """Learnable LSQ (Esser et al. 2020) / LSQ+ (Bhalgat et al. 2020) fake quantizer.

    Args:
        bits: 2..16.
        signed: ``True`` range ``[-2^(b-1), 2^(b-1)-1]``; ``False`` range
            ``[0, 2^b-1]``; ``None`` decides from the first tensor seen (its
            first forward batch, or everything observed before calibration):
            signed when it holds a negative value, unsigned otherwise. The
            decision is stored in the ``is_signed`` buffer and then fixed.
        per_channel_axis: ``None`` for one step per tensor, or the dimension
            of the input that gets one step per index (0 for weights
            ``[C_out, ...]``). May be negative (counted from the input's last dim).
        learn_offset: LSQ+ — also learn an offset ``o`` so that the grid is
            ``q * step + o``. Without it (LSQ) the grid is symmetric about 0.
        num_channels: per-channel only: the size of the channel dimension, if
            known up front (it fixes the step's shape at construction). When
            ``None`` the step is a ``[1]`` placeholder until the first batch
            (or until a per-channel state dict is loaded).
        grad_scale: passed to :func:`spark_ext.lsq_fake_quant`: ``"lsq"``
            (``1/sqrt(n * Qp)``), a positive float, or ``None`` (1).
        backend: backend for :func:`spark_ext.lsq_fake_quant` (``None`` = auto).
        device, dtype: of the step / offset parameters (default float32).

    Initialisation on the first tensor ``x`` quantized while not initialised
    (docs/spec.md §5b): LSQ ``step = 2 * mean(|x|) / sqrt(Qp)`` (per tensor, or per
    channel over all other dims); LSQ+ (``learn_offset``) ``step = (max - min)
    / (Qp + Qn)``, ``offset = min + Qn * step`` (per tensor or per channel).
    Steps are clamped to at least 1e-8 so an all-zero tensor still gives a
    valid (tiny) step; calibrate or load a state for such tensors. A first
    tensor holding NaN or inf raises ``ValueError`` and leaves the quantizer
    uninitialised (so is a non-finite step or offset given to ``set_qparams``).

    Switches (plain attributes, not saved in the state dict):
        enabled: ``True`` fake-quantizes; ``False`` returns the input unchanged
            (and does not initialise).
        observe: ``True`` tracks the running min / max of every input, per
            tensor or per channel, in ``running_min`` / ``running_max``
            (used by :func:`spark_ext.quant.calibrate`).

    Before quantizing, the step is clamped in place to at least 1e-8, so an
    optimizer step that overshoots below zero does not make the forward fail.

    Forward: ``x`` any shape, float32/float16/bfloat16 (float64 on the
    reference backend). Returns a tensor of x's shape and dtype, differentiable
    w.r.t. x (straight-through inside the range), ``step`` and ``offset``.
    Initialisation reads the data once (a host sync: it checks the data are
    finite, and decides the sign when ``signed=None``); after that a forward
    does not synchronise, and a model whose quantizers
    are initialised (one eager forward, :func:`calibrate` or a loaded state)
    compiles with ``torch.compile(fullgraph=True)``.

    Distributed training: initialise before wrapping the model in DDP (or load
    a state), since each rank would otherwise initialise from its own batch.
    """

    step: nn.Parameter
    offset: Optional[nn.Parameter]
    initialized: torch.Tensor
    is_signed: torch.Tensor

    def __init__(
        self,
        bits: int,
        signed: Optional[bool],
        per_channel_axis: Optional[int] = None,
        learn_offset: bool = False,
        *,
        num_channels: Optional[int] = None,
        grad_scale: Union[str, float, None] = "lsq",
        backend: Optional[str] = None,
        device: Union[torch.device, str, None] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        signed = _check_bool(signed, "signed", allow_none=True)
        if per_channel_axis is not None and (
            isinstance(per_channel_axis, bool) or not isinstance(per_channel_axis, int)
        ):
            raise TypeError(f"per_channel_axis must be an int or None, got {per_channel_axis!r}")
        self.per_channel_axis = per_channel_axis
        self.learn_offset = _check_bool(learn_offset, "learn_offset")
        if num_channels is not None:
            if per_channel_axis is None:
                raise ValueError(
                    f"num_channels={num_channels!r} needs per_channel_axis (a per-tensor quantizer has one step)"
                )
            if isinstance(num_channels, bool) or not isinstance(num_channels, int) or num_channels < 1:
                raise ValueError(f"num_channels must be a positive int or None, got {num_channels!r}")
        self.num_channels = num_channels
        self.grad_scale = check_grad_scale(grad_scale)
        self.backend = backend
        dtype = torch.float32 if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        shape = (num_channels or 1,)
        # 1.0 is only a placeholder: `initialized` says whether it is real.
        self.step = nn.Parameter(torch.ones(shape, device=device, dtype=dtype))
        if self.learn_offset:
            self.offset = nn.Parameter(torch.zeros(shape, device=device, dtype=dtype))
        else:
            self.register_parameter("offset", None)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8, device=device))
        sign_code = -1 if signed is None else int(signed)
        self.register_buffer("is_signed", torch.tensor(sign_code, dtype=torch.int8, device=device))
        self.register_buffer("running_min", None, persistent=False)
        self.register_buffer("running_max", None, persistent=False)
        self.enabled = True
        self.observe = False
        # Host-side mirrors of the two buffers, so that a forward never reads
        # a device tensor to decide what to do. They are kept in step by every
        # method that writes the buffers and by `_load_from_state_dict`.
        self._initialized = False
        self._signed: Optional[bool] = signed
        self._signed_arg = signed

    # ------------------------------------------------------------------ info

    @property
    def is_initialized(self) -> bool:
        """Whether the step (and offset) hold real values (from data, calibration or a state dict)."""
        return self._initialized

    @property
    def signed(self) -> Optional[bool]:
        """The signedness in use; ``None`` while ``signed=None`` is still undecided."""
        return self._signed

    @property
    def qrange(self) -> tuple[int, int]:
        """``(Qn, Qp)`` of docs/spec.md §5b; needs the signedness to be decided."""
        if self._signed is None:
            raise RuntimeError("LSQQuantizer(signed=None) has not seen data yet: its range is not decided")
        return lsq_range(self.bits, self._signed)

    def extra_repr(self) -> str:
        parts = [f"bits={self.bits}", f"signed={self._signed}" + (" (auto)" if self._signed_arg is None else "")]
        if self.per_channel_axis is not None:
            parts.append(f"per_channel_axis={self.per_channel_axis}")
            if self.step.numel() > 1 or self.num_channels is not None:
                parts.append(f"channels={self.step.numel()}")
        if self.learn_offset:
            parts.append("learn_offset=True")
        if self.grad_scale != "lsq":
            parts.append(f"grad_scale={self.grad_scale!r}")
        if self.backend is not None:
            parts.append(f"backend={self.backend!r}")
        parts.append(f"initialized={self._initialized}")
        if not self.enabled:
            parts.append("enabled=False")
        if self.observe:
            parts.append("observe=True")
        return ", ".join(parts)

    # ------------------------------------------------------- setting qparams

    def _axis_for(self, x: torch.Tensor) -> Optional[int]:
        if self.per_channel_axis is None:
            return None
        if x.dim() == 0:
            raise ValueError("a per-channel LSQQuantizer cannot quantize a 0-D tensor")
        axis = _normalise_axis(self.per_channel_axis, x.dim())
        if self.num_channels is not None and x.shape[axis] != self.num_channels:
            raise ValueError(
                f"LSQQuantizer(num_channels={self.num_channels}) got an input with {x.shape[axis]} "
                f"channels along axis {self.per_channel_axis} (shape {tuple(x.shape)})"
            )
        return axis

    def _set_signed(self, signed: bool) -> None:
        self._signed = bool(signed)
        self.is_signed.fill_(int(signed))

    @torch.no_grad()
    def _assign(self, param: nn.Parameter, value: torch.Tensor) -> None:
        """Write ``value`` into ``param`` keeping the Parameter object (optimizers hold it)."""
        value = value.detach().reshape(-1).to(device=param.device, dtype=param.dtype)
        if param.shape == value.shape:
            # .data: no autograd version bump, so a graph that saved the step stays valid.
            param.data.copy_(value)
        else:
            # First per-channel batch on a placeholder: change the shape, keep the object.
            param.data = value.clone()

    @torch.no_grad()
    def set_qparams(self, step: torch.Tensor, offset: Optional[torch.Tensor] = None) -> None:
        """Set the step (and offset, LSQ+ only) directly and mark the quantizer initialised.

        ``step``: ``[1]`` or ``[C]`` (any float dtype, cast to the parameter's);
        clamped to at least 1e-8. ``offset`` is required iff ``learn_offset``.
        The signedness must be decided (``signed`` not None).
        """
        if self._signed is None:
            raise RuntimeError("set_qparams needs the signedness decided: construct with signed=True/False")
        if (offset is None) == self.learn_offset:
            need = "requires an offset" if self.learn_offset else "takes no offset"
            raise ValueError(f"this LSQQuantizer (learn_offset={self.learn_offset}) {need}")
        step = torch.as_tensor(step).detach().reshape(-1)
        if self.per_channel_axis is None and step.numel() != 1:
            raise ValueError(f"a per-tensor LSQQuantizer needs one step, got shape {tuple(step.shape)}")
        if self.num_channels is not None and step.numel() != self.num_channels:
            raise ValueError(f"step must have {self.num_channels} elements, got shape {tuple(step.shape)}")
        if offset is not None:
            offset = torch.as_tensor(offset).detach().reshape(-1)
            if offset.shape != step.shape:
                raise ValueError(f"offset must have the step's shape {tuple(step.shape)}, got {tuple(offset.shape)}")
        for name, t in (("step", step), ("offset", offset)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"{name} must be finite, got {t.flatten()[:4].tolist()} (NaN/inf data observed?); "
                    "the quantizer is left unchanged"
                )
        self._assign(self.step, step.to(accumulation_dtype(step.dtype)).clamp_min(LSQ_MIN_STEP))
        if offset is not None:
            self._assign(self.offset, offset)
        self._mark_initialized()

    @torch.no_grad()
    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Range-based (min-max) qparams covering ``[lo, hi]`` (``[1]`` or ``[C]`` each).

        * LSQ+ (``learn_offset``): ``step = (hi - lo) / (Qp + Qn)``, ``offset = lo + Qn * step``.
        * LSQ signed: ``step = max(-lo / Qn, hi / Qp)`` (both ends representable).
        * LSQ unsigned: ``step = hi / Qp`` (values below 0 clip to 0).

        With ``signed=None`` still undecided, the sign is decided here
        (signed iff ``min(lo) < 0``; a host sync).
        """
        lo, hi = torch.as_tensor(lo).detach().reshape(-1), torch.as_tensor(hi).detach().reshape(-1)
        lo, hi = lo.to(accumulation_dtype(lo.dtype)), hi.to(accumulation_dtype(hi.dtype))
        if self._signed is None:
            self._set_signed(bool((lo < 0).any()))
        step, offset = range_to_qparams(lo, hi, self.bits, self._signed, self.learn_offset)
        self.set_qparams(step, offset)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-driven init from ``x`` (docs/spec.md §5b; see the class docstring). Overwrites any previous value.

        Raises ``ValueError`` (and changes nothing) when ``x`` holds NaN or
        inf: the step would be NaN/inf and the quantizer would stay broken.
        This reads the data on the host once, as the init does anyway.
        """
        axis = self._axis_for(x)
        if not bool(torch.isfinite(x.detach()).all()):
            raise ValueError(
                f"LSQQuantizer cannot initialise from a tensor holding NaN or inf (shape {tuple(x.shape)}); "
                "it stays uninitialised: feed finite data, or calibrate / set_qparams / load a state first"
            )
        rows = channel_rows(x, axis)
        signed = self._signed if self._signed is not None else bool((x.detach() < 0).any())
        if self.learn_offset:
            # LSQ+ init is the min-max range init of set_range.
            step, offset = range_to_qparams(*rows.aminmax(dim=1), self.bits, signed, True)
        else:
            _, qp = lsq_range(self.bits, signed)
            step, offset = (2.0 * rows.abs().mean(dim=1) / math.sqrt(qp)).clamp_min(LSQ_MIN_STEP), None
        if not bool(torch.isfinite(step).all()):  # e.g. |x| near float max: the mean overflows
            raise ValueError(
                f"LSQQuantizer: the initial step from this tensor is not finite ({step.flatten()[:4].tolist()}); "
                "it stays uninitialised: rescale the data, or calibrate / set_qparams first"
            )
        if self._signed is None:
            self._set_signed(signed)
        if offset is not None:
            self._assign(self.offset, offset)
        self._assign(self.step, step)
        self._mark_initialized()

    def _mark_initialized(self) -> None:
        self.initialized.fill_(1)
        self._initialized = True

    @torch.no_grad()
    def reset(self) -> None:
        """Forget the learned values: the next tensor seen re-initialises (and re-decides ``signed=None``)."""
        self.initialized.fill_(0)
        self._initialized = False
        if self._signed_arg is None:
            self.is_signed.fill_(-1)
            self._signed = None
        self.reset_observer()

    # ------------------------------------------------------------ observing

    def reset_observer(self) -> None:
        """Clear ``running_min`` / ``running_max``."""
        self.running_min = None
        self.running_max = None

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = channel_rows(x, self._axis_for(x)).aminmax(dim=1)
        if self.running_min is None or self.running_min.shape != lo.shape:
            self.running_min, self.running_max = lo, hi
        else:
            self.running_min = torch.minimum(self.running_min, lo)
            self.running_max = torch.maximum(self.running_max, hi)

    # -------------------------------------------------------------- forward

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize ``x`` regardless of ``enabled`` / ``observe`` (initialising first if needed)."""
        if not self._initialized:
            self.initialize(x)
        else:
            # An optimizer step can overshoot a small step to <= 0, which the op
            # rejects. Clamp in place like torch's learnable fake quant clamps its
            # scale (through .data: no autograd version bump, no host sync); a
            # NaN step stays NaN and is reported by the op.
            self.step.data.clamp_(min=LSQ_MIN_STEP)
        return ops.lsq_fake_quant(
            x,
            self.step,
            self.offset,
            bits=self.bits,
            signed=self._signed,
            axis=self._axis_for(x),
            grad_scale=self.grad_scale,
            backend=self.backend,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe:
            self._observe(x)
        if not self.enabled:
            return x
        return self.fake_quant(x)

    # --------------------------------------------------------- state dicts

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        step = state_dict.get(prefix + "step")
        init = state_dict.get(prefix + "initialized")
        sign = state_dict.get(prefix + "is_signed")
        if isinstance(step, torch.Tensor) and step.shape != self.step.shape and step.dim() == 1:
            # A per-channel step whose size was unknown here (placeholder [1]), or an
            # uninitialised placeholder loaded into an initialised quantizer: adopt
            # the incoming shape. Anything else is left to the size-mismatch error.
            resizable = self.per_channel_axis is not None and (
                self.num_channels is None or step.numel() in (1, self.num_channels)
            )
            if resizable:
                with torch.no_grad():
                    self.step.data = torch.empty(step.shape, dtype=self.step.dtype, device=self.step.device)
                    if self.offset is not None and (prefix + "offset") in state_dict:
                        self.offset.data = torch.empty(step.shape, dtype=self.offset.dtype, device=self.offset.device)
        if isinstance(sign, torch.Tensor) and sign.numel() == 1:
            incoming = int(sign.reshape(()))
            if self._signed_arg is not None and incoming != -1 and incoming != int(self._signed_arg):
                error_msgs.append(
                    f"{prefix}is_signed: the state is {'signed' if incoming else 'unsigned'} but this "
                    f"LSQQuantizer was built with signed={self._signed_arg}"
                )
                return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # Refresh the host-side mirrors from what was actually loaded.
        if isinstance(init, torch.Tensor):
            self._initialized = bool(self.initialized.reshape(()))
            if not self._initialized and self.num_channels is not None and self.step.numel() != self.num_channels:
                self.step.data = torch.ones(self.num_channels, dtype=self.step.dtype, device=self.step.device)
                if self.offset is not None:
                    self.offset.data = torch.zeros_like(self.step.data)
        if isinstance(sign, torch.Tensor):
            code = int(self.is_signed.reshape(()))
            self._signed = None if code == -1 else bool(code)


def range_to_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool, learn_offset: bool
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Step (and offset) whose grid covers ``[lo, hi]``; see :meth:`LSQQuantizer.set_range`.

    ``lo``, ``hi``: ``[C]`` float32 (or float64). Returns ``[C]`` tensors of that dtype, step >= 1e-8.
    """
    qn, qp = lsq_range(bits, signed)
    if learn_offset:
        step = ((hi - lo) / (qp + qn)).clamp_min(LSQ_MIN_STEP)
        return step, lo + qn * step
    if signed:
        step = torch.maximum(-lo / qn, hi / qp)
    else:
        step = hi / qp
    return step.clamp_min(LSQ_MIN_STEP), None
