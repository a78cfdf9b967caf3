"""``spark-ext demo``: W4A4 students of a restoration network on real photos.

What it does, for ``--task denoise`` (AWGN sigma 25/255) or ``--task sr``
(bicubic x2), on scikit-image's bundled photos (no download):

1. loads the FP32 teacher shipped with the package for the ``default``
   preset (:func:`spark_ext.models.load_pretrained_teacher`, hash-checked;
   ``docs/teachers.md``), or, with ``--retrain-teacher`` / ``--teacher-steps``
   and for the other presets, trains one (cached in
   ``~/.cache/spark_ext/teachers/<hash>.pt``; the hash covers everything that
   determines the weights);
2. quantizes a copy to W4A4 (first and last layer W8A8) and calibrates it on
   training crops (PTQ, MSE search) — the **PTQ** row, and the common starting
   point of every trained student;
3. trains, with identical data order, steps, learning rates and seeds,
   **QAT** (L1 only), **KD** (L1 + uniform KD from the FP32 teacher),
   **SPARK** (L1 + policy-weighted KD), **GoR** and **LMR** (L1 + KD combined
   by those balancers); optionally **DFD** (feature KD at the bottleneck);
4. evaluates PSNR / SSIM as papers do (:mod:`spark_ext.metrics`: outputs
   rounded to 8-bit levels; denoising on RGB; SR on the BT.601 Y channel with a
   ``scale``-pixel border cropped; SSIM with an 11x11 Gaussian window) on the
   held-out photos (and, with ``--eval-images DIR``, on every PNG/JPEG photo
   in DIR), prints the table (with the degraded input and the FP32
   teacher), writes ``results.json``, ``crops.png`` (a row of crops per
   method), ``spark_weight_map.png`` (the SPARK policy's weight map over a
   held-out photo) and ``curves.png`` (training losses).

Presets: ``smoke`` (seconds, for tests), ``default`` (a few minutes on a
2-core CPU), ``full`` (GPU: larger network and crops, more steps, three seeds
reported as mean ± std). The teacher is fixed across seeds; a seed sets the
calibration crops, the training data order and the SPARK policy.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import hashlib
import importlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

import spark_ext
from spark_ext._validation import writable_dir_problem
from spark_ext.data import (
    HELD_OUT_PHOTOS,
    TRAIN_PHOTOS,
    RandomCropBatches,
    RestorationTask,
    bicubic_upsample,
    held_out_pairs,
    image_folder_pairs,
)
from spark_ext.distill import DistillConfig, SparkDistiller, per_image_loss
from spark_ext.metrics import SSIM_WINDOW, restoration_metrics
from spark_ext.models import PRETRAINED_TEACHERS, build_model, feature_layer, load_pretrained_teacher

TEACHER_FORMAT = "spark_ext-teacher-v2"  # v2: SR inputs from the MATLAB-style bicubic downscale

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
    student_steps, student_lr: every student's training (Adam, cosine decay).
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


PRESETS = {
    "smoke": Preset("smoke", 4, 1, 16, 2, 4, 2e-3, 3, 2e-4, 1e-3, 1, "minmax", 32, (4, 4), (0,)),
    "default": Preset("default", 16, 2, 48, 8, 1500, 2e-3, 500, 1e-3, 1e-2, 4, "mse", 192, (8, 8), (0,)),
    "full": Preset("full", 32, 3, 96, 16, 20000, 1e-3, 5000, 5e-4, 1e-3, 16, "mse", None, (8, 8), (0, 1, 2)),
}


# ----------------------------------------------------------------------------- helpers


def _progress(iterable, desc: str, quiet: bool, total: Optional[int] = None):
    if quiet:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the demo extra is missing: plain iteration
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr)


def _cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1)))
    )


def _lsq_quantizers(model: nn.Module) -> list[nn.Module]:
    from spark_ext.quant import LSQQuantizer

    return [m for m in model.modules() if isinstance(m, LSQQuantizer)]


def student_optimizer(model: nn.Module, lr: float, quant_rel_lr: float) -> torch.optim.Adam:
    """Adam with one group for the weights (``lr``) and one group per LSQ quantizer
    whose lr is ``quant_rel_lr * min(initial step)`` (see :class:`Preset`).
    Steps at the 1e-8 floor (all-zero channels) are ignored when taking the min."""
    quant_ids, groups = set(), []
    for q in _lsq_quantizers(model):
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


def _resolve_backends(device: torch.device, backend: str) -> dict[str, str]:
    """Which backend each op runs on this device (float32 inputs) under ``backend``."""
    like = torch.empty(1, device=device)
    out = {}
    for op in ("difficulty_signals", "fused_weighted_kd", "lsq_fake_quant"):
        try:
            out[op] = spark_ext.backend_for(op, like, backend)
        except Exception as exc:  # report, and let the real call raise with its own message
            out[op] = f"unavailable ({exc})"
    return out


# ----------------------------------------------------------------------------- teacher


def _teacher_key(task: RestorationTask, preset: Preset) -> dict[str, Any]:
    return {
        "format": TEACHER_FORMAT,
        "task": dataclasses.asdict(task),
        "width": preset.width,
        "depth": preset.depth,
        "crop": preset.crop,
        "batch": preset.batch,
        "steps": preset.teacher_steps,
        "lr": preset.teacher_lr,
        "photos": list(TRAIN_PHOTOS),
        "seed": 0,
        "torch": torch.__version__.split("+")[0],
    }


def train_teacher(
    task: RestorationTask,
    preset: Preset,
    device: torch.device,
    quiet: bool,
    callback: Optional[Callable[[int, nn.Module], None]] = None,
) -> tuple[nn.Module, list[float]]:
    """FP32 teacher: L1 loss, Adam with cosine decay over ``preset.teacher_steps``, seed 0.

    Deterministic: on one CPU thread, the same torch build gives bitwise the same
    weights (``tools/train_teachers.py`` made the shipped teachers this way).
    ``callback(step, model)``, if given, runs after every optimiser step
    (``step`` counts from 1), e.g. to record a held-out curve.
    """
    torch.manual_seed(0)
    model = build_model(task.kind, preset.width, depth=preset.depth, scale=task.scale).to(device)
    data = RandomCropBatches(task, preset.crop, preset.batch, seed=10_000, device=device)
    opt = torch.optim.Adam(model.parameters(), lr=preset.teacher_lr)
    sched = _cosine(opt, preset.teacher_steps)
    losses = []
    for _ in _progress(range(preset.teacher_steps), "FP32 teacher", quiet):
        x, y = next(data)
        loss = per_image_loss(model(x), y).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(len(losses), model)
    return model, losses


def uses_pretrained_teacher(task: RestorationTask, preset: Preset) -> bool:
    """Whether the shipped teacher fits this task and preset (same network and degradation)."""
    spec = PRETRAINED_TEACHERS[task.kind]
    same_task = task.sigma == spec.sigma if task.kind == "denoise" else task.scale == spec.scale
    return same_task and (preset.width, preset.depth) == (spec.width, spec.depth)


def get_teacher(
    task, preset, device, cache_dir: Optional[Path], quiet: bool, retrain: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The FP32 teacher: the shipped one when it fits ``preset`` and ``retrain`` is off, else
    trained with ``preset.teacher_steps`` (from / into ``cache_dir`` when given)."""
    if not retrain and uses_pretrained_teacher(task, preset):
        spec = PRETRAINED_TEACHERS[task.kind]
        model = load_pretrained_teacher(task.kind, device)
        print(f"teacher: shipped {task.kind} teacher ({spec.steps} steps, sha256 {spec.sha256[:12]}...)")
        return model, {"pretrained": True, "steps": spec.steps, "sha256": spec.sha256, "seconds": 0.0, "losses": []}
    key = _teacher_key(task, preset)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"{digest}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        blob = torch.load(path, map_location=device, weights_only=True)
        if blob.get("key") == json.dumps(key, sort_keys=True):
            model = build_model(task.kind, preset.width, depth=preset.depth, scale=task.scale).to(device)
            model.load_state_dict(blob["state_dict"])
            print(f"teacher: loaded from cache {path}")
            return model.eval(), {
                "pretrained": False,
                "steps": preset.teacher_steps,
                "cached": True,
                "path": str(path),
                "seconds": 0.0,
                "losses": [],
            }
    t0 = time.perf_counter()
    model, losses = train_teacher(task, preset, device, quiet)
    seconds = time.perf_counter() - t0
    print(
        f"teacher: trained {preset.teacher_steps} steps in {seconds:.1f}s "
        f"(final L1 {sum(losses[-20:]) / max(len(losses[-20:]), 1):.4f})"
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"key": json.dumps(key, sort_keys=True), "state_dict": model.state_dict()}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
        print(f"teacher: cached at {path}")
    return model.eval(), {
        "pretrained": False,
        "steps": preset.teacher_steps,
        "cached": False,
        "path": str(path) if path else None,
        "seconds": seconds,
        "losses": losses,
    }


