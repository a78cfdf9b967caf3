"""SPARK's weighting policy (docs/spec.md §4): difficulty signals -> Beta per cell -> KD weight map.

The policy is a small CNN over the cell grid. It never receives gradient from
the student's loss: its sample is detached before it weights the KD term, and
it learns only through REINFORCE (:mod:`spark_ext.distill.reinforce`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validation import check_int, check_real, check_tensor

# Beta samples are clamped into (0, 1) by this much before log-probabilities
# and weights are taken: fp32 Dirichlet sampling can return exactly 0 or 1,
# where log pi is -inf.
ACTION_EPS = 1e-6


@dataclasses.dataclass
class PolicySample:
    """One draw of the policy for a batch.

    action: ``[B, 1, Gh, Gw]`` float32 in ``[eps, 1 - eps]``, no gradient.
    log_prob: ``[B]``, ``sum_cells log pi(a | s)``, differentiable w.r.t. the policy.
    entropy: ``[B]``, ``sum_cells H(Beta(alpha, beta))``, differentiable w.r.t. the policy.
    alpha, beta: ``[B, 1, Gh, Gw]`` concentrations (>= 1), differentiable.
    """

    action: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor


def standardize_features(signals: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``log1p(signals)`` standardised per image and per channel over the cells.

    ``(f - mean) / (std + eps)`` with the population std over the ``Gh*Gw``
    cells (so a 1x1 grid gives zeros rather than NaN). Signals are
    non-negative by construction; they are clamped at 0 first so that a
    rounding-negative value cannot reach ``log1p``'s pole.

    Args:
        signals: ``[B, 4, Gh, Gw]`` float (docs/spec.md §2's lap_var, pix_var, recon_err, kd_gap).
    Returns:
        ``[B, 4, Gh, Gw]`` float32 features, no gradient is needed (signals carry none).
    """
    f = torch.log1p(signals.float().clamp_min(0))
    mean = f.mean(dim=(-2, -1), keepdim=True)
    std = f.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (f - mean) / (std + eps)


def _beta(alpha: torch.Tensor, beta: torch.Tensor) -> torch.distributions.Beta:
    """``Beta(alpha, beta)`` without torch.distributions' argument / sample validation.

    That validation (on by default) checks the parameters and every sample with
    a Python ``if`` on a tensor, i.e. a host sync on each construction and each
    ``log_prob`` on a GPU, in the training step's hot path. Nothing here needs
    it: ``softplus(.) + 1 >= 1`` by construction and actions are clamped into
    ``(0, 1)`` before their log-density is taken.
    """
    return torch.distributions.Beta(alpha, beta, validate_args=False)


