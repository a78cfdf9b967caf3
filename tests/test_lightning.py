"""SparkLightningModule: Lightning's Trainer.fit runs SPARK on CPU, updates the distiller once per optimiser
step under gradient accumulation, and its checkpoints carry the distiller's state. Skipped without Lightning."""

import copy

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
