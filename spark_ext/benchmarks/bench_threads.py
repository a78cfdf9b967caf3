"""CPU thread scaling of the C++ kernels (``cpp`` backend): every op at 1, 2 and all threads.

Ops and cases (fp32; the sizes of issue 11's targets):

* ``lsq_fake_quant``                 8x64x128x128 per tensor (8.4M elements)
* ``fake_quant`` (§5a)               8x64x128x128 per tensor, and per channel on axis 1
* ``difficulty_signals``             16x3x256x256, grid 8x8, l1
* ``fused_weighted_kd``              16x3x256x256, per-pixel weight [B,1,H,W], l1

Implementations, each at each thread count: ``ours`` (cpp), ``eager`` (the
reference), ``compiled`` (``torch.compile(reference)``, compiled for that
thread count: inductor bakes the count into its C++ kernels) and ``torch``
(``torch._fake_quantize_learnable_*``, for the fake-quant ops). Passes:
``fwd`` (no grad) and ``fwd+bwd`` (forward, then the gradients of every
differentiable input for a dense random upstream gradient). Bandwidth is
given as a fraction of a same-size fp32 copy (``dst.copy_(src)``) measured
at the same thread count (``copy_fraction``), and of an allocating copy
(``src.clone()``, ``clone_fraction``): every implementation here returns
fresh tensors, and on Linux a fresh buffer above glibc's mmap threshold
(32 MiB at most) is a new mapping whose pages fault and are zeroed on first
write, a cost ``dst.copy_`` never pays.

The machine may be shared: every (thread count, implementation) timing is
repeated ``--repeats`` times, interleaved (round r times everything before
round r + 1 starts), and the median is kept; the load average before and
after is recorded. One JSON per op and thread count goes to
``--out`` (default ``./spark-ext-bench``) as ``threads-<op>-t<N>-cpu-<stamp>.json``; the summary printed
at the end (speed-up 1 -> N threads, ratios, copy fraction, the issue's
targets met or missed) is the README's CPU table.

    python -m spark_ext.benchmarks.bench_threads                  # estimated 4-6 min on an idle 2-core machine
    python -m spark_ext.benchmarks.bench_threads --quick          # small sizes, smoke run
    python -m spark_ext.benchmarks.bench_threads --threads 1,2,4 --repeats 5
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

import spark_ext
from spark_ext import _extension, reference
from spark_ext.benchmarks import bench_fake_quant, bench_lsq, common

LARGE_BYTES = 32 * 2**20  # "large tensors" for the copy-bandwidth target: >= 32 MiB per input


def fake_quant_case(op, shape, axis):
    """(label, tensors, impls, bytes) for lsq_fake_quant or the §5a op; impls map name -> f(x, p0, p1)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2
    n = 1 if axis is None else shape[axis]
    p0 = torch.rand(n, generator=gen) * 0.2 + 0.2
    # |offset| < 0.5: torch's learnable op, LSQ's closest built-in, takes it as a zero point rounding to 0.
    if op == bench_lsq.OP:
        p1 = torch.randn(n, generator=gen) * 0.05
    else:
        p1 = torch.randint(-2, 3, (n,), generator=gen).float()
    bench = bench_lsq if op == bench_lsq.OP else bench_fake_quant
    impls = bench.make_impls(axis, "cpp", with_compiled=False)  # ours, torch, eager
    label = f"{'x'.join(map(str, shape))} fp32 {'per-tensor' if axis is None else f'per-channel axis{axis}'}"
    n_el = x.numel()
    nbytes = {"fwd": 2 * n_el * 4, "fwd+bwd": 5 * n_el * 4}  # x, y; then x, dy, dx
    return label, (x, p0, p1), impls, nbytes, n_el * 4


def difficulty_case(shape, grid=(8, 8)):
    gen = torch.Generator().manual_seed(0)
    S, T, Y = (torch.randn(shape, generator=gen) for _ in range(3))

    def ours(s, t, y):
        return spark_ext.difficulty_signals(s, t, y, grid, "l1", backend="cpp")

    def eager(s, t, y):
        return reference.difficulty_signals(s, t, y, grid, "l1")

    n_el = S.numel()
    cells = shape[0] * grid[0] * grid[1]
    nbytes = {"fwd": 3 * n_el * 4 + 5 * cells * 4, "fwd+bwd": 6 * n_el * 4 + 6 * cells * 4}
    label = f"{'x'.join(map(str, shape))} fp32 grid{grid[0]}x{grid[1]} l1"
    return label, (S, T, Y), {"ours": ours, "eager": eager}, nbytes, n_el * 4


