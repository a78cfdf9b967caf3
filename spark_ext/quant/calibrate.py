"""Post-training quantization (PTQ): set every quantizer's step from data, without training.

:func:`calibrate` is the PTQ baseline of docs/spec.md §5c. Two methods:

* ``"minmax"``: range-based. Each quantizer's grid covers the observed
  ``[min, max]`` of its input (weights per output channel, activations per
  tensor): see :meth:`LSQQuantizer.set_range`.
* ``"mse"``: the same range shrunk by a clipping ratio ``r`` in
  ``{1/n, 2/n, ..., 1}`` (``n = num_candidates``), ``r`` chosen to minimise
  the summed squared quantization error ``sum (fq(x) - x)^2`` — per channel
  for per-channel (weight) quantizers, over all calibration batches for
  activations. ``r = 1`` is a candidate, so the MSE is never worse than minmax
  on the calibration data.

How the passes run: the model is put in ``eval()`` mode (BatchNorm and
dropout behave as at inference and BN running statistics are not updated),
every quantizer is *disabled* (each layer sees float inputs and weights, so
activation statistics are those of the float network), and batches run under
``torch.no_grad()``. Weights of the quantized layers (:class:`QuantConv2d`, ...)
are calibrated directly from the weight tensors. ``"mse"`` runs the batches
twice (ranges, then candidate errors), so it first stores the batches in a
list. Afterwards every module's train/eval mode and every quantizer's
``enabled`` / ``observe`` switches are restored.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn

from .. import ops
from ..progress import progress as progress_bar  # `progress` is calibrate's flag
from .layers import QUANT_LAYERS
from .quantizer import LSQQuantizer, channel_rows, range_to_qparams

METHODS = ("minmax", "mse")


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        # (input, target) pairs from a data loader: the model gets the input.
        return model(batch[0])
    raise TypeError(
        f"calibrate: cannot feed a batch of type {type(batch).__name__} to the model; batches must be "
        "tensors, (input, target, ...) tuples / lists, or dicts of keyword arguments — or pass forward_fn"
    )


def _to_device(batch: Any, device: Optional[torch.device]) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _model_device(model: nn.Module) -> Optional[torch.device]:
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type != "meta":
            return t.device
    return None


def _run(model, batches, forward_fn, device, progress: bool, desc: str) -> int:
    total = len(batches) if isinstance(batches, list) else None
    bar = progress_bar(desc=desc, total=total, quiet=not progress)
    n = 0
    try:
        for batch in batches:
            forward_fn(model, _to_device(batch, device))
            n += 1
            bar.update()
    finally:
        bar.close()
    return n


@torch.no_grad()
def _mse_errors(q: LSQQuantizer, x: torch.Tensor, lo, hi, ratios, axis) -> torch.Tensor:
    """``[R, C]`` summed squared error of quantizing ``x`` with each ratio's shrunk range."""
    rows = channel_rows(x, axis)
    errors = []
    for r in ratios:
        step, offset = range_to_qparams(lo * r, hi * r, q.bits, q.signed, q.learn_offset)
        # Quantize the [C, n] rows per channel (axis 0) with the real op, so the
        # candidates are scored with exactly the rounding the forward uses.
        y = ops.lsq_fake_quant(
            rows, step, offset, bits=q.bits, signed=q.signed, axis=0 if axis is not None else None, backend=q.backend
        )
        errors.append((y - rows).square().sum(dim=1))
    return torch.stack(errors)


def _select_mse(
    q: LSQQuantizer, lo: torch.Tensor, hi: torch.Tensor, errors: torch.Tensor, ratios: torch.Tensor
) -> None:
    # Ratios are in decreasing order, so ties (e.g. an all-zero channel) keep the widest range.
    best = ratios.to(errors.device)[errors.argmin(dim=0)]
    q.set_range(lo * best, hi * best)


