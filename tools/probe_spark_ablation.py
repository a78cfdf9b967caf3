"""Ablate the default SPARK's gain over uniform KD at ``spark-ext study --quick``'s budget: map or schedule?

Per seed (the study's W4A4 students, the shipped teacher, the ``--quick`` optimiser) it trains:

* ``spark``: SPARK's default (credit policy), logging its map's batch mean ``w_t`` and the losses per step;
* ``kd``: uniform KD at ``lambda_kd = 1``;
* ``kd_lambda_from_spark``: uniform KD with ``lambda_kd = w_t`` at step ``t``: SPARK's learned amount of
  KD over the run, without its spatial spread;
* ``kd_scaled``: uniform KD at ``lambda_kd = 1`` with the total loss multiplied by
  ``s_t = (L_task + w_t L_kd) / (L_task + L_kd)`` (from SPARK's run): the same growth of the loss's size
  as SPARK's, without more KD relative to the task term (a growing loss scale makes Adam's later steps
  larger, docs/spark.md);
* ``qat``, ``qat_scaled``: plain QAT, and QAT with the same ``s_t``.

and prints each variant's mean PSNR and paired difference to ``kd``. ``kd_lambda_from_spark`` patches
``SparkDistiller._lambda`` and the ``*_scaled`` variants the ``"none"`` balancer's forward, in this process
only: a probe, not an API.

    python tools/probe_spark_ablation.py --task denoise --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import dataclasses

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("denoise", "sr"), required=True)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")

    from spark_ext.commands.study import PRESETS as STUDY_PRESETS
    from spark_ext.commands.study import _setup
    from spark_ext.demo.presets import PRESETS
    from spark_ext.demo.scoring import model_outputs, score_outputs
    from spark_ext.demo.training import make_ptq, train_student
    from spark_ext.distill import SparkDistiller, balancers
    from spark_ext.stats import paired_difference, summarize, summary_line

    torch.set_num_threads(1)
    device = torch.device("cpu")
    quick = STUDY_PRESETS["quick"]
    preset = dataclasses.replace(
        PRESETS[quick.demo_preset],
        student_steps=quick.student_steps,
        student_lr=quick.student_lr,
        student_schedule=quick.student_schedule,
    )
    task, teacher, _, held = _setup(args.task, preset, device, None, True)
    plain_sum, plain_lambda = balancers.NoBalancer.forward, SparkDistiller._lambda

    def train(method: str, base, seed: int) -> float:
        student, *_ = train_student(method, base, teacher, task, preset, seed, device, True, overrides={"mode": method})
        return score_outputs(model_outputs(student, held), held, task)["psnr"]

    def lambda_from(w: list[float]):
        def lambda_kd(self):
            return self.config.lambda_kd * w[min(self.steps, len(w) - 1)]

        return lambda_kd

    def scaled_sum(scale: list[float]):
        step = [0]

        def total(self, l_task, l_kd):
            s = scale[min(step[0], len(scale) - 1)]
            step[0] += torch.is_grad_enabled()  # one grad-enabled balancer call per training step
            return s * (l_task + l_kd)

        return total

    psnr: dict[str, list[float]] = {}
    try:
        for seed in seeds:
            base = make_ptq(teacher, task, preset, seed, device)
            student, _, logs, _ = train_student(
                "spark", base, teacher, task, preset, seed, device, True, overrides={"mode": "spark"}
            )
            row = {"spark": score_outputs(model_outputs(student, held), held, task)["psnr"]}
            w = [entry["w_mean"] for entry in logs]
            scale = [(e["loss_task"] + e["w_mean"] * e["loss_kd"]) / (e["loss_task"] + e["loss_kd"]) for e in logs]
            row["kd"] = train("kd", base, seed)
            SparkDistiller._lambda = lambda_from(w)
            row["kd_lambda_from_spark"] = train("kd", base, seed)
            SparkDistiller._lambda = plain_lambda
            balancers.NoBalancer.forward = scaled_sum(scale)
            row["kd_scaled"] = train("kd", base, seed)
            balancers.NoBalancer.forward = scaled_sum(scale)
            row["qat_scaled"] = train("qat", base, seed)
            balancers.NoBalancer.forward = plain_sum
            row["qat"] = train("qat", base, seed)
            for name, value in row.items():
                psnr.setdefault(name, []).append(value)
            print(
                f"seed {seed}: "
                + ", ".join(f"{k} {v:.4f}" for k, v in row.items())
                + f"; SPARK's map mean {w[0]:.3f} -> {w[len(w) // 2]:.3f} -> {w[-1]:.3f}, "
                + f"loss scale -> {scale[-1]:.3f}",
                flush=True,
            )
    finally:
        balancers.NoBalancer.forward, SparkDistiller._lambda = plain_sum, plain_lambda
    print(f"\n{args.task}, seeds {seeds}; paired difference to kd (mean, 95 % t-interval)")
    for name, values in psnr.items():
        paired = None if name == "kd" else paired_difference(values, psnr["kd"])
        print(summary_line(f"{name:<22}", summarize(values), paired, "kd", 3, " dB"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
