"""One short forward+backward of every GPU kernel, for ``compute-sanitizer --tool memcheck``.

Odd shapes and non-contiguous/channels_last inputs on purpose: masked tails
and stride arithmetic are where out-of-bounds accesses hide. Exits non-zero
if any op raises (a backend that is not registered is reported and skipped).

    compute-sanitizer --tool memcheck python -m spark_ext.benchmarks.sanitize_kernels          # every case
    compute-sanitizer --tool memcheck python -m spark_ext.benchmarks.sanitize_kernels --short  # one case per path
"""

import sys

import torch

import spark_ext


def run(name, fn):
    try:
        fn()
        torch.cuda.synchronize()
        print(f"ok    {name}")
        return True
    except spark_ext.BackendUnavailableError as exc:
        print(f"skip  {name}: {exc}")
        return True
    except Exception as exc:  # report every failure, then exit non-zero
        print(f"FAIL  {name}: {type(exc).__name__}: {exc}")
        return False


def images(dtype, channels_last=False):
    S, T, Y = (torch.randn(2, 3, 37, 53, device="cuda", dtype=dtype) for _ in range(3))
    if channels_last:
        S, T, Y = (t.to(memory_format=torch.channels_last) for t in (S, T, Y))
    return S.requires_grad_(), T.requires_grad_(), Y


def spark_path(dtype, channels_last, grid, kd):
    S, T, Y = images(dtype, channels_last)
    _, cell_kd = spark_ext.difficulty_signals(S, T, Y, grid, kd, backend="triton")
    w = torch.rand(2, 1, *grid, device="cuda")
    (w * cell_kd).sum().backward()


def weighted(dtype, channels_last):
    S, T, _ = images(dtype, channels_last)
    w = torch.rand(2, 1, 37, 53, device="cuda", requires_grad=True)
    spark_ext.fused_weighted_kd(S, T, w, kd_loss="charbonnier", backend="triton").backward()


def lsq(dtype, axis, offset):
    x = torch.randn(17, 9, 5, 3, device="cuda", dtype=dtype)[:, :, 1:].requires_grad_()
    n = 1 if axis is None else x.shape[axis]
    step = torch.full((n,), 0.1, device="cuda", requires_grad=True)
    off = torch.zeros(n, device="cuda", requires_grad=True) if offset else None
    spark_ext.lsq_fake_quant(x, step, off, bits=4, signed=True, axis=axis, backend="cuda").sum().backward()


def torch_fq(dtype, axis):
    x = torch.randn(17, 9, 5, device="cuda", dtype=dtype).requires_grad_()
    if axis is None:
        s, z = (
            torch.tensor([0.1], device="cuda", requires_grad=True),
            torch.tensor([1.0], device="cuda", requires_grad=True),
        )
        y = spark_ext.fake_quantize_learnable_per_tensor_affine(x, s, z, -8, 7, backend="cuda")
    else:
        n = x.shape[axis]
        s, z = (
            torch.full((n,), 0.1, device="cuda", requires_grad=True),
            torch.zeros(n, device="cuda", requires_grad=True),
        )
        y = spark_ext.fake_quantize_learnable_per_channel_affine(x, s, z, axis, -8, 7, backend="cuda")
    y.sum().backward()


def short():
    """One case per kernel path (fp32 and bf16, strided and channels_last, per-tensor and per-channel, tails)."""
    f32, bf16 = torch.float32, torch.bfloat16
    return all(
        [
            run(
                "spark_path fp32 cl=True grid=(5, 7) charbonnier", lambda: spark_path(f32, True, (5, 7), "charbonnier")
            ),
            run("spark_path bf16 cl=False grid=(1, 1) l1", lambda: spark_path(bf16, False, (1, 1), "l1")),
            run("weighted_kd bf16 cl=True", lambda: weighted(bf16, True)),
            run("lsq fp32 axis=None offset=True", lambda: lsq(f32, None, True)),
            run("lsq bf16 axis=1 offset=True", lambda: lsq(bf16, 1, True)),
            run("lsq fp32 axis=3 offset=False", lambda: lsq(f32, 3, False)),
            run("torch_fq fp32 axis=None", lambda: torch_fq(f32, None)),
            run("torch_fq bf16 axis=2", lambda: torch_fq(bf16, 2)),
        ]
    )


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--short"]):
        print(f"usage: sanitize_kernels.py [--short]; got {' '.join(args)}", file=sys.stderr)
        return 2
    if args == ["--short"]:
        return 0 if short() else 1
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for cl in (False, True):
            for grid, kd in (((8, 8), "l1"), ((5, 7), "charbonnier"), ((37, 53), "l2"), ((1, 1), "l1")):
                ok &= run(f"spark_path {dtype} cl={cl} grid={grid} {kd}", lambda: spark_path(dtype, cl, grid, kd))
            ok &= run(f"weighted_kd {dtype} cl={cl}", lambda: weighted(dtype, cl))
        for axis in (None, 0, 1, 3):
            for offset in (False, True):
                ok &= run(f"lsq {dtype} axis={axis} offset={offset}", lambda: lsq(dtype, axis, offset))
            ok &= run(f"torch_fq {dtype} axis={axis}", lambda: torch_fq(dtype, axis if axis != 3 else 2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
