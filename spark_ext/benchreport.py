"""``spark-ext bench``: run the benchmarks or summarise saved runs, print ratios, draw plots.

Usage::

    spark-ext bench                       # run every bench/bench_*.py (``--quick`` on CPU), then report
    spark-ext bench --only difficulty lsq # run a subset
    spark-ext bench --from bench/results/*.json --plot docs/img

The report reads the row schema of ``bench/common.py``: for each op, case and
pass it prints our time, each peer's time, the ratio peer/ours (> 1 means we
are faster), achieved bandwidth as a fraction of a device copy measured in
the same run, and peak extra memory. ``--plot DIR`` writes one PNG per
benchmark: speed-ups over each peer, and bandwidth as a fraction of copy.

Running needs the source tree (the ``bench/`` folder is not installed with
the package); ``--from`` works anywhere.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from ._validation import writable_dir_problem

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
PEERS = ("eager", "compiled", "torch")


def _run_benchmarks(only: Sequence[str], quick: bool, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Run the bench scripts; returns the result files they wrote and the names of those that failed."""
    if not BENCH_DIR.is_dir():
        raise SystemExit(f"spark-ext bench: no bench/ folder next to the package ({BENCH_DIR}); use --from FILE")
    scripts = sorted(BENCH_DIR.glob("bench_*.py"))
    if only:
        scripts = [s for s in scripts if any(s.stem == f"bench_{name}" or s.stem == name for name in only)]
        if not scripts:
            raise SystemExit(f"spark-ext bench: no benchmark matches {list(only)}")
    started = time.time()
    failed = []
    for script in scripts:
        cmd = [sys.executable, str(script), "--out", str(out_dir)] + (["--quick"] if quick else [])
        print(f"$ {' '.join(cmd)}", flush=True)
        result = subprocess.run(cmd, cwd=REPO_ROOT)
        if result.returncode != 0:
            print(f"spark-ext bench: {script.name} failed with exit code {result.returncode}", file=sys.stderr)
            failed.append(script.name)
    paths = sorted(p for p in out_dir.glob("*.json") if p.stat().st_mtime >= started - 1)
    return paths, failed


def load(paths: Sequence[Path]) -> list[dict]:
    runs = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or "rows" not in data:
            raise ValueError(f"{path}: not a spark_ext benchmark result (no 'rows')")
        data["path"] = str(path)
        runs.append(data)
    return runs


def summarise(run: dict) -> list[dict]:
    """One line per (op, case, pass): our ms, peers' ratios, bandwidth fraction, peak memory."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for row in run["rows"]:
        groups[(row["op"], row["case"], row["pass"])][row["impl"]] = row
    lines = []
    for (op, case, pass_), impls in groups.items():
        ours = impls.get("ours")
        if ours is not None and ours.get("ms") is None:  # our run failed: its row carries the error
            ours = None
        line = {"op": op, "case": case, "pass": pass_, "ours_ms": ours["ms"] if ours else None}
        for peer in PEERS:
            if peer in impls and ours and impls[peer].get("ms") is not None:
                line[f"x_{peer}"] = impls[peer]["ms"] / ours["ms"]
        if ours:
            line["copy_frac"] = ours.get("copy_fraction")
            peak = ours.get("peak_extra_bytes")
            line["peak_MiB"] = None if peak is None else peak / 2**20
        lines.append(line)
    return lines


def _print_table(lines: list[dict]) -> None:
    columns = ["op", "case", "pass", "ours_ms", "x_eager", "x_compiled", "x_torch", "copy_frac", "peak_MiB"]

    def fmt(v):
        return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))

    widths = {c: max([len(c)] + [len(fmt(line.get(c))) for line in lines]) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for line in lines:
        print("  ".join(fmt(line.get(c)).ljust(widths[c]) for c in columns))


def plot(run: dict, lines: list[dict], out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{line['op']}\n{line['case']}\n{line['pass']}" for line in lines]
    fig, (ax_speed, ax_bw) = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(lines)), 8), sharex=True)
    width = 0.8 / len(PEERS)
    for k, peer in enumerate(PEERS):
        values = [line.get(f"x_{peer}") or 0.0 for line in lines]
        ax_speed.bar([i + k * width for i in range(len(lines))], values, width, label=f"vs {peer}")
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.set_ylabel("speed-up (peer time / ours)")
    ax_speed.legend()
    ax_bw.bar(range(len(lines)), [line.get("copy_frac") or 0.0 for line in lines], 0.6, color="tab:gray")
    ax_bw.axhline(0.8, color="tab:red", linestyle="--", linewidth=0.8, label="80% of copy")
    ax_bw.set_ylabel("bandwidth / copy bandwidth")
    ax_bw.legend()
    ax_bw.set_xticks([i + 0.3 for i in range(len(lines))])
    ax_bw.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    env = run.get("env", {})
    fig.suptitle(f"{run.get('benchmark', '?')} on {env.get('device', '?')} (torch {env.get('torch', '?')}, {env.get('date', '?')[:10]})")
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (Path(run["path"]).stem + ".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Optional[list[dict]]:
    """Check every argument before any work (``parser.error``: one line, exit 2).

    Returns the loaded runs of ``--from`` (None when the benchmarks are to run).
    """
    if args.plot is not None:
        why = writable_dir_problem(args.plot)
        if why:
            parser.error(f"argument --plot: {why}")
    if args.files:
        if args.only:
            parser.error("argument --only: selects benchmarks to run; it cannot be combined with --from")
        if args.quick is not None:
            parser.error("arguments --quick/--full: size benchmarks to run; they cannot be combined with --from")
        try:
            return load(args.files)
        except (OSError, ValueError) as exc:  # missing/unreadable file, bad JSON, not a result
            parser.error(f"argument --from: {exc}")
    if not BENCH_DIR.is_dir():
        parser.error(f"no bench/ folder next to the package ({BENCH_DIR}): running needs the source tree; "
                     "use --from FILE")
    names = {s.stem for s in BENCH_DIR.glob("bench_*.py")}
    unknown = [n for n in args.only if n not in names and f"bench_{n}" not in names]
    if unknown:
        known = ", ".join(sorted(n.removeprefix("bench_") for n in names))
        parser.error(f"argument --only: no benchmark called {unknown}; choose from {known}")
    why = writable_dir_problem(args.out)
    if why:
        parser.error(f"argument --out: {why}")
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="spark-ext bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="files", nargs="+", type=Path, help="saved result JSONs to summarise")
    parser.add_argument("--only", nargs="+", default=[], help="benchmarks to run (e.g. difficulty lsq)")
    parser.add_argument("--quick", action="store_true", default=None, help="small sizes (default on CPU)")
    parser.add_argument("--full", dest="quick", action="store_false", help="full sizes even on CPU")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="where runs write JSON")
    parser.add_argument("--plot", type=Path, default=None, help="write PNG plots to this folder")
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
        runs = load(paths)
    for run in runs:
        env = run.get("env", {})
        print(f"\n== {run.get('benchmark')}  ({run['path']})")
        print(f"   {env.get('device')}  torch {env.get('torch')}  triton {env.get('triton')}  commit {env.get('commit')}  {env.get('date')}")
        lines = summarise(run)
        _print_table(lines)
        if args.plot is not None:
            print(f"   plot: {plot(run, lines, args.plot)}")
    if failed:
        # The report above covers the benchmarks that ran; the exit code says some did not.
        print(f"spark-ext bench: {len(failed)} benchmark(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
