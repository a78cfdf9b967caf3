"""Command line: ``spark-ext demo | bench | study | diagnose-credit | classify | daqakd | diffkd | export | doctor``.

Also ``python -m spark_ext.cli``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import platform
import sys
from collections.abc import Sequence
from typing import Optional


def positive_int(text: str) -> int:
    """argparse ``type`` of the subcommands' counts (steps, seeds, threads, ...): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse ``type`` of the subcommands' positive reals (learning rates, KD weights): a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _doctor(_: argparse.Namespace) -> int:
    import torch

    import spark_ext

    print(f"spark_ext {spark_ext.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError as exc:  # triton is optional off Linux
        print(f"triton: not importable ({exc})")
    cuda = torch.cuda.is_available()
    print(f"CUDA available: {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    try:
        from spark_ext import _extension

        print(f"C++/CUDA library: {_extension.status()}")
        print(f"  CUDA kernels: {_extension.cuda_status()}")
        print(f"  huge-page outputs: {_extension.huge_page_status()}")
        print(f"  huge-page cache: {_extension.huge_page_cache_status()}")
    except ImportError:
        print("C++/CUDA library: not part of this build")
    print(f"default backend: {spark_ext.get_default_backend()}")
    for op, backends in spark_ext.available_backends().items():
        rows = [name + ("" if reason is None else f" (unavailable: {reason})") for name, reason in backends.items()]
        print(f"  {op}: {', '.join(rows)}")
    return 0


# Subcommands with their own argument parsers; everything after the name is theirs.
_DELEGATED = {
    "demo": ("spark_ext.demo.cli", "train and compare QAT/KD/SPARK students on real photos"),
    "bench": ("spark_ext.benchreport", "run or summarise the benchmarks, print ratios, draw plots"),
    "study": ("spark_ext.study", "paired-seed method matrix (QAT, KD, maps, balancers, DFD, SPARK variants)"),
    "diagnose-credit": ("spark_ext.diagnose_credit", "does a policy signal predict the cells' held-out effect?"),
    "export": ("spark_ext.export_cli", "write a QAT model as ONNX (QuantizeLinear/DequantizeLinear), check it"),
    "classify": ("spark_ext.classify", "W4A4 digit classifiers: QAT vs logit KD, GoR, LMR, ensemble over paired seeds"),
    "diffkd": (
        "spark_ext.diffkd_study",
        "W4A4 denoisers: output KD vs DFD vs DiffKD feature denoising over paired seeds",
    ),
    "daqakd": (
        "spark_ext.daqakd_study",
        "rank augmentations by the DA-QAKD metric and test the ranking over paired seeds",
    ),
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _DELEGATED:
        return int(importlib.import_module(_DELEGATED[argv[0]][0]).main(argv[1:]) or 0)
    parser = argparse.ArgumentParser(prog="spark-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="print devices, backends, library build status, versions").set_defaults(func=_doctor)
    for name, (_, text) in _DELEGATED.items():
        sub.add_parser(name, help=text + f" (see `spark-ext {name} --help`)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
