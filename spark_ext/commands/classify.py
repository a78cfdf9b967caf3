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
import sys
from collections.abc import Sequence
from typing import Any, Optional

from spark_ext.atomic import write_json
from spark_ext.commands._args import (
    CommandParser,
    add_digits_arguments,
    check_digits_arguments,
    environment,
    parse_names,
)
from spark_ext.data.digits import load_digits_split
from spark_ext.demo.digits import train_student, train_teacher
from spark_ext.distill import accuracy
from spark_ext.stats import paired_difference, summarize, summary_line

METHODS: dict[str, dict[str, Any]] = {
    "qat": {"mode": "qat"},
    "kd": {"mode": "kd"},
    "gor": {"mode": "kd", "balancer": "gor"},
    "lmr": {"mode": "kd", "balancer": "lmr"},
    "ensemble": {"mode": "kd", "ensemble": True},
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = CommandParser(
        prog="spark-ext classify", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_digits_arguments(parser)
    parser.add_argument(
        "--methods", default="qat,kd,gor,lmr,ensemble", help=f"comma-separated, from {','.join(METHODS)}"
    )
    args = parser.parse_args(argv)
    try:
        seeds = check_digits_arguments(args)
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
