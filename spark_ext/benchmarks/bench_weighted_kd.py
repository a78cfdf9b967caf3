"""Benchmark ``fused_weighted_kd`` (docs/spec.md §3): ours (Triton on GPU, C++ on CPU) vs eager and compiled reference.

Weights: none (uniform KD), per pixel ``[B, 1, H, W]`` (broadcast over
channels), and per cell ``[B, 1, 8, 8]`` (the SPARK weight map; our path is
``sum(w * cell_kd) / N`` from the cell-KD kernel). Passes: ``fwd`` (loss
only), ``bwd`` (dS alone: the student is what trains; T and w need no
grad), ``fwd+bwd``. Peers in the same run: ``eager`` = the reference,
``compiled`` = ``torch.compile(reference)``, and ``torch`` =
``F.l1_loss`` / ``F.mse_loss`` for the unweighted l1 / l2 case. Bytes are the
minimum each pass must move: forward reads S, T (and a per-pixel weight);
backward reads S, T (and the weight) and writes dS.

    python -m spark_ext.benchmarks.bench_weighted_kd                 # GPU: 8x3x128^2 .. 16x3x1024^2, fp32 and bf16
    python -m spark_ext.benchmarks.bench_weighted_kd --device cpu    # CPU: our C++ kernels vs the peers
    python -m spark_ext.benchmarks.bench_weighted_kd --quick         # CPU smoke run
    python -m spark_ext.benchmarks.bench_weighted_kd --headline      # GPU: only 16x3x1024^2 fp32 (make gpu-check)
    TRITON_INTERPRET=1 python -m spark_ext.benchmarks.bench_weighted_kd --quick  # ours: Triton, interpreted
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import spark_ext
from spark_ext import reference
from spark_ext.benchmarks import common
from spark_ext.benchmarks.bench_difficulty import DTYPES, reset_compiler


def bench_case(rows, shape, dtype_name, weight_kind, kd_loss, device, ours_name, with_compiled, reps):
    dtype = DTYPES[dtype_name]
    B, C, H, W = shape
    n = B * C * H * W
    elt = torch.finfo(dtype).bits // 8
    case = f"{B}x{C}x{H}x{W} {dtype_name} w={weight_kind} {kd_loss}"
    print(f"== fused_weighted_kd {case}", flush=True)
    gen = torch.Generator(device=device).manual_seed(0)
    S, T = (torch.randn(shape, device=device, generator=gen).to(dtype) for _ in range(2))
    if weight_kind == "none":
        w, w_bytes = None, 0
    elif weight_kind == "pixel":
        w = torch.rand(B, 1, H, W, device=device, generator=gen).to(dtype)
        w_bytes = B * H * W * elt
    else:  # grid
        w = torch.rand(B, 1, 8, 8, device=device, generator=gen)
        w_bytes = w.numel() * 4

    def ours(s, t):
        return spark_ext.fused_weighted_kd(s, t, w, kd_loss=kd_loss, backend=ours_name)

    def eager(s, t):
        return reference.fused_weighted_kd(s, t, w, kd_loss=kd_loss)

    reset_compiler()
    impls = {}
    if ours_name:
        impls["ours"] = ours
    impls["eager"] = eager
    if with_compiled:
        impls["compiled"] = torch.compile(eager, dynamic=False)
    if weight_kind == "none" and kd_loss in ("l1", "l2"):
        builtin = F.l1_loss if kd_loss == "l1" else F.mse_loss
        impls["torch"] = lambda s, t: builtin(s, t)

    fwd_bytes = 2 * n * elt + w_bytes
    bwd_bytes = 3 * n * elt + w_bytes
    copy_rate = common.copy_gbps(2 * n * elt, device)
    kw = dict(op="fused_weighted_kd", case=case, copy_rate=copy_rate, reps=reps)

    def no_grad_call(fn):
        def call():
            with torch.no_grad():
                return fn(S, T)

        return call

    common.run_pass(rows, {k: no_grad_call(f) for k, f in impls.items()}, device, pass_="fwd", nbytes=fwd_bytes, **kw)
    s = S.detach().requires_grad_()
    bwd_fns = {}
    for k, f in impls.items():
        loss = f(s, T)
        bwd_fns[k] = lambda loss=loss: torch.autograd.grad(loss, s, retain_graph=True)
    common.run_pass(rows, bwd_fns, device, pass_="bwd", nbytes=bwd_bytes, **kw)
    del bwd_fns
    common.run_pass(
        rows,
        {k: (lambda f=f: torch.autograd.grad(f(s, T), s)) for k, f in impls.items()},
        device,
        pass_="fwd+bwd",
        nbytes=fwd_bytes + bwd_bytes,
        **kw,
    )


def main(argv=None) -> int:
    args, device, ours_name, reps = common.kd_bench_setup(argv, __doc__.split("\n\n")[0])
    if args.quick:
        cases = [((2, 3, 32, 32), "fp32", wk) for wk in ("none", "pixel", "grid")]
    elif args.headline:  # the HBM-bound size of the targets, every weight kind
        cases = [((16, 3, 1024, 1024), "fp32", wk) for wk in ("none", "pixel", "grid")]
    else:
        sizes = [(8, 3, 128, 128), (8, 3, 256, 256), (16, 3, 512, 512), (16, 3, 1024, 1024)]
        cases = [(s, d, wk) for s in sizes for d in ("fp32", "bf16") for wk in ("none", "pixel", "grid")]
    rows = []
    for shape, dtype_name, weight_kind in cases:
        bench_case(rows, shape, dtype_name, weight_kind, args.kd_loss, device, ours_name, not args.no_compiled, reps)
    common.finish("weighted_kd", device, rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
