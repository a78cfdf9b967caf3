"""The demo's figures: ``crops.png`` (:func:`save_crops`), ``spark_weight_map.png`` (:func:`save_weight_map`)
and ``curves.png`` (:func:`save_curves`). Needs matplotlib (the ``demo`` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import spark_ext
from spark_ext.atomic import atomic_path
from spark_ext.demo.presets import LABELS, Preset
from spark_ext.demo.scoring import restore
from spark_ext.distill import SparkDistiller


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    _pyplot().close(fig)


def _to_numpy(img: torch.Tensor):
    return img[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy()


def save_crops(path: Path, rows: dict[str, dict[str, torch.Tensor]], scores: dict[str, dict], held, zoom: int) -> None:
    """A row of crops per method (columns: held-out photos), PSNR in each title."""
    plt = _pyplot()
    names = [n for n, _, _ in held]
    fig, axes = plt.subplots(len(rows), len(names), figsize=(2.4 * len(names), 2.4 * len(rows)), squeeze=False)
    for r, (method, outs) in enumerate(rows.items()):
        for c, name in enumerate(names):
            img = outs[name]
            h, w = img.shape[-2:]
            z = min(zoom, h, w)
            top, left = (h - z) // 2, (w - z) // 2
            ax = axes[r][c]
            ax.imshow(_to_numpy(img[..., top : top + z, left : left + z]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            psnr = scores.get(method, {}).get("per_image", {}).get(name, {}).get("psnr")
            ax.set_title(f"{name}" + (f"  {psnr:.2f} dB" if psnr is not None else ""), fontsize=8)
            if c == 0:
                ax.set_ylabel(LABELS.get(method, method), fontsize=9)
    _save(fig, path)


@torch.no_grad()
def save_weight_map(
    path: Path, distiller: SparkDistiller, student: nn.Module, teacher: nn.Module, held, preset: Preset, backend: str
) -> dict[str, Any]:
    """The trained SPARK policy's weight map (Beta means) over a held-out photo,
    at the training cell size, next to the per-cell KD gap and student error."""
    plt = _pyplot()
    name, x, y = held[0]
    s, t = restore(student, x), restore(teacher, x)
    h, w = y.shape[-2:]
    cell = max(preset.crop // preset.grid[0], 1)
    grid = (max(1, min(h, h // cell)), max(1, min(w, w // cell)))
    signals, _ = spark_ext.difficulty_signals(s, t, y, grid, backend=backend)
    weight = distiller.policy_weight_map(signals, mean=True)[0, 0].cpu().numpy()
    # As the training step uses it: the mean map ("credit") or one draw (REINFORCE variants).
    sampled = distiller.policy_weight_map(signals, mean=False)[0, 0].cpu().numpy()
    trained_on = (
        "the Beta-mean map (as in training)"
        if distiller.config.policy_signal == "credit"
        else "one sampled map (as in training)"
    )
    panels = [
        ("ground truth", _to_numpy(y), None),
        ("SPARK weight map (Beta mean)", weight, "magma"),
        (trained_on, sampled, "magma"),
        ("KD gap |S-T| per cell", signals[0, 3].cpu().numpy(), "viridis"),
        ("student error |S-Y| per cell", signals[0, 2].cpu().numpy(), "viridis"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.8 * h / w + 0.6))
    for ax, (title, img, cmap) in zip(axes, panels):
        if cmap is None:
            ax.imshow(img)
        else:
            ax.imshow(_to_numpy(y).mean(-1), cmap="gray", extent=(0, w, h, 0))
            im = ax.imshow(img, cmap=cmap, alpha=0.75, extent=(0, w, h, 0), interpolation="nearest")
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{name}: grid {grid[0]}x{grid[1]} ({cell}px cells, as in training)", fontsize=10)
    _save(fig, path)
    return {
        "photo": name,
        "grid": list(grid),
        "mean_map": {"min": float(weight.min()), "max": float(weight.max()), "std": float(weight.std())},
        "sampled_map": {"min": float(sampled.min()), "max": float(sampled.max()), "std": float(sampled.std())},
    }


def save_curves(path: Path, histories: dict[str, list[dict[str, float]]]) -> None:
    """Each method's training task loss (L1), smoothed by a moving average over ~1/30 of the run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, logs in histories.items():
        vals = [entry["loss_task"] for entry in logs]
        k = max(1, len(vals) // 30)
        smooth = [sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))]
        ax.plot(smooth, label=LABELS.get(method, method))
    ax.set_xlabel("step")
    ax.set_ylabel("training L1 (task loss, smoothed)")
    ax.legend(fontsize=8)
    _save(fig, path)
