"""``spark-ext classify``: W4A4 students of a small CNN on scikit-learn's digits, with paired seeds.

Methods (all from the same FP32 teacher(s), same data order, steps and seeds):
``qat`` (cross-entropy only), ``kd`` (CE + logit KD at temperature T, T^2-scaled),
``gor`` / ``lmr`` (KD combined by those balancers), ``ensemble`` (KD from the
mean logits of two teachers trained from different seeds). The metric is top-1
test accuracy on a fixed 25 % held-out split. A seed sets the student's
initialisation, the batch order and the augmentation draws; teachers are
trained once per invocation with ``--teacher-seed``. Output: a table with
mean ± std over seeds and each method's paired difference to ``qat`` with its
95 % t-interval, and ``--out`` JSON.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from spark_ext._validation import writable_file_problem
from spark_ext.atomic import write_json
from spark_ext.cli import CommandParser, parse_names, seed_int
from spark_ext.data.digits import load_digits_split
from spark_ext.distill import LogitDistiller, accuracy, get_augmentation
from spark_ext.models import DigitsCNN
from spark_ext.progress import progress
from spark_ext.stats import paired_difference, summarize, summary_line

METHODS: dict[str, dict[str, Any]] = {
    "qat": {"mode": "qat"},
    "kd": {"mode": "kd"},
    "gor": {"mode": "kd", "balancer": "gor"},
    "lmr": {"mode": "kd", "balancer": "lmr"},
    "ensemble": {"mode": "kd", "ensemble": True},
}


def batches(n: int, batch_size: int, steps: int, seed: int):
    """``steps`` index batches drawn by epochs of a seeded permutation."""
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


def train_teacher(
    x: torch.Tensor, y: torch.Tensor, *, width: int, steps: int, seed: int, lr: float = 3e-3, batch_size: int = 64
) -> nn.Module:
    """An FP32 :class:`DigitsCNN` trained with cross-entropy (Adam) from ``seed``."""
    torch.manual_seed(seed)
    model = DigitsCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for idx in progress(batches(len(y), batch_size, steps, seed), f"teacher seed {seed}", total=steps):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def train_student(
    teachers: Sequence[nn.Module],
    data: tuple,
    *,
    seed: int,
    steps: int,
    width: int,
    bits: Optional[int],
    mode: str = "kd",
    balancer: str = "none",
    temperature: float = 4.0,
    augmentation: str = "none",
    lr: float = 3e-3,
    batch_size: int = 64,
    desc: str = "student",
) -> float:
    """Train a (W``bits``A``bits``, first/last layer 8-bit) :class:`DigitsCNN` student; return its test accuracy.

    ``augmentation`` (a name in :data:`~spark_ext.distill.AUGMENTATIONS`) is applied to each training
    batch; teacher and student see the same augmented batch."""
    from spark_ext.quant import quantize_model

    x_tr, y_tr, x_te, y_te = data
    aug = get_augmentation(augmentation)
    torch.manual_seed(seed)
    student = DigitsCNN(width)
    if bits is not None:
        quantize_model(student, w_bits=bits, a_bits=bits)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    distiller = LogitDistiller(
        student, list(teachers) if mode == "kd" else None, opt, mode=mode, balancer=balancer, temperature=temperature
    )
    g_aug = torch.Generator().manual_seed(seed + 10_000)
    for idx in progress(batches(len(y_tr), batch_size, steps, seed), desc, total=steps):
        distiller.step(aug(x_tr[idx], g_aug), y_tr[idx])
    return accuracy(student, x_te, y_te)


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: comma-separated distinct integers in ``[0, MAX_SEED]``; raises ValueError with one line."""
    try:
        seeds = [seed_int(s) for s in text.split(",") if s.strip()]
    except argparse.ArgumentTypeError as exc:
        raise ValueError(f"--seeds: {exc}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers, got {text!r}")
    return seeds


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated student seeds (paired across arms)")
    parser.add_argument("--steps", type=int, default=300, help="student training steps")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--teacher-width", type=int, default=32)
    parser.add_argument("--teacher-seed", type=seed_int, default=0)
    parser.add_argument("--width", type=int, default=8, help="student width")
    parser.add_argument("--bits", type=int, default=4, help="student W/A bits (first and last layer: 8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def check_common(args: argparse.Namespace) -> list[int]:
    """Validate the shared arguments; returns the seeds. Raises ValueError with one line."""
    seeds = parse_seeds(args.seeds)
    for name in ("steps", "teacher_steps", "teacher_width", "width", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 2 <= args.bits <= 16:
        raise ValueError(f"--bits must be in [2, 16], got {args.bits}")
    if not (args.lr > 0 and math.isfinite(args.lr)) or not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--lr and --temperature must be finite and > 0, got {args.lr}, {args.temperature}")
    why = None if args.out is None else writable_file_problem(args.out)
    if why:
        raise ValueError(f"--out: {why}")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ValueError("the digits data needs scikit-learn: pip install 'spark_ext[demo]'") from None
    return seeds


def environment() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = CommandParser(
        prog="spark-ext classify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common_arguments(parser)
    parser.add_argument(
        "--methods", default="qat,kd,gor,lmr,ensemble", help=f"comma-separated, from {','.join(METHODS)}"
    )
    args = parser.parse_args(argv)
    try:
        seeds = check_common(args)
        methods = parse_names(args.methods, "--methods", tuple(METHODS))
    except ValueError as exc:
        print(f"spark-ext classify: error: {exc}", file=sys.stderr)
        return 2
    data = load_digits_split()
    teachers = [
        train_teacher(data[0], data[1], width=args.teacher_width, steps=args.teacher_steps, seed=args.teacher_seed)
    ]
    if "ensemble" in methods:
        teachers.append(
            train_teacher(
                data[0], data[1], width=args.teacher_width, steps=args.teacher_steps, seed=args.teacher_seed + 1
            )
        )
    results: dict[str, list[float]] = {m: [] for m in methods}
    for seed in seeds:
        for m in methods:
            spec = dict(METHODS[m])
            ts = teachers if spec.pop("ensemble", False) else teachers[:1]
            results[m].append(
                train_student(
                    ts,
                    data,
                    seed=seed,
                    steps=args.steps,
                    width=args.width,
                    bits=args.bits,
                    temperature=args.temperature,
                    lr=args.lr,
                    batch_size=args.batch_size,
                    desc=f"{m} seed {seed}",
                    **spec,
                )
            )
    report = {
        "command": "classify",
        "args": {k: str(v) for k, v in vars(args).items()},
        "seeds": seeds,
        "environment": environment(),
        "teacher_accuracy": [accuracy(t, data[2], data[3]) for t in teachers],
        "accuracy": {m: {"per_seed": v, **summarize(v)} for m, v in results.items()},
    }
    if "qat" in results:
        report["paired_vs_qat"] = {m: paired_difference(v, results["qat"]) for m, v in results.items() if m != "qat"}
    print(f"teacher accuracy: {', '.join(f'{a:.4f}' for a in report['teacher_accuracy'])}")
    for m, s in report["accuracy"].items():
        print(summary_line(f"{m:>9}", s, report.get("paired_vs_qat", {}).get(m), "qat", digits=4))
    if args.out is not None:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
