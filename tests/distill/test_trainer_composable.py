"""SparkDistiller's composable parts: ``compute_loss`` -> the caller's backward / optimiser step ->
``after_optimizer_step``. step() is exactly those parts; accumulating k micro-batches gives the gradient of
one k-times larger batch (qat / kd); the distiller updates once per optimiser step; bf16 autocast matches
float32; fp16 with GradScaler on CUDA (marked ``cuda``)."""

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


def batch(seed=0, b=2, size=8):
    g = torch.Generator().manual_seed(seed)
    y = torch.rand(b, 3, size, size, generator=g)
    return y + 0.1 * torch.randn(y.shape, generator=g), y


def distiller(device="cpu", **kw):
    student, teacher = nets()
    student, teacher = student.to(device), teacher.to(device)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    return student, SparkDistiller(student, None if kw.get("mode") == "qat" else teacher, opt, grid=(2, 2), **kw)


def floats(log):
    return {k: float(v) for k, v in log.items()}


CONFIGS = [
    dict(mode="kd", balancer="gor", grad_clip=0.05),
    dict(mode="spark", policy_signal="credit", credit_every=1, kd_gate="teacher"),
    dict(mode="spark", policy_signal="paper", balancer="lmr"),
    dict(mode="spark", policy_signal="reinforce", credit_every=1, horizon=2, dfd_layer="bottleneck"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_step_is_exactly_its_parts(cfg):
    student_a, a = distiller(**cfg)
    student_b, b = distiller(**cfg)
    for i in range(4):
        log_a = a.step(*batch(i))
        b.optimizer.zero_grad()
        loss, log_b = b.compute_loss(*batch(i))
        loss.backward()
        if b.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(student_b.parameters(), b.config.grad_clip)
        b.optimizer.step()
        log_b.update(b.after_optimizer_step())
        assert log_a == {**floats(log_b), "step": i + 1}
    for pa, pb in zip(student_a.state_dict().values(), student_b.state_dict().values()):
        assert torch.equal(pa, pb)
    for part in ("balancer", "policy"):
        if getattr(a, part) is not None:
            for pa, pb in zip(getattr(a, part).parameters(), getattr(b, part).parameters()):
                assert torch.equal(pa, pb), part


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "cfg",
    [
        dict(mode="qat"),
        dict(mode="kd"),
        dict(mode="kd", balancer="gor", lambda_kd=0.5),
        dict(mode="spark", policy_signal="credit"),
        dict(mode="map", map_signal="lap_var", kd_gate="teacher"),
    ],
    ids=["qat", "kd", "kd-gor", "spark-credit", "map-gate"],
)
def test_accumulated_micro_batches_give_the_large_batch_gradient(cfg):
    k = 3
    x, y = batch(b=2 * k)
    student_big, big = distiller(**cfg)
    loss, _ = big.compute_loss(x, y)
    loss.backward()
    student_acc, acc = distiller(**cfg)
    for xs, ys in zip(x.chunk(k), y.chunk(k)):
        loss, _ = acc.compute_loss(xs, ys)
        (loss / k).backward()
    for g_big, g_acc in zip(grads(student_big), grads(student_acc)):
        torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-7)
    assert any(g.abs().max() > 0 for g in grads(student_big))
    for d in (big, acc):
        d.optimizer.step()
        d.after_optimizer_step()
        assert d.steps == 1
    # The balancer learns from the micro-batches' mean loss: the large batch's, for GoR (linear in the losses).
    for pb, pa in zip(big.balancer.parameters(), acc.balancer.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)
        assert pa.abs() > 0


@pytest.mark.parametrize("signal", ["credit", "paper", "reinforce"])
def test_the_policy_updates_once_per_optimiser_step(signal):
    k = 3
    _, d = distiller(mode="spark", policy_signal=signal, credit_every=1, horizon=1)
    for window in range(3):
        before = [p.detach().clone() for p in d.policy.parameters()]
        rewards = []
        if signal == "paper":
            original = d.updater.update
            d.updater.update = lambda r, lp, e: rewards.append(r) or original(r, lp, e)
        d.optimizer.zero_grad()
        for m in range(k):
            loss, _ = d.compute_loss(*batch(10 * window + m))
            (loss / k).backward()
            # Nothing the distiller learns moves before the optimiser step.
            assert all(torch.equal(p0, p) for p0, p in zip(before, d.policy.parameters()))
        d.optimizer.step()
        log = d.after_optimizer_step()
        assert d.steps == window + 1
        moved = any(not torch.equal(p0, p) for p0, p in zip(before, d.policy.parameters()))
        # "credit" needs a previous batch as held-out data: it first learns in the second window.
        assert moved == (signal != "credit" or window > 0), window
        assert ("policy_loss" in log) == moved
        if signal == "paper":
            assert rewards[0].shape == (k * 2,)  # every image of every micro-batch is rewarded
            d.updater.update = original


