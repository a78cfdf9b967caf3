"""Command line: ``spark-ext demo | bench | study | diagnose-credit | classify | daqakd | diffkd | export | doctor``.

Also ``python -m spark_ext.cli``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, Optional

# Largest seed a command takes: numpy's limit, and far enough below torch's (2**64 - 1) for the offsets the
# commands add to it (a seed per data stream).
MAX_SEED = 2**32 - 1
MAX_SEEDS = 1000


class CommandParser(argparse.ArgumentParser):
    """The commands' argument parser: an error is one line on stderr (``prog: error: message``), exit 2.

    argparse's default prints the whole usage block first; the one line names the argument and what is
    wrong, and ``--help`` still shows the usage.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def int_in(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse ``type``: an integer in ``[low, high]`` (``high`` None: no upper bound)."""
    expected = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value

    return parse


# A seed: an integer in [0, MAX_SEED].
seed_int = int_in(0, MAX_SEED)
# A number of paired seeds (seeds 0..n-1): far above what a study uses; a typo such as 10**9 would
# otherwise hang building the list of seeds.
seed_count = int_in(1, MAX_SEEDS)
# CPU threads for torch, or worker processes: up to the machine's cores (torch crashes on absurd thread
# counts, each worker loads torch, and more of either than cores only makes every op wait on the others).
core_count = int_in(1, os.cpu_count() or 1)


def parse_device(text: str, who: str = "this command"):
    """``--device``: 'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N' -> ``torch.device``.

    Raises ValueError saying what is wrong: not a device, a kind the commands do not run on ('meta',
    'mps', ...), CUDA not available, or no such CUDA device.
    """
    import torch

    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{who} runs on 'cpu' or 'cuda', got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{text!r} asked for, but CUDA is not available here (torch {torch.__version__}); use cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{text!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def repeated(items: Sequence[str]) -> list[str]:
    """The entries of ``items`` given more than once (sorted), for the commands' comma-separated lists."""
    return sorted({item for item in items if list(items).count(item) > 1})


def error_summary(exc: BaseException, limit: int = 160) -> str:
    """``exc`` as one short line for a command's error message: its type and the first line of its text."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def parse_names(text: str, flag: str, choices: Sequence[str]) -> list[str]:
    """A comma-separated list of distinct names from ``choices`` (``flag`` names the argument in the
    one-line ValueError)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in choices]
    if bad or not names:
        raise ValueError(f"{flag}: unknown {bad or 'empty'}; choose from {','.join(choices)}")
    if repeated(names):
        raise ValueError(f"{flag}: {repeated(names)} given more than once (each is run once)")
    return names


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
    parser = CommandParser(prog="spark-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("doctor", help="print devices, backends, library build status, versions").set_defaults(func=_doctor)
    for name, (_, text) in _DELEGATED.items():
        sub.add_parser(name, help=text + f" (see `spark-ext {name} --help`)")
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
