"""calibrate (PTQ): min-max and MSE steps, 8-bit accuracy, modes restored, batch formats, errors."""

import copy

import pytest
import torch
from torch import nn

from spark_ext.quant import LSQQuantizer, calibrate, quantize_model


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 5),
    )


def mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


class ResCNN(nn.Module):
    """A small image-restoration net: head, grouped + depthwise body with a skip, tail, global residual."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 16, 3, padding=1)
        self.b1 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.tail = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        h = torch.relu(self.head(x))
        h = h + self.b2(torch.relu(self.b1(h)))
        return x + self.tail(h)


def _ptq_error(model, make_data, method):
    model.eval()
    batches = [make_data() for _ in range(4)]
    test = make_data()
    with torch.no_grad():
        ref = model(test)
    quantize_model(model, w_bits=8, a_bits=8)
    calibrate(model, batches, method=method, num_candidates=20)
    with torch.no_grad():
        return rel_err(model(test), ref)


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_ptq_8bit_restoration_cnn_within_one_percent(method):
    # Random images in [0, 1] through a restoration-style CNN (the project's
    # use case); measured 0.2-0.6 % over 30 random nets.
    assert _ptq_error(ResCNN(), lambda: torch.rand(4, 3, 12, 12), method) < 0.01


@pytest.mark.parametrize("method", ["minmax", "mse"])
def test_ptq_8bit_mlp_within_noise_budget(method):
    # An 8-bit uniform grid costs ~0.4 % (per-channel weights) to ~0.8 %
    # (per-tensor activations) of each of the 6 quantized operands, and a freshly
    # initialised MLP's small outputs amplify it: over 30 random MLPs the output
    # error is 0.4-1.3 % (median 0.6 %). So 1 % is not a property of every MLP;
    # the bound here is the budget, and the exact steps are checked in
    # test_minmax_steps.
    assert _ptq_error(mlp(), lambda: torch.rand(32, 12), method) < 0.02


def test_ptq_error_shrinks_with_bits():
    base = ResCNN().eval()
    data = [torch.rand(2, 3, 8, 8) for _ in range(2)]
    with torch.no_grad():
        ref = base(data[0])
    errors = []
    for bits in (4, 6, 8):
        m = copy.deepcopy(base)
        quantize_model(m, w_bits=bits, a_bits=bits, first_last_bits=None)
        calibrate(m, data)
        with torch.no_grad():
            errors.append(rel_err(m(data[0]), ref))
    assert errors[0] > errors[1] > errors[2]


def test_minmax_steps():
    model = mlp()
    quantize_model(model, w_bits=4, a_bits=4, first_last_bits=None)
    batches = [torch.randn(8, 12), 3 * torch.randn(8, 12)]
    calibrate(model, batches, method="minmax")
    first = model[0]
    # Weights: per output channel, step = max(-min / Qn, max / Qp) with Qn=8, Qp=7.
    w = first.weight.detach()
    expected = torch.maximum(-w.amin(1) / 8, w.amax(1) / 7)
    torch.testing.assert_close(first.weight_quantizer.step.detach(), expected)
    # Input activation: one range over all batches; signed (negatives seen).
    allx = torch.cat(batches)
    assert first.input_quantizer.signed is True
    torch.testing.assert_close(
        first.input_quantizer.step.detach(), torch.maximum(-allx.min() / 8, allx.max() / 7).reshape(1)
    )
    # After a ReLU the input is non-negative: unsigned, step = max / 15, where the
    # activations are those of the float network (quantizers off while calibrating).
    second = model[2]
    assert second.input_quantizer.signed is False
    with torch.no_grad():
        h = torch.relu(nn.functional.linear(allx, first.weight, first.bias))
    torch.testing.assert_close(second.input_quantizer.step.detach(), (h.max() / 15).reshape(1))


def test_lsq_plus_minmax_and_mse_offsets():
    model = mlp()
    quantize_model(model, w_bits=4, a_bits=4, a_learn_offset=True, first_last_bits=None)
    x = torch.rand(32, 12) * 3 + 1  # asymmetric, positive range
    calibrate(model, [x], method="minmax")
    q = model[0].input_quantizer
    lo, hi = x.min(), x.max()
    step = (hi - lo) / 15
    assert q.signed is False  # decided from the data: no negative value
    torch.testing.assert_close(q.step.detach(), step.reshape(1))
    torch.testing.assert_close(q.offset.detach(), lo.reshape(1))  # + Qn * step, Qn = 0
    calibrate(model, [x], method="mse", num_candidates=10)
    assert q.is_initialized and float(q.step.detach()) <= float(step) + 1e-7


def _weight_mse(layer):
    with torch.no_grad():
        return float((layer.quantized_weight() - layer.weight).square().sum())


def test_mse_not_worse_than_minmax_per_channel():
    base = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        base[2].weight[:, 0] *= 8  # outliers: clipping pays off
    data = [torch.randn(16, 64) for _ in range(2)]
    results = {}
    for method in ("minmax", "mse"):
        m = copy.deepcopy(base)
        quantize_model(m, w_bits=3, a_bits=3, first_last_bits=None)
        calibrate(m, data, method=method, num_candidates=32)
        results[method] = m
    for i in (0, 2, 4):
        assert _weight_mse(results["mse"][i]) <= _weight_mse(results["minmax"][i]) * (1 + 1e-6)
    assert _weight_mse(results["mse"][2]) < 0.9 * _weight_mse(results["minmax"][2])  # outliers get clipped
    # Activation MSE over the calibration data is not worse either.
    for i in (2, 4):
        errs = {}
        for method, m in results.items():
            seen = []
            h = m[i].input_quantizer.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
            for q in m.modules():
                if isinstance(q, LSQQuantizer):
                    q.enabled = False
            with torch.no_grad():
                for x in data:
                    m(x)
            h.remove()
            quant = m[i].input_quantizer
            with torch.no_grad():
                errs[method] = sum(float((quant.fake_quant(a) - a).square().sum()) for a in seen)
        assert errs["mse"] <= errs["minmax"] * (1 + 1e-6)


def test_modes_restored_and_batch_formats():
    model = cnn()
    quantize_model(model)
    model.train()
    bn = model[0].bn  # folded into the conv by quantize_model
    stats = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    model[3].input_quantizer.enabled = False  # a user setting that calibrate must keep
    data = [(torch.randn(2, 3, 6, 6), torch.zeros(2)) for _ in range(3)]  # (input, target) pairs
    calibrate(model, data, method="mse", num_candidates=5)
    assert all(m.training for m in model.modules())
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert int(bn.num_batches_tracked) == stats[2]
    assert model[3].input_quantizer.enabled is False and model[0].input_quantizer.enabled is True
    quantizers = [m for m in model.modules() if isinstance(m, LSQQuantizer)]
    assert all(q.is_initialized and not q.observe and q.running_min is None for q in quantizers)
    # A generator (consumed once) works for "mse"; num_batches limits what is read.
    pulled = []

    def gen():
        for i in range(10):
            pulled.append(i)
            yield {"input": torch.randn(2, 3, 6, 6)}

    class Kw(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input):
            return self.inner(input)

    calibrate(Kw(model), gen(), method="mse", num_batches=2, num_candidates=3)
    assert pulled == [0, 1]
    calls = []
    calibrate(model, [torch.randn(2, 3, 6, 6)], forward_fn=lambda m, b: calls.append(m(b)))
    assert len(calls) == 1


def test_calibrated_model_trains_without_reinit():
    model = mlp()
    quantize_model(model)
    calibrate(model, [torch.randn(8, 12)])
    step = model[0].input_quantizer.step.detach().clone()
    model(10 * torch.randn(8, 12)).sum().backward()  # a very different batch: no re-init
    torch.testing.assert_close(model[0].input_quantizer.step.detach(), step)
    assert model[0].input_quantizer.step.grad is not None


def test_unreached_quantizer_warns_and_progress(capsys):
    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    model = TwoPaths()
    quantize_model(model)
    with pytest.warns(
        UserWarning, match=r"1 quantizer\(s\) received no input and were not calibrated: \['unused.input_quantizer'\]"
    ):
        calibrate(model, [torch.randn(2, 4)], progress=True)
    assert model.unused.weight_quantizer.is_initialized  # weights need no data
    assert not model.unused.input_quantizer.is_initialized


def test_calibrate_errors():
    model = mlp()
    quantize_model(model)
    x = [torch.randn(2, 12)]
    with pytest.raises(ValueError, match=r"method must be one of \('minmax', 'mse'\), got 'max'"):
        calibrate(model, x, method="max")
    with pytest.raises(ValueError, match="contains no LSQQuantizer; call quantize_model"):
        calibrate(mlp(), x)
    with pytest.raises(ValueError, match="batches yielded no batch"):
        calibrate(model, [])
    with pytest.raises(ValueError, match="num_candidates must be a positive int, got 0"):
        calibrate(model, x, method="mse", num_candidates=0)
    with pytest.raises(ValueError, match="num_batches must be a positive int or None, got 0"):
        calibrate(model, x, num_batches=0)
    with pytest.raises(TypeError, match="got a single tensor"):
        calibrate(model, torch.randn(2, 12))
    with pytest.raises(TypeError, match="batches must be an iterable of batches, got int"):
        calibrate(model, 3)
    with pytest.raises(TypeError, match="cannot feed a batch of type str"):
        calibrate(model, ["abc"])
    with pytest.raises(TypeError, match="forward_fn must be callable"):
        calibrate(model, x, forward_fn=1)
    with pytest.raises(TypeError, match="model must be an nn.Module, got list"):
        calibrate([model], x)
    # A failing pass leaves the model's modes and switches as they were.
    model.train()
    with pytest.raises(TypeError):
        calibrate(model, ["abc"])
    assert model.training and all(q.enabled and not q.observe for q in model.modules() if isinstance(q, LSQQuantizer))
