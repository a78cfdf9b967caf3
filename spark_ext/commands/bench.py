"""``spark-ext bench``: run the benchmarks on this device or summarise saved runs; ratios, plots.

Usage::

    spark-ext bench                          # every benchmark (``--quick`` on CPU) -> ./spark-ext-bench
    spark-ext bench --only difficulty lsq    # a subset
    spark-ext bench --out DIR --plot PLOTS   # JSON to DIR, plots to PLOTS (default DIR/plots)
    spark-ext bench --from docs/benchmarks/*.json --plot plots/

The benchmarks are the ``bench_<name>`` modules of :mod:`spark_ext.benchmarks`, installed with the
package: each runs in its own process as ``python -m spark_ext.benchmarks.bench_<name> --out DIR
[--quick]`` and writes one JSON there; the report (:mod:`spark_ext.benchmarks.report`) then prints
every result it wrote and draws its plot (plots need matplotlib, the ``demo`` extra: without it the
report says so in one line and only the JSON is written).

With ``--from``, a bad file ends the command with exit status 2 and one line naming the file and what
is wrong with it, before any report; a bad file written by a benchmark this command ran is skipped
with a one-line warning, the others are reported, and the exit status is 1. So is a benchmark that
fails: the report covers those that ran.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from spark_ext._validation import writable_dir_problem
from spark_ext.benchmarks import report
from spark_ext.commands._args import CommandParser

BENCHMARKS_PACKAGE = "spark_ext.benchmarks"  # its bench_<name> modules are the benchmarks


def benchmark_names() -> list[str]:
    """The benchmarks that can run: ``<name>`` of every ``bench_<name>`` module of the benchmarks package."""
    package = importlib.import_module(BENCHMARKS_PACKAGE)
    modules = (m.name for m in pkgutil.iter_modules(package.__path__))
    return sorted(name.removeprefix("bench_") for name in modules if name.startswith("bench_"))


def _run_benchmarks(names: Sequence[str], quick: bool, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Run each benchmark in its own process; returns the result files they wrote and the modules that failed."""
    started = time.time()
    failed = []
    for name in names:
        module = f"{BENCHMARKS_PACKAGE}.bench_{name}"
        cmd = [sys.executable, "-m", module, "--out", str(out_dir)] + (["--quick"] if quick else [])
        print(f"$ {' '.join(cmd)}", flush=True)
        result = subprocess.run(cmd)
        if result.returncode != 0:
            print(f"spark-ext bench: {module} failed with exit code {result.returncode}", file=sys.stderr)
            failed.append(module)
    paths = sorted(p for p in out_dir.glob("*.json") if p.stat().st_mtime >= started - 1)
    return paths, failed


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[list[dict]]:
    """Check every argument before any work (``parser.error``: one line, exit 2); settles ``args.only``
    (the benchmarks to run, by name) and ``args.plot`` (None: no plots).

    Returns the loaded runs of ``--from`` (None when the benchmarks are to run).
    """
    if args.plot is not None:
        why = report.plots_unavailable() or writable_dir_problem(args.plot)
        if why:
            parser.error(f"argument --plot: {why}")
    if args.files:
        if args.only:
            parser.error("argument --only: selects benchmarks to run; it cannot be combined with --from")
        if args.quick is not None:
            parser.error("arguments --quick/--full: size benchmarks to run; they cannot be combined with --from")
        try:
            return report.load(args.files)
        except (OSError, ValueError) as exc:  # missing/unreadable file, bad JSON, not a result
            parser.error(f"argument --from: {exc}")
    names = benchmark_names()
    unknown = [n for n in args.only if n.removeprefix("bench_") not in names]
    if unknown:
        parser.error(f"argument --only: no benchmark called {unknown}; choose from {', '.join(names)}")
    args.only = sorted({n.removeprefix("bench_") for n in args.only}) or names
    why = writable_dir_problem(args.out)
    if why:
        parser.error(f"argument --out: {why}")
    if args.plot is None:
        no_plots = report.plots_unavailable()
        if no_plots:
            print(f"spark-ext bench: JSON only: {no_plots}", file=sys.stderr)
        else:
            args.plot = args.out / "plots"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = CommandParser(prog="spark-ext bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="files", nargs="+", type=Path, help="saved result JSONs to summarise")
    parser.add_argument("--only", nargs="+", default=[], help="benchmarks to run (e.g. difficulty lsq)")
    parser.add_argument("--quick", action="store_true", default=None, help="small sizes (default on CPU)")
    parser.add_argument("--full", dest="quick", action="store_false", help="full sizes even on CPU")
    parser.add_argument(
        "--out", type=Path, default=report.DEFAULT_OUT, help="where runs write JSON (default ./spark-ext-bench)"
    )
    parser.add_argument(
        "--plot", type=Path, default=None, help="write PNG plots to this folder (default when running: OUT/plots)"
    )
    args = parser.parse_args(argv)
    runs = _check_args(parser, args)
    failed: list[str] = []
    if runs is None:
        import torch

        quick = (not torch.cuda.is_available()) if args.quick is None else args.quick
        paths, failed = _run_benchmarks(args.only, quick, args.out)
        if not paths:
            print("spark-ext bench: the benchmarks wrote no results", file=sys.stderr)
            return 1
        runs, problems = report.load_each(paths)
        for problem in problems:  # a benchmark wrote a file the report cannot read: skipped, and the run fails
            print(f"spark-ext bench: skipping {problem}", file=sys.stderr)
            failed.append(problem.split(":", 1)[0])
    for run in runs:
        report.print_report(run, args.plot)
    if failed:
        # The report above covers the benchmarks that ran; the exit code says some did not.
        print(f"spark-ext bench: {len(failed)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