def _check_positive_int(value: object, name: str, *, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    method: str = "minmax",
    *,
    num_batches: Optional[int] = None,
    num_candidates: int = 100,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    progress: bool = False,
) -> nn.Module:
    """PTQ: set the step (and offset) of every :class:`LSQQuantizer` in ``model`` from data.

    Args:
        model: a model containing LSQ quantizers (e.g. after :func:`quantize_model`).
        batches: an iterable of batches: tensors (``model(batch)``),
            ``(input, target, ...)`` tuples / lists (``model(batch[0])``) or
            dicts (``model(**batch)``); tensors are moved to the model's device.
            A DataLoader or a list both work.
        method: ``"minmax"`` or ``"mse"`` (see the module docstring).
        num_batches: use at most this many batches (``None``: all of them).
        num_candidates: number of clipping ratios tried by ``"mse"`` (>= 1).
        forward_fn: ``forward_fn(model, batch)`` runs one batch, for models
            with other calling conventions.
        progress: show a progress bar (tqdm if installed, else a counter on stderr).

    Returns:
        ``model`` (calibrated in place). Quantizers that received no input
        during the passes keep their previous state; a warning names them.
        No gradient flows; parameters other than the quantizers' are untouched.

    Raises:
        ValueError: unknown ``method``; no LSQQuantizer in ``model``; no batch;
            bad ``num_batches`` / ``num_candidates``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    num_batches = _check_positive_int(num_batches, "num_batches", allow_none=True)
    num_candidates = _check_positive_int(num_candidates, "num_candidates")
    if forward_fn is not None and not callable(forward_fn):
        raise TypeError(f"forward_fn must be callable, got {forward_fn!r}")
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            "batches must be an iterable of batches (e.g. a list of tensors or a DataLoader), got a single tensor"
        )
    try:
        iter(batches)
    except TypeError:
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}") from None
    forward_fn = forward_fn or _default_forward

    names = {id(m): n for n, m in model.named_modules()}
    quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    if not quantizers:
        raise ValueError(
            f"calibrate: {type(model).__name__} contains no LSQQuantizer; call quantize_model(model) first"
        )
    # Weights of quant layers are calibrated from the weight tensors directly;
    # every other quantizer (input activations, user-placed ones) from data.
    weight_layers = [m for m in model.modules() if isinstance(m, QUANT_LAYERS) and m.weight_quantizer is not None]
    weight_qs = {id(m.weight_quantizer) for m in weight_layers}
    data_qs = [q for q in quantizers if id(q) not in weight_qs]

    if num_batches is not None:
        batches = itertools.islice(batches, num_batches)
    if method == "mse":
        batches = list(batches)  # two passes over the same batches
    ratios = torch.arange(num_candidates, 0, -1, dtype=torch.float32) / num_candidates

    saved_modes = [(m, m.training) for m in model.modules()]
    saved_switches = [(q, q.enabled, q.observe) for q in quantizers]
    hooks = []
    try:
        model.eval()
        for q in quantizers:
            q.enabled, q.observe = False, False
            q.reset_observer()
        for q in data_qs:
            q.observe = True
        device = _model_device(model)
        seen = _run(model, batches, forward_fn, device, progress, f"calibrate ({method}) ranges")
        if seen == 0:
            raise ValueError("calibrate: batches yielded no batch")
        for q in data_qs:
            q.observe = False
        observed = [q for q in data_qs if q.running_min is not None]

        if method == "minmax":
            for q in observed:
                q.set_range(q.running_min, q.running_max)
        else:
            for q in observed:
                if q.signed is None:  # decide the sign from the whole calibration set
                    q.set_range(q.running_min, q.running_max)
            errors = {id(q): None for q in observed}

            def accumulate(module: LSQQuantizer, args):
                x = args[0]
                axis = module._axis_for(x)
                e = _mse_errors(module, x, module.running_min, module.running_max, ratios, axis)
                prev = errors[id(module)]
                errors[id(module)] = e if prev is None else prev + e

            hooks = [q.register_forward_pre_hook(accumulate) for q in observed]
            _run(model, batches, forward_fn, device, progress, "calibrate (mse) errors")
            for q in observed:
                if errors[id(q)] is not None:
                    _select_mse(q, q.running_min, q.running_max, errors[id(q)], ratios)

        for layer in weight_layers:
            q, w = layer.weight_quantizer, layer.weight_to_quantize().detach()  # BN-scaled in QuantConvBn2d
            axis = q._axis_for(w)
            lo, hi = channel_rows(w, axis).aminmax(dim=1)
            if method == "minmax":
                q.set_range(lo, hi)
            else:
                _select_mse(q, lo, hi, _mse_errors(q, w, lo, hi, ratios, axis), ratios)

        missed = [names.get(id(q), "?") for q in data_qs if q.running_min is None]
        if missed:
            warnings.warn(
                f"calibrate: {len(missed)} quantizer(s) received no input and were not calibrated: {missed}",
                UserWarning,
                stacklevel=2,
            )
    finally:
        for h in hooks:
            h.remove()
        for m, training in saved_modes:
            m.training = training
        for q, enabled, observe in saved_switches:
            q.enabled, q.observe = enabled, observe
            q.reset_observer()
    return model
