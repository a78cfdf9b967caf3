"""Training-step cost of every distiller variant of ``spark-ext study``, relative to uniform KD.

The demo's default sizes (width-16 encoder-decoder or x2 SR net, W4A4, batch 8, 48 px crops, 8x8
grid), an untrained FP32 teacher (timing only). Variants are timed interleaved, in windows of
``--window`` steps (default 32: two periods of the default ``credit_every=16``, so a window holds
the same number of credit steps wherever it starts), ``--reps`` windows each; reported: CPU time
per step (``time.process_time``, one thread; wall time on CUDA), the minimum over windows, and the
ratio to ``kd``.

Besides the study's variants, ``qat_torch`` is plain QAT with torch's learnable fake quant in
place of our LSQ op (every quantizer of the same student through
``torch._fake_quantize_learnable_per_{tensor,channel}_affine``, as bench_e2e.py's ``qat_step`` /
``torch``): the baseline of "SPARK for free", the SPARK step with our ops against plain QAT as
torch offers it.

The JSON (``distill_variants-<device>-<stamp>.json``) has one row per variant (``op``
``distill_step``, ``impl`` the variant, ``ms`` the median per-step time over windows, p20 / p80 /
p90 / max and ``ms_min``) and ratio rows (``impl: "ratio"``): every variant over ``kd``, and
``spark_over_qat_torch`` / ``spark_over_qat`` / ``qat_over_qat_torch`` at the minimum.

    python -m spark_ext.benchmarks.bench_distill_variants [--task denoise|sr] [--reps 3] [--window 32]
    python -m spark_ext.benchmarks.bench_distill_variants --quick     # SPARK, kd, qat, qat_torch; 2 x 16 steps
    python -m spark_ext.benchmarks.bench_distill_variants --headline  # the same four, 3 x 32 steps (gpu-check)
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch

from spark_ext.benchmarks import common
from spark_ext.benchmarks.bench_e2e import use_torch_fake_quant
from spark_ext.data import RandomCropBatches, RestorationTask
from spark_ext.demo.presets import PRESETS
from spark_ext.demo.training import make_ptq, student_optimizer
from spark_ext.distill import DistillConfig, SparkDistiller
from spark_ext.models import build_model

SPARK = "spark"  # the default SPARK (credit policy, credit every 16 steps)
VARIANTS = {
    "qat": dict(mode="qat"),
    "qat_torch": dict(mode="qat"),  # + torch's fake quant (use_torch_fake_quant)
    "kd": dict(mode="kd"),
    "kd_gate": dict(mode="kd", kd_gate="teacher"),
    "gor": dict(mode="kd", balancer="gor"),
    "map_kd_gap": dict(mode="map", map_signal="kd_gap"),
    "spark_paper": dict(mode="spark", policy_signal="paper"),
    "spark_reinforce": dict(mode="spark", policy_signal="reinforce"),
    "spark_credit_k1": dict(mode="spark", credit_every=1),
    "spark_credit_k8": dict(mode="spark", credit_every=8),
    SPARK: dict(mode="spark"),
    "spark + gor": dict(mode="spark", balancer="gor"),
}
SHORT = ("qat", "qat_torch", "kd", SPARK)  # --quick / --headline


def spread(samples: list[float]) -> dict:
    out = common.percentiles(samples)
    out["ms_p90"] = statistics.quantiles(samples, n=10, method="inclusive")[8] if len(samples) > 1 else samples[0]
    out["ms_max"] = max(samples)
    out["ms_min"] = min(samples)
    return out


def main(argv=None) -> int:
    p = common.arg_parser(__doc__.splitlines()[0])
    p.add_argument("--task", choices=("denoise", "sr"), default="denoise")
    p.add_argument("--window", type=int, default=None, help="steps per window (default 32; 16 with --quick)")
    p.add_argument(
        "--variants", default=None, help=f"comma list of variants (default all; {', '.join(SHORT)} when short)"
    )
    args = p.parse_args(argv)
    short = args.quick or args.headline
    reps = args.reps or (2 if args.quick else 3)
    window = args.window or (16 if args.quick else 32)
    if reps < 1 or window < 1:
        p.error("--reps and --window must be >= 1")
    names = [v.strip() for v in args.variants.split(",")] if args.variants else list(SHORT if short else VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or "kd" not in names:
        p.error(f"argument --variants: needs kd and names from {', '.join(VARIANTS)}; got {args.variants!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda requested but torch.cuda.is_available() is False")
    torch.set_num_threads(1)
    task = RestorationTask(args.task)
    preset = PRESETS["default"]
    torch.manual_seed(0)
    teacher = (
        build_model(task.kind, preset.width, depth=preset.depth, scale=task.scale).to(device).requires_grad_(False)
    )
    base = make_ptq(teacher, task, preset, 0, device)
    distillers = {}
    for name in names:
        kw = VARIANTS[name]
        student = copy.deepcopy(base).train()
        if name == "qat_torch":
            use_torch_fake_quant(student)
        opt = student_optimizer(student, preset.student_lr, preset.quant_rel_lr)
        distillers[name] = SparkDistiller(
            student, None if kw["mode"] == "qat" else teacher, opt, DistillConfig(grid=preset.grid, **kw)
        )
    data = RandomCropBatches(task, preset.crop, preset.batch, seed=1, device=device)
    batches = [next(data) for _ in range(window)]
    for d in distillers.values():  # warm-up; step 0 has no previous batch, so no credit
        d.step(*batches[0])
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = {name: [] for name in distillers}
    for _ in range(reps):
        for name, d in distillers.items():  # interleaved: load changes hit every variant alike
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            for b in batches:
                d.step(*b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append((clock() - t0) / len(batches) * 1000)
    ref = min(times["kd"])
    case = f"{args.task} demo default W4A4 b{preset.batch} {preset.crop}px window{window}"
    print(f"{args.task}, {device}, window {window} steps x {reps} reps")
    rows = []
    for name, t in times.items():
        print(f"{name:<22} {min(t):7.1f} ms/step  {min(t) / ref:5.2f}x kd")
        rows.append({"op": "distill_step", "case": case, "pass": "step", "impl": name, **spread(t), "samples": len(t)})
    ratios = [(f"{name}_over_kd", min(t) / ref, None) for name, t in times.items() if name != "kd"]
    pairs = ((SPARK, "qat_torch", "spark_over_qat_torch"), (SPARK, "qat", "spark_over_qat"))
    pairs += (("qat", "qat_torch", "qat_over_qat_torch"),)
    for a, b, label in pairs:
        if a in times and b in times:
            target = "<= 1: SPARK for free" if label == "spark_over_qat_torch" else None
            ratios.append((label, min(times[a]) / min(times[b]), target))
            print(f"{label:<22} {ratios[-1][1]:7.2f}x" + (f"  (target {target})" if target else ""))
    rows += [
        {"op": op, "case": case, "pass": "step", "impl": "ratio", "ms": value, **({"target": t} if t else {})}
        for op, value, t in ratios
    ]
    config = {"task": args.task, "window": window, "reps": reps, "clock": clock.__name__, "threads": 1}
    print(common.save_results("distill_variants", device, rows, args.out, config=config), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
