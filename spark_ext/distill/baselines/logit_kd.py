"""Classification KD: cross-entropy plus temperature-softened logit KD (Hinton et al. 2015).

:class:`LogitDistiller` is :class:`~spark_ext.distill.SparkDistiller`'s sibling
for classifiers. Per :meth:`LogitDistiller.step` on ``(inputs, labels)``:

* ``L_task = CE(student(inputs), labels)``;
* ``"kd"``: ``L_kd = T^2 KL(softmax(t / T) || softmax(s / T))`` (batch mean), where
  for an ensemble ``t`` is the teachers' mean logit; ``"qat"``: no KD term;
* ``L = balancer(L_task, lambda_kd * L_kd)`` with the same balancers as the
  restoration trainer (``none`` / ``gor`` / ``lmr``, their own Adam).

The ``T^2`` factor keeps the KD gradient's scale independent of ``T``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..._validation import check_choice, check_real, check_tensor
from ..balancers import BALANCERS, make_balancer
from ..trainer import _as_teacher_list, _clone

LOGIT_MODES = ("qat", "kd")


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``T^2 * mean_b KL(softmax(t_b / T) || softmax(s_b / T))``: 0-D float32, differentiable w.r.t. the student logits.

    Both logits ``[B, K]``; the teacher's are detached."""
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logits must both be [B, K] of one shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    t = check_real(temperature, "temperature")
    if t <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / t, 1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, 1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


@dataclasses.dataclass
class LogitDistillConfig:
    """Settings of :class:`LogitDistiller`.

    mode ``"qat"`` | ``"kd"``; balancer ``"none"`` | ``"gor"`` | ``"lmr"``; temperature ``T``; lambda_kd (KD
    weight); balancer_lr (the balancer's Adam); grad_clip (optional max-norm of the student's gradients)."""

    mode: str = "kd"
    balancer: str = "none"
    temperature: float = 4.0
    lambda_kd: float = 1.0
    balancer_lr: float = 1e-2
    grad_clip: Optional[float] = None

    def validate(self) -> LogitDistillConfig:
        check_choice(self.mode, "mode", LOGIT_MODES)
        check_choice(self.balancer, "balancer", BALANCERS)
        if check_real(self.temperature, "temperature") <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        check_real(self.lambda_kd, "lambda_kd")
        if check_real(self.balancer_lr, "balancer_lr") <= 0:
            raise ValueError(f"balancer_lr must be > 0, got {self.balancer_lr}")
        if self.grad_clip is not None and check_real(self.grad_clip, "grad_clip") <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.balancer != "none" and self.mode == "qat":
            raise ValueError(f"balancer {self.balancer!r} needs a KD term; mode 'qat' has none")
        return self


class LogitDistiller:
    """QAT / logit-KD training step for a classifier, with optional balancer and teacher ensemble.

    Args: student, teacher (module, list = ensemble of mean logits, or None for
    ``"qat"``), the user's optimizer, a :class:`LogitDistillConfig` and keyword overrides.
    ``step(inputs, labels)`` returns a log of floats (``loss``, ``loss_task``,
    ``loss_kd``, balancer scalars, ``step``); ``state_dict`` / ``load_state_dict``
    checkpoint the student, its optimiser, the balancer and its optimiser, and the step count.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Union[None, nn.Module, Sequence[nn.Module]],
        optimizer: torch.optim.Optimizer,
        config: Optional[LogitDistillConfig] = None,
        **overrides: Any,
    ):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config = dataclasses.replace(config or LogitDistillConfig(), **overrides).validate()
        self.student, self.optimizer = student, optimizer
        self.teachers = _as_teacher_list(teacher)
        if self.config.mode == "kd" and not self.teachers:
            raise ValueError("mode 'kd' needs a teacher (got none)")
        for t in self.teachers:
            t.eval()
        params = list(student.parameters())
        device = params[0].device if params else torch.device("cpu")
        self.balancer = make_balancer(self.config.balancer).to(device)
        bal = list(self.balancer.parameters())
        self.balancer_optimizer = torch.optim.Adam(bal, lr=self.config.balancer_lr) if bal else None
        self.steps = 0

    @torch.no_grad()
    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Mean logits of the teachers (no grad): ``[B, K]``."""
        outs = [t(inputs) for t in self.teachers]
        return outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)

    def step(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One step on ``inputs [B, ...]`` and integer ``labels [B]``. A non-finite loss (a batch holding inf
        or NaN) skips the step: nothing (student, optimisers, balancer, step count) changes, and the log has
        ``skipped`` 1.0."""
        cfg = self.config
        check_tensor(inputs, "inputs")
        check_tensor(labels, "labels", ndim=1)
        if inputs.dim() == 0 or inputs.shape[0] == 0 or labels.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"inputs {tuple(inputs.shape)} and labels {tuple(labels.shape)} need the same batch size >= 1"
            )
        if labels.dtype != torch.int64:
            raise TypeError(f"labels must be int64 class indices, got {labels.dtype}")
        logits = self.student(inputs)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            raise ValueError(f"student output must be [B, K] logits, got {getattr(logits, 'shape', type(logits))}")
        l_task = F.cross_entropy(logits.float(), labels)
        if cfg.mode == "kd":
            l_kd = logit_kd_loss(logits, self.teacher_logits(inputs), cfg.temperature)
        else:
            l_kd = torch.zeros((), device=l_task.device)
        total = self.balancer(l_task, cfg.lambda_kd * l_kd)
        log = {"loss": total.detach(), "loss_task": l_task.detach(), "loss_kd": l_kd.detach()}
        if not bool(torch.isfinite(torch.stack(list(log.values()))).all()):
            log["skipped"] = torch.ones((), device=total.device)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if self.balancer_optimizer is not None:
                self.balancer_optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
            if self.balancer_optimizer is not None:
                self.balancer_optimizer.step()
            self.optimizer.step()
            self.steps += 1
        log.update(self.balancer.stats())
        keys = list(log)
        out = dict(zip(keys, torch.stack([log[k].float().reshape(()) for k in keys]).tolist()))
        out["step"] = self.steps
        return out

    def state_dict(self) -> dict:
        state = {
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "balancer": self.balancer.state_dict(),
            "steps": self.steps,
            "mode": self.config.mode,
            "balancer_name": self.config.balancer,
        }
        if self.balancer_optimizer is not None:
            state["balancer_optimizer"] = self.balancer_optimizer.state_dict()
        return _clone(state)

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; ``state`` is copied (the optimisers would otherwise keep its
        tensors and update them in place), so one in-memory checkpoint can be restored any number of times."""
        state = _clone(state)
        for key, mine in (("mode", self.config.mode), ("balancer_name", self.config.balancer)):
            if state[key] != mine:
                raise ValueError(f"checkpoint {key} {state[key]!r} differs from this distiller's {mine!r}")
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.balancer.load_state_dict(state["balancer"])
        if self.balancer_optimizer is not None:
            self.balancer_optimizer.load_state_dict(state["balancer_optimizer"])
        self.steps = int(state["steps"])


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on ``(x [N, ...], y [N])`` in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    correct = sum(
        int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        for i in range(0, len(y), batch_size)
    )
    model.train(was_training)
    return correct / max(len(y), 1)
