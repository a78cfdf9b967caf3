"""``spark-ext diffkd``: W4A4 denoising students distilled by output KD, DFD and DiffKD, over paired seeds.

Reuses the demo's pieces (photos, AWGN sigma 25/255 task, cached FP32 teacher,
PTQ start, optimiser and cosine schedule, PSNR on held-out photos) with a small
budget of its own. Every method starts from the same PTQ model per seed and
sees the same crops, steps and learning rates; ``dfd`` and ``diffkd`` distil at
the network's feature layer (``bottleneck``). Reports PSNR mean ± std and each
method's paired difference to ``kd`` with its 95 % t-interval; ``--out`` JSON.
``--balancer`` and ``--lambda-kd`` apply to every KD method (``qat`` has no KD term).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from spark_ext._validation import writable_dir_problem, writable_file_problem
from spark_ext.atomic import write_json
from spark_ext.commands._args import CommandParser, add_seeds_argument, environment, parse_names
from spark_ext.data import HELD_OUT_PHOTOS, TRAIN_PHOTOS
from spark_ext.progress import progress
from spark_ext.stats import paired_difference, summarize, summary_line

METHODS = {
    "qat": {"mode": "qat"},
    "kd": {"mode": "kd"},
    "dfd": {"mode": "kd", "dfd_layer": True},
    "diffkd": {"mode": "kd", "diffkd_layer": True},
}


def smallest_side(photos: Sequence[str]) -> int:
    """The smallest height or width over ``photos`` (names of :mod:`spark_ext.data.photos`)."""
    from spark_ext.data import load_photo

    return min(min(load_photo(name).shape[-2:]) for name in photos)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = CommandParser(
        prog="spark-ext diffkd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_seeds_argument(p, "0,1,2", "student seeds, paired across methods")
    p.add_argument("--methods", default="kd,dfd,diffkd", help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--teacher-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=200, help="student steps")
    p.add_argument("--crop", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--eval-size", type=int, default=96)
    p.add_argument("--balancer", default="none", choices=("none", "gor", "lmr"), help="balancer of every KD method")
    p.add_argument("--lambda-kd", type=float, default=1.0, help="KD weight of every KD method")
    p.add_argument("--cache-dir", type=Path, default=None, help="teacher cache folder (default: no cache)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        seeds = list(args.seeds)
        methods = parse_names(args.methods, "--methods", tuple(METHODS))
        for name in ("width", "teacher_steps", "steps", "batch"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        if args.crop < 8 or args.crop % 4 or args.eval_size < 16:
            raise ValueError(
                f"--crop must be a multiple of 4 >= 8 and --eval-size >= 16, got {args.crop}, {args.eval_size}"
            )
        try:
            import skimage  # noqa: F401
        except ImportError:
            raise ValueError("the photos need scikit-image: pip install 'spark_ext[demo]'") from None
        largest_crop, largest_eval = smallest_side(TRAIN_PHOTOS), smallest_side(HELD_OUT_PHOTOS)
        if args.crop > largest_crop:
            raise ValueError(f"--crop must be <= {largest_crop} (the smallest training photo's side), got {args.crop}")
        if args.eval_size > largest_eval:
            raise ValueError(
                f"--eval-size must be <= {largest_eval} (the smallest held-out photo's side), got {args.eval_size}"
            )
        if not math.isfinite(args.lambda_kd) or args.lambda_kd < 0:
            raise ValueError(f"--lambda-kd must be finite and >= 0, got {args.lambda_kd}")
        why = None if args.out is None else writable_file_problem(args.out)
        if why:
            raise ValueError(f"--out: {why}")
        why = None if args.cache_dir is None else writable_dir_problem(args.cache_dir)
        if why:
            raise ValueError(f"--cache-dir: {why}")
    except ValueError as exc:
        print(f"spark-ext diffkd: error: {exc}", file=sys.stderr)
        return 2

    from spark_ext.data import RandomCropBatches, RestorationTask, held_out_pairs
    from spark_ext.demo.presets import PRESETS
    from spark_ext.demo.scoring import model_outputs, score_outputs
    from spark_ext.demo.teacher import get_teacher
    from spark_ext.demo.training import cosine_schedule, make_ptq, student_optimizer
    from spark_ext.distill import DistillConfig, SparkDistiller
    from spark_ext.models import feature_layer

    preset = dataclasses.replace(
        PRESETS["default"],
        name="diffkd-study",
        width=args.width,
        depth=1,
        crop=args.crop,
        batch=args.batch,
        teacher_steps=args.teacher_steps,
        student_steps=args.steps,
        eval_size=args.eval_size,
        seeds=tuple(seeds),
    )
    device = torch.device("cpu")
    task = RestorationTask("denoise")
    held = held_out_pairs(task, preset.eval_size, device=device)
    teacher, _ = get_teacher(task, preset, device, args.cache_dir, quiet=True)
    layer = feature_layer(teacher)
    psnr: dict[str, list[float]] = {m: [] for m in methods}
    last_logs: dict[str, dict] = {}
    for seed in seeds:
        base = make_ptq(teacher, task, preset, seed, device)
        for m in methods:
            torch.manual_seed(seed)
            student = copy.deepcopy(base).train()
            overrides = {k: (layer if v is True else v) for k, v in METHODS[m].items()}
            if overrides["mode"] != "qat":
                overrides.update(balancer=args.balancer, lambda_kd=args.lambda_kd)
            opt = student_optimizer(student, preset.student_lr, preset.quant_rel_lr)
            sched = cosine_schedule(opt, preset.student_steps)
            d = SparkDistiller(
                student, teacher if overrides["mode"] != "qat" else None, opt, DistillConfig(seed=seed, **overrides)
            )
            data = RandomCropBatches(task, preset.crop, preset.batch, seed=30_000 + seed, device=device)
            for _ in progress(range(preset.student_steps), f"{m} seed {seed}"):
                last_logs[m] = d.step(*next(data))
                sched.step()
            d.close()
            psnr[m].append(score_outputs(model_outputs(student.eval(), held), held, task)["psnr"])
    report = {
        "command": "diffkd",
        "args": {k: str(v) for k, v in vars(args).items()},
        "seeds": seeds,
        "environment": environment(),
        "teacher_psnr": score_outputs(model_outputs(teacher, held), held, task)["psnr"],
        "psnr": {m: {"per_seed": v, **summarize(v)} for m, v in psnr.items()},
        "last_step_log": last_logs,
    }
    if "kd" in psnr:
        report["paired_vs_kd"] = {m: paired_difference(v, psnr["kd"]) for m, v in psnr.items() if m != "kd"}
    print(f"teacher PSNR {report['teacher_psnr']:.2f} dB")
    for m, s in report["psnr"].items():
        print(summary_line(f"{m:>7}", s, report.get("paired_vs_kd", {}).get(m), "kd", digits=3, unit=" dB"))
    if args.out is not None:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
