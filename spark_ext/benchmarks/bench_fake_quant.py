"""Benchmark ``fake_quantize_learnable_per_{tensor,channel}_affine`` (docs/spec.md §5a): ours vs torch's ops.

For each layout and dtype (the same as ``bench_lsq.py``: an activation per
tensor, a conv weight per output channel, a channels_last activation per
channel), every implementation is timed in the same run:

* ``ours``     spark_ext's compiled kernels (``backend="cpp"`` on CPU, ``"cuda"`` on GPU);
* ``torch``    ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``,
  the ops ours replace (same arguments, ``grad_factor = 1``);
* ``eager``    the reference (:mod:`spark_ext.reference`);
* ``compiled`` ``torch.compile`` of the same reference function.

Range ``[-8, 7]`` (4 bits, signed), scale in ``[0.2, 0.4)``, zero point 0.
Passes: ``fwd`` (no grad), ``bwd`` (gradients of x, scale and zero point
for a random upstream gradient, graph built once), ``fwd+bwd``; bytes as in
``bench_lsq.py`` (whose case runner this uses): the forward reads x and
writes y, the backward reads x and dy and writes dx.

    python -m spark_ext.benchmarks.bench_fake_quant            # CPU or GPU sizes for the device
    python -m spark_ext.benchmarks.bench_fake_quant --quick    # small sizes, few reps
    python -m spark_ext.benchmarks.bench_fake_quant --headline # GPU: one activation, one weight layout (gpu-check)
"""

from __future__ import annotations

import sys

import torch

import spark_ext
from spark_ext import reference
from spark_ext.benchmarks import bench_lsq

OP = "fake_quant"  # the op family's one name: ops/fake_quant.py, tests/ops/test_fake_quant.py, this file
BITS, SIGNED = bench_lsq.BITS, bench_lsq.SIGNED


def make_impls(axis, backend, with_compiled):
    """impl name -> f(x, scale, zero_point): the per-tensor op (``axis`` None) or the per-channel op on ``axis``."""
    qn, qp = reference.lsq_range(BITS, SIGNED)

    def ours(x, scale, zero_point):
        if axis is None:
            return spark_ext.fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, -qn, qp, backend=backend)
        return spark_ext.fake_quantize_learnable_per_channel_affine(
            x, scale, zero_point, axis, -qn, qp, backend=backend
        )

    def eager(x, scale, zero_point):
        if axis is None:
            return reference.fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, -qn, qp)
        return reference.fake_quantize_learnable_per_channel_affine(x, scale, zero_point, axis, -qn, qp)

    def builtin(x, scale, zero_point):
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(x, scale, zero_point, -qn, qp, 1.0)
        return torch._fake_quantize_learnable_per_channel_affine(x, scale, zero_point, axis, -qn, qp, 1.0)

    impls = {"ours": ours, "torch": builtin, "eager": eager}
    if with_compiled:
        impls["compiled"] = torch.compile(eager, dynamic=False)
    return impls


def make_zero_point(n, device, gen):
    return torch.zeros(n, device=device)


def main(argv=None) -> int:
    return bench_lsq.run(argv, __doc__.split("\n\n")[0], OP, "fake_quant", make_impls, make_zero_point)


if __name__ == "__main__":
    sys.exit(main())
