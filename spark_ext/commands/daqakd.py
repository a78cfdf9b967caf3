"""``spark-ext daqakd``: rank augmentations by the DA-QAKD metric, then test the ranking with paired seeds.

1. trains the FP32 teacher on the digits' training split (``--teacher-seed``);
2. scores every ``--candidates`` augmentation with
   :func:`spark_ext.distill.score_augmentations` on the training split (the
   teacher's predictions; ``--rank-with teacher+student`` adds a W4A4 student
   briefly trained by KD without augmentation) — lower is better;
3. trains the W4A4 student by logit KD from the teacher with the top-ranked
   augmentation, with none, and with the lowest-ranked one, over the same
   seeds, data order and steps; reports test accuracy mean ± std and the paired
   differences (top − none, top − bottom, none − bottom) with 95 % t-intervals.

Output: a table on stdout and ``--out`` JSON (ranking, per-seed accuracies, environment).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Optional

from spark_ext.atomic import write_json
from spark_ext.commands._args import CommandParser, add_digits_arguments, check_digits_arguments, environment
from spark_ext.data.digits import load_digits_split
from spark_ext.demo.digits import batches, train_student, train_teacher
from spark_ext.distill import AUGMENTATIONS, accuracy, score_augmentations
from spark_ext.stats import paired_difference, summarize

RANK_WITH = ("teacher", "teacher+student")


def rank_student(teacher, data, args):
    """The W4A4 student used for ranking: ``--rank-student-steps`` of KD without augmentation."""
    import torch

    from spark_ext.distill import LogitDistiller
    from spark_ext.models import DigitsCNN
    from spark_ext.quant import quantize_model

    torch.manual_seed(args.teacher_seed)
    student = DigitsCNN(args.width)
    quantize_model(student, w_bits=args.bits, a_bits=args.bits)
    d = LogitDistiller(
        student, teacher, torch.optim.Adam(student.parameters(), lr=args.lr), temperature=args.temperature
    )
    for idx in batches(len(data[1]), args.batch_size, args.rank_student_steps, args.teacher_seed):
        d.step(data[0][idx], data[1][idx])
    return student


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = CommandParser(
        prog="spark-ext daqakd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_digits_arguments(parser)
    parser.add_argument(
        "--candidates",
        default="shift,noise,cutout,rotate,hflip,invert",
        help=f"comma-separated augmentations to rank, from {','.join(a for a in AUGMENTATIONS if a != 'none')}",
    )
    parser.add_argument(
        "--beta", type=float, default=1.0, help="weight of the contextual mutual information in the score"
    )
    parser.add_argument(
        "--rank-temperature", type=float, default=1.0, help="softmax temperature of the ranking predictions"
    )
    parser.add_argument("--repeats", type=int, default=2, help="augmented draws per sample when scoring")
    parser.add_argument("--rank-with", default="teacher", choices=RANK_WITH)
    parser.add_argument("--rank-student-steps", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        seeds = check_digits_arguments(args)
        candidates = [c for c in args.candidates.split(",") if c]
        bad = [c for c in candidates if c not in AUGMENTATIONS or c == "none"]
        if bad or len(candidates) < 2 or len(set(candidates)) != len(candidates):
            raise ValueError(
                f"--candidates: need >= 2 distinct names from {','.join(a for a in AUGMENTATIONS if a != 'none')}; "
                f"got {args.candidates!r}"
            )
        if not math.isfinite(args.beta) or not (args.rank_temperature > 0 and math.isfinite(args.rank_temperature)):
            raise ValueError(
                f"--beta must be finite and --rank-temperature finite and > 0, got {args.beta}, {args.rank_temperature}"
            )
        if args.repeats < 1 or args.rank_student_steps < 1:
            raise ValueError(
                f"--repeats and --rank-student-steps must be >= 1, got {args.repeats}, {args.rank_student_steps}"
            )
    except ValueError as exc:
        print(f"spark-ext daqakd: error: {exc}", file=sys.stderr)
        return 2

    data = load_digits_split()
    teacher = train_teacher(
        data[0], data[1], width=args.teacher_width, steps=args.teacher_steps, seed=args.teacher_seed
    )
    models = [teacher] + ([rank_student(teacher, data, args)] if args.rank_with == "teacher+student" else [])
    ranking = score_augmentations(
        models,
        data[0],
        data[1],
        candidates,
        beta=args.beta,
        temperature=args.rank_temperature,
        repeats=args.repeats,
        seed=args.teacher_seed,
    )
    arms = {"top": ranking[0].name, "none": "none", "bottom": ranking[-1].name}
    print(
        "ranking (lower score is better): "
        + ", ".join(f"{r.name} {r.score:.4f} (fit {r.fit:.4f}, cmi {r.cmi:.4f})" for r in ranking)
    )
    acc: dict[str, list[float]] = {arm: [] for arm in arms}
    for seed in seeds:
        for arm, aug in arms.items():
            acc[arm].append(
                train_student(
                    [teacher],
                    data,
                    seed=seed,
                    steps=args.steps,
                    width=args.width,
                    bits=args.bits,
                    mode="kd",
                    temperature=args.temperature,
                    augmentation=aug,
                    lr=args.lr,
                    batch_size=args.batch_size,
                    desc=f"{arm} ({aug}) seed {seed}",
                )
            )
    report = {
        "command": "daqakd",
        "args": {k: str(v) for k, v in vars(args).items()},
        "seeds": seeds,
        "environment": environment(),
        "teacher_accuracy": accuracy(teacher, data[2], data[3]),
        "ranking": [r.__dict__ for r in ranking],
        "arms": arms,
        "accuracy": {arm: {"augmentation": arms[arm], "per_seed": v, **summarize(v)} for arm, v in acc.items()},
        "paired": {
            "top-none": paired_difference(acc["top"], acc["none"]),
            "top-bottom": paired_difference(acc["top"], acc["bottom"]),
            "none-bottom": paired_difference(acc["none"], acc["bottom"]),
        },
    }
    print(f"teacher accuracy {report['teacher_accuracy']:.4f}")
    for arm, s in report["accuracy"].items():
        print(f"{arm:>7} ({s['augmentation']}): {s['mean']:.4f} ± {s['std']:.4f}")
    for name, p in report["paired"].items():
        print(f"{name:>12}: {p['mean']:+.4f} [{p['lo']:+.4f}, {p['hi']:+.4f}] (95% t, n={p['n']})")
    if args.out is not None:
        write_json(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
