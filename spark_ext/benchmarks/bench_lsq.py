"""Benchmark ``lsq_fake_quant`` (docs/spec.md §5b): ours vs torch's learnable op, the eager and compiled reference.

For each layout and dtype, every implementation is timed in the same run:

* ``ours``     spark_ext's compiled kernels (``backend="cpp"`` on CPU, ``"cuda"`` on GPU);
* ``torch``    ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``
  with zero point 0, range ``[-Qn, Qp]`` and ``grad_factor = g``: the
  closest torch built-in (LSQ's offset, here ``|o| < 0.05``, is its zero
  point, which rounds to 0);
* ``eager``    the reference (:mod:`spark_ext.reference`);
* ``compiled`` ``torch.compile`` of the same reference function.

Passes: ``fwd`` (no grad), ``bwd`` (gradients of x, step and offset for a
random upstream gradient, graph built once), ``fwd+bwd``. Bytes are the
minimum a pass must move (docs/spec.md §8): the forward reads x and writes y, the
backward reads x and dy and writes dx (parameters are negligible), so GB/s
and the fraction of a copy measured in the same run compare like with like.
Peak extra memory is reported on CUDA. The case runner here is shared with
``bench_fake_quant.py`` (docs/spec.md §5a, the torch drop-ins), which times the
same layouts.

    python -m spark_ext.benchmarks.bench_lsq            # CPU or GPU sizes for the device
    python -m spark_ext.benchmarks.bench_lsq --quick    # small sizes, few reps
    python -m spark_ext.benchmarks.bench_lsq --headline # GPU: one activation and one weight layout (make gpu-check)
"""

from __future__ import annotations

import sys

import torch

import spark_ext
from spark_ext import _extension, reference
from spark_ext.benchmarks import common

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BITS, SIGNED = 4, True


OP = "lsq_fake_quant"


def make_impls(axis, backend, with_compiled):
    """impl name -> f(x, step, offset) for ``lsq_fake_quant`` on ``axis`` (None = per tensor)."""
    qn, qp = reference.lsq_range(BITS, SIGNED)

    def ours(x, step, offset):
        return spark_ext.lsq_fake_quant(x, step, offset, bits=BITS, signed=SIGNED, axis=axis, backend=backend)

    def eager(x, step, offset):
        return reference.lsq_fake_quant(x, step, offset, bits=BITS, signed=SIGNED, axis=axis)

    def builtin(x, step, offset):
        n_steps = 1 if axis is None else x.shape[axis]
        g = reference.lsq_grad_factor("lsq", x.numel(), n_steps, qp)
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(x, step, offset, -qn, qp, g)
        return torch._fake_quantize_learnable_per_channel_affine(x, step, offset, axis, -qn, qp, g)

    impls = {"ours": ours, "torch": builtin, "eager": eager}
    if with_compiled:
        impls["compiled"] = torch.compile(eager, dynamic=False)
    return impls


def make_offset(n, device, gen):
    """LSQ+'s learnable offset: small, so that torch's op (which rounds it as a zero point) sees 0."""
    return torch.randn(n, device=device, generator=gen) * 0.05


def bench_case(rows, op, make_impls, make_p1, layout, dtype_name, device, with_compiled, reps, backend):
    """Time every implementation of a fake-quant ``op`` (``make_impls(axis, backend, with_compiled)``) on one
    layout ``(name, shape, axis, channels_last)`` and dtype: fwd, bwd and fwd+bwd rows appended to ``rows``.
    ``make_p1(n, device, generator)`` gives the second parameter (LSQ's offset, §5a's zero point)."""
    name, shape, axis, channels_last = layout
    dtype = DTYPES[dtype_name]
    case = (
        f"{name} {'x'.join(map(str, shape))}{' channels_last' if channels_last else ''} "
        f"{'per-tensor' if axis is None else f'per-channel axis{axis}'} {dtype_name}"
    )
    print(f"== {op} {case}", flush=True)
    torch._dynamo.reset()
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(shape, device=device, generator=gen) * 2).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    n_params = 1 if axis is None else shape[axis]
    p0 = torch.rand(n_params, device=device, generator=gen) * 0.2 + 0.2
    p1 = make_p1(n_params, device, gen)
    dy = torch.randn(x.shape, device=device, generator=gen).to(dtype)
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    impls = make_impls(axis, backend, with_compiled)
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
        except Exception as exc:  # noqa: BLE001  recorded as this peer's error row by run_pass
            bwd[k] = lambda exc=exc: (_ for _ in ()).throw(exc)
    common.run_pass(rows, bwd, device, pass_="bwd", nbytes=bwd_bytes, **kw)
    del bwd
    common.run_pass(
        rows,
        {k: (lambda f=f: torch.autograd.grad(f(*leaves), leaves, dy)) for k, f in impls.items()},
        device,
        pass_="fwd+bwd",
        nbytes=fwd_bytes + bwd_bytes,
        **kw,
    )


def layouts(args, device):
    """``(name, shape, axis, channels_last)`` cases for the run's size (``--quick``, ``--headline``, device)."""
    if args.quick:
        return [
            ("act", (4, 16, 32, 32), None, False),
            ("weight", (64, 32, 3, 3), 0, False),
            ("act", (4, 16, 32, 32), 1, True),
        ]
    if args.headline:  # an HBM-bound activation per tensor, a conv weight per channel (GPU sizes)
        return [("act", (32, 128, 128, 128), None, False), ("weight", (1024, 1024, 3, 3), 0, False)]
    if device.type == "cuda":
        return [
            ("act", (32, 128, 128, 128), None, False),
            ("weight", (1024, 1024, 3, 3), 0, False),
            ("act", (32, 128, 128, 128), 1, True),
            ("act", (32, 128, 128, 128), 1, False),
        ]
    return [
        ("act", (16, 64, 64, 64), None, False),
        ("weight", (256, 256, 3, 3), 0, False),
        ("act", (16, 64, 64, 64), 1, True),
    ]


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


def run(argv, description, op, result_name, make_impls, make_p1) -> int:
    """The command line of a fake-quant benchmark: every layout x dtype, the table, the summary, the JSON."""
    args = common.arg_parser(description).parse_args(argv)
    device = torch.device(args.device)
    backend = "cuda" if device.type == "cuda" else "cpp"
    _extension.load()
    print(f"library: {_extension.status()}  threads: {torch.get_num_threads()}", flush=True)
    reps = common.default_reps(args)
    rows = []
    for layout in layouts(args, device):
        for dtype_name in DTYPES:
            bench_case(rows, op, make_impls, make_p1, layout, dtype_name, device, not args.no_compiled, reps, backend)
    common.finish(result_name, device, rows, args.out)
    summarize(rows)
    return 0


def main(argv=None) -> int:
    return run(argv, __doc__.split("\n\n")[0], OP, "lsq", make_impls, make_offset)


if __name__ == "__main__":
    sys.exit(main())
