"""Every argument check of the public ops raises a clear error naming the argument."""

import pytest
import torch

import spark_ext


def images(shape=(2, 3, 8, 8), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize(
    "kwargs_or_args,err,match",
    [
        (dict(grid=(0, 2)), ValueError, "Gh"),
        (dict(grid=(2, 9)), ValueError, "Gw"),
        (dict(grid=(9, 2)), ValueError, "Gh"),
        (dict(grid=4), TypeError, "grid"),
        (dict(grid=(2.0, 2)), TypeError, "Gh"),
        (dict(grid=(1, 2, 3)), TypeError, "grid"),
        (dict(kd_loss="huber"), ValueError, "kd_loss"),
        (dict(backend="fast"), ValueError, "backend"),
    ],
)
def test_difficulty_signals_argument_errors(kwargs_or_args, err, match):
    S, T, Y = images()
    with pytest.raises(err, match=match):
        spark_ext.difficulty_signals(S, T, Y, **kwargs_or_args)


def test_difficulty_signals_tensor_errors():
    S, T, Y = images()
    with pytest.raises(ValueError, match="teacher must have the student's shape"):
        spark_ext.difficulty_signals(S, T[:, :2], Y)
    with pytest.raises(TypeError, match="target must have the student's dtype"):
        spark_ext.difficulty_signals(S, T, Y.half())
    with pytest.raises(ValueError, match="student must be 4-D"):
        spark_ext.difficulty_signals(S[0], T[0], Y[0])
    with pytest.raises(TypeError, match="student must have a floating dtype"):
        spark_ext.difficulty_signals(S.long(), T.long(), Y.long())
    with pytest.raises(TypeError, match="teacher must be a torch.Tensor"):
        spark_ext.difficulty_signals(S, T.numpy(), Y)


def test_fused_weighted_kd_errors():
    S, T, _ = images()
    with pytest.raises(ValueError, match="reduction"):
        spark_ext.fused_weighted_kd(S, T, reduction="max")
    with pytest.raises(ValueError, match="weight"):
        spark_ext.fused_weighted_kd(S, T, torch.rand(3, 1, 8, 8))  # batch 3 vs 2
    with pytest.raises(ValueError, match="grid weight"):
        spark_ext.fused_weighted_kd(S, T, torch.rand(2, 2, 4, 4))  # grid weights have one channel
    with pytest.raises(ValueError, match="neither per-pixel"):
        spark_ext.fused_weighted_kd(S, T, torch.rand(2, 1, 9, 4))
    with pytest.raises(TypeError, match="weight must have a floating dtype"):
        spark_ext.fused_weighted_kd(S, T, torch.ones(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="weight must be"):
        spark_ext.fused_weighted_kd(S, T, torch.rand(8))


def test_lsq_errors():
    x = torch.randn(4, 5)
    step = torch.tensor([0.1])
    with pytest.raises(ValueError, match="bits must be in"):
        spark_ext.lsq_fake_quant(x, step, bits=1, signed=True)
    with pytest.raises(ValueError, match="bits must be in"):
        spark_ext.lsq_fake_quant(x, step, bits=17, signed=True)
    with pytest.raises(TypeError, match="bits must be an int"):
        spark_ext.lsq_fake_quant(x, step, bits=4.0, signed=True)
    with pytest.raises(TypeError, match="signed must be a bool"):
        spark_ext.lsq_fake_quant(x, step, bits=4, signed=1)
    with pytest.raises(ValueError, match="step must be finite and > 0"):
        spark_ext.lsq_fake_quant(x, torch.tensor([0.0]), bits=4, signed=True)
    with pytest.raises(ValueError, match="step must be finite and > 0"):
        spark_ext.lsq_fake_quant(x, torch.tensor([float("nan")]), bits=4, signed=True)
    with pytest.raises(ValueError, match="step must be finite and > 0"):
        spark_ext.lsq_fake_quant(x, torch.tensor([-1.0, 1, 1, 1, 1]), bits=4, signed=True, axis=1)
    with pytest.raises(ValueError, match=r"step must have shape \[5\]"):
        spark_ext.lsq_fake_quant(x, step, bits=4, signed=True, axis=1)
    with pytest.raises(ValueError, match="step must have one element"):
        spark_ext.lsq_fake_quant(x, torch.ones(2), bits=4, signed=True)
    with pytest.raises(ValueError, match="offset must have one element"):
        spark_ext.lsq_fake_quant(x, step, torch.zeros(3), bits=4, signed=True)
    with pytest.raises(ValueError, match="axis must be in"):
        spark_ext.lsq_fake_quant(x, step, bits=4, signed=True, axis=2)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        spark_ext.lsq_fake_quant(x.int(), step, bits=4, signed=True)
    with pytest.raises(TypeError, match="step must have a floating dtype"):
        spark_ext.lsq_fake_quant(x, torch.tensor([1]), bits=4, signed=True)
    with pytest.raises(ValueError, match="grad_scale"):
        spark_ext.lsq_fake_quant(x, step, bits=4, signed=True, grad_scale="adaptive")
    with pytest.raises(ValueError, match="grad_scale must be a finite number > 0"):
        spark_ext.lsq_fake_quant(x, step, bits=4, signed=True, grad_scale=-1.0)


def test_fake_quant_errors():
    x = torch.randn(4, 5)
    s, z = torch.tensor([0.1]), torch.tensor([0.0])
    with pytest.raises(ValueError, match="quant_min <= 0 <= quant_max"):
        spark_ext.fake_quantize_learnable_per_tensor_affine(x, s, z, 5, 3)
    with pytest.raises(TypeError, match="quant_min must be an int"):
        spark_ext.fake_quantize_learnable_per_tensor_affine(x, s, z, -8.0, 7)
    with pytest.raises(ValueError, match="scale must hold one value"):
        spark_ext.fake_quantize_learnable_per_tensor_affine(x, torch.ones(2), z, -8, 7)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        spark_ext.fake_quantize_learnable_per_tensor_affine(x, torch.tensor([0.0]), z, -8, 7)
    # An integer zero point is accepted, like torch (tests/ops/test_fake_quant.py); a bool one is not.
    with pytest.raises(TypeError, match="zero_point must have a floating dtype or an integer dtype"):
        spark_ext.fake_quantize_learnable_per_tensor_affine(x, s, torch.tensor([False]), -8, 7)
    with pytest.raises(TypeError, match="scale must have a floating dtype, got torch.int64"):
        spark_ext.fake_quantize_learnable_per_tensor_affine(x, torch.tensor([1]), z, -8, 7)
    with pytest.raises(ValueError, match="grad_factor must be finite"):
        spark_ext.fake_quantize_learnable_per_tensor_affine(x, s, z, -8, 7, float("inf"))
    with pytest.raises(ValueError, match="scale must hold one value per index"):
        spark_ext.fake_quantize_learnable_per_channel_affine(x, torch.ones(4), torch.zeros(5), 1, -8, 7)
    with pytest.raises(ValueError, match="axis must be in"):
        spark_ext.fake_quantize_learnable_per_channel_affine(x, torch.ones(5), torch.zeros(5), 3, -8, 7)


def test_backend_selection():
    S, T, Y = images()
    with pytest.raises(ValueError, match="backend must be one of"):
        spark_ext.set_default_backend("gpu")
    with pytest.raises(spark_ext.BackendUnavailableError, match="difficulty_signals: backend 'cuda'"):
        spark_ext.difficulty_signals(S, T, Y, backend="cuda")
    with spark_ext.use_backend("reference"):
        assert spark_ext.get_default_backend() == "reference"
        spark_ext.difficulty_signals(S, T, Y)
    assert spark_ext.get_default_backend() == "auto"


def test_auto_warns_once_and_falls_back_when_a_fast_backend_cannot_load(monkeypatch):
    from spark_ext.ops import _dispatch

    def broken(*args):
        raise AssertionError("must not be called")

    monkeypatch.setitem(_dispatch._registry, "fake_op", {})
    # the cpp backend's one availability rule, looked up at call time
    monkeypatch.setattr(_dispatch._extension, "cpp_unavailable", lambda: "library failed to build")
    _dispatch.register("fake_op", "cpp", broken)
    _dispatch.register("fake_op", "reference", lambda: "ref")
    x = torch.zeros(1)
    with pytest.warns(RuntimeWarning, match="library failed to build"):
        assert _dispatch.resolve("fake_op", "auto", x)[0] == "reference"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _dispatch.resolve("fake_op", "auto", x)[0] == "reference"
    with pytest.raises(spark_ext.BackendUnavailableError, match="library failed to build"):
        _dispatch.resolve("fake_op", "cpp", x)


def test_backend_for_and_available_backends_answer_publicly(monkeypatch):
    from spark_ext import _extension

    x64, x32 = torch.zeros(2, dtype=torch.float64), torch.zeros(2)
    assert spark_ext.backend_for("lsq_fake_quant", x64) == "reference"
    assert spark_ext.backend_for("difficulty_signals", x32, "reference") == "reference"
    with spark_ext.use_backend("reference"):
        assert spark_ext.backend_for("fused_weighted_kd", x32) == "reference"
    with pytest.raises(ValueError, match="op must be one of"):
        spark_ext.backend_for("no_such_op", x32)
    with pytest.raises(spark_ext.BackendUnavailableError, match="lsq_fake_quant: backend 'cuda' cannot run here"):
        spark_ext.backend_for("lsq_fake_quant", x32, "cuda")
    table = spark_ext.available_backends()
    ops = {"difficulty_signals", "fused_weighted_kd", "lsq_fake_quant", "fake_quantize_learnable_per_tensor_affine"}
    assert ops <= set(table)
    for op in ops:
        assert list(table[op]) == spark_ext.registered_backends(op)
        assert table[op]["reference"] is None
    monkeypatch.setattr(_extension, "cpp_unavailable", lambda: "library failed to build")
    assert spark_ext.available_backends()["lsq_fake_quant"]["cpp"] == "library failed to build"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_check_positive_step_accepts_exactly_the_finite_positive_values(dtype):
    from spark_ext._validation import check_positive_step

    info = torch.finfo(dtype)
    smallest = torch.tensor(info.smallest_normal * info.eps, dtype=dtype)  # the smallest positive subnormal
    assert smallest > 0
    for value in (smallest, torch.tensor(1.0, dtype=dtype), torch.tensor(info.max, dtype=dtype)):
        check_positive_step(value.reshape(1), "step")
    for bad in (0.0, -0.0, -1.0, -float(smallest), float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="step must be finite and > 0 everywhere"):
            check_positive_step(torch.tensor([1.0, bad], dtype=dtype), "step")
