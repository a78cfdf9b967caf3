"""``quantize_model``: swap a model's convolutions and ``nn.Linear`` for LSQ-quantized layers.

Which layers: every ``nn.Conv1d``, ``nn.Conv2d``, ``nn.ConvTranspose2d`` or
``nn.Linear``, at any depth, found through ``named_modules()`` — i.e. in
*module registration order* (the order the attributes were assigned in
``__init__``), which for the usual ``head -> body -> tail`` restoration nets
is also the execution order. Layers referenced only through plain Python
attributes or lists (not registered submodules) are not seen.

Subclasses: one that keeps its parent's ``forward`` (and, for convs,
``_conv_forward``) computes what its parent computes and is quantized like it
(the quantized layer is a plain ``QuantConv2d`` etc.: the subclass's own
methods and attributes are not kept). One that overrides either (timm's
``StdConv2d`` standardises its weight), or whose weights are all frozen
(basicsr's ``MeanShift``: a fixed transform), is left float and listed in the
report with the reason, as are an
uninitialised lazy layer and ``nn.MultiheadAttention``'s ``out_proj`` (the
attention reads its weight and never calls its forward). Layers left float
for these reasons do not count as the first / last layer.

First / last layer: the first and the last of those layers in registration
order, counting ``skip``-ped ones, get ``first_last_bits`` for weights and input
activations (LSQ's convention: the layer that reads the image and the one
that writes the output stay at 8 bits). If the registration order of a model
differs from its execution order, name the layers to keep float with ``skip``
or set ``first_last_bits=None`` and convert those layers yourself.

Per-layer bit widths: ``layer_bits={"head.*": 8, "body.*": {"w_bits": 4, "a_bits": 6}}``
maps module names or ``fnmatch`` patterns to the bits of the layers they
match (the first matching pattern, in the mapping's order, wins). Precedence:
``skip``, then ``layer_bits``, then ``first_last_bits``, then ``w_bits`` /
``a_bits``. The report's note says which pattern set a layer's bits.

Shared modules: a layer object registered under several names is converted
once; every place that referenced it gets the same quantized layer, so it
stays shared. It is skipped when any of its names matches ``skip``.

Conv-BN folding (``fold_bn=True``, the default): an ``nn.Conv2d`` whose output
goes only to an ``nn.BatchNorm2d`` becomes one :class:`QuantConvBn2d` that
holds the BN (trained as torch.ao's fused ``ConvBn2d``; exported with the BN
in the conv's weight and bias), and the BN's place becomes an ``nn.Identity``.
The pairs are found

1. in an ``nn.Sequential`` (or a subclass that keeps its forward): the conv
   directly followed by the BN;
2. anywhere else (torchvision's ``conv1`` -> ``bn1`` in a block's forward) by
   tracing the model with ``torch.fx``: the conv and the BN are each called
   once, the BN's only input is the conv's output, and nothing else uses that
   output. A model ``torch.fx`` cannot trace (data-dependent control flow)
   gets rule 1 only. The trace runs (forward hooks included, on proxies)
   only when a ``BatchNorm2d`` is left that rule 1 does not pair.

A found pair is left unfolded, and the report says why, when the conv stays
float (``skip``, the subclass rules, ``layer_bits``), either module is
registered under several names, or the BN cannot be folded (no running
statistics, a subclass with its own forward, another channel count). The
report's ``bn_folds`` lists every pair found. State-dict keys of a folded BN
move under the conv (``features.0.1.weight`` -> ``features.0.0.bn.weight``),
as with torch.ao's ``fuse_modules``.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from .._validation import check_bits
from .layers import (
    QUANT_LAYERS,
    QuantConv1d,
    QuantConv2d,
    QuantConvBn2d,
    QuantConvTranspose2d,
    QuantLinear,
    foldable_bn_problem,
    overridden_forward,
)
from .quantizer import LSQQuantizer

_SWAPS: dict[type, type] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
}
_KINDS = "nn.Conv1d / nn.Conv2d / nn.ConvTranspose2d / nn.Linear"


def _float_type(module: nn.Module) -> Optional[type]:
    """The supported float class ``module`` is or subclasses; ``None`` for other modules and quantized layers."""
    if isinstance(module, QUANT_LAYERS):
        return None
    return next((t for t in _SWAPS if isinstance(module, t)), None)


def _left_float_reason(module: nn.Module, float_type: type) -> Optional[str]:
    """Why a candidate of ``float_type`` cannot be swapped for its quantized layer, or ``None``."""
    if type(module) is float_type:
        return None
    method = overridden_forward(type(module), float_type)
    if method is not None:
        return f"subclass {type(module).__qualname__} overrides {method}: left float"
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        # basicsr's MeanShift: a subclass with frozen weights is a fixed transform, not a layer to train.
        return f"subclass {type(module).__qualname__} has frozen weights (a fixed transform): left float"
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return f"uninitialised {type(module).__qualname__}: left float (run a forward first)"
    if isinstance(module, NonDynamicallyQuantizableLinear):
        return "nn.MultiheadAttention's out_proj (its forward is never called): left float"
    return None


class QuantEntry(NamedTuple):
    """One candidate layer: ``kind`` is the float class name; bits are ``None`` when left float."""

    name: str
    kind: str
    w_bits: Optional[int]
    a_bits: Optional[int]
    note: str = ""


class BNFold(NamedTuple):
    """A conv followed by a BatchNorm2d: ``folded`` into one :class:`QuantConvBn2d`, or not and ``why``."""

    conv: str
    bn: str
    folded: bool
    why: str = ""


@dataclass
class QuantReport:
    """What :func:`quantize_model` did: one :class:`QuantEntry` per candidate layer, in order.

    ``model`` is the quantized model (the input model itself when
    ``inplace=True``). Iterating, ``len`` and indexing go over ``entries``;
    ``str(report)`` is a table. ``bn_folds``: every conv-BN pair found (empty with ``fold_bn=False``).
    """

    entries: list[QuantEntry]
    model: nn.Module = field(repr=False)
    bn_folds: list[BNFold] = field(default_factory=list)

    def __iter__(self) -> Iterator[QuantEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> QuantEntry:
        return self.entries[index]

    @property
    def quantized(self) -> list[QuantEntry]:
        return [e for e in self.entries if e.w_bits is not None or e.a_bits is not None]

    @property
    def skipped(self) -> list[QuantEntry]:
        return [e for e in self.entries if e.w_bits is None and e.a_bits is None]

    def __str__(self) -> str:
        header = ("name", "kind", "w_bits", "a_bits", "note")
        rows = [header] + [
            (
                e.name,
                e.kind,
                "float" if e.w_bits is None else str(e.w_bits),
                "float" if e.a_bits is None else str(e.a_bits),
                e.note,
            )
            for e in self.entries
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"{len(self.quantized)} layer(s) quantized, {len(self.skipped)} left float")
        if self.bn_folds:
            folded = sum(f.folded for f in self.bn_folds)
            lines.append(f"{folded} conv-BN pair(s) folded, {len(self.bn_folds) - folded} not folded")
        return "\n".join(lines)


def _check_skip(skip: object) -> tuple[str, ...]:
    if isinstance(skip, str):
        return (skip,)
    if skip is None:
        return ()
    try:
        patterns = tuple(skip)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"skip must be a module name, an fnmatch pattern or a sequence of them, got {skip!r}") from None
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"skip must contain strings (module names or fnmatch patterns), got {p!r} in {skip!r}")
    return patterns


_UNSET = object()


def _check_layer_bits(layer_bits: object) -> dict[str, dict[str, Optional[int]]]:
    """``{pattern: {"w_bits"?: bits, "a_bits"?: bits}}`` from the user's mapping (int = both operands)."""
    if layer_bits is None:
        return {}
    if not isinstance(layer_bits, Mapping):
        raise TypeError(
            f"layer_bits must be a mapping of module name patterns to bits, got {type(layer_bits).__name__}"
        )
    out: dict[str, dict[str, Optional[int]]] = {}
    for pattern, value in layer_bits.items():
        if not isinstance(pattern, str):
            raise TypeError(f"layer_bits keys must be module names or fnmatch patterns (str), got {pattern!r}")
        where = f"layer_bits[{pattern!r}]"
        if isinstance(value, Mapping):
            unknown = set(value) - {"w_bits", "a_bits"}
            if unknown or not value:
                raise ValueError(f"{where} must have the keys 'w_bits' and/or 'a_bits', got {dict(value)!r}")
            out[pattern] = {k: check_bits(v, f"{where}[{k!r}]", allow_none=True) for k, v in value.items()}
        else:
            bits = check_bits(value, where)  # an int: both operands
            out[pattern] = {"w_bits": bits, "a_bits": bits}
        if out[pattern].get("w_bits", _UNSET) is None and out[pattern].get("a_bits", _UNSET) is None:
            raise ValueError(f"{where} leaves both operands float: use skip={pattern!r} for that")
    return out


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with quantized layers and quantizers as leaves (their forward reads data)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*QUANT_LAYERS, LSQQuantizer)) or super().is_leaf_module(m, qualname)


