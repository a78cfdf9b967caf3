"""Probe the students' optimiser at a study budget (``--steps``, default 200): lr, schedule, GoR's loss scale.

Trains the study's W4A4 students (the demo's ``train_student``, ``--steps`` steps, the shipped teacher, the
study's per-seed PTQ start and data) for a list of variants on paired seeds and prints each
variant's mean held-out PSNR and its paired difference to the first variant. A variant is
``METHOD[@lrF][@SCHEDULE][@ramp]``:

* ``METHOD``: ``qat``, ``kd`` (uniform KD, lambda 1), ``gor`` (KD with the GoR balancer),
  ``spark`` (SPARK's default), ``spark_gor`` (SPARK's map with the GoR balancer);
* ``@lrF``: the students' Adam lr is ``F`` x 1e-3 (default 1e-3);
* ``@SCHEDULE``: one of :data:`spark_ext.demo.presets.STUDENT_SCHEDULES` instead of ``cosine``
  (:func:`spark_ext.demo.training.student_schedule`); ``warmup`` is short for ``warmup_then_linear``
  (a linear warm-up from 0.15 x lr to lr over the first half of the run, then constant, then linear to
  0 over the last quarter);
* ``@ramp``: the total loss multiplied by ``0.5 exp(0.01 t)`` at step ``t``, a *fixed* schedule equal
  to what GoR's two log-scales do at this budget (both fall by Adam's lr 1e-2 per step, so GoR's
  weights stay equal to each other and grow together). With Adam, a growing loss scale is not a
  no-op: the second-moment average lags behind it, so later steps are larger. ``kd@ramp`` is
  uniform KD with GoR's loss scale but without its learned balancing; ``qat@ramp`` the same for QAT.
  (Implemented by patching the ``"none"`` balancer's forward in this process: a probe, not an API.)

    python tools/probe_student_lr.py --task denoise --seeds 0,1,2 --variants kd,kd@lr2,gor@lr2,kd@lr2@ramp
    python tools/probe_student_lr.py --task sr --steps 500 --variants kd,kd@lr2@warmup,kd@lr3@warmup,kd@lr4@warmup
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from spark_ext.demo.presets import STUDENT_SCHEDULES

VARIANT_METHODS = {
    "qat": {"mode": "qat"},
    "kd": {"mode": "kd"},
    "gor": {"mode": "kd", "balancer": "gor"},
    "spark": {"mode": "spark"},
    "spark_gor": {"mode": "spark", "balancer": "gor"},
}


def parse_variant(text: str) -> tuple[str, float, str, bool]:
    """``"kd@lr2@constant@ramp"`` -> ``("kd", 2.0, "constant", True)``: method, lr factor, schedule, ramp."""
    method, *options = text.split("@")
    lr_factor, schedule, ramp = 1.0, "cosine", False
    for option in options:
        if option == "ramp":
            ramp = True
        elif option in STUDENT_SCHEDULES:
            schedule = option
        elif option == "warmup":
            schedule = "warmup_then_linear"
        elif option.startswith("lr") and option[2:].replace(".", "", 1).isdigit() and float(option[2:]) > 0:
            lr_factor = float(option[2:])
        else:
            raise argparse.ArgumentTypeError(f"bad option {option!r} in variant {text!r}")
    if method not in VARIANT_METHODS:
        raise argparse.ArgumentTypeError(f"bad method in variant {text!r}: choose from {list(VARIANT_METHODS)}")
    return method, lr_factor, schedule, ramp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("denoise", "sr"), required=True)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument(
        "--variants", required=True, help="comma-separated METHOD[@lrF][@SCHEDULE][@ramp]; the first is the reference"
    )
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
        variants = {v: parse_variant(v) for v in args.variants.split(",")}
    except (ValueError, argparse.ArgumentTypeError) as exc:
        p.error(str(exc))
    if args.steps < 1:
        p.error("--steps must be >= 1")

    from spark_ext.commands.study import _setup
    from spark_ext.demo.presets import PRESETS
    from spark_ext.demo.scoring import model_outputs, score_outputs
    from spark_ext.demo.training import make_ptq, train_student
    from spark_ext.distill import balancers
    from spark_ext.stats import paired_difference, summarize, summary_line

    torch.set_num_threads(1)
    device = torch.device("cpu")
    base_preset = dataclasses.replace(PRESETS["default"], student_steps=args.steps, student_lr=1e-3)
    task, teacher, _, held = _setup(args.task, base_preset, device, None, True)
    plain_sum = balancers.NoBalancer.forward

    psnr: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for seed in seeds:
            base = make_ptq(teacher, task, base_preset, seed, device)
            for name, (method, lr_factor, schedule, ramp) in variants.items():
                steps_taken = [0]

                def total(self, l_task, l_kd, ramp=ramp, steps_taken=steps_taken):
                    scale = 1.0
                    if ramp:
                        scale = 0.5 * torch.exp(torch.tensor(0.01 * steps_taken[0])).item()
                        steps_taken[0] += torch.is_grad_enabled()
                    return scale * (l_task + l_kd)

                balancers.NoBalancer.forward = total
                preset = dataclasses.replace(
                    base_preset, student_lr=base_preset.student_lr * lr_factor, student_schedule=schedule
                )
                student, *_ = train_student(
                    method, base, teacher, task, preset, seed, device, True, overrides=VARIANT_METHODS[method]
                )
                psnr[name].append(score_outputs(model_outputs(student, held), held, task)["psnr"])
                print(f"seed {seed} {name:<22} {psnr[name][-1]:.4f}", flush=True)
    finally:
        balancers.NoBalancer.forward = plain_sum
    reference = next(iter(variants))
    print(f"\n{args.task}, {args.steps} steps, seeds {seeds}; paired difference to {reference} (mean, 95 % t-interval)")
    for name, values in psnr.items():
        paired = None if name == reference else paired_difference(values, psnr[reference])
        print(summary_line(f"{name:<22}", summarize(values), paired, reference, 3, " dB"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
