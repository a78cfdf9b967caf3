"""Training-step cost of every distiller variant of ``spark-ext study``, relative to uniform KD.

The demo's default sizes (width-16 encoder-decoder or x2 SR net, W4A4, batch 8, 48 px crops, 8x8
grid), an untrained FP32 teacher (timing only). Variants are timed interleaved, in windows of
``--window`` steps (default 32: two periods of the default ``credit_every=16``, so a window holds
the same number of credit steps wherever it starts), ``--reps`` windows each; reported: CPU time
per step (``time.process_time``, one thread; wall time on CUDA), the minimum over windows, and the
ratio to ``kd``.

    python bench/bench_distill_variants.py [--task denoise|sr] [--reps 3] [--window 32] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from spark_ext.data import RandomCropBatches, RestorationTask
from spark_ext.demo.presets import PRESETS
from spark_ext.demo.training import make_ptq, student_optimizer
from spark_ext.distill import DistillConfig, SparkDistiller
from spark_ext.models import build_model

VARIANTS = {
    "qat": dict(mode="qat"),
    "kd": dict(mode="kd"),
    "kd_gate": dict(mode="kd", kd_gate="teacher"),
    "gor": dict(mode="kd", balancer="gor"),
    "map_kd_gap": dict(mode="map", map_signal="kd_gap"),
    "spark_paper": dict(mode="spark", policy_signal="paper"),
    "spark_reinforce": dict(mode="spark", policy_signal="reinforce"),
    "spark_credit_k1": dict(mode="spark", credit_every=1),
    "spark_credit_k8": dict(mode="spark", credit_every=8),
    "spark (default, k16)": dict(mode="spark"),
    "spark + gor": dict(mode="spark", balancer="gor"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("denoise", "sr"), default="denoise")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.reps < 1 or args.window < 1:
        p.error("--reps and --window must be >= 1")
    device = torch.device(args.device)
    torch.set_num_threads(1)
    task = RestorationTask(args.task)
    preset = PRESETS["default"]
    torch.manual_seed(0)
    teacher = (
        build_model(task.kind, preset.width, depth=preset.depth, scale=task.scale).to(device).requires_grad_(False)
    )
    base = make_ptq(teacher, task, preset, 0, device)
    distillers = {}
    for name, kw in VARIANTS.items():
        student = copy.deepcopy(base).train()
        opt = student_optimizer(student, preset.student_lr, preset.quant_rel_lr)
        distillers[name] = SparkDistiller(
            student, None if kw["mode"] == "qat" else teacher, opt, DistillConfig(grid=preset.grid, **kw)
        )
    data = RandomCropBatches(task, preset.crop, preset.batch, seed=1, device=device)
    batches = [next(data) for _ in range(args.window)]
    for d in distillers.values():  # warm-up; step 0 has no previous batch, so no credit
        d.step(*batches[0])
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    times = {name: [] for name in distillers}
    for _ in range(args.reps):
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
    print(f"{args.task}, {device}, window {args.window} steps x {args.reps} reps")
    for name, t in times.items():
        print(f"{name:<22} {min(t):7.1f} ms/step  {min(t) / ref:5.2f}x kd")


if __name__ == "__main__":
    main()
