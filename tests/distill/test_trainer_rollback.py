"""SparkDistiller's state machines under skipped optimiser steps, rollbacks and held-out sources.

A skipped step (a GradScaler that found inf/NaN gradients, a non-finite loss, ``skipped=True``) leaves every
distiller state as if its batches never happened; ``load_state_dict`` restores exactly what a fresh distiller
resuming from the same checkpoint has; ``held_out`` sources are cycled or refused with a clear error.
"""

import copy

import pytest
import torch

from spark_ext.distill import SparkDistiller
from spark_ext.models import EncoderDecoderNet


def nets(seed=0):
    torch.manual_seed(seed)
    teacher = EncoderDecoderNet(width=4, depth=1)
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a perturbed copy: the student starts off the teacher
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def batch(seed=0, b=2, size=8, poison=False):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(b, 3, size, size, generator=g)
    x = y + 0.1 * torch.randn(y.shape, generator=g)
    if poison:
        x[0, 1, 2, 3] = float("inf")
    return x, y


def distiller(**kw):
    student, teacher = nets()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    return SparkDistiller(student, teacher, opt, grid=(2, 2), **kw)


def assert_same_state(a, b, path="state"):
    """Nested dicts / lists / tensors equal bitwise (NaN nowhere)."""
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
        if a.is_floating_point():
            assert torch.isfinite(a).all(), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


CONFIGS = [
    dict(mode="kd", balancer="gor"),
    dict(mode="spark", credit_every=1),  # the default credit signal, every step
    dict(mode="spark", policy_signal="paper", balancer="lmr"),
    dict(mode="spark", policy_signal="reinforce", credit_every=1, horizon=2),
    dict(mode="map", map_signal="random"),
    dict(mode="kd", diffkd_layer="bottleneck"),
]
IDS = ["kd-gor", "spark-credit", "paper-lmr", "reinforce", "map-random", "diffkd"]


def scaler_loop(d, windows, scaler=None, k=2):
    """The README's loop: bf16 autocast, a GradScaler, k micro-batches per optimiser step.

    ``windows``: a list of lists of batches. Returns the float logs of every optimiser step.
    """
    scaler = scaler or torch.amp.GradScaler("cpu")
    logs = []
    for window in windows:
        d.optimizer.zero_grad()
        for x, y in window:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, log = d.compute_loss(x, y)
            scaler.scale(loss / k).backward()
        scaler.step(d.optimizer)
        scaler.update()
        log.update(d.after_optimizer_step())
        logs.append({key: float(v) for key, v in log.items()})
    return logs


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_a_step_the_grad_scaler_skips_teaches_the_distiller_nothing(cfg):
    # A batch holding inf: the scaler skips the step, but GoR and the credit policy learnt from the NaN
    # record and every later loss was NaN.
    good = [[batch(10 * w + m) for m in range(2)] for w in range(4)]
    bad = [batch(90), batch(91, poison=True)]
    a = distiller(**cfg)
    scaler = torch.amp.GradScaler("cpu")
    logs_a = scaler_loop(a, good[:2], scaler)
    before = a.state_dict()
    logs_a += scaler_loop(a, [bad], scaler)
    assert logs_a[2]["skipped"] == 1.0
    assert_same_state(a.state_dict(), before)
    logs_a += scaler_loop(a, good[2:], scaler)
    assert all(v == v for log in logs_a[3:] for v in log.values()), "a NaN after the skipped step"
    if cfg.get("diffkd_layer"):
        return  # DiffKD's modules learn from the scaled loss: the halved scale moves them (Adam's eps) a little
    b = distiller(**cfg)
    logs_b = scaler_loop(b, good, torch.amp.GradScaler("cpu"))
    assert a.steps == b.steps == 4
    assert logs_a[:2] + logs_a[3:] == logs_b
    assert_same_state(a.state_dict(), b.state_dict())