def test_misuse_raises_clear_errors_and_validation_records_nothing():
    _, d = distiller(mode="spark")
    with pytest.raises(RuntimeError, match="after_optimizer_step.*compute_loss"):
        d.after_optimizer_step()
    with torch.no_grad():
        loss, log = d.compute_loss(*batch())
    assert loss.shape == () and "loss_kd" in log
    with pytest.raises(RuntimeError, match="after_optimizer_step"):
        d.after_optimizer_step()
    loss, _ = d.compute_loss(*batch())
    with pytest.raises(RuntimeError, match="state_dict.*between"):
        d.state_dict()


def test_the_callers_loss_scaling_never_reaches_the_balancer():
    _, d = distiller(mode="kd", balancer="gor")
    for i in range(2):
        d.optimizer.zero_grad()
        loss, _ = d.compute_loss(*batch(i))
        before = [None if p.grad is None else p.grad.clone() for p in d.balancer.parameters()]
        (loss * 65536.0).backward()  # as a GradScaler would
        after = [p.grad for p in d.balancer.parameters()]
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(after, before))
        d.optimizer.step()
        d.after_optimizer_step()
    reference = distiller(mode="kd", balancer="gor")[1]
    for i in range(2):
        reference.step(*batch(i))
    for p, q in zip(d.balancer.parameters(), reference.balancer.parameters()):
        torch.testing.assert_close(p, q)  # the same balancer as without scaling


@pytest.mark.parametrize(
    "cfg",
    [
        dict(mode="kd"),
        dict(mode="spark", policy_signal="credit", credit_every=1),
        dict(mode="spark", policy_signal="paper", balancer="gor"),
    ],
    ids=["kd", "credit", "paper"],
)
def test_bf16_autocast_losses_are_close_to_float32(cfg):
    runs = {}
    for amp in (False, True):
        student, d = distiller(**cfg)
        logs = []
        for i in range(3):
            d.optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss, log = d.compute_loss(*batch(i))
            assert loss.dtype == torch.float32
            loss.backward()
            d.optimizer.step()
            log.update(d.after_optimizer_step())
            logs.append(floats(log))
        runs[amp] = logs
        if d.policy is not None:
            assert all(p.dtype == torch.float32 for p in d.policy.parameters())
    for f32, bf16 in zip(runs[False], runs[True]):
        assert f32.keys() == bf16.keys()
        for key in ("loss", "loss_task", "loss_kd"):
            assert bf16[key] == pytest.approx(f32[key], rel=3e-2), key
    if "credit" in runs[True][-1]:  # the credit is measured in float32: same sign and size as without autocast
        assert runs[True][-1]["credit_pos"] == pytest.approx(runs[False][-1]["credit_pos"], abs=0.26)


@pytest.mark.cuda
@pytest.mark.parametrize("signal", ["credit", "paper"])
def test_fp16_autocast_with_grad_scaler_on_cuda(signal):
    student, d = distiller("cuda", mode="spark", policy_signal=signal, credit_every=1, balancer="gor")
    scaler = torch.amp.GradScaler("cuda")
    first = None
    for i in range(8):
        x, y = (t.cuda() for t in batch(i % 2))
        d.optimizer.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss, log = d.compute_loss(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(d.optimizer)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        scaler.step(d.optimizer)
        scaler.update()
        log.update(d.after_optimizer_step())
        assert all(torch.isfinite(v) for v in log.values())
        first = float(log["loss"]) if first is None else first
    assert float(log["loss"]) < first


def test_resume_between_accumulation_windows_is_bitwise(tmp_path):
    k = 2

    def train(d, windows):
        out = []
        for w in windows:
            d.optimizer.zero_grad()
            for m in range(k):
                loss, _ = d.compute_loss(*batch(10 * w + m))
                (loss / k).backward()
            d.optimizer.step()
            out.append(floats(d.after_optimizer_step()))
        return out

    cfg = dict(mode="spark", policy_signal="credit", credit_every=1, balancer="gor")
    student_a, a = distiller(**cfg)
    logs_a = train(a, range(4))
    _, b = distiller(**cfg)
    logs_b = train(b, range(2))
    torch.save(b.state_dict(), tmp_path / "ckpt.pt")
    student_c, c = distiller(**cfg)
    c.load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=False))
    logs_c = train(c, range(2, 4))
    assert logs_a == logs_b + logs_c
    for pa, pc in zip(student_a.state_dict().values(), student_c.state_dict().values()):
        assert torch.equal(pa, pc)
