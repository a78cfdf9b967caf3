"""Tail latency of the C++ CPU kernels' large outputs (csrc/cpu/huge_page_allocator.h), three ways, interleaved.

Modes, switched in one process by the library's ops (``set_huge_page_threshold``,
``set_huge_page_cache_limit``):

- ``cache``: huge-page outputs, freed blocks kept for reuse (the default);
- ``no cache``: huge-page outputs, every one a new mapping (limit 0);
- ``off``: the default CPU allocator (threshold 0, as ``SPARK_EXT_HUGE_PAGES=0``).

Each round times every (threads, case) in every mode, the modes' order rotating
from round to round; a mode's first call in a round is not timed (in ``cache``
mode it refills the cache, which switching modes emptied, as the first training
step does). Reported per (threads, case, mode): p50, p90 and max over all timed
calls of the wall time, and of the process's CPU time (user + system, all its
threads): on a busy machine the wall time also counts waiting for a core, while
the CPU time still counts page faults and the kernel's compaction, which run in
the faulting thread. Outputs are checked bit for bit across the modes first; ``--rss`` also
runs each case 200 times per huge-page mode and prints the process's resident
memory before and after, and the cache's size (a leak would grow RSS by the
outputs' size per iteration; the cache by at most its limit).

    python -m spark_ext.benchmarks.ab_huge_pages   # lsq fwd and bwd, 1 and 2 threads, 5 x 12 calls (~1 min idle)
    python -m spark_ext.benchmarks.ab_huge_pages --rss --rounds 10
    python -m spark_ext.benchmarks.ab_huge_pages --threads 1 --only fwd --threshold-mib 8

Cases: ``fwd``, ``spark_ext.lsq_fake_quant`` on an 8x64x128x128 float32 tensor
(32 MiB, per tensor, no grad: one 32 MiB output); ``bwd``, its backward op
``lsq_fake_quant_backward`` (one 32 MiB ``dx``). Not a ``bench_<name>`` module: `spark-ext
bench` does not run it, and it writes no JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import spark_ext
from spark_ext import _extension

SHAPE = (8, 64, 128, 128)
MODES = ("cache", "no cache", "off")
BITS, QN, QP = 8, 128, 127  # signed 8-bit


def cases():
    """name -> zero-argument callable returning the op's output(s)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=gen) * 2
    dy = torch.randn(SHAPE, generator=gen)
    step, offset = torch.tensor([0.2]), torch.tensor([0.01])
    grad_factor = 1.0 / (x.numel() * QP) ** 0.5
    ops = torch.ops.spark_ext

    def fwd():
        with torch.no_grad():
            return spark_ext.lsq_fake_quant(x, step, offset, bits=BITS, signed=True, backend="cpp")

    def bwd():
        return ops.lsq_fake_quant_backward(dy, x, step, offset, None, QN, QP, grad_factor)

    return {"fwd": fwd, "bwd": bwd}


def set_mode(mode: str, threshold: int, cache_limit: int) -> None:
    ops = torch.ops.spark_ext
    ops.set_huge_page_threshold(0 if mode == "off" else threshold)
    ops.set_huge_page_cache_limit(cache_limit if mode == "cache" else 0)  # 0 also unmaps what it held


def timed_ms(fn, iters: int) -> list[tuple[float, float]]:
    """(wall ms, process CPU ms) of each of ``iters`` calls."""
    times = []
    for _ in range(iters):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()  # the output is freed here, as a training loop frees it
        times.append(((time.perf_counter() - w0) * 1e3, (time.process_time() - c0) * 1e3))
    return times


