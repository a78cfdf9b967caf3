"""The demo's students: the calibrated PTQ start (:func:`make_ptq`) and its training by one method
(:func:`train_student`), with the optimiser and schedule every demo model shares."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.nn as nn

from spark_ext._validation import check_choice
from spark_ext.data import RandomCropBatches, RestorationTask
from spark_ext.demo.presets import LABELS, METHODS, STUDENT_SCHEDULES, Preset
from spark_ext.distill import DistillConfig, SparkDistiller
from spark_ext.models import feature_layer
from spark_ext.progress import progress


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of every group's lr from its initial value to 0 over ``steps`` (then held at 0)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1)))
    )


WARMUP_START = 0.15  # "warmup_then_linear": the lr factor at step 0


def student_schedule(
    optimizer: torch.optim.Optimizer, steps: int, kind: str
) -> Optional[torch.optim.lr_scheduler.LambdaLR]:
    """The students' lr over ``steps`` (``Preset.student_schedule``), as a factor of each group's initial lr:

    * ``"cosine"``: :func:`cosine_schedule`;
    * ``"constant"``: None (no scheduler);
    * ``"constant_then_linear"``: 1 for the first 75 % of the run, then a linear decay to 0 at ``steps``
      (the high lr's progress, with the last quarter averaging out its noise);
    * ``"warmup_then_linear"``: a linear warm-up from ``WARMUP_START`` (0.15) at step 0 to 1 at
      ``steps / 2``, 1 until ``0.75 steps``, then the same linear decay to 0 at ``steps``. Adam's steps
      grow over the first half, as a growing loss scale makes them grow (docs/spark.md, "The students'
      optimiser comes first"); uniform KD's best schedule of those measured.
    """
    check_choice(kind, "student_schedule", STUDENT_SCHEDULES)
    if kind == "cosine":
        return cosine_schedule(optimizer, steps)
    if kind == "constant":
        return None
    steps = max(steps, 1)
    warmup = 0.5 * steps if kind == "warmup_then_linear" else 0.0
    tail = 0.25 * steps

    def factor(i: int) -> float:
        rise = 1.0 if warmup == 0 else WARMUP_START + (1.0 - WARMUP_START) * i / warmup
        return max(0.0, min(1.0, rise, (steps - i) / tail))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def lsq_quantizers(model: nn.Module) -> list[nn.Module]:
    """Every :class:`~spark_ext.quant.LSQQuantizer` in ``model``, in module order."""
    from spark_ext.quant import LSQQuantizer

    return [m for m in model.modules() if isinstance(m, LSQQuantizer)]


def student_optimizer(model: nn.Module, lr: float, quant_rel_lr: float) -> torch.optim.Adam:
    """Adam with one group for the weights (``lr``) and one group per LSQ quantizer
    whose lr is ``quant_rel_lr * min(initial step)`` (see :class:`~spark_ext.demo.presets.Preset`).
    Steps at the 1e-8 floor (all-zero channels) are ignored when taking the min."""
    quant_ids, groups = set(), []
    for q in lsq_quantizers(model):
        params = [p for p in q.parameters(recurse=False) if p.requires_grad]
        if not params:
            continue
        quant_ids.update(id(p) for p in params)
        steps = q.step.detach().abs()
        live = steps[steps > 1e-6]
        scale = float(live.min()) if live.numel() else 1e-3
        groups.append({"params": params, "lr": quant_rel_lr * scale})
    weights = [p for p in model.parameters() if id(p) not in quant_ids and p.requires_grad]
    return torch.optim.Adam([{"params": weights, "lr": lr}] + groups)


def make_ptq(teacher: nn.Module, task: RestorationTask, preset: Preset, seed: int, device: torch.device) -> nn.Module:
    """W4A4 copy of the teacher (first/last layers W8A8), calibrated on training crops."""
    from spark_ext.quant import calibrate, quantize_model

    student = copy.deepcopy(teacher)
    student.requires_grad_(True)  # the teacher is frozen; its copy must train
    quantize_model(student, w_bits=4, a_bits=4, first_last_bits=8)
    data = RandomCropBatches(task, preset.crop, preset.batch, seed=20_000 + seed, device=device)
    calibrate(student, [next(data)[0] for _ in range(preset.calib_batches)], method=preset.calib_method)
    return student


def train_student(
    method: str,
    base: nn.Module,
    teacher: nn.Module,
    task: RestorationTask,
    preset: Preset,
    seed: int,
    device: torch.device,
    quiet: bool,
    overrides: Optional[dict[str, Any]] = None,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[nn.Module, SparkDistiller, list[dict[str, float]], float]:
    """Train a copy of the PTQ model with ``method``; identical data and budget for every method.

    ``overrides``: DistillConfig fields to use instead of ``METHODS[method]`` (``spark-ext study``'s variants).
    ``clock``: what the training seconds are read from: wall time by default; ``spark-ext study`` passes
    ``time.process_time`` on a CPU (its workers run one thread each, so that is the step's CPU time, which
    another process on the machine does not inflate).
    Returns the student (eval mode), its distiller, the per-step logs and the training seconds.
    """
    torch.manual_seed(seed)
    student = copy.deepcopy(base).train()
    overrides = dict(METHODS[method] if overrides is None else overrides)
    if "dfd_layer" in overrides:
        overrides["dfd_layer"] = feature_layer(teacher)
    overrides.setdefault("policy_steps", preset.student_steps)  # the policy's lr/entropy anneal over the run
    config = DistillConfig(grid=preset.grid, seed=seed, **overrides)
    opt = student_optimizer(student, preset.student_lr, preset.quant_rel_lr)
    sched = student_schedule(opt, preset.student_steps, preset.student_schedule)
    distiller = SparkDistiller(student, teacher if config.mode != "qat" else None, opt, config)
    data = RandomCropBatches(
        task, preset.crop, preset.batch, seed=30_000 + seed, device=device
    )  # same for every method
    logs = []
    t0 = clock()
    for _ in progress(range(preset.student_steps), f"{LABELS.get(method, method)} (seed {seed})", quiet=quiet):
        logs.append(distiller.step(*next(data)))
        if sched is not None:
            sched.step()
    seconds = clock() - t0
    distiller.close()
    return student.eval(), distiller, logs, seconds
