"""``spark-ext export``: write a QAT model as ONNX (QuantizeLinear / DequantizeLinear) and check it.

Three modes:

* ``spark-ext export --model student.pt --input-shape 1,3,64,64 --out student.onnx``: a
  whole model saved with ``torch.save(model)`` (a pickle: load only files you trust),
  whose quantizers are initialised, is exported and run once with
  onnxruntime on a random input; the largest output difference to the
  fake-quantized model (in eval mode) is printed. A model with ``quantize_model`` layers
  goes through :func:`~spark_ext.quant.export_onnx`, a torch.ao ``prepare_qat`` model
  through :func:`~spark_ext.quant.export_prepared_onnx` (its observers switched off;
  int8 / uint8 codes, ``--no-int4`` or not).
* ``spark-ext export --model-factory pkg.module:build --state-dict student.pth ...``
  (or ``--model-factory path/to/script.py:build``, the script loaded from that file, so
  a class it defines works): ``build()`` returns the model with the trained model's
  structure (e.g. the float net after ``quantize_model`` with the training's options),
  the state dict (``torch.save(model.state_dict())``, loaded with ``weights_only=True``)
  fills it, then as ``--model``. The module, the function, its result and the state
  dict's keys are all checked before the export.
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
    src.add_argument(
        "--model-factory",
        metavar="MODULE:FN",
        help="pkg.module:fn or path/to/script.py:fn, a function that builds the model --state-dict fills",
    )
    src.add_argument("--demo", action="store_true", help="the demo's round trip: train a student, export, PSNR")
    p.add_argument("--out", type=Path, required=True, help="--model: the .onnx file to write; --demo: an output folder")
    p.add_argument("--state-dict", type=Path, help="--model-factory: the model's state dict (torch.save(state_dict))")
    p.add_argument(
        "--input-shape", type=_shape, help="--model / --model-factory: the example input's shape, e.g. 1,3,64,64"
    )
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
    if args.model_factory is None and args.state_dict is not None:
        p.error("--state-dict is only for --model-factory")
    if args.model is not None or args.model_factory is not None:
        flag = "--model" if args.model is not None else "--model-factory"
        if args.input_shape is None:
            p.error(f"{flag} needs --input-shape (e.g. 1,3,64,64)")
        if args.model is not None and not args.model.is_file():
            p.error(f"--model: no such file: {args.model}")
        if args.model_factory is not None:
            if args.state_dict is None:
                p.error("--model-factory needs --state-dict (the trained model's state dict)")
            if not args.state_dict.is_file():
                p.error(f"--state-dict: no such file: {args.state_dict}")
        if args.out.suffix != ".onnx":
            p.error(f"--out must name a .onnx file with {flag}, got {args.out}")
        why = writable_file_problem(args.out)
        if why:
            p.error(f"--out: {why}")
        demo_only = [f for f in ("steps", "teacher_steps") if getattr(args, f) is not None]
        if demo_only:
            p.error(f"--{demo_only[0].replace('_', '-')} is only for --demo")
    elif args.input_shape is not None:
        p.error("--input-shape is only for --model / --model-factory (--demo uses the held-out photos)")
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
    args.built_model = None
    if args.model_factory is not None:
        try:
            args.built_model = build_from_factory(args.model_factory, args.state_dict)
        except ValueError as exc:
            p.error(str(exc))
    return args


def _load_factory(spec: str):
    """The function ``spec`` names (``pkg.module:fn`` or ``path/to/script.py:fn``); ValueError naming the flag."""
    import importlib
    import importlib.util

    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise ValueError(f"--model-factory: expected pkg.module:fn or path/to/script.py:fn, got {spec!r}")
    if where.endswith(".py") or os.sep in where or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"--model-factory: no such file: {where}")
        module_name = f"_spark_ext_factory_{path.stem}"
        loader = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[module_name] = module  # classes defined in the script pickle and repr by this name
        try:
            loader.loader.exec_module(module)
        except Exception as exc:  # whatever the user's script raises on import
            del sys.modules[module_name]
            raise ValueError(f"--model-factory: importing {where} failed ({error_summary(exc)})") from None
    else:
        if os.getcwd() not in sys.path:  # as `python -m` does: the current folder's packages import
            sys.path.append(os.getcwd())
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            raise ValueError(f"--model-factory: no module named {exc.name or where!r}") from None
        except Exception as exc:  # whatever the module raises on import
            raise ValueError(f"--model-factory: importing {where} failed ({error_summary(exc)})") from None
    if not hasattr(module, name):
        raise ValueError(f"--model-factory: {where} has no function {name!r}")
    fn = getattr(module, name)
    if not callable(fn):
        raise ValueError(f"--model-factory: {where}:{name} is not callable (a {type(fn).__name__})")
    return fn


def _short(keys: list[str], limit: int = 5) -> str:
    more = f" ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def build_from_factory(spec: str, state_dict_path: Path):
    """``fn()`` of ``--model-factory`` with ``--state-dict`` loaded (strict); ValueError naming the flag."""
    from collections.abc import Mapping

    import torch

    fn = _load_factory(spec)
    try:
        model = fn()
    except Exception as exc:  # whatever the user's function raises
        raise ValueError(f"--model-factory: {spec}() raised {error_summary(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"--model-factory: {spec}() returned a {type(model).__name__}, not an nn.Module")
    try:
        state = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, a pickle of objects weights_only refuses, ...
        raise ValueError(
            f"--state-dict: cannot load {state_dict_path} ({error_summary(exc)}); expected "
            "torch.save(model.state_dict())"
        ) from None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"--state-dict: {state_dict_path} is not a state dict (a mapping of names to tensors)")
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        parts = [
            f"missing {_short(missing)}" if missing else "",
            f"unexpected {_short(unexpected)}" if unexpected else "",
        ]
        raise ValueError(
            f"--state-dict: its keys do not match the model of --model-factory: {'; '.join(p for p in parts if p)}"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:  # shape mismatches
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ValueError(f"--state-dict: does not fit the model of --model-factory: {lines[-1]}") from None
    return model


def _export_model(args: argparse.Namespace) -> int:
    import torch
    from torch.ao.quantization import FakeQuantizeBase, disable_observer

    from spark_ext.quant.export import export_onnx, export_prepared_onnx, run_onnx
    from spark_ext.quant.layers import QUANT_LAYERS

    if args.built_model is not None:
        model, flag = args.built_model, "--model-factory"
    else:
        flag = "--model"
        try:
            model = torch.load(args.model, map_location="cpu", weights_only=False)
        except Exception as exc:  # a truncated or foreign file: torch.load / pickle raise many kinds
            why = error_summary(exc)
            return _fail(f"--model: cannot load {args.model} ({why}); expected a model saved with torch.save(model)")
        if not isinstance(model, torch.nn.Module):
            return _fail(f"{args.model} holds a {type(model).__name__}, not a model saved with torch.save(model)")
    model = model.float().eval()
    # Route: spark_ext's layers, else a torch.ao prepare_qat model (observers off: fixed scales).
    prepared = not any(isinstance(m, QUANT_LAYERS) for m in model.modules()) and any(
        isinstance(m, FakeQuantizeBase) for m in model.modules()
    )
    if prepared:
        model.apply(disable_observer)
    try:
        x = torch.rand(args.input_shape)
        with torch.no_grad():
            ref = model(x)
    except Exception as exc:  # whatever the model raises on an input it does not take
        shape, why = list(args.input_shape), error_summary(exc)
        return _fail(f"--input-shape: the model of {flag} does not run on a {shape} input ({why})")
    try:
        with atomic_path(args.out) as tmp:  # replaced only once exported and run
            if prepared:
                export_prepared_onnx(model, x, tmp, opset=args.opset)
            else:
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
    from spark_ext.quant.export import ORT_BIAS_PASS, export_onnx, run_onnx

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
        sessions[name] = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"], disabled_optimizers=[ORT_BIAS_PASS]
        )
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
