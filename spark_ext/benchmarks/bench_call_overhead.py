"""Per-call wall time of every public op and quantizer module on tiny to medium tensors, against torch.

What it answers: how much of a call is Python, validation and dispatch rather
than kernel. On a tiny tensor (4x16) the kernel is nothing and the time is
the call path; on a small one (64x64x3x3 weight, 8x64x32x32 activation) a
QAT model's layers are mostly like it; on a medium one the kernel dominates.

Ops (``impl``: ``ours`` = the fast backend for the device: ``cpp`` on CPU,
``cuda`` / ``triton`` on CUDA; ``eager`` = the ``reference`` backend through
the same public op; ``torch`` = the torch built-in where one exists;
``floor`` = an empty custom op, see below), each ``fwd`` and ``fwd+bwd``:

* ``fake_quantize_learnable_per_tensor_affine`` vs ``torch._fake_quantize_learnable_per_tensor_affine``
  (activation shapes, range [-8, 7]);
* ``fake_quantize_learnable_per_channel_affine`` vs ``torch._fake_quantize_learnable_per_channel_affine``
  (weight shapes, axis 0);
* ``lsq_fake_quant`` (4 bits signed, per tensor, LSQ grad scale) vs torch's per-tensor learnable op with
  the same grad factor and a zero point of 0;
* ``difficulty_signals`` (grid 8x8, 4x4 for the tiny image; gradient of the cell KD) and
  ``fused_weighted_kd`` (per-cell weight): image shapes, no torch built-in.

Modules (``ours`` = spark_ext's module on the default backend, ``torch`` =
the torch / torchao module it replaces or compares with, ``plain`` = the float
layer, ``floor``): ``LearnableFakeQuantize`` vs torch.ao's
``_LearnableFakeQuantize`` (per-tensor quint8 activation, per-channel qint8
weight), ``PT2ELearnableFakeQuantize`` vs torchao's ``LearnableFakeQuantize``
(when torchao imports), ``LSQQuantizer`` (4 bits, per tensor) vs torch.ao's
``_LearnableFakeQuantize`` on the same range with LSQ grad scaling, and
``QuantConv2d`` / ``QuantLinear`` (W4A4) vs a torch.ao-prepared layer
(``nn.qat`` layer with a learnable weight fake quant behind a learnable
activation fake quant) and the plain float layer. Fake quantizers are timed in
their training steady state: qparams initialised, learning on, observers off.

``fwd`` is a training forward (inputs and qparams require grad: the autograd
graph is built, as in a QAT step); ``fwd+bwd`` adds
``torch.autograd.grad`` of the output for a random upstream gradient
(not ones: no op may take a shortcut) w.r.t. every input that requires grad.

The floor is ``bench_call_overhead::floor_clone``, a ``torch.library.custom_op``
returning ``x.clone()`` with a pass-through backward registered in Python (the
compiled library has no no-op op): the cheapest a Python-registered custom op
with autograd can be, on the op's main input.

Measurement: per group (op, case, pass) every implementation is timed in
interleaved rounds (A, B, C, A, B, C, ...; the order rotated every round), one
sample per implementation per round: a batch of calls sized to take about
``--sample-ms``, wall time divided by the calls (on CUDA synchronised before
and after the batch, so a sample is the throughput of back-to-back calls,
kernels included). Reported per row: p50 (= ``ms``), p90 and max over the
samples, p20 / p80 (the schema of common.py), and at the median
``over_torch`` = this row / the torch row and ``over_floor`` = this row / the
floor. Rounds: as many as fit ``--group-s`` seconds, between 5 and
``--rounds`` (3 and 7 with ``--quick``).

    python -m spark_ext.benchmarks.bench_call_overhead                  # CPU, 1 thread: under about 2 minutes
    python -m spark_ext.benchmarks.bench_call_overhead --quick          # tiny and small only, few rounds: under 30 s
    python -m spark_ext.benchmarks.bench_call_overhead --device cuda    # CUDA backends, CUDA modules
    python -m spark_ext.benchmarks.bench_call_overhead --threads 2
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import torch
from torch import nn

import spark_ext
from spark_ext import reference
from spark_ext.benchmarks import common
from spark_ext.quant import LearnableFakeQuantize, LSQQuantizer, QuantConv2d, QuantLinear

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch.ao.nn.qat as nnqat
    import torch.ao.quantization as tq
    from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

FLOOR = (
    "bench_call_overhead::floor_clone: torch.library.custom_op returning x.clone(), "
    "pass-through backward registered in Python"
)
QMIN, QMAX = -8, 7  # 4 bits signed: the range of the op rows
SIZES_QUICK = ("tiny", "small")
SIZES = ("tiny", "small", "medium")
ACT = {"tiny": (4, 16), "small": (8, 64, 32, 32), "medium": (8, 64, 64, 64)}
WEIGHT = {"tiny": (4, 16), "small": (64, 64, 3, 3), "medium": (256, 256, 3, 3)}
IMAGE = {"tiny": ((1, 3, 16, 16), (4, 4)), "small": ((8, 3, 48, 48), (8, 8)), "medium": ((16, 3, 128, 128), (8, 8))}
# (in, out, input shape): the conv's weight is [out, in, 3, 3]
CONV = {"tiny": (4, 16, (1, 4, 8, 8)), "small": (64, 64, (2, 64, 16, 16)), "medium": (64, 64, (8, 64, 32, 32))}
LINEAR = {"tiny": (16, 16, (4, 16)), "small": (256, 256, (64, 256)), "medium": (1024, 1024, (256, 1024))}


@torch.library.custom_op("bench_call_overhead::floor_clone", mutates_args=())
def floor_clone(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@floor_clone.register_fake
def _(x):
    return torch.empty_like(x)


floor_clone.register_autograd(lambda ctx, grad: grad)


def shape_label(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


# --------------------------------------------------------------------------
# what is timed: per group, impl -> (backend, fwd callable, fwd+bwd callable)
# --------------------------------------------------------------------------


class Group:
    """The implementations of one op or module on one case, each with a ``fwd`` and a ``fwd+bwd`` callable."""

    def __init__(self, op: str, case: str):
        self.op, self.case = op, case
        self.impls: dict[str, tuple[Optional[str], dict[str, Callable[[], object]]]] = {}

    def add(self, impl: str, backend: Optional[str], fn: Callable, inputs: Sequence[torch.Tensor], pick=None) -> None:
        """Add ``fn(*inputs)``; the gradient flows from ``pick(output)`` (default the output itself)
        to every input that requires grad, for an upstream gradient of fixed random values."""
        pick = pick or (lambda out: out)
        grad_inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        probe = pick(fn(*inputs))
        gen = torch.Generator(device=probe.device).manual_seed(1)
        upstream = torch.rand(probe.shape, generator=gen, device=probe.device, dtype=probe.dtype) + 0.5

        def fwd():
            return fn(*inputs)

        def fwd_bwd():
            return torch.autograd.grad(pick(fn(*inputs)), grad_inputs, upstream)

        self.impls[impl] = (backend, {"fwd": fwd, "fwd+bwd": fwd_bwd})

    def add_module(self, impl: str, backend: Optional[str], module: nn.Module, x: torch.Tensor) -> None:
        """Add ``module(x)``: gradients w.r.t. x and every parameter that requires grad."""
        params = [p for p in module.parameters() if p.requires_grad]
        self.add(impl, backend, lambda x, *_: module(x), [x, *params])

    def add_floor(self, x: torch.Tensor) -> None:
        self.add("floor", "custom_op", floor_clone, [x])


def leaf(shape, device, gen, scale=2.0, grad=True) -> torch.Tensor:
    t = (torch.randn(shape, generator=gen) * scale).to(device)
    return t.requires_grad_(grad)


def fast_backend(op: str, like: torch.Tensor) -> Optional[str]:
    """What ``auto`` runs for ``like`` when it is not the reference (None: no fast backend here)."""
    backend = spark_ext.backend_for(op, like, "auto")
    return None if backend == "reference" else backend


def op_groups(device: torch.device, sizes: Sequence[str]) -> list[Group]:
    gen = torch.Generator().manual_seed(0)
    groups = []
    for size in sizes:
        # learnable fake quant, per tensor and per channel, vs torch's ops
        for op, shape, axis in (
            ("fake_quantize_learnable_per_tensor_affine", ACT[size], None),
            ("fake_quantize_learnable_per_channel_affine", WEIGHT[size], 0),
        ):
            x = leaf(shape, device, gen)
            n = 1 if axis is None else shape[axis]
            scale = (torch.rand(n, generator=gen) * 0.2 + 0.2).to(device).requires_grad_()
            zero_point = torch.zeros(n, device=device).requires_grad_()
            group = Group(op, f"{size} {shape_label(shape)} fp32 " + ("per-tensor" if axis is None else "axis0"))
            if axis is None:

                def ours(x, s, z, b):
                    return spark_ext.fake_quantize_learnable_per_tensor_affine(x, s, z, QMIN, QMAX, 1.0, backend=b)

                def builtin(x, s, z):
                    return torch._fake_quantize_learnable_per_tensor_affine(x, s, z, QMIN, QMAX, 1.0)

            else:

                def ours(x, s, z, b):
                    return spark_ext.fake_quantize_learnable_per_channel_affine(x, s, z, 0, QMIN, QMAX, 1.0, backend=b)

                def builtin(x, s, z):
                    return torch._fake_quantize_learnable_per_channel_affine(x, s, z, 0, QMIN, QMAX, 1.0)

            fast = fast_backend(op, x)
            if fast:
                group.add("ours", fast, lambda x, s, z, f=ours, b=fast: f(x, s, z, b), [x, scale, zero_point])
            group.add("eager", "reference", lambda x, s, z, f=ours: f(x, s, z, "reference"), [x, scale, zero_point])
            group.add("torch", "builtin", builtin, [x, scale, zero_point])
            group.add_floor(x)
            groups.append(group)

        # LSQ per tensor vs torch's per-tensor learnable op with the same grad factor, zero point 0
        x = leaf(ACT[size], device, gen)
        step = torch.full((1,), 0.3, device=device).requires_grad_()
        zero = torch.zeros(1, device=device)
        qn, qp = reference.lsq_range(4, True)
        g = reference.lsq_grad_factor("lsq", x.numel(), 1, qp)
        group = Group("lsq_fake_quant", f"{size} {shape_label(ACT[size])} fp32 per-tensor 4-bit")
        fast = fast_backend("lsq_fake_quant", x)
        for impl, backend in (("ours", fast), ("eager", "reference")):
            if backend:
                group.add(
                    impl,
                    backend,
                    lambda x, s, b=backend: spark_ext.lsq_fake_quant(x, s, bits=4, signed=True, backend=b),
                    [x, step],
                )
        group.add(
            "torch",
            "builtin",
            lambda x, s, z=zero, g=g: torch._fake_quantize_learnable_per_tensor_affine(x, s, z, -qn, qp, g),
            [x, step],
        )
        group.add_floor(x)
        groups.append(group)

        # SPARK's ops: the student carries the gradient, the teacher and target do not
        shape, grid = IMAGE[size]
        student = leaf(shape, device, gen)
        teacher, target = leaf(shape, device, gen, grad=False), leaf(shape, device, gen, grad=False)
        weight = torch.rand(shape[0], 1, *grid, generator=gen).to(device)
        label = f"{size} {shape_label(shape)} fp32 grid{grid[0]}x{grid[1]} l1"
        for op in ("difficulty_signals", "fused_weighted_kd"):
            group = Group(op, label + (" w=cell" if op == "fused_weighted_kd" else ""))
            fast = fast_backend(op, student)
            for impl, backend in (("ours", fast), ("eager", "reference")):
                if not backend:
                    continue
                if op == "difficulty_signals":
                    group.add(
                        impl,
                        backend,
                        lambda s, t, y, b=backend, g=grid: spark_ext.difficulty_signals(s, t, y, g, "l1", backend=b),
                        [student, teacher, target],
                        pick=lambda out: out[1],  # cell_kd: the differentiable output
                    )
                else:
                    group.add(
                        impl,
                        backend,
                        lambda s, t, w, b=backend: spark_ext.fused_weighted_kd(s, t, w, kd_loss="l1", backend=b),
                        [student, teacher, weight],
                    )
            group.add_floor(student)
            groups.append(group)
    return groups


# --------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------


def learning(fq: nn.Module, x: torch.Tensor) -> nn.Module:
    """A learnable fake quantize in its training steady state: observed once, then learning, observer off."""
    with torch.no_grad():
        fq(x)
    if hasattr(fq, "enable_param_learning"):  # torch.ao's API
        fq.enable_param_learning()
    else:  # torchao PT2E's
        fq.enable_range_learning()
    return fq


def act_fq(cls, **kw):
    return cls(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, use_grad_scaling=True, **kw)


def weight_fq(cls, channels):
    return cls(
        observer=tq.MovingAveragePerChannelMinMaxObserver,
        quant_min=-128,
        quant_max=127,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        channel_len=channels,
        use_grad_scaling=True,
    )


def torch_qconfig(out_channels: int) -> tq.QConfig:
    """torch.ao's learnable fake quants, 4 bits like the W4A4 layers: signed per-channel weights, unsigned inputs."""
    weight = _LearnableFakeQuantize.with_args(
        observer=tq.MovingAveragePerChannelMinMaxObserver,
        quant_min=-8,
        quant_max=7,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,
        channel_len=out_channels,
        use_grad_scaling=True,
    )
    act = _LearnableFakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=15, use_grad_scaling=True
    )
    return tq.QConfig(activation=act, weight=weight)