# ----------------------------------------------------------------------------- students


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
) -> tuple[nn.Module, SparkDistiller, list[dict[str, float]], float]:
    """Train a copy of the PTQ model with ``method``; identical data and budget for every method.

    ``overrides``: DistillConfig fields to use instead of ``METHODS[method]`` (``spark-ext study``'s variants).
    """
    torch.manual_seed(seed)
    student = copy.deepcopy(base).train()
    overrides = dict(METHODS[method] if overrides is None else overrides)
    if "dfd_layer" in overrides:
        overrides["dfd_layer"] = feature_layer(teacher)
    overrides.setdefault("policy_steps", preset.student_steps)  # the policy's lr/entropy anneal over the run
    config = DistillConfig(grid=preset.grid, seed=seed, **overrides)
    opt = student_optimizer(student, preset.student_lr, preset.quant_rel_lr)
    sched = _cosine(opt, preset.student_steps)
    distiller = SparkDistiller(student, teacher if config.mode != "qat" else None, opt, config)
    data = RandomCropBatches(
        task, preset.crop, preset.batch, seed=30_000 + seed, device=device
    )  # same for every method
    logs = []
    t0 = time.perf_counter()
    for _ in _progress(range(preset.student_steps), f"{LABELS.get(method, method)} (seed {seed})", quiet):
        logs.append(distiller.step(*next(data)))
        sched.step()
    seconds = time.perf_counter() - t0
    distiller.close()
    return student.eval(), distiller, logs, seconds


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def restore(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
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
    return {name: restore(model, x) for name, x, _ in held}


def input_outputs(task: RestorationTask, held) -> dict[str, torch.Tensor]:
    if task.kind == "denoise":
        return {name: x.clamp(0, 1) for name, x, _ in held}
    return {name: bicubic_upsample(x, task.scale) for name, x, _ in held}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


# ----------------------------------------------------------------------------- pictures


def _to_numpy(img: torch.Tensor):
    return img[0].permute(1, 2, 0).clamp(0, 1).cpu().numpy()


def save_crops(path: Path, rows: dict[str, dict[str, torch.Tensor]], scores: dict[str, dict], held, zoom: int) -> None:
    """A row of crops per method (columns: held-out photos), PSNR in each title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def save_weight_map(
    path: Path, distiller: SparkDistiller, student: nn.Module, teacher: nn.Module, held, preset: Preset, backend: str
) -> dict[str, Any]:
    """The trained SPARK policy's weight map (Beta means) over a held-out photo,
    at the training cell size, next to the per-cell KD gap and student error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return {
        "photo": name,
        "grid": list(grid),
        "mean_map": {"min": float(weight.min()), "max": float(weight.max()), "std": float(weight.std())},
        "sampled_map": {"min": float(sampled.min()), "max": float(sampled.max()), "std": float(sampled.std())},
    }


def save_curves(path: Path, histories: dict[str, list[dict[str, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, logs in histories.items():
        vals = [entry["loss_task"] for entry in logs]
        k = max(1, len(vals) // 30)  # moving average over ~1/30 of the run
        smooth = [sum(vals[max(0, i - k + 1) : i + 1]) / len(vals[max(0, i - k + 1) : i + 1]) for i in range(len(vals))]
        ax.plot(smooth, label=LABELS.get(method, method))
    ax.set_xlabel("step")
    ax.set_ylabel("training L1 (task loss, smoothed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    presets = "; ".join(
        f"{p.name}: {p.student_steps} student steps, {p.teacher_steps} teacher steps, width {p.width}, "
        f"{len(p.seeds)} seed(s)"
        for p in PRESETS.values()
    )
    p = argparse.ArgumentParser(
        prog="spark-ext demo",
        description=(
            "Train W4A4 students (PTQ, QAT, KD, SPARK, GoR, LMR; optionally DFD) of a small restoration "
            "network from one FP32 teacher on scikit-image's bundled photos (no download), then print a "
            "PSNR/SSIM table on held-out photos and the backend each spark_ext op used."
        ),
        epilog=(
            f"Presets: {presets}. 'default' takes about 5 minutes on a 2-core CPU; 'smoke' seconds; 'full' "
            "is meant for a GPU. Writes OUT/results.json (table, settings, backends), crops.png, "
            "spark_weight_map.png (with SPARK) and curves.png. The 'default' preset uses the FP32 teacher "
            "shipped with the package; a trained one is cached (see --cache-dir)."
        ),
    )
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="default",
        help="run budget, see Presets below (default: %(default)s)",
    )
    p.add_argument(
        "--task",
        choices=("denoise", "sr"),
        default="denoise",
        help="denoise: Gaussian noise sigma 25/255; sr: bicubic x2 super-resolution (default: %(default)s)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("demo_out"),
        help="output folder for results.json and PNGs (default: %(default)s)",
    )
    p.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument(
        "--backend",
        choices=spark_ext.BACKENDS,
        default="auto",
        help="backend for every spark_ext op (default: %(default)s)",
    )
    p.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated list from ptq,{','.join(METHODS)} (default: %(default)s)",
    )
    p.add_argument(
        "--seeds", type=_int_at_least(1), default=None, help="number of student seeds (default: the preset's)"
    )
    p.add_argument(
        "--steps", type=_int_at_least(1), default=None, help="student training steps (default: the preset's)"
    )
    p.add_argument(
        "--teacher-steps",
        type=_int_at_least(1),
        default=None,
        help="train the teacher for this many steps (implies --retrain-teacher; default: the preset's)",
    )
    p.add_argument(
        "--retrain-teacher",
        action="store_true",
        help="train the FP32 teacher (preset's steps) instead of loading the one shipped with the package "
        "(the 'default' preset's network; other presets always train theirs)",
    )
    p.add_argument(
        "--eval-images",
        type=Path,
        default=None,
        metavar="DIR",
        help="also evaluate every method on the PNG/JPEG photos in DIR (whole photos, degraded like the held-out set)",
    )
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spark_ext" / "teachers"
    p.add_argument("--cache-dir", type=Path, default=default_cache, help="teacher cache (default %(default)s)")
    p.add_argument("--no-cache", action="store_true", help="always train the teacher, do not cache it")
    p.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=None,
        help="CPU threads for torch (default: half the cores, at least 1; on a busy machine more "
        "threads than free cores make every op wait on the others)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _parse_device(text: str) -> torch.device:
    """``--device``: 'auto', 'cpu', 'cuda' or 'cuda:N'; raises ValueError saying what is wrong."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the demo runs on 'cpu' or 'cuda', got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{text!r} asked for, but CUDA is not available here (torch {torch.__version__}); use cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{text!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every check that needs more than argparse's types, before any work (``p.error``: one line, exit 2).

    Sets ``args.method_list``, ``args.torch_device`` and ``args.eval_folder`` (the loaded --eval-images pairs).
    """
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    choices = f"choose from ptq,{','.join(METHODS)}"
    if not methods:
        p.error(f"argument --methods: no method given; {choices}")
    bad = [m for m in methods if m != "ptq" and m not in METHODS]
    if bad:
        p.error(f"argument --methods: unknown {bad}; {choices}")
    repeated = sorted({m for m in methods if methods.count(m) > 1})
    if repeated:
        p.error(f"argument --methods: {repeated} given more than once (each method trains once per seed)")
    args.method_list = methods
    try:
        args.torch_device = _parse_device(args.device)
    except ValueError as exc:
        p.error(f"argument --device: {exc}")
    like = torch.empty(1, device=args.torch_device)
    for op in ("difficulty_signals", "fused_weighted_kd", "lsq_fake_quant"):
        try:
            spark_ext.backend_for(op, like, args.backend)
        except Exception as exc:  # BackendUnavailableError, or a library that fails to load
            p.error(f"argument --backend: {exc} (--backend auto picks the fastest backend each op has)")
    args.eval_folder = None
    if args.eval_images is not None:  # loaded here: every file must decode before any work
        task = RestorationTask(args.task)
        try:
            args.eval_folder = image_folder_pairs(task, args.eval_images)
        except ValueError as exc:
            p.error(f"argument --eval-images: {exc}")
        small = [name for name, _, y in args.eval_folder if min(y.shape[-2:]) < SSIM_WINDOW + 2 * task.scale]
        if small:
            p.error(f"argument --eval-images: images smaller than {SSIM_WINDOW + 2 * task.scale}px: {small}")
    why = writable_dir_problem(args.out)
    if why:
        p.error(f"argument --out: {why}")
    if not args.no_cache:
        why = writable_dir_problem(args.cache_dir)
        if why:
            p.error(f"argument --cache-dir: {why}; pass --no-cache to train the teacher without caching it")


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    preset = PRESETS[args.preset]
    replace = {}
    if args.steps is not None:
        replace["student_steps"] = args.steps
    if args.teacher_steps is not None:
        replace["teacher_steps"] = args.teacher_steps
    if args.seeds is not None:
        replace["seeds"] = tuple(range(args.seeds))
    preset = dataclasses.replace(preset, **replace)
    methods, device = args.method_list, args.torch_device
    task, folder = RestorationTask(args.task), args.eval_folder
    spark_ext.set_default_backend(args.backend)
    if device.type == "cpu":
        threads = args.threads if args.threads is not None else max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(threads)
    try:
        importlib.import_module("spark_ext.quant")
    except ImportError as exc:
        print(f"spark_ext.quant is not available ({exc}); the demo needs the QAT toolkit", file=sys.stderr)
        return 1

    backends = _resolve_backends(device, args.backend)
    dev_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    print(
        f"spark_ext {spark_ext.__version__} demo: task={task.kind} preset={preset.name} device={dev_name} "
        f"torch {torch.__version__}"
    )
    print(
        "backends used: "
        + ", ".join(f"{op}={name}" for op, name in backends.items())
        + f"  (requested: {args.backend})"
    )
    print(
        f"data: train {len(TRAIN_PHOTOS)} photos, held out {', '.join(HELD_OUT_PHOTOS)}"
        f" ({'whole photos' if preset.eval_size is None else f'{preset.eval_size}px centre crops'})"
    )
    print(
        f"budget per student: {preset.student_steps} steps x batch {preset.batch} x {preset.crop}px crops, "
        f"seeds {list(preset.seeds)}"
    )

    if folder is not None:
        print(f"extra evaluation: {len(folder)} photo(s) in {args.eval_images} (whole photos)")
    held = held_out_pairs(task, preset.eval_size, device=device)
    folder = [(n, x.to(device), y.to(device)) for n, x, y in folder] if folder is not None else None
    cache_dir = None if args.no_cache else args.cache_dir
    retrain = args.retrain_teacher or args.teacher_steps is not None
    teacher, teacher_info = get_teacher(task, preset, device, cache_dir, args.quiet, retrain=retrain)
    for p in teacher.parameters():
        p.requires_grad_(False)

    def score(outs: dict[str, torch.Tensor], model: Optional[nn.Module]) -> dict[str, Any]:
        """Held-out scores of ``outs`` (+ the --eval-images folder's, from ``model`` or the input)."""
        result = score_outputs(outs, held, task)
        if folder is not None:
            extra = model_outputs(model, folder) if model is not None else input_outputs(task, folder)
            result["eval_images"] = score_outputs(extra, folder, task)
        return result

    pictures: dict[str, dict[str, torch.Tensor]] = {
        "input": input_outputs(task, held),
        "fp32": model_outputs(teacher, held),
    }
    scores: dict[str, list[dict]] = {
        "input": [score(pictures["input"], None)],
        "fp32": [score(pictures["fp32"], teacher)],
    }
    train_seconds: dict[str, list[float]] = {}
    histories: dict[str, list[dict[str, float]]] = {}
    spark_state = None
    for seed in preset.seeds:
        base = make_ptq(teacher, task, preset, seed, device)
        if "ptq" in methods:
            outs = model_outputs(base, held)
            scores.setdefault("ptq", []).append(score(outs, base))
            if seed == preset.seeds[0]:
                pictures["ptq"] = outs
        for method in methods:
            if method == "ptq":
                continue
            student, distiller, logs, seconds = train_student(
                method, base, teacher, task, preset, seed, device, args.quiet
            )
            outs = model_outputs(student, held)
            result = score(outs, student)
            # LSQ steps an optimiser pushed to the quantizer's 1e-8 floor (should be 0).
            result["collapsed_quant_steps"] = sum(
                int((q.step.detach() <= 1e-7).sum()) for q in _lsq_quantizers(student)
            )
            scores.setdefault(method, []).append(result)
            train_seconds.setdefault(method, []).append(seconds)
            print(
                f"  seed {seed} {LABELS[method]:<12} PSNR {result['psnr']:.3f} dB  SSIM {result['ssim']:.4f}  "
                f"({seconds:.1f}s)"
            )
            if seed == preset.seeds[0]:
                pictures[method] = outs
                histories[method] = logs
                if method == "spark":
                    spark_state = (distiller, student)
    pictures["target"] = {name: y for name, _, y in held}

    # ---- table
    rows, summary = [], {}
    header = (
        ("method", "PSNR (dB)", "SSIM") + (("PSNR (DIR)", "SSIM (DIR)") if folder is not None else ()) + ("train s",)
    )
    for method, runs in scores.items():
        sets = [("", runs)] + ([("eval_images_", [r["eval_images"] for r in runs])] if folder is not None else [])
        summary[method] = {"label": LABELS[method]}
        row = [LABELS[method]]
        for prefix, results in sets:
            psnr_m, psnr_s = _mean_std([r["psnr"] for r in results])
            ssim_m, ssim_s = _mean_std([r["ssim"] for r in results])
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
        secs = train_seconds.get(method)
        summary[method].update({"seeds": len(runs), "train_seconds": secs, "runs": runs})
        rows.append(tuple(row) + (f"{sum(secs) / len(secs):.1f}" if secs else "-",))
    wall = time.perf_counter() - wall0
    print()
    print(_table(header, rows))
    print(
        f"\n(PSNR/SSIM: mean over held-out photos {', '.join(n for n, _, _ in held)}"
        + (f"; DIR: {len(folder)} photo(s) in {args.eval_images}" if folder is not None else "")
        + f"; {METRIC_NOTES[task.kind]}; {len(preset.seeds)} seed(s); wall time {wall:.0f}s)"
    )

    # ---- files
    args.out.mkdir(parents=True, exist_ok=True)
    extra = {}
    written = ["results.json", "crops.png"]
    if spark_state is not None:
        extra["weight_map"] = save_weight_map(
            args.out / "spark_weight_map.png", spark_state[0], spark_state[1], teacher, held, preset, args.backend
        )
        written.append("spark_weight_map.png")
    save_crops(args.out / "crops.png", pictures, summary, held, zoom=96)  # "target" was added last: bottom row
    if histories:
        save_curves(args.out / "curves.png", histories)
        written.append("curves.png")
    report = {
        "spark_ext": spark_ext.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev_name,
        "backend_requested": args.backend,
        "backends": backends,
        "task": dataclasses.asdict(task),
        "preset": dataclasses.asdict(preset),
        "methods": methods,
        "held_out": [n for n, _, _ in held],
        "eval_images": None if folder is None else {"dir": str(args.eval_images), "images": [n for n, _, _ in folder]},
        "metric_notes": METRIC_NOTES[task.kind],
        "teacher": {k: v for k, v in teacher_info.items() if k != "losses"},
        "results": summary,
        "wall_seconds": wall,
        **extra,
    }
    with open(args.out / "results.json", "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {', '.join(written)} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