def weighted_kd_case(shape):
    gen = torch.Generator().manual_seed(0)
    S, T = (torch.randn(shape, generator=gen) for _ in range(2))
    w = torch.rand(shape[0], 1, shape[2], shape[3], generator=gen)

    def ours(s, t, w):
        return spark_ext.fused_weighted_kd(s, t, w, kd_loss="l1", backend="cpp")

    def eager(s, t, w):
        return reference.fused_weighted_kd(s, t, w, kd_loss="l1")

    n_el, wb = S.numel(), w.numel() * 4
    nbytes = {"fwd": 2 * n_el * 4 + wb, "fwd+bwd": 5 * n_el * 4 + 2 * wb}
    label = f"{'x'.join(map(str, shape))} fp32 w=pixel l1"
    return label, (S, T, w), {"ours": ours, "eager": eager}, nbytes, n_el * 4


def cases(quick: bool):
    act = (2, 16, 32, 32) if quick else (8, 64, 128, 128)
    img = (2, 3, 64, 64) if quick else (16, 3, 256, 256)
    return [
        (bench_lsq.OP,) + fake_quant_case(bench_lsq.OP, act, None),
        (bench_fake_quant.OP,) + fake_quant_case(bench_fake_quant.OP, act, None),
        (bench_fake_quant.OP,) + fake_quant_case(bench_fake_quant.OP, act, 1),
        ("difficulty_signals",) + difficulty_case(img),
        ("fused_weighted_kd",) + weighted_kd_case(img),
    ]