class SparkPolicy(nn.Module):
    """Per-cell Beta policy of docs/spec.md §4.

    ``Conv3x3(in->hidden) ReLU Conv3x3(hidden->hidden) ReLU Conv1x1(hidden->2)``
    (padding 1 on the 3x3s, so the grid size is kept), then
    ``alpha, beta = softplus(.) + 1`` (concentrations >= 1 make the Beta
    unimodal and its log-density bounded) and ``a ~ Beta(alpha, beta)`` per cell.

    Args:
        in_channels: number of signal channels (4).
        hidden: CNN width (16).
        feature_eps: eps of the per-image standardisation (1e-6).
        w_min, w_max: optional clamp of the weight map (then renormalised to mean 1).
    """

    def __init__(
        self,
        in_channels: int = 4,
        hidden: int = 16,
        *,
        feature_eps: float = 1e-6,
        w_min: Optional[float] = None,
        w_max: Optional[float] = None,
    ):
        super().__init__()
        in_channels, hidden = check_int(in_channels, "in_channels"), check_int(hidden, "hidden")
        if in_channels < 1 or hidden < 1:
            raise ValueError(f"in_channels and hidden must be >= 1, got {in_channels}, {hidden}")
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, 2, 1),
        )
        self.in_channels = in_channels
        self.feature_eps = check_real(feature_eps, "feature_eps")
        if self.feature_eps <= 0:  # a 1x1 grid (std 0) would give 0/0
            raise ValueError(f"feature_eps must be > 0, got {feature_eps}")
        for value, name in ((w_min, "w_min"), (w_max, "w_max")):
            if value is not None and check_real(value, name) <= 0:
                raise ValueError(f"{name} must be > 0 (weights are positive), got {value}")
        if w_min is not None and w_max is not None and w_min > w_max:
            raise ValueError(f"w_min must be <= w_max, got w_min={w_min}, w_max={w_max}")
        self.w_min, self.w_max = w_min, w_max

    def forward(self, signals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``signals [B, 4, Gh, Gw]`` -> ``(alpha, beta)``, each ``[B, 1, Gh, Gw]`` float32 >= 1,
        differentiable w.r.t. the policy's parameters (not w.r.t. the signals' source)."""
        check_tensor(signals, "signals", ndim=4)
        if signals.shape[1] != self.in_channels:
            raise ValueError(f"signals must have {self.in_channels} channels, got shape {tuple(signals.shape)}")
        out = self.net(standardize_features(signals.detach(), self.feature_eps))
        conc = F.softplus(out) + 1.0
        return conc[:, 0:1], conc[:, 1:2]

    def distribution(self, signals: torch.Tensor) -> torch.distributions.Beta:
        """The per-cell ``Beta(alpha, beta)`` for ``signals`` (batch shape ``[B, 1, Gh, Gw]``)."""
        return _beta(*self(signals))

    def sample(self, signals: torch.Tensor, generator: Optional[torch.Generator] = None) -> PolicySample:
        """Draw ``a ~ Beta(alpha, beta)`` per cell from ``generator`` (on the signals' device).

        Sampling goes through ``torch._sample_dirichlet`` (a Beta is a
        2-component Dirichlet; this is what ``torch.distributions.Beta`` does)
        because it accepts a generator, so the policy's randomness is private,
        seedable and checkpointable without touching the global RNG.
        """
        alpha, beta = self(signals)
        with torch.no_grad():
            conc = torch.stack([alpha, beta], dim=-1)
            action = torch._sample_dirichlet(conc, generator=generator)[..., 0]
            action = action.clamp(ACTION_EPS, 1.0 - ACTION_EPS)
        dist = _beta(alpha, beta)
        log_prob = dist.log_prob(action).flatten(1).sum(1)
        entropy = dist.entropy().flatten(1).sum(1)
        return PolicySample(action, log_prob, entropy, alpha, beta)

    def log_prob(self, signals: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``sum_cells log pi(action | signals)``: ``[B]``, differentiable w.r.t. the policy."""
        action = action.detach().clamp(ACTION_EPS, 1.0 - ACTION_EPS)
        return self.distribution(signals).log_prob(action).flatten(1).sum(1)

    def weight_map(self, action: torch.Tensor) -> torch.Tensor:
        """KD weights from actions: ``w = a / mean_cells(a)`` per image (mean 1).

        If ``w_min``/``w_max`` are set, ``w`` is clamped to them once and
        renormalised to mean 1 (so after renormalisation a value can exceed a
        bound by the renormalisation factor; the mean-1 property wins).
        Returns ``[B, 1, Gh, Gw]`` float32, detached (the policy learns by REINFORCE only).
        """
        a = action.detach().float()
        w = a / a.mean(dim=(-2, -1), keepdim=True)
        if self.w_min is not None or self.w_max is not None:
            w = w.clamp(self.w_min, self.w_max)
            w = w / w.mean(dim=(-2, -1), keepdim=True)
        return w

    @torch.no_grad()
    def mean_weight_map(self, signals: torch.Tensor) -> torch.Tensor:
        """Deterministic weight map from the Beta means ``alpha / (alpha + beta)`` (for pictures)."""
        alpha, beta = self(signals)
        return self.weight_map(alpha / (alpha + beta))
