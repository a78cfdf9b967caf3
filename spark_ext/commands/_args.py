"""What the ``spark-ext`` commands share: the one-line-error parser, argument types, run metadata.

One meaning per argument everywhere: ``--seeds`` is a count (``5``: seeds 0..4) or a comma-separated
list (``0,3,7``; one given seed is ``7,``), see :func:`seeds`.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, Optional

from spark_ext._validation import error_summary, writable_file_problem  # noqa: F401  (error_summary: re-exported)

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


def seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: a count ``N`` (seeds ``0..N-1``, N in [1, MAX_SEEDS]) or distinct comma-separated seeds
    (``0,3,7``; a single chosen seed is ``7,``), each in [0, MAX_SEED]."""
    if "," not in text:
        return tuple(range(seed_count(text)))
    try:
        chosen = tuple(seed_int(s.strip()) for s in text.split(",") if s.strip())
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"a seed {exc}") from None
    if not chosen:
        raise argparse.ArgumentTypeError(f"expected a count N or seeds such as 0,3,7, got {text!r}")
    if repeated([str(s) for s in chosen]):
        raise argparse.ArgumentTypeError(f"seeds {repeated([str(s) for s in chosen])} given more than once")
    return chosen


def add_seeds_argument(parser: argparse.ArgumentParser, default: Optional[str], what: str = "paired seeds") -> None:
    """``--seeds`` with its one meaning (:func:`seeds`); ``default`` None: the command's preset decides."""
    shown = "the preset's" if default is None else default
    parser.add_argument(
        "--seeds",
        type=seeds,
        default=None if default is None else seeds(default),
        help=f"{what}: a count N (seeds 0..N-1) or a list such as 0,3,7 (default: {shown})",
    )


def environment() -> dict[str, Any]:
    """Where a run happened, recorded in its results JSON: date (UTC), platform, torch and its CPU threads."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def add_digits_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments ``spark-ext classify`` and ``spark-ext daqakd`` share (digits data, teacher, students)."""
    add_seeds_argument(parser, "0,1,2,3,4", "student seeds, paired across methods")
    parser.add_argument("--steps", type=int, default=300, help="student training steps")
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--teacher-width", type=int, default=32)
    parser.add_argument("--teacher-seed", type=seed_int, default=0)
    parser.add_argument("--width", type=int, default=8, help="student width")
    parser.add_argument("--bits", type=int, default=4, help="student W/A bits (first and last layer: 8)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")


def check_digits_arguments(args: argparse.Namespace) -> list[int]:
    """Check :func:`add_digits_arguments`'s values; returns the seeds. Raises ValueError with one line."""
    seeds = list(args.seeds)
    for name in ("steps", "teacher_steps", "teacher_width", "width", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 2 <= args.bits <= 16:
        raise ValueError(f"--bits must be in [2, 16], got {args.bits}")
    if not (args.lr > 0 and math.isfinite(args.lr)) or not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--lr and --temperature must be finite and > 0, got {args.lr}, {args.temperature}")
    why = None if args.out is None else writable_file_problem(args.out)
    if why:
        raise ValueError(f"--out: {why}")
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ValueError("the digits data needs scikit-learn: pip install 'spark_ext[demo]'") from None
    return seeds