def pass_callables(op, impl_fn, inputs):
    """{"fwd": f, "fwd+bwd": f}: zero-argument callables for one implementation."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    if op == "difficulty_signals":
        leaves[2].requires_grad_(False)  # the target carries no gradient
    grad_leaves = [t for t in leaves if t.requires_grad]
    gen = torch.Generator().manual_seed(1)

    def fwd():
        with torch.no_grad():
            return impl_fn(*inputs)

    def first_out(out):
        return out[1] if op == "difficulty_signals" else out  # cell_kd carries the gradient

    probe = first_out(impl_fn(*inputs))
    dy = torch.randn(probe.shape, generator=gen)

    def fwd_bwd():
        return torch.autograd.grad(first_out(impl_fn(*leaves)), grad_leaves, dy)

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def thread_counts(spec: str) -> list[int]:
    """``--threads`` ("1,2,all") as a sorted list of distinct counts; "all" = the threads torch started with."""
    out = set()
    for part in spec.split(","):
        part = part.strip()
        n = torch.get_num_threads() if part == "all" else int(part)
        if n < 1:
            raise ValueError(f"--threads: counts must be >= 1, got {part!r}")
        out.add(n)
    return sorted(out)


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__.split("\n\n")[0], threads=True)
    args = parser.parse_args(argv)
    if args.device != "cpu":
        parser.error("bench_threads.py measures the CPU kernels: --device must be cpu")
    try:
        counts = thread_counts(args.threads)
    except ValueError as exc:
        parser.error(str(exc))
    _extension.load()
    torch._dynamo.config.cache_size_limit = 64  # a compiled graph per thread count and pass
    repeats = args.repeats or (1 if args.quick else 3)
    load_before = os.getloadavg()
    print(
        f"library: {_extension.status()}\nthreads: {counts}  repeats: {repeats}  "
        f"load average before: {load_before[0]:.2f}",
        flush=True,
    )
    all_thread_max = torch.get_num_threads()
    summary = []
    try:
        for op, label, inputs, impls, nbytes, in_bytes in cases(args.quick):
            print(f"== {op} {label}", flush=True)
            torch._dynamo.reset()
            fns = {}  # (threads, impl, pass) -> callable
            for n in counts:
                torch.set_num_threads(n)
                per_n = dict(impls)
                if not args.no_compiled:
                    per_n["compiled"] = torch.compile(impls["eager"], dynamic=False, options={"cpp.threads": n})
                for impl, fn in per_n.items():
                    for pass_, call in pass_callables(op, fn, inputs).items():
                        call()  # compile / warm up at this thread count
                        fns[(n, impl, pass_)] = call
            times = {key: [] for key in fns}
            copy_times = {n: [] for n in counts}
            clone_times = {n: [] for n in counts}
            for _ in range(repeats):
                for n in counts:
                    torch.set_num_threads(n)
                    copy_times[n].append(common.copy_gbps(in_bytes, "cpu"))
                    clone_times[n].append(common.copy_gbps(in_bytes, "cpu", allocate=True))
                    for key, call in fns.items():
                        if key[0] == n:
                            times[key].append(common.time_ms(call, "cpu", reps=args.reps or 10))
            for n in counts:
                copy_rate = statistics.median(copy_times[n])
                clone_rate = statistics.median(clone_times[n])
                rows = []
                for (tn, impl, pass_), ms_list in times.items():
                    if tn != n:
                        continue
                    ms = statistics.median(ms_list)
                    rate = common.gbps(nbytes[pass_], ms)
                    rows.append(
                        {
                            "op": op,
                            "case": f"{label} threads={n}",
                            "pass": pass_,
                            "impl": impl,
                            "ms": ms,
                            "bytes": nbytes[pass_],
                            "gbps": rate,
                            "copy_fraction": rate / copy_rate,
                            "peak_extra_bytes": None,
                            "threads": n,
                            "ms_repeats": ms_list,
                            "copy_gbps": copy_rate,
                            "clone_fraction": rate / clone_rate,
                            "clone_gbps": clone_rate,
                        }
                    )
                columns = ["case", "pass", "impl", "ms", "gbps", "copy_fraction", "clone_fraction", "speedup_vs_peer"]
                common.finish(f"threads-{op}-t{n}", "cpu", rows, args.out, columns)
                summary += rows
    finally:
        torch.set_num_threads(all_thread_max)
    load_after = os.getloadavg()
    print(
        f"\nload average after: {load_after[0]:.2f} (before: {load_before[0]:.2f}; "
        f"{os.cpu_count()} cores: timings above ~1 per core are disturbed)"
    )
    print_targets(summary, counts, in_bytes_large=LARGE_BYTES)
    return 0


def print_targets(rows: list[dict], counts: list[int], in_bytes_large: int) -> None:
    """Issue 11's targets per op/case/pass, as a markdown table (the README's CPU table)."""
    by = {(r["op"], r["case"].rsplit(" threads=", 1)[0], r["pass"], r["impl"], r["threads"]): r for r in rows}
    keys = sorted({(k[0], k[1], k[2]) for k in by})
    lo, hi = counts[0], counts[-1]
    print(
        f"\n| op | case | pass | ours {lo}t ms | ours {hi}t ms | {lo}->{hi} threads | "
        + " | ".join(f"vs torch {n}t | vs compiled {n}t | of copy / clone {n}t" for n in counts)
        + " |"
    )
    print("|" + "---|" * (6 + 3 * len(counts)))
    for op, case, pass_ in keys:
        ours = {n: by.get((op, case, pass_, "ours", n)) for n in counts}
        if any(v is None for v in ours.values()):
            continue
        cells = [
            op,
            case,
            pass_,
            f"{ours[lo]['ms']:.2f}",
            f"{ours[hi]['ms']:.2f}",
            f"{ours[lo]['ms'] / ours[hi]['ms']:.2f}x",
        ]
        for n in counts:
            for peer in ("torch", "compiled"):
                r = by.get((op, case, pass_, peer, n))
                cells.append("-" if r is None or r.get("speedup_vs_peer") is None else f"{r['speedup_vs_peer']:.2f}x")
            cells.append(f"{ours[n]['copy_fraction']:.0%} / {ours[n]['clone_fraction']:.0%}")
        print("| " + " | ".join(cells) + " |")
    print(
        f"\ntargets (issue 11): >= 1.7x from 1 to 2 threads (8.4M LSQ, 16x3x256x256 difficulty); >= 3x torch's "
        f"learnable op and >= 1.2x compiled at every thread count; >= 70% of copy bandwidth on large tensors "
        f"(inputs >= {in_bytes_large // 2**20} MiB)"
    )


if __name__ == "__main__":
    sys.exit(main())
