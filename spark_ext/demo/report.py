"""The demo's table (mean ± std over seeds per method) and its ``results.json``."""

from __future__ import annotations

import dataclasses
import datetime
import platform
from typing import Any

import torch

import spark_ext
from spark_ext.data import RestorationTask
from spark_ext.demo.compare import Comparison
from spark_ext.demo.presets import LABELS, METRIC_NOTES, Preset
from spark_ext.stats import mean_std


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Fixed-width text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def summarize(run: Comparison, with_folder: bool) -> tuple[dict[str, dict[str, Any]], str]:
    """Per method: PSNR / SSIM mean and std over seeds (held-out photos, and ``eval_images_*`` for the folder),
    seeds, training seconds and every run's scores; and the table of them as text."""
    header = ("method", "PSNR (dB)", "SSIM") + (("PSNR (DIR)", "SSIM (DIR)") if with_folder else ()) + ("train s",)
    rows, summary = [], {}
    for method, runs in run.scores.items():
        sets = [("", runs)] + ([("eval_images_", [r["eval_images"] for r in runs])] if with_folder else [])
        summary[method] = {"label": LABELS[method]}
        row = [LABELS[method]]
        for prefix, results in sets:
            psnr_m, psnr_s = mean_std([r["psnr"] for r in results])
            ssim_m, ssim_s = mean_std([r["ssim"] for r in results])
            summary[method].update(
                {
                    f"{prefix}psnr_mean": psnr_m,
                    f"{prefix}psnr_std": psnr_s,
                    f"{prefix}ssim_mean": ssim_m,
                    f"{prefix}ssim_std": ssim_s,
                }
            )
            row += [
                f"{psnr_m:.3f}" + (f" ± {psnr_s:.3f}" if len(runs) > 1 else ""),
                f"{ssim_m:.4f}" + (f" ± {ssim_s:.4f}" if len(runs) > 1 else ""),
            ]
        secs = run.train_seconds.get(method)
        summary[method].update({"seeds": len(runs), "train_seconds": secs, "runs": runs})
        rows.append(tuple(row) + (f"{sum(secs) / len(secs):.1f}" if secs else "-",))
    return summary, format_table(header, rows)


def table_note(task: RestorationTask, held, folder, eval_images, seeds: int, wall_seconds: float) -> str:
    """The line under the table: which photos, the metric conventions, seeds and wall time."""
    return (
        f"(PSNR/SSIM: mean over held-out photos {', '.join(n for n, _, _ in held)}"
        + (f"; DIR: {len(folder)} photo(s) in {eval_images}" if folder is not None else "")
        + f"; {METRIC_NOTES[task.kind]}; {seeds} seed(s); wall time {wall_seconds:.0f}s)"
    )


def build_report(
    *,
    device_name: str,
    backend: str,
    backends: dict[str, str],
    task: RestorationTask,
    preset: Preset,
    methods: list[str],
    held,
    eval_images,
    folder,
    teacher_info: dict[str, Any],
    summary: dict[str, dict[str, Any]],
    wall_seconds: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The content of ``results.json``: versions, settings, the backends used, the teacher and the results."""
    return {
        "spark_ext": spark_ext.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "backend_requested": backend,
        "backends": backends,
        "task": dataclasses.asdict(task),
        "preset": dataclasses.asdict(preset),
        "methods": methods,
        "held_out": [n for n, _, _ in held],
        "eval_images": None if folder is None else {"dir": str(eval_images), "images": [n for n, _, _ in folder]},
        "metric_notes": METRIC_NOTES[task.kind],
        "teacher": {k: v for k, v in teacher_info.items() if k != "losses"},
        "results": summary,
        "wall_seconds": wall_seconds,
        **extra,
    }
