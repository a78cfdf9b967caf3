"""PSNR / SSIM of the demo's models on held-out pairs ``[(name, input, target), ...]``, as papers report them
(:func:`spark_ext.metrics.restoration_metrics`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from spark_ext.data import RestorationTask, bicubic_upsample
from spark_ext.metrics import restoration_metrics


@torch.no_grad()
def restore(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` in eval mode, clamped to [0, 1]; the model is left in the mode it was in."""
    was_training = model.training
    model.eval()
    out = model(x).clamp(0.0, 1.0)
    model.train(was_training)
    return out


def score_outputs(outputs: dict[str, torch.Tensor], held, task: RestorationTask) -> dict[str, Any]:
    """PSNR / SSIM of ``outputs[name]`` against each held-out target (:func:`spark_ext.metrics.restoration_metrics`:
    8-bit levels; SR on the Y channel with a ``scale``-pixel border cropped), mean over the images."""
    per = {}
    for name, _, target in held:
        m = restoration_metrics(outputs[name], target, task.kind, task.scale)
        per[name] = {"psnr": float(m["psnr"][0]), "ssim": float(m["ssim"][0])}
    return {
        "psnr": sum(v["psnr"] for v in per.values()) / len(per),
        "ssim": sum(v["ssim"] for v in per.values()) / len(per),
        "per_image": per,
    }


def evaluate(model: nn.Module, task: RestorationTask, held) -> dict[str, Any]:
    """Mean PSNR (dB) / SSIM of ``model`` over ``held`` (``[(name, input, target), ...]``, e.g. from
    :func:`spark_ext.data.held_out_pairs` or :func:`spark_ext.data.image_folder_pairs`) for ``task``,
    plus ``per_image`` scores. Outputs are clamped to [0, 1]; the model is left in its mode."""
    return score_outputs(model_outputs(model, held), held, task)


def model_outputs(model: nn.Module, held) -> dict[str, torch.Tensor]:
    """``{name: restore(model, input)}`` for every held-out pair."""
    return {name: restore(model, x) for name, x, _ in held}


def input_outputs(task: RestorationTask, held) -> dict[str, torch.Tensor]:
    """The degraded inputs as outputs (SR: bicubic-upsampled), the baseline row of the table."""
    if task.kind == "denoise":
        return {name: x.clamp(0, 1) for name, x, _ in held}
    return {name: bicubic_upsample(x, task.scale) for name, x, _ in held}
