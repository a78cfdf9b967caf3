"""End-to-end: one SPARK QAT training step of a realistic W4A4 restoration student.

Compares, in one run, the same training step (student forward at W4A4, frozen
FP32 teacher forward, fused difficulty signals + cell KD, policy sample,
backward, optimiser step, reward forward, REINFORCE update) built from

* ``ours``     — ``backend="auto"``: Triton kernels for the signals/KD, the
  compiled library for LSQ fake quantization;
* ``eager``    — every op from ``spark_ext.reference`` in eager mode;
* ``compiled`` — the reference ops, with the student and teacher wrapped in
  ``torch.compile`` and the reference signals op compiled too;

and plain QAT (``mode="qat"``, no KD) with our ops, for SPARK's overhead.
Reported per variant: median step time, peak memory, and (CUDA) the share of
the step's GPU time spent inside ``spark_ext::`` ops (torch.profiler).

    python bench/bench_e2e.py                # GPU: batch 16, 48 channels, 192x192 crops
    python bench/bench_e2e.py --quick        # CPU smoke run: tiny sizes
    python bench/bench_e2e.py --headline --no-compiled   # GPU sizes, 10 reps, no compiled variant (make gpu-check)
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import spark_ext  # noqa: E402
from spark_ext import reference  # noqa: E402
from spark_ext.distill import SparkDistiller  # noqa: E402
from spark_ext.models import build_model  # noqa: E402
from spark_ext.ops import _dispatch  # noqa: E402
from spark_ext.quant import quantize_model  # noqa: E402


@contextlib.contextmanager
def compiled_reference_signals():
    """Temporarily route the reference difficulty op through ``torch.compile``."""
    impls = _dispatch._registry["difficulty_signals"]
    original = impls["reference"]
    _dispatch.register("difficulty_signals", "reference", torch.compile(reference.difficulty_signals, dynamic=False))
    try:
        yield
    finally:
        impls["reference"] = original


def build(args, device, mode, compiled):
    torch.manual_seed(0)
    teacher = build_model("denoise", width=args.teacher_width).to(device).eval()
    student = copy.deepcopy(build_model("denoise", width=args.width)).to(device)
    quantize_model(student, w_bits=4, a_bits=4)
    x = torch.rand(args.batch, 3, args.crop, args.crop, device=device)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    student(x)  # data-driven quantizer init outside the timed region
    if compiled:
        student, teacher = torch.compile(student), torch.compile(teacher)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    # The paper's per-step REINFORCE path (what this benchmark has always timed); the default credit
    # signal's cost, averaged over its period, is in bench_distill_variants.py.
    extra = {"policy_signal": "paper"} if mode == "spark" else {}
    distiller = SparkDistiller(student, None if mode == "qat" else teacher, optimizer, mode=mode, grid=(8, 8), **extra)
    return distiller, x, y


def time_steps(step, device, reps):
    for _ in range(3):  # compile, autotune, allocator warm-up
        step()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def share_in_our_ops(step, device):
    """Fraction of the step's device time spent inside spark_ext:: custom ops (CUDA only)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    ours = sum(e.device_time_total for e in events if e.key.startswith("spark_ext::"))
    kernels = sum(e.self_device_time_total for e in events)
    return ours / kernels if kernels else None


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.quick:
        args.batch, args.width, args.teacher_width, args.crop = 2, 8, 16, 32
    else:
        args.batch, args.width, args.teacher_width, args.crop = 16, 48, 64, 192
    reps = args.reps or (3 if args.quick else 10 if args.headline else 20)
    case = f"W4A4 b{args.batch} w{args.width} {args.crop}x{args.crop}"

    variants = [("spark", "ours", "auto", False), ("spark", "eager", "reference", False)]
    if not (args.quick or args.no_compiled):
        variants.append(("spark", "compiled", "reference", True))
    variants.append(("qat", "ours", "auto", False))
    rows = []
    for mode, impl, backend, compiled in variants:
        with spark_ext.use_backend(backend), (compiled_reference_signals() if compiled else contextlib.nullcontext()):
            distiller, x, y = build(args, device, mode, compiled)

            def step():
                return distiller.step(x, y)

            ms = time_steps(step, device, reps)
            peak = common.peak_extra_bytes(step, device)
            share = share_in_our_ops(step, device) if impl == "ours" else None
        rows.append(
            {"op": f"{mode}_step", "case": case, "pass": "step", "impl": impl, "ms": ms, "bytes": 0, "gbps": None,
             "copy_fraction": None, "peak_extra_bytes": peak, "share_in_spark_ext_ops": share}
        )
        print(f"{mode:5s} {impl:8s} {ms:9.2f} ms/step  peak {peak}  share {share}", flush=True)
    spark_ours = next(r["ms"] for r in rows if r["op"] == "spark_step" and r["impl"] == "ours")
    qat_ours = next(r["ms"] for r in rows if r["op"] == "qat_step")
    print(f"SPARK overhead over plain QAT (ours): {spark_ours / qat_ours:.2f}x step time")
    common.print_rows(common.add_ratios(rows), ["op", "impl", "ms", "speedup_vs_peer", "peak_extra_bytes", "share_in_spark_ext_ops"])
    print(common.save_results("e2e", device, rows + [{"op": "spark_overhead", "case": case, "pass": "step", "impl": "ratio", "ms": spark_ours / qat_ours}], args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