def _conv_bn_candidates(model: nn.Module) -> dict[int, nn.Module]:
    """``{id(conv): bn}`` for every ``nn.Conv2d`` whose output only a ``nn.BatchNorm2d`` reads (module docstring)."""
    pairs: dict[int, nn.Module] = {}
    for seq in model.modules():  # rule 1: Sequential neighbours
        if isinstance(seq, nn.Sequential) and type(seq).forward is nn.Sequential.forward:
            children = list(seq)
            for conv, bn in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    pairs[id(conv)] = bn
    paired = {id(bn) for bn in pairs.values()}
    if all(id(m) in paired for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        return pairs  # nothing left to find: no trace (it would run the model's forward hooks on proxies)
    try:  # rule 2: the traced graph
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any model code may fail on proxies: rule 1 only
        return pairs
    modules = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module"]
    count: dict[str, int] = {}
    for n in calls:
        count[n.target] = count.get(n.target, 0) + 1
    for n in calls:
        conv = modules.get(n.target)
        users = list(n.users)
        if not isinstance(conv, nn.Conv2d) or count[n.target] != 1 or len(users) != 1:
            continue
        (user,) = users
        bn = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(bn, nn.BatchNorm2d) and count[user.target] == 1 and user.args == (n,) and not user.kwargs:
            pairs[id(conv)] = bn
    return pairs


def _matches(names: Sequence[str], pattern: str) -> bool:
    return any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names)


