"""A/B of the huge-page outputs of the C++ CPU kernels (csrc/cpu/huge_page_allocator.h), interleaved.

Each round times every case with the huge-page path off (the default CPU
allocator, as before it existed) and on (the library's threshold), in
alternating order, at each thread count, in one process: the test-only op
``spark_ext::set_huge_page_threshold`` switches it (``SPARK_EXT_HUGE_PAGES=0``
does the same for a whole process). Per (case, mode) the median over rounds
of each round's median iteration is kept. Outputs are checked bit for bit
between the modes; ``--rss`` also runs each case 200 times with the path on
and prints the process's resident memory before and after (a leak would
grow it by the outputs' size per iteration).

    python bench/ab_huge_pages.py                        # 1 and 2 threads, 5 rounds (~3 min idle)
    python bench/ab_huge_pages.py --compiled --rss       # plus torch.compile(reference), plus the RSS check
    python bench/ab_huge_pages.py --threads 1 --rounds 3 --only lsq

Not a bench_*.py: `spark-ext bench` does not run it, and it writes no JSON.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fake_quant  # noqa: E402
import bench_lsq  # noqa: E402
import bench_threads  # noqa: E402

from spark_ext import _extension  # noqa: E402

ACT = (8, 64, 128, 128)
IMG = (16, 3, 256, 256)


def cases():
    """name -> (op, label, inputs, impls) for bench_threads.pass_callables."""
    out = {}
    for name, op in (("lsq", bench_lsq.OP), ("fake_quant", bench_fake_quant.OP)):
        label, inputs, impls, _, _ = bench_threads.fake_quant_case(op, ACT, None)
        out[name] = (op, label, inputs, impls)
    label, inputs, impls, _, _ = bench_threads.difficulty_case(IMG)
    out["difficulty"] = ("difficulty_signals", label, inputs, impls)
    label, inputs, impls, _, _ = bench_threads.weighted_kd_case(IMG)
    out["weighted_kd"] = ("fused_weighted_kd", label, inputs, impls)
    return out


def median_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in flat(o)] if isinstance(out, (tuple, list)) else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--iters", type=int, default=7, help="iterations per round and mode (default 7)")
    parser.add_argument("--only", default="", help="comma-separated cases: lsq, fake_quant, difficulty, weighted_kd")
    parser.add_argument("--compiled", action="store_true", help="also time torch.compile(reference) (yardstick)")
    parser.add_argument("--threshold-mib", type=float, default=None, help="'on' threshold (default: the library's)")
    parser.add_argument("--rss", action="store_true", help="also run 200 iterations per case and report RSS")
    args = parser.parse_args(argv)
    all_cases = cases()
    only = [c for c in args.only.split(",") if c]
    unknown = [c for c in only if c not in all_cases]
    if unknown or args.rounds < 1 or args.iters < 1:
        parser.error(f"--only must name {', '.join(all_cases)}; --rounds/--iters >= 1 (got {unknown or args})")
    try:
        counts = [int(n) for n in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads: comma-separated integers, got {args.threads!r}")
    _extension.load()
    ops = torch.ops.spark_ext
    on = ops.huge_page_threshold() if args.threshold_mib is None else max(int(args.threshold_mib * 2**20), 1)
    if on == 0:
        parser.error("the huge-page path is off (SPARK_EXT_HUGE_PAGES=0 or not Linux): nothing to compare")
    print(f"library: {_extension.status()}\nhuge-page outputs: {_extension.huge_page_status()}")
    print(f"threads {counts}, {args.rounds} rounds x {args.iters} iterations, load average {os.getloadavg()[0]:.2f}")
    torch._dynamo.config.cache_size_limit = 64
    names = only or list(all_cases)
    fns = {}  # (threads, case, impl, pass) -> callable
    for n in counts:
        torch.set_num_threads(n)
        for name in names:
            op, label, inputs, impls = all_cases[name]
            chosen = {"ours": impls["ours"]}
            if args.compiled:
                chosen["compiled"] = torch.compile(impls["eager"], dynamic=False, options={"cpp.threads": n})
            for impl, fn in chosen.items():
                for pass_, call in bench_threads.pass_callables(op, fn, inputs).items():
                    call()
                    fns[(n, name, impl, pass_)] = call
    # bit-for-bit: our outputs with the path off and on
    for (n, name, impl, pass_), call in fns.items():
        if impl != "ours":
            continue
        torch.set_num_threads(n)
        ops.set_huge_page_threshold(0)
        off_out = flat(call())
        ops.set_huge_page_threshold(on)
        ops.huge_page_allocations()
        on_out = flat(call())
        used = ops.huge_page_allocations()
        same = all(torch.equal(a, b) for a, b in zip(off_out, on_out)) and len(off_out) == len(on_out)
        print(f"bitwise t{n} {name} {pass_}: {'equal' if same else 'DIFFERENT'} ({used} huge-page outputs)")
        if not same:
            return 1
    times = {key: {"off": [], "on": []} for key in fns}
    # the copy-bandwidth yardstick of bench_threads.py: dst.copy_(src) of one activation, no allocation
    src = torch.rand(ACT)
    dst = torch.empty_like(src)
    copy_ms = {n: [] for n in counts}
    for r in range(args.rounds):
        for n in counts:
            torch.set_num_threads(n)
            copy_ms[n].append(median_ms(lambda: dst.copy_(src), args.iters))
        modes = ("off", "on") if r % 2 == 0 else ("on", "off")
        for key, call in fns.items():
            torch.set_num_threads(key[0])
            for mode in modes:
                ops.set_huge_page_threshold(0 if mode == "off" else on)
                times[key][mode].append(median_ms(call, args.iters))
    ops.set_huge_page_threshold(on)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    for n in counts:
        print(f"dst.copy_(src) {'x'.join(map(str, ACT))} fp32, {n} thread(s): {statistics.median(copy_ms[n]):.2f} ms")
    print("threads | case | impl | pass | off ms | on ms | off/on")
    for (n, name, impl, pass_), t in times.items():
        off, on_ms = statistics.median(t["off"]), statistics.median(t["on"])
        note = "" if impl == "ours" else " (c10 allocator: the switch does not apply)"
        if impl == "ours" and name in ("lsq", "fake_quant"):
            moved = 2 if pass_ == "fwd" else 5  # tensors read or written: x, y; then x, dy, dx as well
            note = f" ({moved / 2 * statistics.median(copy_ms[n]) / on_ms:.0%} of copy_ bandwidth when on)"
        row = f"{n} | {name} {all_cases[name][1]} | {impl} | {pass_} | {off:.2f} | {on_ms:.2f} | {off / on_ms:.2f}x"
        print(row + note)
    if args.rss:
        for (n, name, impl, pass_), call in fns.items():
            if impl != "ours":
                continue
            torch.set_num_threads(n)
            for _ in range(5):
                call()
            before = rss_mib()
            for _ in range(200):
                call()
            print(f"rss t{n} {name} {pass_}: {before:.0f} MiB -> {rss_mib():.0f} MiB after 200 iterations")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
