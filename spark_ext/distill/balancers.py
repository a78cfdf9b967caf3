"""Combining the task loss and the KD loss (docs/spec.md §4 and §6).

Each balancer is an ``nn.Module`` mapping ``(L_task, L_kd)`` (0-D tensors) to
the student's total loss. Learnable balancers' parameters are trained by the
distiller's own optimiser on the same total loss (its gradient w.r.t. them),
and averaged over DDP ranks before each step.

* ``none``: ``L_task + L_kd`` (the distiller has already scaled ``L_kd`` by
  ``lambda_kd``).
* ``gor`` (after GoR, arXiv 2509.20854, docs/spec.md §6): ``s1, s2`` init 0,
  ``L = 0.5 e^-s1 L_task + 0.5 e^-s2 L_kd + 0.5 (s1 + s2)``. At the optimum of
  ``s`` each term has weight ``0.5 / L``, i.e. both losses are normalised to a
  comparable magnitude.
* ``lmr`` (learnable magnitude reweighting, docs/spec.md §6): ``theta`` init 0,
  ``L = L_task + softplus(theta) * sg(L_task / (L_kd + eps)) * L_kd``: the KD
  term is rescaled to the task loss's magnitude times a learnable factor.
  Note: as written, ``dL/dtheta = sigmoid(theta) * L_task > 0``, so gradient
  descent only ever lowers ``theta``: the KD factor starts at
  ``softplus(0) = ln 2`` and decays over training (a learned annealing).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validation import check_choice, check_real

BALANCERS = ("none", "gor", "lmr")


class Balancer(nn.Module):
    """Base class: ``forward(l_task, l_kd) -> total``; ``stats()`` for the per-step log."""

    def forward(self, l_task: torch.Tensor, l_kd: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stats(self) -> dict[str, torch.Tensor]:
        return {}


class NoBalancer(Balancer):
    """``L = L_task + L_kd``."""

    def forward(self, l_task: torch.Tensor, l_kd: torch.Tensor) -> torch.Tensor:
        return l_task + l_kd


class GoRBalancer(Balancer):
    """GoR uncertainty-style weighting with two learnable log-scales ``s1, s2`` (init 0)."""

    def __init__(self):
        super().__init__()
        self.s1 = nn.Parameter(torch.zeros(()))
        self.s2 = nn.Parameter(torch.zeros(()))

    def forward(self, l_task: torch.Tensor, l_kd: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.exp(-self.s1) * l_task + 0.5 * torch.exp(-self.s2) * l_kd + 0.5 * (self.s1 + self.s2)

    def stats(self) -> dict[str, torch.Tensor]:
        return {"gor_s1": self.s1.detach(), "gor_s2": self.s2.detach()}


class LMRBalancer(Balancer):
    """Learnable magnitude reweighting: one scalar ``theta`` (init 0)."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(()))
        self.eps = check_real(eps, "eps")

    def forward(self, l_task: torch.Tensor, l_kd: torch.Tensor) -> torch.Tensor:
        ratio = (l_task / (l_kd + self.eps)).detach()
        return l_task + F.softplus(self.theta) * ratio * l_kd

    def stats(self) -> dict[str, torch.Tensor]:
        return {"lmr_factor": F.softplus(self.theta.detach())}


def make_balancer(name: str, **kwargs) -> Balancer:
    """``"none"`` | ``"gor"`` | ``"lmr"`` -> a fresh balancer module."""
    check_choice(name, "balancer", BALANCERS)
    return {"none": NoBalancer, "gor": GoRBalancer, "lmr": LMRBalancer}[name](**kwargs)
