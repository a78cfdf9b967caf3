"""The demo's budgets (:class:`Preset`), its student methods and their display labels."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

# Student methods: DistillConfig overrides. "ptq" is handled separately (no training).
METHODS: dict[str, dict[str, Any]] = {
    "qat": {"mode": "qat"},
    "kd": {"mode": "kd"},
    "spark": {"mode": "spark"},
    "gor": {"mode": "kd", "balancer": "gor"},
    "lmr": {"mode": "kd", "balancer": "lmr"},
    "dfd": {"mode": "kd", "dfd_layer": "<feature layer>"},
}
DEFAULT_METHODS = ("ptq", "qat", "kd", "spark", "gor", "lmr")
METRIC_NOTES = {
    "denoise": "BasicSR conventions: outputs rounded to uint8, RGB, no border crop, SSIM 11x11 Gaussian (sigma 1.5)",
    "sr": "BasicSR conventions: outputs rounded to uint8, Y channel (BT.601), border = scale cropped, "
    "SSIM 11x11 Gaussian (sigma 1.5)",
}
STUDENT_SCHEDULES = ("cosine", "constant", "constant_then_linear", "warmup_then_linear")
LABELS = {
    "input": "input (degraded)",
    "fp32": "FP32 teacher",
    "ptq": "PTQ W4A4",
    "qat": "QAT W4A4",
    "kd": "KD W4A4",
    "spark": "SPARK W4A4",
    "gor": "GoR W4A4",
    "lmr": "LMR W4A4",
    "dfd": "DFD W4A4",
    "target": "ground truth",
}


@dataclasses.dataclass(frozen=True)
class Preset:
    """Budget of one demo run (identical for every student method).

    width, depth: network size (``build_model``). crop, batch: training crops.
    teacher_steps, teacher_lr: FP32 teacher training (Adam, cosine decay).
    student_steps, student_lr: every student's training (Adam).
    student_schedule: the students' lr over the run (:func:`spark_ext.demo.training.student_schedule`):
        ``"cosine"`` (decay to 0), ``"constant"``, ``"constant_then_linear"`` (constant, then a linear decay
        to 0 over the last quarter) or ``"warmup_then_linear"`` (a linear warm-up from 0.15 x lr over the
        first half, constant, then the same linear decay over the last quarter).
    quant_rel_lr: learning rate of each LSQ step (and offset) *relative to its
        initial value* — Adam moves a parameter by about ``lr`` per step, so a
        step of 1e-3 (8-bit layers) needs a far smaller lr than one of 0.1.
    calib_batches, calib_method: PTQ calibration. eval_size: centred crop of
        the held-out photos (None: whole photos). grid: SPARK cells per crop.
    seeds: student seeds (mean ± std over them when more than one).
    """

    name: str
    width: int
    depth: int
    crop: int
    batch: int
    teacher_steps: int
    teacher_lr: float
    student_steps: int
    student_lr: float
    quant_rel_lr: float
    calib_batches: int
    calib_method: str
    eval_size: Optional[int]
    grid: tuple[int, int]
    seeds: tuple[int, ...]
    student_schedule: str = "warmup_then_linear"


# The students' optimiser: Adam at 3e-3 with the "warmup_then_linear" schedule, the best uniform-KD setting
# measured at the default preset's 500 steps on both tasks (docs/spark.md, "The students' optimiser comes
# first"). "smoke" only exercises the code; "full" (5000 steps, a larger network) is not probed.
PRESETS = {
    "smoke": Preset("smoke", 4, 1, 16, 2, 4, 2e-3, 3, 3e-3, 1e-3, 1, "minmax", 32, (4, 4), (0,), "warmup_then_linear"),
    "default": Preset(
        "default", 16, 2, 48, 8, 1500, 2e-3, 500, 3e-3, 1e-2, 4, "mse", 192, (8, 8), (0,), "warmup_then_linear"
    ),
    "full": Preset(
        "full", 32, 3, 96, 16, 20000, 1e-3, 5000, 3e-3, 1e-3, 16, "mse", None, (8, 8), (0, 1, 2), "warmup_then_linear"
    ),
}