def tail(values: list[float]) -> tuple[float, float, float]:
    """(p50, p90, max)."""
    return statistics.median(values), statistics.quantiles(values, n=10, method="inclusive")[8], max(values)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def flat(out):
    return [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--iters", type=int, default=12, help="timed calls per round and mode (default 12)")
    parser.add_argument("--only", default="", help="comma-separated cases: fwd, bwd (default both)")
    parser.add_argument(
        "--threshold-mib", type=float, default=None, help="huge-page threshold (default: the library's)"
    )
    parser.add_argument("--rss", action="store_true", help="also run 200 iterations per case and mode and report RSS")
    args = parser.parse_args(argv)
    _extension.load()
    all_cases = cases()
    only = [c for c in args.only.split(",") if c]
    unknown = [c for c in only if c not in all_cases]
    if unknown:
        parser.error(f"--only: cases are {', '.join(all_cases)}, got {', '.join(unknown)}")
    if args.rounds < 1 or args.iters < 1:
        parser.error(f"--rounds and --iters must be >= 1, got {args.rounds} and {args.iters}")
    try:
        counts = [int(n) for n in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads: comma-separated integers, got {args.threads!r}")
    if any(n < 1 for n in counts):
        parser.error(f"--threads: counts must be >= 1, got {args.threads!r}")
    ops = torch.ops.spark_ext
    threshold = ops.huge_page_threshold() if args.threshold_mib is None else max(int(args.threshold_mib * 2**20), 1)
    if threshold == 0:
        parser.error("the huge-page path is off (SPARK_EXT_HUGE_PAGES=0 or not Linux): nothing to compare")
    cache_limit = ops.huge_page_cache_limit()
    names = only or list(all_cases)
    print(f"library: {_extension.status()}\nhuge-page outputs: {_extension.huge_page_status()}")
    print(f"huge-page cache: {_extension.huge_page_cache_status()}")
    print(f"threads {counts}, {args.rounds} rounds x {args.iters} calls, load average {os.getloadavg()[0]:.2f}")

    # bit for bit across the modes, and which path each mode took
    for n in counts:
        torch.set_num_threads(n)
        for name in names:
            outs, used = {}, {}
            for mode in MODES:
                set_mode(mode, threshold, cache_limit)
                ops.huge_page_allocations()
                all_cases[name]()  # in cache mode the second call reuses the first one's block
                outs[mode] = flat(all_cases[name]())
                used[mode] = ops.huge_page_allocations()
            same = all(
                len(outs[m]) == len(outs["off"]) and all(torch.equal(a, b) for a, b in zip(outs[m], outs["off"]))
                for m in MODES
            )
            paths = ", ".join(f"{m}: {used[m]}" for m in MODES)
            print(f"bitwise t{n} {name}: {'equal' if same else 'DIFFERENT'} (huge-page outputs in 2 calls: {paths})")
            if not same:
                return 1

    times = {(n, name, mode): [] for n in counts for name in names for mode in MODES}
    for r in range(args.rounds):
        order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]
        for n in counts:
            torch.set_num_threads(n)
            for name in names:
                for mode in order:
                    set_mode(mode, threshold, cache_limit)
                    all_cases[name]()  # untimed: see the module docstring
                    times[(n, name, mode)] += timed_ms(all_cases[name], args.iters)
    set_mode("cache", threshold, cache_limit)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    shape = "x".join(map(str, SHAPE))
    print(f"lsq_fake_quant {shape} fp32 per tensor; ms over {args.rounds * args.iters} calls per row")
    print("threads | case | mode | wall p50 | p90 | max | p90/p50 | cpu p50 | p90 | max | p90/p50")
    for (n, name, mode), t in times.items():
        wall, cpu = tail([w for w, _ in t]), tail([c for _, c in t])
        row = [f"{v:.2f}" for v in (*wall, wall[1] / wall[0], *cpu, cpu[1] / cpu[0])]
        print(f"{n} | {name} | {mode} | " + " | ".join(row))

    if args.rss:
        for mode in ("cache", "no cache"):
            set_mode(mode, threshold, cache_limit)
            for n in counts:
                torch.set_num_threads(n)
                for name in names:
                    for _ in range(5):
                        all_cases[name]()
                    before = rss_mib()
                    for _ in range(200):
                        all_cases[name]()
                    held = ops.huge_page_cache_bytes() / 2**20
                    print(
                        f"rss {mode} t{n} {name}: {before:.0f} MiB -> {rss_mib():.0f} MiB after 200 calls "
                        f"(cache holds {held:.0f} MiB)"
                    )
        set_mode("cache", threshold, cache_limit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
