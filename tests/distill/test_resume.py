"""Checkpoint and resume: 4 steps straight == 2 steps, save, fresh objects, load, 2 steps.

Covers the quantized student (weights and LSQ steps), its optimiser, the
SPARK policy and its optimiser / baseline / generator, the GoR balancer and
its optimiser, the data iterator and the global RNG: bitwise on CPU.
"""

import copy

import pytest
import torch

from spark_ext.distill import SparkDistiller
from spark_ext.models import EncoderDecoderNet

quant = pytest.importorskip("spark_ext.quant", reason="spark_ext.quant (QAT toolkit) is not available yet")


def make_batches():
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(4):
        y = torch.rand(2, 3, 8, 8, generator=g)
        out.append((y + 0.1 * torch.randn(y.shape, generator=g), y))
    return out


def fresh(teacher, policy_signal="paper"):
    """A new student quantized from the teacher, its optimiser and a distiller (all new objects)."""
    student = copy.deepcopy(teacher)
    quant.quantize_model(student, w_bits=4, a_bits=4)
    quant.calibrate(student, [b[0] for b in make_batches()[:1]], method="minmax")
    # Adam moves every parameter by ~lr per step: keep lr well below the 8-bit
    # layers' LSQ steps (~1e-3) so that no step is pushed through zero.
    opt = torch.optim.Adam(student.parameters(), lr=1e-4)
    d = SparkDistiller(
        student,
        teacher,
        opt,
        mode="spark",
        balancer="gor",
        grid=(2, 2),
        seed=5,
        policy_lr=1e-3,
        policy_signal=policy_signal,
        credit_every=1,
        horizon=2,
    )
    return student, d


@pytest.mark.parametrize("policy_signal", ["paper", "credit", "reinforce"])
def test_resume_is_bitwise_identical(tmp_path, policy_signal):
    torch.manual_seed(0)
    teacher = EncoderDecoderNet(width=4, depth=1)
    batches = make_batches()

    torch.manual_seed(1)
    student_a, run_a = fresh(teacher, policy_signal)
    logs_a = [run_a.step(*b) for b in batches]

    torch.manual_seed(1)
    student_b, run_b = fresh(teacher, policy_signal)
    logs_b = [run_b.step(*b) for b in batches[:2]]
    torch.save(run_b.state_dict(), tmp_path / "ckpt.pt")
    rng_at_save = torch.get_rng_state()
    torch.manual_seed(123)  # disturb the global RNG: the checkpoint must restore it
    student_c, run_c = fresh(teacher, policy_signal)
    run_c.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    assert torch.equal(torch.get_rng_state(), rng_at_save)
    logs_c = [run_c.step(*b) for b in batches[2:]]

    assert logs_a == logs_b + logs_c  # identical floats, step numbers included
    for (name, pa), (_, pc) in zip(student_a.state_dict().items(), student_c.state_dict().items()):
        assert torch.equal(pa, pc), name
    for part in ("policy", "balancer"):
        sa, sc = getattr(run_a, part).state_dict(), getattr(run_c, part).state_dict()
        assert all(torch.equal(sa[k], sc[k]) for k in sa), part
    if policy_signal == "paper":
        assert torch.equal(run_a.updater.baseline, run_c.updater.baseline)
    assert torch.equal(run_a.generator.get_state(), run_c.generator.get_state())
    # The quantizers really are part of the student's state.
    assert any("step" in k for k in student_a.state_dict())


def test_load_rejects_another_mode():
    torch.manual_seed(0)
    teacher = EncoderDecoderNet(width=4, depth=1)
    _, d = fresh(teacher)
    student = copy.deepcopy(teacher)
    other = SparkDistiller(student, teacher, torch.optim.Adam(student.parameters()), mode="kd", balancer="gor")
    with pytest.raises(ValueError, match="mode"):
        other.load_state_dict(d.state_dict())
