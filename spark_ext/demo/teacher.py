"""The demo's FP32 teacher: the one shipped with the package where it fits the preset, else trained
(:func:`train_teacher`) and cached under a hash of everything that determines its weights."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from spark_ext._validation import error_summary, writable_dir_problem
from spark_ext.atomic import atomic_path
from spark_ext.data import TRAIN_PHOTOS, RandomCropBatches, RestorationTask
from spark_ext.demo.presets import Preset
from spark_ext.demo.training import cosine_schedule
from spark_ext.distill import per_image_loss
from spark_ext.models import PRETRAINED_TEACHERS, build_model, load_pretrained_teacher
from spark_ext.models.pretrained import verify_pretrained_teacher
from spark_ext.progress import progress

TEACHER_FORMAT = "spark_ext-teacher-v2"  # v2: SR inputs from the MATLAB-style bicubic downscale


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
    sched = cosine_schedule(opt, preset.teacher_steps)
    losses = []
    for _ in progress(range(preset.teacher_steps), "FP32 teacher", quiet=quiet):
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


def teacher_problem(
    task: RestorationTask, preset: Preset, cache_dir: Optional[Path], retrain: bool = False
) -> Optional[str]:
    """For the commands' checks before any work: None, or why :func:`get_teacher` (same arguments) cannot
    give the teacher: the shipped one missing or not its recorded sha256, or, for a teacher it trains,
    ``cache_dir`` not a writable folder (the message then starts with ``--cache-dir``)."""
    if not retrain and uses_pretrained_teacher(task, preset):
        try:
            verify_pretrained_teacher(task.kind)
        except (OSError, RuntimeError) as exc:
            return str(exc)
        return None
    why = None if cache_dir is None else writable_dir_problem(cache_dir)
    return None if why is None else f"--cache-dir: {why}"


def _load_cached_teacher(
    path: Path, key: str, task: RestorationTask, preset: Preset, device: torch.device
) -> Optional[nn.Module]:
    """The teacher cached at ``path`` for ``key``, or None: a file of another key (a digest collision), or
    one that cannot be read (truncated, not a teacher, ...: a one-line warning). None makes the caller
    retrain and rewrite the file."""
    try:
        blob = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(blob, dict) or "key" not in blob or "state_dict" not in blob:
            raise ValueError("not a cached teacher (expected a dict with 'key' and 'state_dict')")
        if blob["key"] != key:
            return None
        model = build_model(task.kind, preset.width, depth=preset.depth, scale=task.scale).to(device)
        model.load_state_dict(blob["state_dict"])
    except Exception as exc:  # any unreadable file is a cache miss: torch.load raises many kinds
        print(f"warning: teacher cache {path} is unreadable ({error_summary(exc)}); retraining it", file=sys.stderr)
        return None
    return model


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
    key = json.dumps(_teacher_key(task, preset), sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir / f"{digest}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        model = _load_cached_teacher(path, key, task, preset, device)
        if model is not None:
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
        with atomic_path(path) as tmp:  # a concurrent or interrupted run never leaves half a file
            torch.save({"key": key, "state_dict": model.state_dict()}, tmp)
        print(f"teacher: cached at {path}")
    return model.eval(), {
        "pretrained": False,
        "steps": preset.teacher_steps,
        "cached": False,
        "path": str(path) if path else None,
        "seconds": seconds,
        "losses": losses,
    }
