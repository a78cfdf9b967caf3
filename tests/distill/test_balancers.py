"""Loss balancers (docs/spec.md §6): values and gradients by hand, and inside the distiller."""

import math

import pytest
import torch

from spark_ext.distill import GoRBalancer, LMRBalancer, NoBalancer, SparkDistiller, make_balancer


def test_none_adds():
    assert float(NoBalancer()(torch.tensor(0.3), torch.tensor(0.2))) == pytest.approx(0.5)


def test_gor_value_and_gradients():
    bal = GoRBalancer()
    with torch.no_grad():
        bal.s1.fill_(0.4)
        bal.s2.fill_(-0.7)
    lt = torch.tensor(0.3, requires_grad=True)
    lk = torch.tensor(0.05, requires_grad=True)
    out = bal(lt, lk)
    expected = 0.5 * math.exp(-0.4) * 0.3 + 0.5 * math.exp(0.7) * 0.05 + 0.5 * (0.4 - 0.7)
    assert float(out.detach()) == pytest.approx(expected, abs=1e-7)  # float32 sum with cancellation
    out.backward()
    assert float(bal.s1.grad) == pytest.approx(-0.5 * math.exp(-0.4) * 0.3 + 0.5, rel=1e-6)
    assert float(bal.s2.grad) == pytest.approx(-0.5 * math.exp(0.7) * 0.05 + 0.5, rel=1e-6)
    assert float(lt.grad) == pytest.approx(0.5 * math.exp(-0.4), rel=1e-6)
    assert float(lk.grad) == pytest.approx(0.5 * math.exp(0.7), rel=1e-6)


def test_lmr_value_and_stop_gradient():
    bal = LMRBalancer(eps=1e-8)
    lt = torch.tensor(0.3, requires_grad=True)
    lk = torch.tensor(0.05, requires_grad=True)
    out = bal(lt, lk)
    factor = math.log(2.0)  # softplus(0)
    ratio = 0.3 / (0.05 + 1e-8)
    assert float(out.detach()) == pytest.approx(0.3 + factor * ratio * 0.05, rel=1e-6)
    out.backward()
    # The ratio is a constant: dL/dL_task = 1, dL/dL_kd = softplus(theta) * ratio.
    assert float(lt.grad) == pytest.approx(1.0, rel=1e-6)
    assert float(lk.grad) == pytest.approx(factor * ratio, rel=1e-5)
    assert float(bal.theta.grad) == pytest.approx(0.5 * ratio * 0.05, rel=1e-5)  # sigmoid(0) = 0.5


def test_make_balancer_names():
    assert isinstance(make_balancer("gor"), GoRBalancer)
    with pytest.raises(ValueError, match="balancer"):
        make_balancer("magic")


@pytest.mark.parametrize("name,keys", [("gor", ("gor_s1", "gor_s2")), ("lmr", ("lmr_factor",))])
def test_balancer_learns_inside_distiller(name, keys):
    student = torch.nn.Conv2d(3, 3, 3, padding=1)
    teacher = torch.nn.Conv2d(3, 3, 3, padding=1)
    opt = torch.optim.SGD(student.parameters(), lr=1e-2)
    d = SparkDistiller(student, teacher, opt, mode="kd", balancer=name, balancer_lr=0.1)
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    first = d.step(x, y)
    second = d.step(x, y)
    for k in keys:
        assert k in first and first[k] != second[k]
    if name == "gor":
        # Both losses are < 1, so e^-s L - 1 < 0 pushes s down from 0.
        assert second["gor_s1"] < 0 and second["gor_s2"] < 0
    else:
        assert second["lmr_factor"] < math.log(2.0)


def test_balancer_needs_kd():
    student = torch.nn.Conv2d(3, 3, 1)
    with pytest.raises(ValueError, match="KD term"):
        SparkDistiller(student, None, torch.optim.SGD(student.parameters(), lr=0.1), mode="qat", balancer="gor")