def torch_prepared(layer: nn.Module, out_channels: int, x: torch.Tensor) -> nn.Module:
    """``layer`` as torch.ao's eager QAT flow trains it: input fake quant, then the nn.qat layer (weight fake quant)."""
    layer.qconfig = torch_qconfig(out_channels)
    qat_cls = nnqat.Conv2d if isinstance(layer, nn.Conv2d) else nnqat.Linear
    qat = qat_cls.from_float(layer)
    model = nn.Sequential(layer.qconfig.activation(), qat).to(x.device)
    with torch.no_grad():
        model(x)
    model.apply(lambda m: m.enable_param_learning() if isinstance(m, _LearnableFakeQuantize) else None)
    return model


def torchao_pt2e():
    """``(spark_ext's PT2E module, torchao's, torchao's observer)``, or None where torchao does not import."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.pt2e import LearnableFakeQuantize as TorchaoLearnable
            from torchao.quantization.pt2e import MovingAverageMinMaxObserver

            from spark_ext.quant.pt2e import PT2ELearnableFakeQuantize
    except Exception as exc:  # not installed, or a build that does not match this torch
        print(f"note: PT2ELearnableFakeQuantize not timed: torchao does not import ({type(exc).__name__})", flush=True)
        return None
    return PT2ELearnableFakeQuantize, TorchaoLearnable, MovingAverageMinMaxObserver


def module_groups(device: torch.device, sizes: Sequence[str]) -> list[Group]:
    gen = torch.Generator().manual_seed(2)
    pt2e = torchao_pt2e()
    groups = []
    for size in sizes:
        x_act = leaf(ACT[size], device, gen).detach().abs().requires_grad_()  # after a ReLU: unsigned
        like = x_act.detach()
        fast_fq = fast_backend("fake_quantize_learnable_per_tensor_affine", like)

        group = Group("LearnableFakeQuantize", f"{size} {shape_label(ACT[size])} fp32 act per-tensor quint8")
        group.add_module("ours", fast_fq, learning(act_fq(LearnableFakeQuantize).to(device), like), x_act)
        group.add_module("torch", "torch.ao", learning(act_fq(_LearnableFakeQuantize).to(device), like), x_act)
        group.add_floor(x_act)
        groups.append(group)

        w = leaf(WEIGHT[size], device, gen)
        group = Group("LearnableFakeQuantize", f"{size} {shape_label(WEIGHT[size])} fp32 weight per-channel qint8")
        channels = WEIGHT[size][0]
        group.add_module(
            "ours", fast_fq, learning(weight_fq(LearnableFakeQuantize, channels).to(device), w.detach()), w
        )
        group.add_module(
            "torch", "torch.ao", learning(weight_fq(_LearnableFakeQuantize, channels).to(device), w.detach()), w
        )
        group.add_floor(w)
        groups.append(group)

        if pt2e is not None:
            ours_cls, theirs_cls, observer = pt2e
            group = Group("PT2ELearnableFakeQuantize", f"{size} {shape_label(ACT[size])} fp32 act per-tensor quint8")
            for impl, backend, cls in (("ours", fast_fq, ours_cls), ("torch", "torchao", theirs_cls)):
                fq = cls(observer=observer, quant_min=0, quant_max=255, use_grad_scaling=True).to(device)
                group.add_module(impl, backend, learning(fq, like), x_act)
            group.add_floor(x_act)
            groups.append(group)

        group = Group("LSQQuantizer", f"{size} {shape_label(ACT[size])} fp32 per-tensor 4-bit unsigned")
        lsq = LSQQuantizer(4, False, device=device)
        with torch.no_grad():
            lsq(like)  # data-driven init
        group.add_module("ours", fast_backend("lsq_fake_quant", like), lsq, x_act)
        fq = _LearnableFakeQuantize(
            observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=15, use_grad_scaling=True
        ).to(device)
        group.add_module("torch", "torch.ao", learning(fq, like), x_act)
        group.add_floor(x_act)
        groups.append(group)

        for name, spec, float_cls, quant_cls in (
            ("QuantConv2d", CONV[size], nn.Conv2d, QuantConv2d),
            ("QuantLinear", LINEAR[size], nn.Linear, QuantLinear),
        ):
            c_in, c_out, in_shape = spec
            x = leaf(in_shape, device, gen).detach().abs().requires_grad_()
            args = (c_in, c_out, 3) if float_cls is nn.Conv2d else (c_in, c_out)
            kwargs = {"padding": 1} if float_cls is nn.Conv2d else {}
            torch.manual_seed(0)
            layer = float_cls(*args, **kwargs).to(device)
            ours = quant_cls.from_float(layer, w_bits=4, a_bits=4)
            with torch.no_grad():
                ours(x.detach())  # data-driven init of both quantizers
            weight_label = shape_label(layer.weight.shape)
            group = Group(name, f"{size} w{weight_label} x{shape_label(in_shape)} fp32 W4A4")
            group.add_module("ours", fast_backend("lsq_fake_quant", like), ours, x)
            group.add_module("torch", "torch.ao", torch_prepared(float_cls(*args, **kwargs), c_out, x.detach()), x)
            group.add_module("plain", "float", layer, x)
            group.add_floor(x)
            groups.append(group)
    return groups


# --------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------


def make_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def calls_per_sample(fn: Callable, sync: Callable, sample_s: float) -> int:
    """Calls in one sample: enough for ``sample_s`` seconds (at least 1, at most 2000), after a warm-up."""
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(2000, math.ceil(sample_s / one)))


def sample(fn: Callable, sync: Callable, calls: int) -> float:
    """Milliseconds per call over ``calls`` back-to-back calls (synchronised before and after on CUDA)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e3 / calls


