"""Benchmark LSQ (docs/spec.md §5b) and the torch-compatible learnable fake quant (§5a).

For each op, layout and dtype, every implementation is timed in the same run:

* ``ours``     spark_ext's compiled kernels (``backend="cpp"`` on CPU, ``"cuda"`` on GPU);
* ``torch``    ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``
  (for LSQ: the same op with zero point 0, range ``[-Qn, Qp]`` and
  ``grad_factor = g``, the closest torch built-in);
* ``eager``    the reference (:mod:`spark_ext.reference`);
* ``compiled`` ``torch.compile`` of the same reference function.

Passes: ``fwd`` (no grad), ``bwd`` (gradients of x, step/scale and
offset/zero point for a random upstream gradient, graph built once),
``fwd+bwd``. Bytes are the minimum a pass must move (docs/spec.md §8): the forward
reads x and writes y, the backward reads x and dy and writes dx (parameters
are negligible), so GB/s and the fraction of a copy measured in the same run
compare like with like. Peak extra memory is reported on CUDA.

    python bench/bench_lsq.py            # CPU or GPU sizes for the device
    python bench/bench_lsq.py --quick    # small sizes, few reps
    python bench/bench_lsq.py --headline # GPU: one activation and one weight layout (make gpu-check)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import spark_ext  # noqa: E402
from spark_ext import _extension, reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BITS, SIGNED = 4, True


def make_impls(op, axis, backend, with_compiled):
    """name -> f(x, p0, p1) for one op family; p0/p1 = step/offset (LSQ) or scale/zero point (§5a)."""
    qn, qp = reference.lsq_range(BITS, SIGNED)

    if op == "lsq_fake_quant":
        def ours(x, p0, p1):
            return spark_ext.lsq_fake_quant(x, p0, p1, bits=BITS, signed=SIGNED, axis=axis, backend=backend)

        def eager(x, p0, p1):
            return reference.lsq_fake_quant(x, p0, p1, bits=BITS, signed=SIGNED, axis=axis)

        def builtin(x, p0, p1):
            n_steps = 1 if axis is None else x.shape[axis]
            g = reference.lsq_grad_factor("lsq", x.numel(), n_steps, qp)
            if axis is None:
                return torch._fake_quantize_learnable_per_tensor_affine(x, p0, p1, -qn, qp, g)
            return torch._fake_quantize_learnable_per_channel_affine(x, p0, p1, axis, -qn, qp, g)
    else:
        def ours(x, p0, p1):
            if axis is None:
                return spark_ext.fake_quantize_learnable_per_tensor_affine(x, p0, p1, -qn, qp, backend=backend)
            return spark_ext.fake_quantize_learnable_per_channel_affine(x, p0, p1, axis, -qn, qp, backend=backend)

        def eager(x, p0, p1):
            if axis is None:
                return reference.fake_quantize_learnable_per_tensor_affine(x, p0, p1, -qn, qp)
            return reference.fake_quantize_learnable_per_channel_affine(x, p0, p1, axis, -qn, qp)

        def builtin(x, p0, p1):
            if axis is None:
                return torch._fake_quantize_learnable_per_tensor_affine(x, p0, p1, -qn, qp, 1.0)
            return torch._fake_quantize_learnable_per_channel_affine(x, p0, p1, axis, -qn, qp, 1.0)

    impls = {"ours": ours, "torch": builtin, "eager": eager}
    if with_compiled:
        impls["compiled"] = torch.compile(eager, dynamic=False)
    return impls


def bench_case(rows, op, name, shape, axis, channels_last, dtype_name, device, with_compiled, reps, backend):
    dtype = DTYPES[dtype_name]
    case = f"{name} {'x'.join(map(str, shape))}{' channels_last' if channels_last else ''} " \
           f"{'per-tensor' if axis is None else f'per-channel axis{axis}'} {dtype_name}"
    print(f"== {op} {case}", flush=True)
    torch._dynamo.reset()
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(shape, device=device, generator=gen) * 2).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n_params = 1 if axis is None else shape[axis]
    p0 = torch.rand(n_params, device=device, generator=gen) * 0.2 + 0.2
    p1 = (torch.randn(n_params, device=device, generator=gen) * 0.05) if op == "lsq_fake_quant" else \
        torch.zeros(n_params, device=device)
    dy = torch.randn(x.shape, device=device, generator=gen).to(dtype)
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    impls = make_impls(op, axis, backend, with_compiled)
    elt = x.element_size()
    n = x.numel()
    fwd_bytes, bwd_bytes = 2 * n * elt, 3 * n * elt
    copy_rate = common.copy_gbps(fwd_bytes, device)
    kw = dict(op=op, case=case, copy_rate=copy_rate, reps=reps)

    def no_grad(f):
        def call():
            with torch.no_grad():
                return f(x, p0, p1)

        return call

    common.run_pass(rows, {k: no_grad(f) for k, f in impls.items()}, device, pass_="fwd", nbytes=fwd_bytes, **kw)

    leaves = [t.detach().requires_grad_() for t in (x, p0, p1)]
    bwd = {}
    for k, f in impls.items():
        try:
            y = f(*leaves)
            bwd[k] = lambda y=y: torch.autograd.grad(y, leaves, dy, retain_graph=True)
        except Exception as exc:  # noqa: BLE001
            bwd[k] = lambda exc=exc: (_ for _ in ()).throw(exc)
    common.run_pass(rows, bwd, device, pass_="bwd", nbytes=bwd_bytes, **kw)
    del bwd
    common.run_pass(rows, {k: (lambda f=f: torch.autograd.grad(f(*leaves), leaves, dy)) for k, f in impls.items()}, device,
             pass_="fwd+bwd", nbytes=fwd_bytes + bwd_bytes, **kw)


def summarize(rows):
    """Per pass: geometric mean of peer ms / ours ms over the cases where both ran."""
    import math

    out = {}
    for r in rows:
        if r["impl"] == "ours" or r.get("speedup_vs_peer") is None:
            continue
        out.setdefault((r["op"], r["pass"], r["impl"]), []).append(r["speedup_vs_peer"])
    print("\nspeedup of ours (peer time / our time, geometric mean over cases):")
    for (op, pass_, impl), v in sorted(out.items()):
        gm = math.exp(sum(math.log(s) for s in v) / len(v))
        print(f"  {op:24s} {pass_:8s} vs {impl:9s} {gm:6.2f}x  (min {min(v):.2f}x, {len(v)} cases)")


def main(argv=None) -> int:
    parser = common.arg_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--ops", default="lsq_fake_quant,fake_quant_learnable")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    backend = "cuda" if device.type == "cuda" else "cpp"
    _extension.load()
    print(f"library: {_extension.status()}  threads: {torch.get_num_threads()}", flush=True)
    reps = args.reps or (5 if args.quick else 20 if args.headline else 50)
    if args.quick:
        layouts = [("act", (4, 16, 32, 32), None, False), ("weight", (64, 32, 3, 3), 0, False),
                   ("act", (4, 16, 32, 32), 1, True)]
    elif args.headline:  # an HBM-bound activation per tensor, a conv weight per channel (GPU sizes)
        layouts = [("act", (32, 128, 128, 128), None, False), ("weight", (1024, 1024, 3, 3), 0, False)]
    elif device.type == "cuda":
        layouts = [("act", (32, 128, 128, 128), None, False), ("weight", (1024, 1024, 3, 3), 0, False),
                   ("act", (32, 128, 128, 128), 1, True), ("act", (32, 128, 128, 128), 1, False)]
    else:
        layouts = [("act", (16, 64, 64, 64), None, False), ("weight", (256, 256, 3, 3), 0, False),
                   ("act", (16, 64, 64, 64), 1, True)]
    rows = []
    for op in args.ops.split(","):
        for name, shape, axis, cl in layouts:
            for dtype_name in DTYPES:
                bench_case(rows, op, name, shape, axis, cl, dtype_name, device, not args.no_compiled, reps, backend)
    common.add_ratios(rows)
    common.print_rows(rows, ["op", "case", "pass", "impl", "ms", "gbps", "copy_fraction", "speedup_vs_peer",
                             "peak_extra_bytes"])
    summarize(rows)
    print(common.save_results("lsq", device, rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
