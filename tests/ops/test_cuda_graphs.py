"""CUDA-graph capture of forward+backward of every fast op (GPU only).

A kernel that synchronises with the host, allocates with a host-visible size
or launches on the wrong stream breaks capture or replays wrong results.
Each test captures one training-style step, replays it on new inputs copied
into the static buffers, and compares with an eager run.
"""

import pytest
import torch

import spark_ext

pytestmark = pytest.mark.cuda


def _capture(step, static_inputs):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm up autotuning and lazy loading outside capture
            step(*static_inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(*static_inputs)
    return graph, static_out


def _replay_matches_eager(step, make_inputs):
    static = make_inputs()
    graph, static_out = _capture(step, static)
    fresh = make_inputs()
    for s, f in zip(static, fresh):
        s.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    want = step(*fresh)
    for got, expected in zip(static_out, want):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_spark_path_graph_capture():
    def make():
        return [torch.randn(2, 3, 64, 64, device="cuda") for _ in range(3)] + [torch.rand(2, 1, 8, 8, device="cuda")]

    def step(S, T, Y, w):
        s = S.detach().requires_grad_()
        _, cell_kd = spark_ext.difficulty_signals(s, T, Y, (8, 8), backend="triton")
        loss = (w * cell_kd).sum() / s.numel()
        (grad,) = torch.autograd.grad(loss, s)
        return loss.detach(), grad

    _replay_matches_eager(step, make)


def test_weighted_kd_graph_capture():
    def make():
        return [torch.randn(2, 3, 64, 64, device="cuda") for _ in range(2)] + [torch.rand(2, 1, 64, 64, device="cuda")]

    def step(S, T, w):
        s = S.detach().requires_grad_()
        loss = spark_ext.fused_weighted_kd(s, T, w, backend="triton")
        (grad,) = torch.autograd.grad(loss, s)
        return loss.detach(), grad

    _replay_matches_eager(step, make)


@pytest.mark.parametrize("axis", [None, 0])
def test_lsq_graph_capture(axis):
    def make():
        x = torch.randn(64, 32, 3, 3, device="cuda")
        n = 1 if axis is None else 64
        return [x, torch.rand(n, device="cuda") * 0.1 + 0.01]

    def step(x, step_):
        xs, ss = x.detach().requires_grad_(), step_.detach().requires_grad_()
        y = spark_ext.lsq_fake_quant(xs, ss, bits=4, signed=True, axis=axis, backend="cuda")
        dx, ds = torch.autograd.grad(y.square().sum(), (xs, ss))
        return y.detach(), dx, ds

    _replay_matches_eager(step, make)


def test_torch_compatible_fake_quant_graph_capture():
    def make():
        return [
            torch.randn(64, 32, device="cuda"),
            torch.tensor([0.05], device="cuda"),
            torch.tensor([1.0], device="cuda"),
        ]

    def step(x, s, z):
        xs, ss, zs = (t.detach().requires_grad_() for t in (x, s, z))
        y = spark_ext.fake_quantize_learnable_per_tensor_affine(xs, ss, zs, -8, 7, backend="cuda")
        return (y.detach(),) + torch.autograd.grad(y.square().sum(), (xs, ss, zs))

    _replay_matches_eager(step, make)
