"""Benchmark ``difficulty_signals`` (docs/spec.md §2): ours (Triton on GPU, C++ on CPU) vs eager and compiled reference.

Passes, each timed for every implementation in the same run:

* ``fwd``      signals + cell_kd (inputs need no grad);
* ``bwd``      the cell_kd backward alone (dS for a random upstream gradient);
* ``fwd+bwd``  both;
* ``spark``    the SPARK path of a training step: signals + cell KD, the
  grid-weighted loss ``sum(w * cell_kd) / N`` and its backward to S.

Implementations: ``ours`` = ``backend="triton"`` on CUDA, ``"cpp"`` on CPU (see
:func:`common.ours_backend`), ``eager`` = the reference
(:mod:`spark_ext.reference`), ``compiled`` = ``torch.compile`` of the same
reference function. Bytes are the minimum each pass must move (docs/spec.md §8: the
forward reads S, T, Y and writes the per-cell outputs; the backward reads S,
T and the per-cell gradient and writes dS), so GB/s and the fraction of a
device copy measured in the same run compare like with like.

    python -m spark_ext.benchmarks.bench_difficulty                 # GPU: 8x3x128^2 .. 16x3x1024^2, fp32 and bf16
    python -m spark_ext.benchmarks.bench_difficulty --device cpu    # CPU: our C++ kernels vs the reference peers
    python -m spark_ext.benchmarks.bench_difficulty --quick         # CPU smoke run
    python -m spark_ext.benchmarks.bench_difficulty --headline      # GPU: 16x3x1024^2 fp32, bf16 (gpu-check)
    TRITON_INTERPRET=1 python -m spark_ext.benchmarks.bench_difficulty --quick  # ours: Triton, interpreted
"""

from __future__ import annotations

import sys

import torch

import spark_ext
from spark_ext import reference
from spark_ext.benchmarks import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def reset_compiler() -> None:
    """Fresh torch.compile caches per case, so recompile limits never silently fall back to eager."""
    torch._dynamo.reset()


def bench_case(rows, shape, dtype_name, grid, kd_loss, device, ours_name, with_compiled, reps):
    dtype = DTYPES[dtype_name]
    B, C, H, W = shape
    gh, gw = grid
    n = B * C * H * W
    elt = torch.finfo(dtype).bits // 8
    cells = B * gh * gw
    case = f"{B}x{C}x{H}x{W} {dtype_name} grid{gh}x{gw} {kd_loss}"
    print(f"== difficulty_signals {case}", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    S, T, Y = (torch.randn(shape, device=device, generator=gen).to(dtype) for _ in range(3))
    G = torch.randn(B, 1, gh, gw, device=device, generator=gen)
    w = torch.rand(B, 1, gh, gw, device=device, generator=gen)
    w = w / w.mean(dim=(-2, -1), keepdim=True)  # a SPARK weight map (mean 1 per image)

    def ours(s, t, y):
        return spark_ext.difficulty_signals(s, t, y, grid, kd_loss, backend=ours_name)

    def eager(s, t, y):
        return reference.difficulty_signals(s, t, y, grid, kd_loss)

    def spark_loss(signals_fn, s, t, y):
        _, cell_kd = signals_fn(s, t, y)
        return (w * cell_kd).sum() / s.numel()

    reset_compiler()
    impls = {}
    if ours_name:
        impls["ours"] = ours
    impls["eager"] = eager
    if with_compiled:
        impls["compiled"] = torch.compile(eager, dynamic=False)

    fwd_bytes = 3 * n * elt + 5 * cells * 4
    bwd_bytes = 3 * n * elt + cells * 4
    copy_rate = common.copy_gbps(fwd_bytes, device)
    common_kw = dict(op="difficulty_signals", case=case, copy_rate=copy_rate, reps=reps)

    def no_grad_call(fn):
        def call():
            with torch.no_grad():
                return fn(S, T, Y)

        return call

    common.run_pass(
        rows, {k: no_grad_call(f) for k, f in impls.items()}, device, pass_="fwd", nbytes=fwd_bytes, **common_kw
    )

    s = S.detach().requires_grad_()
    bwd_fns = {}
    for k, f in impls.items():
        _, kd = f(s, T, Y)
        bwd_fns[k] = lambda kd=kd: torch.autograd.grad(kd, s, G, retain_graph=True)
    common.run_pass(rows, bwd_fns, device, pass_="bwd", nbytes=bwd_bytes, **common_kw)
    del bwd_fns

    common.run_pass(
        rows,
        {k: (lambda f=f: torch.autograd.grad(f(s, T, Y)[1], s, G)) for k, f in impls.items()},
        device,
        pass_="fwd+bwd",
        nbytes=fwd_bytes + bwd_bytes,
        **common_kw,
    )

    spark_fns = {}
    for k, f in impls.items():

        def loss_fn(s_, t_, y_, f=f):
            return spark_loss(f, s_, t_, y_)

        if k == "compiled":
            loss_fn = torch.compile(lambda s_, t_, y_: spark_loss(eager, s_, t_, y_), dynamic=False)
        spark_fns[k] = lambda loss_fn=loss_fn: torch.autograd.grad(loss_fn(s, T, Y), s)
    common.run_pass(rows, spark_fns, device, pass_="spark", nbytes=fwd_bytes + bwd_bytes + cells * 4, **common_kw)


def main(argv=None) -> int:
    args, device, ours_name, reps = common.kd_bench_setup(argv, __doc__.split("\n\n")[0])
    if args.quick:
        cases = [((2, 3, 32, 32), "fp32", (8, 8)), ((2, 3, 32, 32), "bf16", (8, 8))]
    elif args.headline:  # the HBM-bound size of the targets, SPARK's 8x8 grid
        cases = [((16, 3, 1024, 1024), d, (8, 8)) for d in ("fp32", "bf16")]
    else:
        sizes = [(8, 3, 128, 128), (8, 3, 256, 256), (16, 3, 512, 512), (16, 3, 1024, 1024)]
        cases = [(s, d, (8, 8)) for s in sizes for d in ("fp32", "bf16")]
        # Grid extremes on the largest size: one cell per image (row-band splits)
        # and 4x4-pixel cells (many cells per program).
        cases += [((16, 3, 1024, 1024), "fp32", (1, 1)), ((16, 3, 1024, 1024), "fp32", (256, 256))]
    rows = []
    for shape, dtype_name, grid in cases:
        bench_case(rows, shape, dtype_name, grid, args.kd_loss, device, ours_name, not args.no_compiled, reps)
    common.finish("difficulty", device, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
