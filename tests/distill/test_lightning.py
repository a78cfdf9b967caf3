"""SparkLightningModule: Lightning's Trainer.fit runs SPARK on CPU, updates the distiller once per optimiser
step under gradient accumulation, and its checkpoints carry the distiller's state. Skipped without Lightning."""

import copy
import math

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed (pip install '.[lightning]')")

from spark_ext.distill.lightning import SparkLightningModule  # noqa: E402
from spark_ext.models import EncoderDecoderNet  # noqa: E402


def data(n=8):
    g = torch.Generator().manual_seed(0)
    y = torch.rand(n, 3, 8, 8, generator=g)
    x = y + 0.1 * torch.randn(y.shape, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)


def module(**kw):
    torch.manual_seed(0)
    teacher = EncoderDecoderNet(width=4, depth=1)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return SparkLightningModule(student, teacher, lr=1e-3, grid=(2, 2), **kw)


def trainer(tmp_path, **kw):
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_runs_spark_with_accumulation_and_clipping(tmp_path, precision):
    m = module(mode="spark", policy_signal="credit", credit_every=1, balancer="gor")
    teacher_before = copy.deepcopy(m.teachers[0].state_dict())
    student_before = copy.deepcopy(m.student.state_dict())
    t = trainer(
        tmp_path,
        max_steps=3,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        precision=precision,
        enable_checkpointing=False,
    )
    t.fit(m, data(12))
    assert m.distiller.steps == 3 == t.global_step  # once per optimiser step, not per micro-batch
    assert not m.teachers[0].training and all(not p.requires_grad for p in m.teachers[0].parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in m.teachers[0].state_dict().items())  # teacher frozen
    assert any(not torch.equal(v, student_before[k]) for k, v in m.student.state_dict().items())
    assert float(m.distiller.balancer.s1.detach()) != 0.0
    logged = t.callback_metrics
    assert {"train/loss", "train/loss_kd", "train/w_mean", "train/gor_s1"} <= set(logged)
    assert torch.isfinite(logged["train/loss"])


def test_checkpoint_carries_the_distiller_state(tmp_path):
    m = module(mode="spark", policy_signal="paper")
    t = trainer(tmp_path, max_steps=2)
    t.fit(m, data())
    ckpt = tmp_path / "last.ckpt"
    t.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["spark_distiller"]
    assert saved["steps"] == 2
    resumed = module(mode="spark", policy_signal="paper")
    t2 = trainer(tmp_path, max_steps=3)
    t2.fit(resumed, data(), ckpt_path=ckpt)
    assert resumed.distiller.steps == 3
    assert not torch.equal(resumed.distiller.updater.baseline, torch.zeros(()))


def test_grad_clip_in_the_config_is_rejected():
    with pytest.raises(ValueError, match="gradient_clip_val"):
        module(mode="kd", grad_clip=1.0)


def test_a_step_the_grad_scaler_skips_teaches_the_distiller_nothing(tmp_path):
    # 16-mixed's GradScaler (here on CPU) skips the step of the batch holding inf; the distiller did learn
    # from it (GoR and the credit policy went NaN, every later loss NaN).
    from lightning.pytorch.plugins.precision import MixedPrecision

    loader = data(8)
    x, y = loader.dataset.tensors
    x[2, 0, 1, 1] = float("inf")  # the second batch
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)  # fp16 gradients of these losses do not overflow
    m = module(mode="spark", policy_signal="credit", credit_every=1, balancer="gor")
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    t = trainer(tmp_path, max_steps=4, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], callbacks=[Record()])
    t.fit(m, loader)
    assert t.global_step == 4 and m.distiller.steps == 3  # the skipped step is not counted
    assert losses[1] != losses[1] and all(v == v for i, v in enumerate(losses) if i != 1)
    assert all(torch.isfinite(p).all() for p in [*m.distiller.balancer.parameters(), *m.distiller.policy.parameters()])


def test_a_step_skipped_for_overflowing_fp16_gradients_is_not_learnt_from(tmp_path):
    # Finite losses, gradients that overflow fp16 at the initial scale: only the scaler knows.
    from lightning.pytorch.plugins.precision import MixedPrecision

    init_scale = 2.0**24
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    m = module(mode="kd", balancer="gor")
    t = trainer(tmp_path, max_steps=8, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    t.fit(m, data(16))
    skipped = round(math.log2(init_scale / scaler.get_scale()))  # each skip halves the scale
    assert 1 <= skipped < 8
    assert m.distiller.steps == 8 - skipped
