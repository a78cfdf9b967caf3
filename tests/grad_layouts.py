"""Upstream gradients in layouts other than x's, for the fake-quant tests (test_lsq.py, test_fake_quant.py)."""

import torch


def grad_layouts(shape, dtype=torch.float32, seed=0):
    """Gradients of x's shape in layouts other than x's own: (name, dy), read in place by the CPU kernels."""
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W = shape

    def rand(*s):
        return torch.randn(s, generator=gen).to(dtype)

    return [
        ("scalar (y.sum())", torch.full((), 1.5, dtype=dtype).expand(shape)),
        ("broadcast over batch", rand(1, C, H, W).expand(shape)),
        ("broadcast over channels", rand(B, 1, H, W).expand(shape)),
        ("broadcast along rows", rand(B, C, H, 1).expand(shape)),
        ("transposed", rand(B, C, W, H).transpose(2, 3)),
        ("channels_last", rand(B, C, H, W).contiguous(memory_format=torch.channels_last)),
        ("sliced", rand(B, C, H, 2 * W)[..., ::2]),
    ]


# 2x6x40x70: per tensor the 16384-element tasks cross the runs of the broadcast
# gradients (gathered piece by piece); per channel they lie inside them.
GRAD_SHAPE = (2, 6, 40, 70)