def test_the_log_of_a_skipped_window_keeps_compute_losss_values():
    d = distiller(mode="kd", balancer="gor")
    logs = scaler_loop(d, [[batch(0), batch(1, poison=True)]])
    assert logs[0]["skipped"] == 1.0 and d.steps == 0
    assert d.balancer.s1.item() == 0.0 and d.balancer.s2.item() == 0.0


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_step_skips_a_non_finite_batch(cfg):
    a = distiller(**cfg)
    b = distiller(**cfg)
    for i in range(4):
        if i == 2:
            log = a.step(*batch(99, poison=True))
            assert log["skipped"] == 1.0 and log["step"] == 2
        assert a.step(*batch(i)) == b.step(*batch(i))
    assert_same_state(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_skipped_true_discards_the_window(cfg):
    # e.g. fp16 gradients that overflow while the loss is finite: the caller knows the step was skipped.
    a = distiller(**cfg)
    b = distiller(**cfg)
    for i in range(4):
        if i in (1, 2):
            for m in range(2):
                loss, _ = a.compute_loss(*batch(50 + 2 * i + m))
                loss.backward()
            a.optimizer.zero_grad()
            assert a.after_optimizer_step(skipped=True).keys() == {"skipped"}
        assert a.step(*batch(i)) == b.step(*batch(i))
    assert_same_state(a.state_dict(), b.state_dict())
    a.compute_loss(*batch(0))
    with pytest.raises(TypeError, match="skipped must be a bool, got 'yes'"):
        a.after_optimizer_step(skipped="yes")


@pytest.mark.parametrize(
    "cfg",
    [
        dict(mode="spark", credit_every=1, balancer="gor"),
        dict(mode="spark", policy_signal="paper"),
        dict(mode="spark", policy_signal="reinforce", credit_every=1, horizon=2),
        dict(mode="kd", diffkd_layer="bottleneck"),
    ],
    ids=["credit-gor", "paper", "reinforce", "diffkd"],
)
@pytest.mark.parametrize("at", [0, 2])
def test_load_state_dict_rolls_back_to_exactly_a_clean_resume(cfg, at):
    # Micro-batches recorded before the rollback were kept and learnt from by the next optimiser step;
    # a DiffKD checkpoint from before its first step kept the trained modules.
    a = distiller(**cfg)
    for i in range(at):
        a.step(*batch(i))
    checkpoint = a.state_dict()
    checkpoint_copy = copy.deepcopy(checkpoint)
    for i in range(at, at + 2):
        a.step(*batch(i))
    for m in range(2):  # an abandoned step
        a.compute_loss(*batch(70 + m))
    a.load_state_dict(checkpoint)
    b = distiller(**cfg)
    b.load_state_dict(checkpoint)
    for i in range(at, at + 3):
        assert a.step(*batch(100 + i)) == b.step(*batch(100 + i))
    assert_same_state(a.state_dict(), b.state_dict())
    # The optimisers did not keep the checkpoint's tensors and update them in place: it restores again.
    a.load_state_dict(checkpoint)
    c = distiller(**cfg)
    c.load_state_dict(copy.deepcopy(checkpoint_copy))
    assert_same_state(a.state_dict(), c.state_dict())


def credit_distiller(held_out, **kw):
    return distiller(mode="spark", credit_every=1, held_out=held_out, **kw)


def test_a_one_pass_held_out_iterator_that_runs_out_gives_a_clear_error():
    d = credit_distiller(iter([batch(40)]))
    d.step(*batch(0))
    with pytest.raises(ValueError, match=r"held_out ran out of batches: .*pass a re-iterable source"):
        d.step(*batch(1))
    # The failed call recorded nothing: the distiller goes on with a new source.
    assert d.steps == 1 and not d._micro
    d.held_out, d._held_out_pass = [batch(41)], None
    assert d.step(*batch(1))["step"] == 2


def test_a_compute_loss_that_fails_draws_nothing_from_the_private_generators():
    held = [batch(40), batch(41)]
    cfg = dict(mode="spark", credit_every=1, diffkd_layer="bottleneck")  # DiffKD draws noise before the credit
    failing = distiller(held_out=iter(held[:1]), **cfg)
    clean = distiller(held_out=iter(held), **cfg)
    assert failing.step(*batch(0)) == clean.step(*batch(0))
    with pytest.raises(ValueError, match="held_out ran out of batches"):
        failing.step(*batch(1))
    failing.held_out, failing._held_out_pass = iter(held[1:]), None
    assert failing.step(*batch(1)) == clean.step(*batch(1))
    assert_same_state(failing.state_dict(), clean.state_dict())


def test_a_re_iterable_held_out_source_is_cycled():
    held = [batch(40), batch(41)]
    cycled = credit_distiller(held)
    listed = credit_distiller(iter(held + held + held[:1]))
    for i in range(5):
        assert cycled.step(*batch(i)) == listed.step(*batch(i))


def test_held_out_arguments_are_checked():
    with pytest.raises(TypeError, match="held_out must be an iterable of .* got int"):
        credit_distiller(5)
    with pytest.raises(TypeError, match=r"held_out must yield \(inputs, targets\) pairs of tensors, got Tensor"):
        credit_distiller([torch.rand(2, 3, 8, 8)]).step(*batch(0))
    with pytest.raises(ValueError, match="held_out yields no batches"):
        credit_distiller([]).step(*batch(0))


def test_a_non_finite_held_out_batch_skips_only_the_policy_step():
    held = [batch(40), batch(41, poison=True), batch(42)]
    d = credit_distiller(held)
    before = None
    for i in range(4):
        if i == 1:
            before = copy.deepcopy(d.state_dict())
        log = d.step(*batch(i))
        assert "skipped" not in log and log["step"] == i + 1
        assert ("policy_loss" in log) == (i != 1), i
        if i == 1:  # the student stepped; the policy, its optimiser and the credit's running scale did not
            after = d.state_dict()
            for key in ("policy", "policy_optimizer", "signal_scale"):
                assert_same_state(after[key], before[key], key)
    assert all(torch.isfinite(p).all() for p in d.policy.parameters())


def test_diffkd_does_not_step_on_overflowing_gradients():
    # A GradScaler's overflow with a finite loss: only the student's optimiser is unscaled and skipped,
    # DiffKD's Adam stepped on inf gradients and its modules went NaN for good.
    d = distiller(mode="kd", diffkd_layer="bottleneck")
    d.step(*batch(0))
    before = copy.deepcopy(d.diffkd.state_dict())
    loss, _ = d.compute_loss(*batch(1))
    (loss * 3e38).backward()  # as an overflowing loss scale would
    assert not all(torch.isfinite(p.grad).all() for p in d.diffkd.modules.parameters() if p.grad is not None)
    d.optimizer.zero_grad()  # the scaler skips the student's step
    d.after_optimizer_step()  # the caller does not say so
    assert_same_state(d.diffkd.state_dict()["modules"], before["modules"])
    assert all(v == v for v in d.step(*batch(2)).values())
