"""REINFORCE for the SPARK policy with an EMA baseline (docs/spec.md §4).

Choices where docs/spec.md §4 is silent (all parameters of :class:`ReinforceUpdater`):

* The advantage uses the baseline *before* this step's update
  (``A_b = r_b - b_old``; a baseline that included the current rewards would
  bias the gradient), then ``b <- 0.9 b + 0.1 mean(r)``. ``b`` starts at 0.
* "Normalised over the batch" divides by the batch RMS of the advantage,
  ``A_b / sqrt(mean_b A_b^2 + eps)`` (eps 1e-12): the scale of the reward
  (loss decreases of order 1e-4) no longer sets the policy's step size, and,
  unlike subtracting the batch mean, it keeps the baseline's meaning and is
  defined for a batch of one.
* ``H(pi)`` is the entropy of the joint per-cell policy: the sum over cells of
  each Beta's entropy, averaged over the batch (like ``log pi``, which is the
  sum over cells).

Loss: ``-(mean_b A_b * sum_cells log pi(a_b | s_b)) - beta_H * mean_b H_b``.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._validation import check_real
from . import distributed


def normalize_advantage(rewards: torch.Tensor, baseline: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``(r - b) / sqrt(mean_b((r - b)^2) + eps)``: ``[B]`` float32, no gradient.

    This is our reading of docs/spec.md §4's "advantage normalised over the batch":
    the spec's loss keeps ``r_b - b`` (centred by the EMA baseline), so the
    normalisation only rescales it by a batch statistic — the RMS of
    ``r - b`` — and never re-centres it. Signs and ratios of the advantages
    are those of ``r_b - b``; only the step size stops depending on the
    reward's scale (loss decreases of order 1e-4).

    Standardising instead (``(A - mean_b A) / std_b A``) would subtract the
    batch mean and so cancel ``b`` exactly, making the spec's baseline dead
    code, and is undefined for a batch of one; here ``B = 1`` gives
    ``sign(r - b)``. When every ``r_b`` equals ``b`` the advantage is 0 (``eps``
    keeps the division finite).

    Args:
        rewards: ``[B]`` per-image rewards (detached here).
        baseline: 0-D EMA baseline, the value *before* this step's update.
        eps: added to the mean square (1e-12; rewards are ~1e-4, squares ~1e-8).
    """
    adv = rewards.detach().float() - baseline.float()
    return adv / torch.sqrt(adv.pow(2).mean() + eps)


def reinforce_loss(
    log_prob: torch.Tensor,
    entropy: torch.Tensor,
    advantage: torch.Tensor,
    entropy_coef: float = 1e-3,
) -> torch.Tensor:
    """``-(mean_b A_b * log_prob_b) - entropy_coef * mean_b entropy_b``.

    Args:
        log_prob, entropy: ``[B]`` (sums over cells), differentiable w.r.t. the policy.
        advantage: ``[B]``, treated as a constant.
    Returns:
        0-D float32 loss.
    """
    return -(advantage.detach() * log_prob).mean() - entropy_coef * entropy.mean()


class ReinforceUpdater:
    """Owns the policy's optimiser (Adam, lr 1e-4) and the EMA baseline.

    ``update(rewards, log_prob, entropy)`` computes the loss, backpropagates
    into the policy only, averages the policy gradients over DDP ranks, takes
    one Adam step and updates the baseline with the (rank-averaged) mean reward.
    """

    def __init__(
        self,
        policy: torch.nn.Module,
        lr: float = 1e-4,
        *,
        baseline_momentum: float = 0.9,
        entropy_coef: float = 1e-3,
        advantage_eps: float = 1e-12,
        process_group: Optional[object] = None,
    ):
        self.policy = policy
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=check_real(lr, "policy_lr"))
        self.momentum = check_real(baseline_momentum, "baseline_momentum")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"baseline_momentum must be in [0, 1), got {baseline_momentum}")
        self.entropy_coef = check_real(entropy_coef, "entropy_coef")
        self.advantage_eps = check_real(advantage_eps, "advantage_eps")
        if self.advantage_eps <= 0:  # equal rewards and baseline would give 0/0
            raise ValueError(f"advantage_eps must be > 0, got {advantage_eps}")
        self.group = process_group
        device = next(policy.parameters()).device
        self.baseline = torch.zeros((), dtype=torch.float32, device=device)

    def update(self, rewards: torch.Tensor, log_prob: torch.Tensor, entropy: torch.Tensor) -> dict[str, torch.Tensor]:
        """One REINFORCE step. ``rewards``: ``[B]`` (no gradient). Returns detached 0-D stats."""
        advantage = normalize_advantage(rewards, self.baseline, self.advantage_eps)
        loss = reinforce_loss(log_prob, entropy, advantage, self.entropy_coef)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(list(self.policy.parameters()), self.group)
        self.optimizer.step()
        mean_reward = distributed.average_scalar(rewards.detach().float().mean(), self.group)
        used_baseline = self.baseline
        self.baseline = self.momentum * self.baseline + (1.0 - self.momentum) * mean_reward
        return {
            "policy_loss": loss.detach(),
            "reward": mean_reward,
            "baseline_used": used_baseline,
            "baseline": self.baseline.detach(),
            "entropy": entropy.detach().mean(),
        }

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "baseline": self.baseline.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = state["baseline"].to(self.baseline.device, torch.float32).clone()
