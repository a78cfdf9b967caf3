"""SPARK in PyTorch Lightning: :class:`SparkLightningModule` (needs the ``[lightning]`` extra).

Lightning owns the loop (backward, ``accumulate_grad_batches``, ``precision="bf16-mixed"`` /
``"16-mixed"``, ``gradient_clip_val``, schedulers, DDP, checkpoints); the module plugs the
distiller's two parts into it: ``training_step`` returns :meth:`SparkDistiller.compute_loss`'s loss,
and ``optimizer_step`` calls :meth:`SparkDistiller.after_optimizer_step` after the real optimiser
step (once per accumulation window; with ``skipped=True`` when ``"16-mixed"``'s GradScaler skipped
it, which it tells by the lowered scale). The distiller is built in ``on_fit_start``, once the student is
on its device and the optimiser exists; its state (policy, balancer, generators, step count) is saved
in and restored from Lightning's checkpoints under the key ``"spark_distiller"``.

Usage::

    module = SparkLightningModule(student, teacher, lr=1e-3, mode="spark")
    lightning.Trainer(max_steps=1000, precision="bf16-mixed", accumulate_grad_batches=4,
                      gradient_clip_val=1.0).fit(module, loader)   # loader yields (inputs, targets)

Override ``configure_optimizers`` for another optimiser or a scheduler (one optimiser, over the
student's parameters).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "spark_ext.distill.lightning needs PyTorch Lightning: pip install 'spark-ext[lightning]' (or lightning)"
    ) from e

from .._validation import check_real
from .trainer import DistillConfig, SparkDistiller


class SparkLightningModule(pl.LightningModule):
    """A LightningModule training ``student`` with a :class:`SparkDistiller`.

    Args:
        student: the (quantized) student; its parameters are the only ones trained by the optimiser.
        teacher: frozen teacher(s) as for :class:`SparkDistiller` (kept in eval mode, never trained), or None
            for ``mode="qat"``.
        config: a :class:`DistillConfig`; keyword ``overrides`` replace its fields. ``grad_clip`` is not used
            here: set the Trainer's ``gradient_clip_val``.
        lr: the default optimiser's (Adam) learning rate.
    Batches are ``(inputs, targets)`` pairs. Logs every ``compute_loss`` / ``after_optimizer_step`` value as
    ``train/<name>``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Union[None, nn.Module, Sequence[nn.Module]],
        config: Optional[DistillConfig] = None,
        *,
        lr: float = 1e-3,
        **overrides: Any,
    ):
        super().__init__()
        self.student = student
        teachers = [] if teacher is None else [teacher] if isinstance(teacher, nn.Module) else list(teacher)
        self.teachers = nn.ModuleList(teachers)  # submodules: Lightning moves them to the student's device
        for p in self.teachers.parameters():
            p.requires_grad_(False)
        self.config = config
        self.overrides = overrides
        self.lr = check_real(lr, "lr")
        self.distiller: Optional[SparkDistiller] = None
        self._restored: Optional[dict] = None
        # Checked now (clear errors before fit), built again in on_fit_start with the real optimiser.
        checked = dataclasses.replace(config or DistillConfig(), **overrides).validate()
        if checked.grad_clip is not None:
            raise ValueError("grad_clip is the Trainer's job in Lightning: pass gradient_clip_val to lightning.Trainer")

    def train(self, mode: bool = True):
        super().train(mode)
        self.teachers.eval()  # Lightning calls train() on the whole module at each epoch
        return self

    def configure_optimizers(self):
        return torch.optim.Adam(self.student.parameters(), lr=self.lr)

    def on_fit_start(self) -> None:
        optimizer = self.optimizers(use_pl_optimizer=False)
        if isinstance(optimizer, (list, tuple)):
            raise ValueError(f"SparkLightningModule trains the student with one optimiser, got {len(optimizer)}")
        teacher = list(self.teachers) or None
        self.distiller = SparkDistiller(self.student, teacher, optimizer, self.config, **self.overrides)
        if self._restored is not None:
            self.distiller.load_state_dict(self._restored, restore_global_rng=False)
            self._restored = None

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.student(inputs)

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        loss, logs = self.distiller.compute_loss(inputs, targets)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # "16-mixed": the GradScaler skips a step on inf/NaN gradients and then lowers its scale;
        # the distiller must not learn from a step the student did not take.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
        super().optimizer_step(*args, **kwargs)
        skipped = scale is not None and scaler.get_scale() < scale
        logs = self.distiller.after_optimizer_step(skipped=skipped)
        if logs:
            self.log_dict({f"train/{k}": v for k, v in logs.items()})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.distiller is not None:
            checkpoint["spark_distiller"] = self.distiller.state_dict(include_student=False)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._restored = checkpoint.get("spark_distiller")
