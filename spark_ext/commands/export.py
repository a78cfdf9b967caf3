"""``spark-ext export``: write a QAT model as ONNX (QuantizeLinear / DequantizeLinear) and check it.

Two modes:

* ``spark-ext export --model student.pt --input-shape 1,3,64,64 --out student.onnx``: a
  whole model saved with ``torch.save(model)`` (a pickle: load only files you trust),
  whose quantized layers are initialised, is exported and run once with
  onnxruntime on a random input; the largest output difference to the
  fake-quantized model is printed.
* ``spark-ext export --demo --out DIR``: the demo's round trip on real photos. It
  trains (or loads from the cache) the demo's FP32 teacher, quantizes a copy to
  W{bits}A{bits}, calibrates and trains it (QAT, the demo's data and budget),
  exports it, and prints the PSNR on the held-out photos of the fake-quantized
  model and of the exported model under onnxruntime (default fused integer
  kernels, and unfused); writes ``DIR/student.onnx``, ``DIR/student.pt`` and
  ``DIR/export_report.json``.

Needs the ``[export]`` extra (``--demo`` also the ``[demo]`` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from spark_ext._validation import writable_dir_problem, writable_file_problem
from spark_ext.atomic import atomic_path, write_json
from spark_ext.commands._args import CommandParser, core_count, error_summary, int_in

DEMO_FILES = ("student.onnx", "student.pt", "export_report.json")  # what --demo writes in --out


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints like 1,3,64,64, got {text!r}"
        ) from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive ints like 1,3,64,64, got {text!r}")
    return dims


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    from spark_ext.demo.presets import METHODS, PRESETS

    p = CommandParser(
        prog="spark-ext export",
        description="Write a QAT model as ONNX with QuantizeLinear/DequantizeLinear and check it under onnxruntime.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="a model saved with torch.save(model) (pickle: trusted files only)")
    src.add_argument("--demo", action="store_true", help="the demo's round trip: train a student, export, PSNR")
    p.add_argument("--out", type=Path, required=True, help="--model: the .onnx file to write; --demo: an output folder")
    p.add_argument("--input-shape", type=_shape, help="--model: the example input's shape, e.g. 1,3,64,64")
    p.add_argument(
        "--opset",
        type=int_in(18),
        default=21,
        help="ONNX opset, 18 to the installed onnx's newest; 4-bit types need 21 (default: %(default)s)",
    )
    p.add_argument("--no-int4", action="store_true", help="store 2..4-bit operands in int8/uint8 instead of INT4/UINT4")
    p.add_argument("--preset", choices=tuple(PRESETS), default="default", help="--demo: budget (default: %(default)s)")
    p.add_argument("--task", choices=("denoise", "sr"), default="denoise", help="--demo: task (default: %(default)s)")
    p.add_argument(
        "--bits", type=int_in(2, 8), default=8, help="--demo: weight and activation bits, 2..8 (default: %(default)s)"
    )
    p.add_argument(
        "--method", choices=tuple(METHODS), default="qat", help="--demo: student training (default: %(default)s)"
    )
    p.add_argument("--steps", type=int_in(1), default=None, help="--demo: student steps (default: the preset's)")
    p.add_argument(
        "--teacher-steps", type=int_in(1), default=None, help="--demo: teacher steps (default: the preset's)"
    )
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spark_ext" / "teachers"
    p.add_argument("--cache-dir", type=Path, default=default_cache, help="--demo: teacher cache (default %(default)s)")
    p.add_argument(
        "--threads", type=core_count, default=None, help="CPU threads for torch, at most the cores (default: torch's)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    # Every check before any work.
    if not args.no_int4 and args.opset < 21:
        p.error(f"--opset {args.opset} has no INT4/UINT4: use --opset 21 or --no-int4")
    if args.model is not None:
        if args.input_shape is None:
            p.error("--model needs --input-shape (e.g. 1,3,64,64)")
        if not args.model.is_file():
            p.error(f"--model: no such file: {args.model}")
        if args.out.suffix != ".onnx":
            p.error(f"--out must name a .onnx file with --model, got {args.out}")
        why = writable_file_problem(args.out)
        if why:
            p.error(f"--out: {why}")
        demo_only = [f for f in ("steps", "teacher_steps") if getattr(args, f) is not None]
        if demo_only:
            p.error(f"--{demo_only[0].replace('_', '-')} is only for --demo")
    elif args.input_shape is not None:
        p.error("--input-shape is only for --model (--demo uses the held-out photos)")
    if args.demo:
        if args.out.exists() and not args.out.is_dir():
            p.error(f"--out must be a folder with --demo, got the file {args.out}")
        why = writable_dir_problem(args.out, files=DEMO_FILES)
        if why:
            p.error(f"--out: {why}")
        from spark_ext.data import RestorationTask
        from spark_ext.demo.teacher import teacher_problem

        why = teacher_problem(RestorationTask(args.task), PRESETS[args.preset], args.cache_dir)
        if why:
            p.error(why)
    for module in ("onnx", "onnxscript", "onnxruntime") + (("skimage",) if args.demo else ()):
        try:
            __import__(module)
        except ImportError:
            extra = "demo" if module == "skimage" else "export"
            p.error(f"{module} is not installed: pip install 'spark_ext[{extra}]'")
    import onnx

    if args.opset > onnx.defs.onnx_opset_version():
        p.error(f"--opset: expected at most {onnx.defs.onnx_opset_version()} (the installed onnx), got {args.opset}")
    return args


def _export_model(args: argparse.Namespace) -> int:
    import torch

    from spark_ext.quant.export import export_onnx, run_onnx

    try:
        model = torch.load(args.model, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file: torch.load / pickle raise many kinds
        why = error_summary(exc)
        return _fail(f"--model: cannot load {args.model} ({why}); expected a model saved with torch.save(model)")
    if not isinstance(model, torch.nn.Module):
        return _fail(f"{args.model} holds a {type(model).__name__}, not a model saved with torch.save(model)")
    model = model.float().eval()
    try:
        x = torch.rand(args.input_shape)
        with torch.no_grad():
            ref = model(x)
    except Exception as exc:  # whatever the model raises on an input it does not take
        shape, why = list(args.input_shape), error_summary(exc)
        return _fail(f"--input-shape: the model does not run on a {shape} input ({why})")
    try:
        with atomic_path(args.out) as tmp:  # replaced only once exported and run
            export_onnx(model, x, tmp, opset=args.opset, int4=not args.no_int4)
            diff = float((run_onnx(tmp, x) - ref).abs().max())
    except ValueError as exc:  # no quantized layer, an uninitialised quantizer, ...
        return _fail(str(exc))
    print(f"wrote {args.out}; onnxruntime vs fake-quant model on a random input: max |diff| {diff:.3g}")
    return 0


def _fail(message: str) -> int:
    """One line on stderr, exit status 2."""
    print(f"spark-ext export: error: {message}", file=sys.stderr)
    return 2


def _export_demo(args: argparse.Namespace) -> int:
    import copy

    import onnxruntime as ort
    import torch

    from spark_ext.data import RandomCropBatches, RestorationTask, held_out_pairs
    from spark_ext.demo.presets import PRESETS
    from spark_ext.demo.scoring import model_outputs, score_outputs
    from spark_ext.demo.teacher import get_teacher
    from spark_ext.demo.training import train_student
    from spark_ext.quant import calibrate, quantize_model
    from spark_ext.quant.export import export_onnx, run_onnx

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    replace = {k: v for k, v in (("student_steps", args.steps), ("teacher_steps", args.teacher_steps)) if v is not None}
    preset = dataclasses.replace(preset, **replace)
    device = torch.device("cpu")  # the comparison is against onnxruntime on CPU
    task = RestorationTask(args.task)
    seed = preset.seeds[0]
    t0 = time.perf_counter()
    teacher, _ = get_teacher(task, preset, device, args.cache_dir, args.quiet)
    teacher.requires_grad_(False)

    base = copy.deepcopy(teacher)
    base.requires_grad_(True)
    report = quantize_model(base, w_bits=args.bits, a_bits=args.bits, first_last_bits=max(args.bits, 8))
    data = RandomCropBatches(task, preset.crop, preset.batch, seed=20_000 + seed, device=device)
    calibrate(base, [next(data)[0] for _ in range(preset.calib_batches)], method=preset.calib_method)
    student, _, _, seconds = train_student(args.method, base, teacher, task, preset, seed, device, args.quiet)
    print(
        f"student: W{args.bits}A{args.bits} ({len(report.quantized)} layers; first/last {max(args.bits, 8)}-bit), "
        f"{args.method} for {preset.student_steps} steps in {seconds:.0f}s"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out / "student.onnx"
    held = held_out_pairs(task, preset.eval_size, device=device)
    with atomic_path(onnx_path) as tmp:
        export_onnx(student, held[0][1], tmp, opset=args.opset, int4=not args.no_int4)
    with atomic_path(args.out / "student.pt") as tmp:
        torch.save(student, tmp)

    sessions = {}
    for name, level in (
        ("onnx_fused", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        ("onnx_unfused", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
    ):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        sessions[name] = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    outputs = {
        "fp32_teacher": model_outputs(teacher, held),
        "fake_quant": model_outputs(student, held),
        **{k: {n: run_onnx(None, x, session=s).clamp(0, 1) for n, x, _ in held} for k, s in sessions.items()},
    }
    scores = {k: score_outputs(v, held, task) for k, v in outputs.items()}
    fq = scores["fake_quant"]["psnr"]
    print(
        f"PSNR on held-out photos {', '.join(n for n, _, _ in held)} "
        f"({'whole photos' if preset.eval_size is None else f'{preset.eval_size}px centre crops'}):"
    )
    for k, s in scores.items():
        delta = "" if k in ("fake_quant", "fp32_teacher") else f"  ({s['psnr'] - fq:+.4f} dB vs fake-quant)"
        print(f"  {k:<13} {s['psnr']:.4f} dB{delta}")
    result = {
        "task": args.task,
        "preset": dataclasses.asdict(preset),
        "bits": args.bits,
        "method": args.method,
        "opset": args.opset,
        "int4": not args.no_int4,
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "held_out": [n for n, _, _ in held],
        "psnr": {k: s["psnr"] for k, s in scores.items()},
        "per_image": {k: s["per_image"] for k, s in scores.items()},
        "psnr_delta_onnx_fused_vs_fake_quant": scores["onnx_fused"]["psnr"] - fq,
        "psnr_delta_onnx_unfused_vs_fake_quant": scores["onnx_unfused"]["psnr"] - fq,
        "wall_seconds": time.perf_counter() - t0,
    }
    write_json(args.out / "export_report.json", result)
    print(f"wrote {onnx_path}, student.pt and export_report.json in {args.out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return _export_demo(args) if args.demo else _export_model(args)


if __name__ == "__main__":
    sys.exit(main())
