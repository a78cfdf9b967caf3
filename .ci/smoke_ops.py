"""CPU smoke run of every op on the compiled (cpp) backend: forward and backward against the reference.

Run by .ci/run in the CUDA-torch environment, where the library was built with
CUDA kernels on a machine without a GPU: the CPU kernels must still load and
agree with the reference, and ``torch.compile(fullgraph=True)`` must trace each
op in this fresh process (the library not loaded yet). Exits 1 on any mismatch.
"""

import sys

import torch

import spark_ext
from spark_ext import _extension

torch.manual_seed(0)
B, C, H, W = 2, 3, 8, 12


def cases():
    """(name, fn(backend, *tensors) -> tensor or tuple, differentiable inputs)."""
    s, t, y = (torch.rand(B, C, H, W) for _ in range(3))
    yield "difficulty_signals", lambda be, s, t, y: spark_ext.difficulty_signals(s, t, y, (2, 3), backend=be), (s, t, y)
    w = torch.rand(1, 1, H, W)
    yield "fused_weighted_kd", lambda be, s, t, w: spark_ext.fused_weighted_kd(s, t, w, backend=be), (s, t, w)
    x, step = torch.randn(4, 5, 6), torch.tensor([0.1])
    yield (
        "lsq_fake_quant",
        lambda be, x, st: spark_ext.lsq_fake_quant(x, st, bits=4, signed=True, backend=be),
        (
            x,
            step,
        ),
    )
    scale, zp = torch.tensor([0.05]), torch.tensor([1.0])
    yield (
        "fake_quantize_learnable_per_tensor_affine",
        lambda be, x, sc, z: spark_ext.fake_quantize_learnable_per_tensor_affine(x, sc, z, -8, 7, backend=be),
        (x, scale, zp),
    )
    scales, zps = torch.full((5,), 0.05) + torch.rand(5) * 0.01, torch.zeros(5)
    yield (
        "fake_quantize_learnable_per_channel_affine",
        lambda be, x, sc, z: spark_ext.fake_quantize_learnable_per_channel_affine(x, sc, z, 1, -8, 7, backend=be),
        (x, scales, zps),
    )


def run(fn, backend, inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(backend, *leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.linspace(0.5, 1.5, o.numel()).view_as(o)).sum() for o in outs if o.requires_grad)
    loss.backward()
    return outs, [leaf.grad for leaf in leaves]


failures = []
for name, fn, inputs in cases():
    # first: compiled, fullgraph, in this fresh process (before any eager call has loaded the library)
    try:
        torch.compile(lambda *a, fn=fn: fn("cpp", *a), fullgraph=True, backend="aot_eager")(*inputs)
    except Exception as exc:
        failures.append(f"{name}: torch.compile(fullgraph=True) failed: {type(exc).__name__}: {str(exc)[:300]}")
    got, got_grads = run(fn, "cpp", inputs)
    want, want_grads = run(fn, "reference", inputs)
    for i, (g, w) in enumerate(zip(got + tuple(got_grads), want + tuple(want_grads))):
        if (g is None) != (w is None) or (
            g is not None and not torch.allclose(g.float(), w.float(), rtol=1e-4, atol=1e-5)
        ):
            failures.append(f"{name}: output/gradient {i} differs from the reference")
    print(f"{name}: cpp forward+backward {'ok' if not failures or not failures[-1].startswith(name) else 'FAILED'}")

print(f"library: {_extension.status()}")
print(f"CUDA kernels: {_extension.cuda_status()}")
if failures:
    print("\n".join(failures), file=sys.stderr)
    sys.exit(1)
print("smoke: every op ok on the cpp backend")
