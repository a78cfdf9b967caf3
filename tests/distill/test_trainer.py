"""SparkDistiller: training works, the SPARK step computes what docs/spec.md §4 says,
backends agree, runs are deterministic, bad inputs are rejected."""

import copy

import pytest
import torch

import spark_ext
from spark_ext.distill import SparkDistiller, per_image_loss
from spark_ext.models import EncoderDecoderNet, ResidualSRNet


def nets(width=4, seed=0):
    torch.manual_seed(seed)
    teacher = EncoderDecoderNet(width=width, depth=1)
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a perturbed copy: the student starts off the teacher
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def batch(seed=0, b=2, size=16):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(b, 3, size, size, generator=g)
    return y + 0.1 * torch.randn(y.shape, generator=g), y


def test_short_spark_run_loss_falls():
    student, teacher = nets(width=8)
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    d = SparkDistiller(student, teacher, opt, mode="spark", policy_signal="paper", grid=(4, 4))
    batches = [batch(i, b=4, size=24) for i in range(4)]
    logs = [d.step(*batches[i % 4]) for i in range(32)]
    first = sum(entry["loss"] for entry in logs[:4]) / 4
    last = sum(entry["loss"] for entry in logs[-4:]) / 4
    assert last < 0.8 * first
    for entry in logs:
        assert entry["w_mean"] == pytest.approx(1.0, abs=1e-5)
        assert {"reward", "baseline", "policy_loss", "entropy", "w_std", "w_min", "w_max"} <= set(entry)


def test_kd_term_is_weight_map_times_cell_kd():
    student, teacher = nets()
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    d = SparkDistiller(student, teacher, opt, mode="spark", policy_signal="paper", grid=(4, 4))
    seen = {}
    original = d.policy.weight_map
    d.policy.weight_map = lambda a: seen.setdefault("w", original(a))
    x, y = batch()
    log = d.step(x, y)
    with torch.no_grad():
        expected = spark_ext.fused_weighted_kd(student(x), teacher(x), seen["w"])
    assert log["loss_kd"] == pytest.approx(float(expected), rel=1e-5)
    assert log["loss"] == pytest.approx(log["loss_task"] + log["loss_kd"], rel=1e-6)


def test_reward_is_the_per_image_loss_decrease_and_policy_learns_only_then():
    student, teacher = nets()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    d = SparkDistiller(student, teacher, opt, mode="spark", policy_signal="paper", grid=(2, 2), reward_every=2)
    captured = {}
    original = d.updater.update

    def spy(rewards, log_prob, entropy):
        captured["r"] = rewards.clone()
        # Called after the student's backward: L must have left the policy without gradient.
        captured["policy_grads"] = [p.grad for p in d.policy.parameters()]
        return original(rewards, log_prob, entropy)

    d.updater.update = spy
    x, y = batch(b=3)
    before_model = copy.deepcopy(student)
    policy_before = copy.deepcopy(d.policy.state_dict())
    d.step(x, y)  # step 0: a reward step
    with torch.no_grad():
        expected = per_image_loss(before_model(x), y) - per_image_loss(student(x), y)
    torch.testing.assert_close(captured["r"], expected)
    assert all(g is None for g in captured["policy_grads"])
    changed = copy.deepcopy(d.policy.state_dict())
    assert any(not torch.equal(policy_before[k], changed[k]) for k in changed)
    captured.clear()
    log = d.step(x, y)  # step 1: no reward, and L gives the policy no gradient
    assert "r" not in captured and "reward" not in log
    assert all(torch.equal(changed[k], v) for k, v in d.policy.state_dict().items())


def test_ensemble_kd_target_is_the_mean():
    student, t1 = nets()
    _, t2 = nets(seed=1)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    d = SparkDistiller(student, [t1, t2], opt, mode="kd")
    x, y = batch()
    log = d.step(x, y)
    with torch.no_grad():
        expected = spark_ext.fused_weighted_kd(student(x), (t1(x) + t2(x)) / 2)
    assert log["loss_kd"] == pytest.approx(float(expected), rel=1e-5)


def test_qat_mode_needs_no_teacher():
    student, _ = nets()
    d = SparkDistiller(student, None, torch.optim.SGD(student.parameters(), lr=0.1), mode="qat")
    log = d.step(*batch())
    assert log["loss_kd"] == 0.0 and log["loss"] == log["loss_task"]


def run(seed, steps=3, backend=None, policy_signal="paper"):
    student, teacher = nets()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    d = SparkDistiller(
        student,
        teacher,
        opt,
        mode="spark",
        grid=(4, 4),
        seed=seed,
        backend=backend,
        policy_signal=policy_signal,
        credit_every=1,
    )
    return [d.step(*batch(i)) for i in range(steps)]


def test_deterministic_given_seed():
    assert run(seed=3) == run(seed=3)
    assert run(seed=3)[0]["w_std"] != run(seed=4)[0]["w_std"]
    assert run(seed=3, policy_signal="credit") == run(seed=3, policy_signal="credit")


