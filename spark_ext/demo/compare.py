"""The demo's experiment: from one FP32 teacher, every method's student per seed, scored on the held-out
photos (and an optional folder of the user's photos)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.nn as nn

from spark_ext.data import RestorationTask
from spark_ext.demo.presets import LABELS, Preset
from spark_ext.demo.scoring import input_outputs, model_outputs, score_outputs
from spark_ext.demo.training import lsq_quantizers, make_ptq, train_student
from spark_ext.distill import SparkDistiller


@dataclasses.dataclass
class Comparison:
    """What :func:`compare_methods` measured.

    scores: per row of the table (``input``, ``fp32``, then the methods), one score dict per seed
        (:func:`~spark_ext.demo.scoring.score_outputs`, plus ``eval_images`` with a folder).
    pictures: per row, the first seed's outputs by photo name; ``target`` (the ground truth) last.
    train_seconds, histories: per trained method, its seconds per seed and its first seed's step logs.
    spark: the first seed's SPARK distiller and student (for the weight-map figure), None without SPARK.
    """

    scores: dict[str, list[dict[str, Any]]]
    pictures: dict[str, dict[str, torch.Tensor]]
    train_seconds: dict[str, list[float]]
    histories: dict[str, list[dict[str, float]]]
    spark: Optional[tuple[SparkDistiller, nn.Module]]


def compare_methods(
    teacher: nn.Module,
    task: RestorationTask,
    preset: Preset,
    methods: Sequence[str],
    held,
    folder,
    device: torch.device,
    quiet: bool,
) -> Comparison:
    """Score the degraded input, the teacher and, per seed of ``preset``, the PTQ start and each trained method.

    ``held`` / ``folder``: ``[(name, input, target), ...]`` on ``device``; ``folder`` may be None.
    Prints one line per trained student.
    """

    def score(outs: dict[str, torch.Tensor], model: Optional[nn.Module]) -> dict[str, Any]:
        """Held-out scores of ``outs`` (+ the folder's, from ``model`` or the input)."""
        result = score_outputs(outs, held, task)
        if folder is not None:
            extra = model_outputs(model, folder) if model is not None else input_outputs(task, folder)
            result["eval_images"] = score_outputs(extra, folder, task)
        return result

    pictures = {"input": input_outputs(task, held), "fp32": model_outputs(teacher, held)}
    run = Comparison(
        scores={"input": [score(pictures["input"], None)], "fp32": [score(pictures["fp32"], teacher)]},
        pictures=pictures,
        train_seconds={},
        histories={},
        spark=None,
    )
    for seed in preset.seeds:
        first_seed = seed == preset.seeds[0]
        base = make_ptq(teacher, task, preset, seed, device)
        if "ptq" in methods:
            outs = model_outputs(base, held)
            run.scores.setdefault("ptq", []).append(score(outs, base))
            if first_seed:
                pictures["ptq"] = outs
        for method in methods:
            if method == "ptq":
                continue
            student, distiller, logs, seconds = train_student(method, base, teacher, task, preset, seed, device, quiet)
            outs = model_outputs(student, held)
            result = score(outs, student)
            # LSQ steps an optimiser pushed to the quantizer's 1e-8 floor (should be 0).
            result["collapsed_quant_steps"] = sum(int((q.step.detach() <= 1e-7).sum()) for q in lsq_quantizers(student))
            run.scores.setdefault(method, []).append(result)
            run.train_seconds.setdefault(method, []).append(seconds)
            print(
                f"  seed {seed} {LABELS[method]:<12} PSNR {result['psnr']:.3f} dB  SSIM {result['ssim']:.4f}  "
                f"({seconds:.1f}s)"
            )
            if first_seed:
                pictures[method] = outs
                run.histories[method] = logs
                if method == "spark":
                    run.spark = (distiller, student)
    pictures["target"] = {name: y for name, _, y in held}
    return run