def spread(samples_ms: list[float]) -> dict:
    """``ms`` (median), p20, p50, p80, p90 and max of the samples (numpy's linear rule)."""
    out = common.percentiles(samples_ms)
    if len(samples_ms) > 1:
        out["ms_p90"] = statistics.quantiles(samples_ms, n=10, method="inclusive")[8]
    else:
        out["ms_p90"] = samples_ms[0]
    out["ms_max"] = max(samples_ms)
    return out


def time_group(group: Group, pass_: str, device, args, threads: int) -> list[dict]:
    """Rows of one group and pass: interleaved rounds over its implementations."""
    sync = make_sync(device)
    fns = {impl: fns[pass_] for impl, (_, fns) in group.impls.items()}
    gc.collect()
    calls = {impl: calls_per_sample(fn, sync, args.sample_ms / 1e3) for impl, fn in fns.items()}
    # one probe round decides how many rounds fit the group's time
    times = {impl: [sample(fn, sync, calls[impl])] for impl, fn in fns.items()}
    round_s = sum(times[i][0] * calls[i] for i in fns) / 1e3
    rounds = int(min(args.rounds, max(args.min_rounds, args.group_s / max(round_s, 1e-6))))
    order = list(fns)
    for r in range(1, rounds):
        k = r % len(order)
        for impl in order[k:] + order[:k]:  # rotated: no implementation always runs first
            times[impl].append(sample(fns[impl], sync, calls[impl]))
    rows = []
    for impl, samples in times.items():
        rows.append(
            {
                "op": group.op,
                "case": group.case,
                "pass": pass_,
                "impl": impl,
                "backend": group.impls[impl][0],
                **spread(samples),
                "samples": len(samples),
                "calls_per_sample": calls[impl],
                "threads": threads,
                "bytes": None,
                "gbps": None,
                "copy_fraction": None,
                "peak_extra_bytes": None,
            }
        )
    base = {r["impl"]: r["ms"] for r in rows}
    for r in rows:
        r["over_torch"] = r["ms"] / base["torch"] if "torch" in base and r["impl"] != "torch" else None
        r["over_floor"] = r["ms"] / base["floor"] if "floor" in base and r["impl"] != "floor" else None
    return rows


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def markdown_table(rows: list[dict]) -> str:
    """One line per row: p50 / p90 / max in microseconds, ours/torch and /floor at the median."""

    def us(v):
        return "-" if v is None else f"{v * 1e3:.1f}"

    def ratio(v):
        return "-" if v is None else f"{v:.2f}x"

    lines = [
        "| op | case | pass | impl | backend | p50 µs | p90 µs | max µs | / torch | / floor |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['case']} | {r['pass']} | {r['impl']} | {r.get('backend') or '-'} | {us(r['ms'])} | "
            f"{us(r.get('ms_p90'))} | {us(r.get('ms_max'))} | {ratio(r.get('over_torch'))} | "
            f"{ratio(r.get('over_floor'))} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--rounds", type=int, default=None, help="most interleaved rounds per group (default 25)")
    parser.add_argument("--sample-ms", type=float, default=None, help="wall time of one sample (default 2 ms)")
    parser.add_argument("--group-s", type=float, default=None, help="time per group and pass (default 0.6 s)")
    parser.add_argument(
        "--only", choices=("ops", "modules"), default=None, help="time only the ops or only the modules"
    )
    args = parser.parse_args(argv)
    for name in ("threads", "rounds"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"argument --{name}: must be >= 1, got {value}")
    for name in ("sample_ms", "group_s"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            parser.error(f"argument --{name.replace('_', '-')}: must be a positive number, got {value}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda requested but torch.cuda.is_available() is False")
    short = args.quick or args.headline
    sizes = SIZES_QUICK if short else SIZES
    args.rounds = args.rounds or (7 if short else 25)
    args.min_rounds = min(args.rounds, 3 if short else 5)
    args.sample_ms = args.sample_ms or (1.0 if short else 2.0)
    args.group_s = args.group_s or (0.25 if short else 0.6)
    torch.set_num_threads(args.threads)
    print(f"device {device}, {args.threads} thread(s), sizes {', '.join(sizes)}; floor: {FLOOR}", flush=True)

    load_before = os.getloadavg()[0]  # a shared machine: the timings are only as clean as it was idle
    started = time.monotonic()
    groups = []
    if args.only != "modules":
        groups += op_groups(device, sizes)
    if args.only != "ops":
        groups += module_groups(device, sizes)
    rows = []
    for group in groups:
        for pass_ in ("fwd", "fwd+bwd"):
            new = time_group(group, pass_, device, args, args.threads)
            rows += new
            cells = "  ".join(f"{r['impl']} {r['ms'] * 1e3:.1f}" for r in new)
            print(f"  {group.op:42s} {group.case:44s} {pass_:7s} µs p50: {cells}", flush=True)
    print(f"\n{len(rows)} rows in {time.monotonic() - started:.0f} s\n")
    print(markdown_table(rows))
    config = {"threads": args.threads, "floor": FLOOR, "sizes": list(sizes), "rounds_max": args.rounds}
    config["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}
    config.update(sample_ms=args.sample_ms, group_s=args.group_s)
    path = common.save_results("call_overhead", device, rows, args.out, config=config)
    print(path, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
