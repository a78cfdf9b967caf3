"""``spark-ext demo``: W4A4 students of a restoration network on real photos (also ``python -m spark_ext.demo``).

The command line: its arguments, all checked before any work (:func:`parse_args`), and :func:`main`, the
steps of a run. What the demo does is described in :mod:`spark_ext.demo`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

import spark_ext
from spark_ext._validation import writable_dir_problem
from spark_ext.atomic import write_json
from spark_ext.commands._args import CommandParser, add_seeds_argument, core_count, parse_device, positive_int
from spark_ext.data import HELD_OUT_PHOTOS, TRAIN_PHOTOS, RestorationTask, held_out_pairs, image_folder_pairs
from spark_ext.demo.compare import Comparison, compare_methods
from spark_ext.demo.figures import save_crops, save_curves, save_weight_map
from spark_ext.demo.presets import DEFAULT_METHODS, METHODS, PRESETS, Preset
from spark_ext.demo.report import build_report, summarize, table_note
from spark_ext.demo.teacher import get_teacher, teacher_problem
from spark_ext.metrics import SSIM_WINDOW

# The files a demo run writes in --out.
OUT_FILES = ("results.json", "crops.png", "spark_weight_map.png", "curves.png")
# The spark_ext ops a demo run calls; --backend must be available for each of them.
DEMO_OPS = ("difficulty_signals", "fused_weighted_kd", "lsq_fake_quant")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    presets = "; ".join(
        f"{p.name}: {p.student_steps} student steps, {p.teacher_steps} teacher steps, width {p.width}, "
        f"{len(p.seeds)} seed(s)"
        for p in PRESETS.values()
    )
    p = CommandParser(
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
    add_seeds_argument(p, None, "student seeds")
    p.add_argument("--steps", type=positive_int, default=None, help="student training steps (default: the preset's)")
    p.add_argument(
        "--teacher-steps",
        type=positive_int,
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
        type=core_count,
        default=None,
        help="CPU threads for torch, at most the cores (default: half the cores, at least 1; on a busy machine more "
        "threads than free cores make every op wait on the others)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


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
        args.torch_device = parse_device(args.device, "the demo")
    except ValueError as exc:
        p.error(f"argument --device: {exc}")
    like = torch.empty(1, device=args.torch_device)
    for op in DEMO_OPS:
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
    why = writable_dir_problem(args.out, files=OUT_FILES)
    if why:
        p.error(f"argument --out: {why}")
    if not args.no_cache:
        why = writable_dir_problem(args.cache_dir)
        if why:
            p.error(f"argument --cache-dir: {why}; pass --no-cache to train the teacher without caching it")
    retrain = args.retrain_teacher or args.teacher_steps is not None
    why = teacher_problem(RestorationTask(args.task), PRESETS[args.preset], None, retrain)  # the cache: above
    if why:
        p.error(why)


def _resolve_backends(device: torch.device, backend: str) -> dict[str, str]:
    """Which backend each op runs on this device (float32 inputs) under ``backend``."""
    like = torch.empty(1, device=device)
    out = {}
    for op in DEMO_OPS:
        try:
            out[op] = spark_ext.backend_for(op, like, backend)
        except Exception as exc:  # report, and let the real call raise with its own message
            out[op] = f"unavailable ({exc})"
    return out


def _preset(args: argparse.Namespace) -> Preset:
    """The chosen preset with --steps, --teacher-steps and --seeds applied."""
    replace: dict[str, Any] = {}
    if args.steps is not None:
        replace["student_steps"] = args.steps
    if args.teacher_steps is not None:
        replace["teacher_steps"] = args.teacher_steps
    if args.seeds is not None:
        replace["seeds"] = args.seeds
    return dataclasses.replace(PRESETS[args.preset], **replace)


def _set_up(args: argparse.Namespace, device: torch.device) -> bool:
    """Default backend and CPU threads; False (with a message) when the QAT toolkit cannot be imported."""
    spark_ext.set_default_backend(args.backend)
    if device.type == "cpu":
        threads = args.threads if args.threads is not None else max(1, (os.cpu_count() or 2) // 2)
        torch.set_num_threads(threads)
    try:
        importlib.import_module("spark_ext.quant")
    except ImportError as exc:
        print(f"spark_ext.quant is not available ({exc}); the demo needs the QAT toolkit", file=sys.stderr)
        return False
    return True


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _print_plan(args, task: RestorationTask, preset: Preset, device_name: str, backends: dict[str, str]) -> None:
    print(
        f"spark_ext {spark_ext.__version__} demo: task={task.kind} preset={preset.name} device={device_name} "
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
    if args.eval_folder is not None:
        print(f"extra evaluation: {len(args.eval_folder)} photo(s) in {args.eval_images} (whole photos)")


def _save_figures(
    out: Path, run: Comparison, summary: dict, teacher: nn.Module, held, preset: Preset, backend: str
) -> tuple[list[str], dict[str, Any]]:
    """crops.png, spark_weight_map.png (with SPARK) and curves.png (with a trained method) in ``out``;
    returns the file names and the weight map's statistics for results.json."""
    written, extra = ["results.json", "crops.png"], {}
    if run.spark is not None:
        distiller, student = run.spark
        path = out / "spark_weight_map.png"
        extra["weight_map"] = save_weight_map(path, distiller, student, teacher, held, preset, backend)
        written.append("spark_weight_map.png")
    save_crops(out / "crops.png", run.pictures, summary, held, zoom=96)  # "target" was added last: bottom row
    if run.histories:
        save_curves(out / "curves.png", run.histories)
        written.append("curves.png")
    return written, extra


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    wall0 = time.perf_counter()
    preset, task, device = _preset(args), RestorationTask(args.task), args.torch_device
    if not _set_up(args, device):
        return 1
    backends, device_name = _resolve_backends(device, args.backend), _device_name(device)
    _print_plan(args, task, preset, device_name, backends)

    held = held_out_pairs(task, preset.eval_size, device=device)
    folder = None if args.eval_folder is None else [(n, x.to(device), y.to(device)) for n, x, y in args.eval_folder]
    cache_dir = None if args.no_cache else args.cache_dir
    retrain = args.retrain_teacher or args.teacher_steps is not None
    teacher, teacher_info = get_teacher(task, preset, device, cache_dir, args.quiet, retrain=retrain)
    teacher.requires_grad_(False)
    run = compare_methods(teacher, task, preset, args.method_list, held, folder, device, args.quiet)

    summary, table = summarize(run, with_folder=folder is not None)
    wall = time.perf_counter() - wall0
    print(f"\n{table}\n\n{table_note(task, held, folder, args.eval_images, len(preset.seeds), wall)}")

    args.out.mkdir(parents=True, exist_ok=True)
    written, extra = _save_figures(args.out, run, summary, teacher, held, preset, args.backend)
    report = build_report(
        device_name=device_name,
        backend=args.backend,
        backends=backends,
        task=task,
        preset=preset,
        methods=args.method_list,
        held=held,
        eval_images=args.eval_images,
        folder=folder,
        teacher_info=teacher_info,
        summary=summary,
        wall_seconds=wall,
        extra=extra,
    )
    write_json(args.out / "results.json", report)
    print(f"wrote {', '.join(written)} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