def quantize_model(
    model: nn.Module,
    w_bits: Optional[int] = 4,
    a_bits: Optional[int] = 4,
    skip: Union[str, Sequence[str]] = (),
    first_last_bits: Optional[int] = 8,
    inplace: bool = True,
    *,
    a_signed: Optional[bool] = None,
    a_learn_offset: bool = False,
    grad_scale: Union[str, float, None] = "lsq",
    backend: Optional[str] = None,
    layer_bits: Optional[Mapping[str, Union[int, Mapping[str, Optional[int]]]]] = None,
    fold_bn: bool = True,
) -> QuantReport:
    """Replace every ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` of ``model`` by
    :class:`QuantConv1d` / :class:`QuantConv2d` / :class:`QuantConvTranspose2d` / :class:`QuantLinear`.

    Args:
        model: any ``nn.Module`` (converted in place unless ``inplace=False``).
        w_bits, a_bits: weight / input-activation bits (2..16), or ``None`` to
            leave that operand float (weight-only or activation-only QAT).
        skip: module names or ``fnmatch`` patterns (``"tail.*"``,
            ``"*.attn.*"``) of layers to leave float. A pattern that matches no
            candidate layer only warns.
        first_last_bits: bits for both operands of the first and the last
            candidate layer in registration order (see the module docstring);
            ``None`` gives them ``w_bits`` / ``a_bits`` like every other layer.
        inplace: ``False`` converts a deep copy and leaves ``model`` untouched.
        a_signed, a_learn_offset, grad_scale, backend: passed to every layer
            (see :class:`QuantConv2d`).
        layer_bits: per-layer bits by module name or ``fnmatch`` pattern:
            ``{"head.*": 8}`` (both operands) or ``{"body.*": {"w_bits": 4,
            "a_bits": None}}`` (an omitted key keeps the default). The first
            matching pattern wins; it overrides ``first_last_bits``. A pattern
            that matches no candidate layer only warns.
        fold_bn: fold each ``nn.Conv2d`` -> ``nn.BatchNorm2d`` pair into one
            :class:`QuantConvBn2d` (the module docstring's rule); ``False``
            quantizes the conv alone and leaves the BN as it is.

    Returns:
        A :class:`QuantReport`; ``report.model`` is the converted model.
        Weights are shared with the float layers (same Parameter objects), so
        an optimizer built before the call still updates them; the new step
        parameters must be added to it (or build the optimizer afterwards).

    Raises:
        ValueError: unsupported bit width, a model that is itself a single
            layer, or nothing to quantize (no candidate layer, or all skipped).
        TypeError: ``model`` is not an ``nn.Module``; malformed ``skip`` or ``layer_bits``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    w_bits = check_bits(w_bits, "w_bits", allow_none=True)
    a_bits = check_bits(a_bits, "a_bits", allow_none=True)
    if w_bits is None and a_bits is None:
        raise ValueError("w_bits and a_bits are both None: nothing would be quantized")
    first_last_bits = check_bits(first_last_bits, "first_last_bits", allow_none=True)
    patterns = _check_skip(skip)
    overrides = _check_layer_bits(layer_bits)
    for value, name in ((inplace, "inplace"), (fold_bn, "fold_bn")):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")
    model_type = _float_type(model)
    if model_type is not None:
        raise ValueError(
            f"model is itself an nn.{model_type.__name__} (a {type(model).__qualname__}); quantize_model swaps "
            f"submodules. Use {_SWAPS[model_type].__name__}.from_float(layer) for a single layer"
        )
    if not inplace:
        model = copy.deepcopy(model)

    # Every registered name of every candidate, in registration order; a shared
    # module appears once, under its first name, with its other names as aliases.
    names: dict[int, list[str]] = {}
    layers: dict[int, nn.Module] = {}
    float_types: dict[int, type] = {}
    float_reasons: dict[int, str] = {}  # candidates that stay float whatever the options
    already = 0
    for name, module in model.named_modules(remove_duplicate=False):
        float_type = _float_type(module)
        if float_type is not None:
            names.setdefault(id(module), []).append(name)
            layers[id(module)] = module
            float_types[id(module)] = float_type
            reason = _left_float_reason(module, float_type)
            if reason is not None:
                float_reasons[id(module)] = reason
        elif isinstance(module, QUANT_LAYERS):
            already += 1
    order = list(layers)
    convertible = [k for k in order if k not in float_reasons]
    if not convertible:
        extra = f" ({already} layer(s) are already quantized)" if already else ""
        if float_reasons:
            extra += f" (left float: {'; '.join(sorted(set(float_reasons.values())))})"
        raise ValueError(f"nothing to quantize: {type(model).__name__} has no {_KINDS} submodule{extra}")

    bn_of = _conv_bn_candidates(model) if fold_bn else {}
    registrations: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.BatchNorm2d):
            registrations.setdefault(id(module), []).append(name)

    first, last = convertible[0], convertible[-1]
    unused = [p for p in patterns if not any(_matches(names[k], p) for k in order)]
    if unused:
        warnings.warn(f"quantize_model: skip pattern(s) {unused} matched no {_KINDS}", UserWarning, stacklevel=2)
    unused = [p for p in overrides if not any(_matches(names[k], p) for k in order)]
    if unused:
        warnings.warn(f"quantize_model: layer_bits pattern(s) {unused} matched no {_KINDS}", UserWarning, stacklevel=2)

    entries: list[QuantEntry] = []
    replacement: dict[int, nn.Module] = {}
    bn_folds: list[BNFold] = []
    options = dict(a_signed=a_signed, a_learn_offset=a_learn_offset, grad_scale=grad_scale, backend=backend)
    for key in order:
        layer, aliases = layers[key], names[key]
        notes = []
        if key == first:
            notes.append("first")
        if key == last:
            notes.append("last")
        if len(aliases) > 1:
            notes.append("shared: " + ", ".join(aliases[1:]))
        float_reason, wb, ab = float_reasons.get(key), w_bits, a_bits
        if float_reason is None and any(_matches(aliases, p) for p in patterns):
            float_reason = "skipped"
        if float_reason is None:
            if first_last_bits is not None and key in (first, last):
                wb = None if w_bits is None else first_last_bits
                ab = None if a_bits is None else first_last_bits
            pattern = next((p for p in overrides if _matches(aliases, p)), None)
            if pattern is not None:
                wb = overrides[pattern].get("w_bits", wb)
                ab = overrides[pattern].get("a_bits", ab)
                notes.append(f"layer_bits {pattern!r}")
                if wb is None and ab is None:  # e.g. {"a_bits": None} on a weight-float model
                    float_reason = "left float"

        bn = bn_of.get(key)
        fold = False
        if bn is not None:
            bn_name = registrations[id(bn)][0]
            why = "the conv is left float" if float_reason is not None else foldable_bn_problem(bn, layer.out_channels)
            if why is None and len(registrations[id(bn)]) > 1:
                why = "the BatchNorm2d is registered under several names"
            if why is None and len(aliases) > 1:
                why = "the conv is registered under several names"
            fold = why is None
            bn_folds.append(BNFold(aliases[0], bn_name, fold, why or ""))
            notes.append(f"bn folded: {bn_name}" if fold else f"bn {bn_name} not folded: {why}")

        kind = type(layer).__name__
        if float_reason is not None:
            entries.append(QuantEntry(aliases[0], kind, None, None, "; ".join([float_reason] + notes)))
            continue
        if fold:
            replacement[key] = QuantConvBn2d.from_conv_bn(layer, bn, wb, ab, **options)
            replacement[id(bn)] = nn.Identity()
        else:
            replacement[key] = _SWAPS[float_types[key]].from_float(layer, wb, ab, **options)
        entries.append(QuantEntry(aliases[0], kind, wb, ab, "; ".join(notes)))

    if not replacement:
        raise ValueError(
            f"nothing to quantize: skip={list(patterns)} left all {len(convertible)} candidate layer(s) float"
        )

    # Swap in every parent that registers a converted layer, under every name.
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                parent._modules[child_name] = replacement[id(child)]
    return QuantReport(entries, model, bn_folds)