@pytest.mark.skipif(
    "triton" not in spark_ext.registered_backends("difficulty_signals")
    or "triton" not in spark_ext.registered_backends("fused_weighted_kd"),
    reason="the Triton backend of difficulty_signals / fused_weighted_kd is not registered yet",
)
def test_triton_and_reference_backends_give_the_same_losses():
    ref, tri = run(seed=0, backend="reference"), run(seed=0, backend="triton")
    for a, b in zip(ref, tri):
        for key in ("loss", "loss_task", "loss_kd", "w_std", "reward"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_bad_inputs_raise_value_errors_naming_the_problem():
    student, teacher = nets()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    d = SparkDistiller(student, teacher, opt, mode="spark", grid=(2, 2))
    x, y = batch()
    with pytest.raises(ValueError, match="empty batch"):
        d.step(x[:0], y[:0])
    with pytest.raises(ValueError, match="student output shape.*targets shape"):
        d.step(x, y[..., :8])
    sr_teacher = ResidualSRNet(width=4, blocks=1, scale=2)
    d2 = SparkDistiller(student, sr_teacher, opt, mode="kd")
    with pytest.raises(ValueError, match="teacher 0 output shape .* does not match the student output shape"):
        d2.step(x, y)
    with pytest.raises(ValueError, match="dfd layer 'bottleneck_x'"):
        SparkDistiller(student, teacher, opt, mode="kd", dfd_layer="bottleneck_x")
    with pytest.raises(ValueError, match="needs a teacher"):
        SparkDistiller(student, None, opt, mode="spark")
    with pytest.raises(ValueError, match="mode"):
        SparkDistiller(student, teacher, opt, mode="sparkle")
    with pytest.raises(ValueError, match="batch size"):
        d.step(x, y[:1])


def _first_map(distiller, x, y):
    """The map the student's KD term is weighted by on the next step, and that step's loss and logs."""
    seen = {}
    applied = distiller._applied_map
    distiller._applied_map = lambda w: seen.setdefault("w", applied(w))
    loss, log = distiller.compute_loss(x, y)
    del distiller._applied_map
    return seen["w"], loss, log


def test_placement_map_is_the_default_map_at_mean_one_per_image_and_only_the_student_learns_from_it():
    x, y = batch(b=3)
    student, teacher = nets()
    plain = SparkDistiller(student, teacher, torch.optim.SGD(student.parameters(), lr=0.0), grid=(4, 4))
    default_w, *_ = _first_map(plain, x, y)
    opt = torch.optim.SGD(student.parameters(), lr=0.0)
    d = SparkDistiller(student, teacher, opt, grid=(4, 4), policy_map="placement")
    w, loss, log = _first_map(d, x, y)
    assert w.shape == (3, 1, 4, 4) and not w.requires_grad
    assert default_w.mean().item() != pytest.approx(1.0, abs=1e-3)  # the default map does change KD's amount
    torch.testing.assert_close(w.mean(dim=(-2, -1)), torch.ones(3, 1))
    torch.testing.assert_close(w, default_w / default_w.mean(dim=(-2, -1), keepdim=True))
    with torch.no_grad():
        expected_kd = spark_ext.fused_weighted_kd(student(x), teacher(x), w)
    assert log["loss_kd"].item() == pytest.approx(expected_kd.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in d.policy.parameters())  # the policy learns from its credit only
    d.after_optimizer_step()
    torch.testing.assert_close(d.policy_weight_map(torch.rand(2, 4, 4, 4)).mean(dim=(-2, -1)), torch.ones(2, 1))


def test_scale_map_trains_uniform_kd_with_the_maps_loss_growth():
    x, y = batch(b=3)
    student, teacher = nets()
    plain = SparkDistiller(student, teacher, torch.optim.SGD(student.parameters(), lr=0.0), grid=(4, 4))
    default_w, *_ = _first_map(plain, x, y)
    d = SparkDistiller(student, teacher, torch.optim.SGD(student.parameters(), lr=0.0), grid=(4, 4), policy_map="scale")
    loss, log = d.compute_loss(x, y)
    kd = SparkDistiller(student, teacher, torch.optim.SGD(student.parameters(), lr=0.0), mode="kd")
    kd_loss, kd_log = kd.compute_loss(x, y)
    assert log["loss_kd"].item() == pytest.approx(kd_log["loss_kd"].item(), rel=1e-5)  # uniform KD
    assert log["w_mean"].item() == pytest.approx(default_w.mean().item(), rel=1e-6)  # the policy's own map
    l_task, l_kd = log["loss_task"].item(), log["loss_kd"].item()
    scale = (l_task + default_w.mean().item() * l_kd) / (l_task + l_kd)
    assert scale > 1.0 and log["loss_scale"].item() == pytest.approx(scale, rel=1e-5)
    assert loss.item() == pytest.approx(scale * kd_loss.item(), rel=1e-5)
    grads = torch.autograd.grad(loss, list(student.parameters()))
    kd_grads = torch.autograd.grad(kd_loss, list(student.parameters()))
    for g, g_kd in zip(grads, kd_grads):  # the scale is a constant: KD's gradient, times s
        torch.testing.assert_close(g, scale * g_kd, rtol=1e-4, atol=1e-8)
    d.after_optimizer_step()
    kd.after_optimizer_step()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"policy_map": "spread"}, "policy_map"),
        ({"policy_map": "placement", "mode": "kd"}, "needs mode 'spark'"),
        ({"policy_map": "scale", "mode": "map"}, "needs mode 'spark'"),
        ({"policy_map": "placement", "policy_signal": "paper"}, "policy_signal 'credit' or 'reinforce'"),
    ],
)
def test_bad_policy_map_is_a_value_error(overrides, message):
    student, teacher = nets()
    with pytest.raises(ValueError, match=message):
        SparkDistiller(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), **overrides)
