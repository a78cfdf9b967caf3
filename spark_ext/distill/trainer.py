"""The SPARK distiller: one training step of a (quantized) student, usable in any loop.

:class:`SparkDistiller` wraps a student, one or more frozen teachers and the
user's optimiser. Each :meth:`SparkDistiller.step` does, for a batch
``(inputs, targets)``:

1. ``S = student(inputs)``; ``T = mean_k teacher_k(inputs)`` under no_grad.
2. The KD term, by ``mode``:

   * ``"qat"``: none (plain quantization-aware training on ``L_rec``);
   * ``"kd"``: uniform ``fused_weighted_kd(S, T)``;
   * ``"spark"``: one fused :func:`~spark_ext.difficulty_signals` pass gives the
     per-cell signals and per-cell KD; the policy samples ``a ~ Beta`` per cell,
     ``w = a / mean(a)``, and ``KD = sum(w * cell_kd) / N`` (equal to
     ``fused_weighted_kd(S, T, w)`` with no second pass over the images);
   * with ``dfd_layer`` set, the KD term is instead DFD's feature L1 at that
     layer (weighted per cell by ``w`` in ``"spark"`` mode), with no output KD.

3. ``L = balancer(L_rec(S, Y), lambda_kd * KD)``; backward; the user's
   optimiser steps (and the balancer's own Adam, if it has parameters).
4. ``"spark"`` only, every ``reward_every`` steps: a no-grad forward of the
   updated student on the same batch gives ``r_b = L_rec,b(before) - L_rec,b(after)``
   and the policy takes one REINFORCE step (:mod:`.reinforce`).

:meth:`SparkDistiller.step` is the one-call convenience; in your own loop (AMP, gradient accumulation,
clipping, EMA, schedulers, Lightning) use its parts: ``loss, logs = compute_loss(inputs, targets)``
(steps 1-3 without backward; the balancer's parameters enter ``L`` as constants, the policy
step's credit is measured here, at the parameters the gradient is taken at), your backward and
``optimizer.step()``, then ``after_optimizer_step()`` once per optimiser step (the balancer's
Adam step on the micro-batches' mean loss, the policy step, the reward forwards of step 4, the
step count), from what every ``compute_loss`` since the last one recorded. Under
``torch.autocast`` the networks run in low precision, the losses, policy, credit and rewards in
float32 (with a float32 no-grad forward of the student where the policy needs one).

A skipped optimiser step (a GradScaler that found inf/NaN gradients) teaches the distiller
nothing: ``after_optimizer_step(skipped=True)``, or any non-finite loss recorded since the last
optimiser step, discards the window and leaves every distiller state (balancer, policy, their
optimisers, running scales, baseline, generators, pending action, previous batch, step count) as
if its batches never happened; :meth:`SparkDistiller.step` skips the optimiser step itself on a
non-finite loss.

The policy never receives gradient from ``L`` (its weights are detached).
The student's train/eval mode is left as the caller set it; the reward
forward runs in that same mode (the demo networks have no BatchNorm or
dropout, whose state that forward would otherwise touch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .._validation import KD_LOSSES, check_choice, check_int, check_real, check_tensor
from ..ops import BACKENDS, difficulty_signals, fused_weighted_kd
from ..reference import cell_sum, expand_cells, kd_elementwise
from . import distributed
from .balancers import BALANCERS, make_balancer
from .baselines.dfd import DecoderFreeDistillation
from .baselines.diffkd import DiffKD
from .credit import RunningScale, cell_credit, credit_loss
from .losses import REC_LOSSES, per_image_loss
from .policy import ACTION_EPS, SparkPolicy
from .reinforce import ReinforceUpdater

MODES = ("qat", "kd", "spark", "map")
POLICY_SIGNALS = ("credit", "reinforce", "paper")
KD_GATES = ("none", "teacher")
MAP_SIGNALS = ("lap_var", "pix_var", "recon_err", "kd_gap", "teacher_adv", "random")
POLICY_MAPS = ("weights", "placement", "scale")
STATE_FORMAT = 2


@dataclasses.dataclass
class DistillConfig:
    """Settings of :class:`SparkDistiller` (defaults are docs/spec.md §4's).

    mode: ``"qat"`` | ``"kd"`` | ``"spark"`` | ``"map"`` (a fixed heuristic map from ``map_signal``).
    policy_signal: how the SPARK policy learns (docs/spark.md): ``"credit"`` (default: first-order
        held-out credit per cell, the student trains on the bounded Beta-mean map ``w_bound * a_mean``),
        ``"reinforce"`` (repaired REINFORCE: per-cell rewards over ``horizon`` steps, per-image mean
        baseline, running-std advantage scale, annealed lr and entropy; bounded sampled map) or
        ``"paper"`` (docs/spec.md §4 as written: per-image one-step reward, EMA baseline, mean-1 sampled map).
    credit_every: credit (or reward) period in steps; the policy's map is used every step.
    w_bound: upper bound of the weights in ``"credit"``/``"reinforce"`` (weights in ``(0, w_bound)``,
        the policy can change the total amount of KD).
    policy_map: how ``"spark"``'s map (``"credit"`` or ``"reinforce"``) enters the student's loss; the
        policy learns the same way whichever it is. ``"weights"`` (default): it weights KD per cell.
        ``"placement"``: divided by its mean over each image's cells first, so it moves KD between
        cells but does not change its amount (the map's placement alone). ``"scale"``: KD is uniform
        and the student's total loss is multiplied by ``s = (L_rec + mean(w) * lambda_kd * KD) /
        (L_rec + lambda_kd * KD)`` (detached; ``mean(w)`` over the batch): the growth of the loss's
        size that the map's amount of KD causes, without more KD relative to ``L_rec`` and without
        placement (an optimiser effect with Adam, docs/spark.md).
    horizon: steps between a ``"reinforce"`` action and its reward.
    policy_steps: the run's length, for annealing the policy lr (cosine) and the entropy bonus
        (linear to 0); None = constant.
    kd_gate: ``"teacher"`` keeps KD only on output values where the teacher is closer to the
        target than the student (needs targets; applies to ``"kd"``, ``"spark"``, ``"map"``).
    kd_anneal_steps: if set, ``lambda_kd`` decays linearly to 0 over that many steps.
    map_signal: the signal a ``"map"`` student's weights come from (mean-1 per image):
        ``lap_var``, ``pix_var``, ``recon_err``, ``kd_gap``, ``teacher_adv`` (``relu(err_S - err_T)``
        per cell) or ``random`` (Beta(1.7, 1.7) draws: the initial policy's per-cell variance).
    balancer: ``"none"`` | ``"gor"`` | ``"lmr"`` (docs/spec.md §6), trained by its own Adam at ``balancer_lr``.
    lambda_kd: KD weight (scales the KD term before the balancer).
    rec_loss: task loss ``L_rec`` kind: ``"l1"``, ``"l2"``, ``"charbonnier"``.
    kd_loss: KD loss kind, as in docs/spec.md §2.
    grid: ``(Gh, Gw)`` cells of the SPARK weight map.
    reward_every: policy update period in steps (a reward forward costs one no-grad student pass).
    policy_lr: the policy's Adam lr (None: 1e-4 for ``"paper"``, 1e-3 for ``"reinforce"``, 2e-2 for
        ``"credit"``, which updates only every ``credit_every`` steps but with a low-variance signal).
    policy_hidden, entropy_coef, baseline_momentum: policy width and REINFORCE settings.
    w_min, w_max: optional clamp of the weight map.
    dfd_layer: module name for decoder-free distillation (replaces output KD).
    diffkd_layer: module name for DiffKD feature denoising (replaces output KD; :mod:`.diffkd`).
    grad_clip: optional max-norm clip of the student's gradients.
    seed: seeds the policy's initialisation and its private sampling generator.
    backend: backend for the fused ops (``None`` = process default, ``"auto"``,
        ``"triton"``, ``"reference"``, ...).
    """

    mode: str = "spark"
    policy_signal: str = "credit"
    credit_every: int = 16
    w_bound: float = 2.0
    policy_map: str = "weights"
    horizon: int = 4
    policy_steps: Optional[int] = None
    kd_gate: str = "none"
    kd_anneal_steps: Optional[int] = None
    map_signal: str = "kd_gap"
    balancer: str = "none"
    lambda_kd: float = 1.0
    rec_loss: str = "l1"
    kd_loss: str = "l1"
    grid: tuple[int, int] = (8, 8)
    reward_every: int = 1
    policy_lr: Optional[float] = None
    policy_hidden: int = 16
    entropy_coef: float = 1e-3
    baseline_momentum: float = 0.9
    w_min: Optional[float] = None
    w_max: Optional[float] = None
    balancer_lr: float = 1e-2
    dfd_layer: Optional[str] = None
    diffkd_layer: Optional[str] = None
    grad_clip: Optional[float] = None
    seed: int = 0
    backend: Optional[str] = None

    def validate(self) -> DistillConfig:
        check_choice(self.mode, "mode", MODES)
        check_choice(self.policy_signal, "policy_signal", POLICY_SIGNALS)
        check_choice(self.kd_gate, "kd_gate", KD_GATES)
        check_choice(self.map_signal, "map_signal", MAP_SIGNALS)
        check_choice(self.policy_map, "policy_map", POLICY_MAPS)
        if self.policy_map != "weights" and (self.mode != "spark" or self.policy_signal == "paper"):
            raise ValueError(
                f"policy_map {self.policy_map!r} needs mode 'spark' with policy_signal 'credit' or 'reinforce' "
                f"(got mode {self.mode!r}, policy_signal {self.policy_signal!r}; 'paper''s map has mean 1 already)"
            )
        for name in ("credit_every", "horizon"):
            if check_int(getattr(self, name), name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("policy_steps", "kd_anneal_steps"):
            value = getattr(self, name)
            if value is not None and check_int(value, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if check_real(self.w_bound, "w_bound") <= 0:
            raise ValueError(f"w_bound must be > 0, got {self.w_bound}")
        if self.kd_gate != "none" and self.mode == "qat":
            raise ValueError("kd_gate needs a KD term; mode 'qat' has none")
        check_choice(self.balancer, "balancer", BALANCERS)
        check_choice(self.rec_loss, "rec_loss", REC_LOSSES)
        check_choice(self.kd_loss, "kd_loss", KD_LOSSES)
        check_real(self.lambda_kd, "lambda_kd")
        if not (isinstance(self.grid, (tuple, list)) and len(self.grid) == 2):
            raise TypeError(f"grid must be a pair of ints (Gh, Gw), got {self.grid!r}")
        self.grid = (check_int(self.grid[0], "grid Gh"), check_int(self.grid[1], "grid Gw"))
        if min(self.grid) < 1:
            raise ValueError(f"grid must be >= 1 in both dims, got {self.grid}")
        if check_int(self.reward_every, "reward_every") < 1:
            raise ValueError(f"reward_every must be >= 1, got {self.reward_every}")
        if self.policy_lr is None:
            self.policy_lr = {"paper": 1e-4, "reinforce": 1e-3, "credit": 2e-2}[self.policy_signal]
        if check_real(self.policy_lr, "policy_lr") <= 0 or check_real(self.balancer_lr, "balancer_lr") <= 0:
            raise ValueError(f"policy_lr and balancer_lr must be > 0, got {self.policy_lr}, {self.balancer_lr}")
        if self.grad_clip is not None and check_real(self.grad_clip, "grad_clip") <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        check_int(self.seed, "seed")
        if self.backend is not None:
            check_choice(self.backend, "backend", BACKENDS)
        if self.dfd_layer is not None and self.mode == "qat":
            raise ValueError("dfd_layer needs mode 'kd' or 'spark' (mode 'qat' has no distillation)")
        if self.kd_gate != "none" and (self.dfd_layer is not None or self.diffkd_layer is not None):
            raise ValueError("kd_gate applies to output KD; it cannot be combined with dfd_layer or diffkd_layer")
        if self.diffkd_layer is not None and (self.mode == "qat" or self.dfd_layer is not None):
            raise ValueError("diffkd_layer needs mode 'kd' or 'spark' and no dfd_layer")
        if self.balancer != "none" and self.mode == "qat":
            raise ValueError(f"balancer {self.balancer!r} needs a KD term; mode 'qat' has none")
        return self


def _as_teacher_list(teacher: Union[None, nn.Module, Sequence[nn.Module]]) -> list[nn.Module]:
    if teacher is None:
        return []
    if isinstance(teacher, nn.Module):
        return [teacher]
    teachers = list(teacher)
    for i, t in enumerate(teachers):
        if not isinstance(t, nn.Module):
            raise TypeError(f"teacher[{i}] must be an nn.Module, got {type(t).__name__}")
    return teachers


class SparkDistiller:
    """QAT / KD / SPARK training step with optional balancer, DFD and teacher ensemble.

    Args:
        student: the model being trained (FP32 or quantized, optionally DDP-wrapped).
        teacher: a frozen ``nn.Module``, a list of them (ensemble: the KD target
            is their mean output), or ``None`` for ``mode="qat"``. Teachers are
            put in eval mode and only run under ``torch.no_grad``.
        optimizer: the user's optimiser over the student's parameters.
        config: a :class:`DistillConfig`; keyword ``overrides`` replace its fields.
        policy: optionally a pre-built :class:`SparkPolicy` (else one is built from the seed).
        process_group: DDP process group for the policy/balancer sync (default group).
        held_out: ``(inputs, targets)`` batches the student does not train on, for the ``"credit"``
            policy signal: a re-iterable source (a ``DataLoader``, a list) is cycled, restarted
            whenever it runs out; a one-pass iterator (``iter(loader)``, a generator) makes
            :meth:`compute_loss` raise a ``ValueError`` once exhausted. None uses the previous step's
            training batch (a batch other than the one being weighted). Its position is not part of
            :meth:`state_dict`.

    Use ``log = distiller.step(inputs, targets)`` in a loop; ``state_dict()``
    and ``load_state_dict()`` checkpoint everything the run needs to continue
    bitwise-identically (see :meth:`state_dict`).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Union[None, nn.Module, Sequence[nn.Module]],
        optimizer: torch.optim.Optimizer,
        config: Optional[DistillConfig] = None,
        *,
        policy: Optional[SparkPolicy] = None,
        process_group: Optional[object] = None,
        held_out: Optional[Iterable[tuple[torch.Tensor, torch.Tensor]]] = None,
        **overrides: Any,
    ):
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.config = dataclasses.replace(config or DistillConfig(), **overrides).validate()
        cfg = self.config
        self.student, self.optimizer, self.group = student, optimizer, process_group
        self.teachers = _as_teacher_list(teacher)
        if cfg.mode != "qat" and not self.teachers:
            raise ValueError(f"mode {cfg.mode!r} needs a teacher (got none)")
        for t in self.teachers:
            t.eval()
        params = list(student.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        self.rank = distributed.rank(process_group)

        self.policy: Optional[SparkPolicy] = None
        self.updater: Optional[ReinforceUpdater] = None
        self.generator: Optional[torch.Generator] = None
        self.policy_optimizer: Optional[torch.optim.Optimizer] = None
        self.signal_scale: Optional[RunningScale] = None
        if held_out is not None and not isinstance(held_out, Iterable):
            raise TypeError(f"held_out must be an iterable of (inputs, targets) batches, got {type(held_out).__name__}")
        self.held_out = held_out
        self._held_out_pass: Optional[Iterator] = None  # the current pass over held_out
        self._previous_batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._pending: Optional[dict[str, Any]] = None  # "reinforce": an action waiting for its reward
        self._micro: list[dict[str, Any]] = []  # what compute_loss recorded since the last optimiser step
        self._window_generators: Optional[dict[str, Any]] = None  # their states before the window's first batch
        if cfg.mode == "map":
            self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + self.rank)
        if cfg.mode == "spark":
            if policy is None:
                # Seeded init that leaves the caller's global RNG untouched.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.seed)
                    policy = SparkPolicy(hidden=cfg.policy_hidden, w_min=cfg.w_min, w_max=cfg.w_max)
            self.policy = policy.to(self.device)
            distributed.broadcast_parameters(self.policy.parameters(), process_group)
            if cfg.policy_signal == "paper":
                self.updater = ReinforceUpdater(
                    self.policy,
                    cfg.policy_lr,
                    baseline_momentum=cfg.baseline_momentum,
                    entropy_coef=cfg.entropy_coef,
                    process_group=process_group,
                )
            else:
                self.policy_optimizer = torch.optim.Adam(self.policy.parameters(), lr=cfg.policy_lr)
                self.signal_scale = RunningScale(device=self.device)
            # Each rank samples its own actions (its own images), reproducibly.
            self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed + self.rank)

        self.balancer = make_balancer(cfg.balancer).to(self.device)
        distributed.broadcast_parameters(self.balancer.parameters(), process_group)
        bal_params = list(self.balancer.parameters())
        self.balancer_optimizer = torch.optim.Adam(bal_params, lr=cfg.balancer_lr) if bal_params else None

        self.dfd = DecoderFreeDistillation(student, self.teachers, cfg.dfd_layer) if cfg.dfd_layer else None
        # DiffKD takes DFD's place (same hooks and loss call) and adds its own losses and optimiser.
        self.diffkd = DiffKD(student, self.teachers, cfg.diffkd_layer, seed=cfg.seed) if cfg.diffkd_layer else None
        self.dfd = self.diffkd or self.dfd
        self.steps = 0

    # ------------------------------------------------------------------ step

    def _check_batch(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        check_tensor(inputs, "inputs")
        check_tensor(targets, "targets", ndim=4)
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError(f"inputs is an empty batch (shape {tuple(inputs.shape)}); need at least one sample")
        if targets.shape[0] != inputs.shape[0]:
            raise ValueError(f"targets batch size {targets.shape[0]} differs from inputs batch size {inputs.shape[0]}")

    def _teacher_output(self, inputs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            outs = [t(inputs) for t in self.teachers]
        for i, out in enumerate(outs):
            if not isinstance(out, torch.Tensor) or out.shape != like.shape:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ValueError(
                    f"teacher {i} output shape {shape} does not match the student output shape {tuple(like.shape)}"
                )
        mean = outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)
        return mean.to(like.dtype)

    def _lambda(self) -> float:
        cfg = self.config
        if cfg.kd_anneal_steps is None:
            return cfg.lambda_kd
        return cfg.lambda_kd * max(0.0, 1.0 - self.steps / cfg.kd_anneal_steps)

    def _anneal(self) -> float:
        """Cosine factor in [0, 1] over ``policy_steps`` (1 when it is None)."""
        total = self.config.policy_steps
        if total is None:
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(self.steps, total) / total))

    @torch.no_grad()
    def _fixed_map(self, signals, student_out, teacher_out, targets) -> torch.Tensor:
        """``mode="map"``: mean-1 per-image weights from one signal (see ``map_signal``)."""
        name = self.config.map_signal
        if name == "random":
            conc = torch.full((*signals.shape[:1], 1, *signals.shape[2:], 2), 1.7, device=signals.device)
            raw = torch._sample_dirichlet(conc, generator=self.generator)[..., 0].clamp_min(ACTION_EPS)
        elif name == "teacher_adv":
            err_gap = (student_out.detach() - targets).abs().mean(1) - (teacher_out - targets).abs().mean(1)
            raw = cell_sum(err_gap.float(), tuple(signals.shape[-2:]))[:, None].clamp_min(0)
        else:
            raw = signals[:, MAP_SIGNALS.index(name) : MAP_SIGNALS.index(name) + 1].float()
        mean = raw.mean(dim=(-2, -1), keepdim=True)
        # An image whose signal is 0 everywhere gets uniform weights rather than 0/0.
        return torch.where(mean > 0, raw / mean.clamp_min(1e-30), torch.ones_like(raw))

    def _policy_map(self, signals: torch.Tensor, track_log_prob: bool):
        """The weight map the student trains on this step, and the policy sample (or None)."""
        cfg = self.config
        if cfg.policy_signal == "credit":
            with torch.no_grad():
                alpha, beta = self.policy(signals)
            return cfg.w_bound * alpha / (alpha + beta), None
        with torch.set_grad_enabled(track_log_prob):  # log pi is only needed when the policy learns
            sample = self.policy.sample(signals, self.generator)
        if cfg.policy_signal == "paper":
            return self.policy.weight_map(sample.action), sample
        return cfg.w_bound * sample.action.detach(), sample

    def _applied_map(self, weight: torch.Tensor) -> torch.Tensor:
        """``policy_map="placement"``: ``weight [B, 1, Gh, Gw]`` divided by its mean over each image's cells
        (mean 1 per image); else ``weight`` itself. The policy's maps are detached, so this is too."""
        if self.config.policy_map != "placement":
            return weight
        return weight / weight.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-12)

    def _cell_rec_error(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_pixel = kd_elementwise(output.detach().float() - targets.float(), self.config.rec_loss).sum(1)
        return cell_sum(per_pixel, self.config.grid)[:, None]

    def _policy_step(self, loss: torch.Tensor) -> None:
        self.policy_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(list(self.policy.parameters()), self.group)
        for group in self.policy_optimizer.param_groups:
            group["lr"] = self.config.policy_lr * self._anneal()
        self.policy_optimizer.step()

    def _fp32_output(self, inputs: torch.Tensor, student_out: torch.Tensor) -> torch.Tensor:
        """The student's output in float32 for the policy's signals (credit, rewards): ``student_out``
        itself unless it came from a low-precision (autocast) forward, else a no-grad forward with
        autocast off (an 8-bit mantissa cannot resolve a one-step change of the output)."""
        if student_out.dtype not in (torch.float16, torch.bfloat16):
            return student_out.detach()
        with torch.no_grad():
            return self.student(inputs).float()

    def _cell_credit(self, inputs, student_out, teacher_out, gate) -> torch.Tensor:
        """``"credit"``: score every cell (:func:`cell_credit`) at the parameters this step's gradient is
        taken at (so in :meth:`compute_loss`, before the optimiser moves them)."""
        cfg = self.config
        held = self._next_held_out() if self.held_out is not None else self._previous_batch
        # The wrapped module, not a DistributedDataParallel wrapper: a forward of the wrapper would
        # expect a backward that reduces gradients, and cell_credit only uses autograd.grad.
        plain = getattr(self.student, "module", self.student)
        return cell_credit(
            plain,
            self.optimizer,
            inputs,
            student_out,
            teacher_out,
            held[0],
            held[1],
            cfg.grid,
            kd_loss=cfg.kd_loss,
            rec_loss=cfg.rec_loss,
            pixel_weight=gate,
            process_group=self.group,
        )

    def _next_held_out(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``held_out`` batch; a re-iterable source starts a new pass when one runs out."""
        if self._held_out_pass is None:
            self._held_out_pass = iter(self.held_out)
        try:
            held = next(self._held_out_pass)
        except StopIteration:
            if self._held_out_pass is self.held_out:  # iter(x) is x: a one-pass iterator
                raise ValueError(
                    "held_out ran out of batches: a one-pass iterator (iter(loader), a generator) is used once; "
                    "pass a re-iterable source (the DataLoader itself, a list) to cycle it"
                ) from None
            self._held_out_pass = iter(self.held_out)
            try:
                held = next(self._held_out_pass)
            except StopIteration:
                raise ValueError("held_out yields no batches") from None
        if not (isinstance(held, (tuple, list)) and len(held) == 2 and all(isinstance(t, torch.Tensor) for t in held)):
            raise TypeError(f"held_out must yield (inputs, targets) pairs of tensors, got {type(held).__name__}")
        return held[0], held[1]

    def _generator_states(self) -> dict[str, Any]:
        """The private generators' states: the policy's (or the map's), DiffKD's (or, while its modules are
        not built, the state they will be built with)."""
        states: dict[str, Any] = {"policy": None if self.generator is None else self.generator.get_state()}
        if self.diffkd is not None:
            d = self.diffkd
            states["diffkd"] = d.generator.get_state() if d.generator is not None else d.state_dict()
        return states

    def _restore_generators(self, states: dict[str, Any]) -> None:
        if states["policy"] is not None:
            self.generator.set_state(states["policy"])
        if self.diffkd is not None:
            if isinstance(states["diffkd"], dict):  # built during the window: unbuilt again, as it was
                self.diffkd.load_state_dict({})
                self.diffkd.load_state_dict(states["diffkd"])
            else:
                self.diffkd.generator.set_state(states["diffkd"])

    def _all_finite(self, tensors: list[torch.Tensor]) -> bool:
        """Whether every value of ``tensors`` is finite, on every DDP rank (one host sync)."""
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        return distributed.all_ranks(finite, self.group)

    def _credit_update(self, signals: torch.Tensor, credit: torch.Tensor) -> dict[str, torch.Tensor]:
        """``"credit"``: one policy step on ``-mean(w * credit)``; none on a non-finite credit (a held-out
        batch holding inf): the policy, its optimiser and the running scale stay as they are."""
        stats = {"credit": credit.mean(), "credit_pos": (credit > 0).float().mean()}
        if not self._all_finite([credit]):
            return stats
        alpha, beta = self.policy(signals)
        loss = credit_loss(self.config.w_bound * alpha / (alpha + beta), self.signal_scale.normalize(credit))
        self._policy_step(loss)
        return {**stats, "policy_loss": loss.detach()}

    def _reinforce_update(self) -> dict[str, torch.Tensor]:
        """``"reinforce"``: the pending action's per-cell reward ``horizon`` steps later, one policy step."""
        cfg, p = self.config, self._pending
        self._pending = None
        with torch.no_grad():
            reward = p["err_before"] - self._cell_rec_error(self.student(p["inputs"]), p["targets"])
        advantage = reward - reward.mean(dim=(-2, -1), keepdim=True)  # the image's mean as baseline
        advantage = self.signal_scale.normalize(advantage)
        dist = self.policy.distribution(p["signals"])
        log_prob = dist.log_prob(p["action"].clamp(ACTION_EPS, 1.0 - ACTION_EPS))
        entropy = dist.entropy()
        loss = -(advantage * log_prob).mean() - cfg.entropy_coef * self._anneal() * entropy.mean()
        self._policy_step(loss)
        return {"reward": reward.mean(), "policy_loss": loss.detach(), "entropy": entropy.detach().mean()}

    def compute_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's loss on one (micro-)batch, without backward or any update: ``(loss, logs)``.

        ``loss`` is the 0-D float32 total ``balancer(L_rec, lambda_kd * KD)``, differentiable w.r.t. the
        student only (the balancer's and the policy's parameters are updated by
        :meth:`after_optimizer_step`, from values recorded here). Call it inside ``torch.autocast`` if you
        like: the student and teachers run under it, the losses, the policy and the credit in float32.
        Backpropagate ``loss`` (divided by k when accumulating k equal micro-batches: the gradient is then
        that of one k-times larger batch wherever the weight map is deterministic: ``"qat"``, ``"kd"``,
        ``"map"``, ``"spark"`` with ``"credit"``; docs/spark.md), step your optimiser, then call
        :meth:`after_optimizer_step` once. Under ``torch.no_grad`` (validation) nothing is recorded.

        ``logs``: detached 0-D tensors (no host sync): ``loss``, ``loss_task``, ``loss_kd`` (before
        ``lambda_kd``); in ``"spark"`` and ``"map"`` modes ``w_mean``, ``w_std``, ``w_min``, ``w_max`` (of the
        map the KD term is weighted by; with ``policy_map="scale"``, of the policy's map, plus ``loss_scale``);
        with ``kd_gate="teacher"``, ``gate_frac``.
        """
        cfg = self.config
        self._check_batch(inputs, targets)
        student_out = self.student(inputs)
        if not isinstance(student_out, torch.Tensor) or student_out.dim() != 4:
            raise ValueError(
                f"student output must be a [B, C, H, W] tensor, got {getattr(student_out, 'shape', type(student_out))}"
            )
        if student_out.shape != targets.shape:
            raise ValueError(
                f"student output shape {tuple(student_out.shape)} does not match targets shape {tuple(targets.shape)}"
            )
        teacher_out = self._teacher_output(inputs, student_out) if cfg.mode != "qat" else None
        with torch.autocast(student_out.device.type, enabled=False):
            try:
                return self._loss(inputs, targets, student_out, teacher_out)
            except BaseException:
                if not self._micro and self._window_generators is not None:  # this call began the window
                    self._restore_generators(self._window_generators)
                    self._window_generators = None
                raise

    def _loss(self, inputs, targets, student_out, teacher_out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        low_precision = student_out.dtype in (torch.float16, torch.bfloat16)
        out = student_out.float() if low_precision else student_out  # the losses in float32 under autocast
        targets = targets.to(out.dtype)
        if teacher_out is not None:
            teacher_out = teacher_out.to(out.dtype)

        rec_before = per_image_loss(out, targets, cfg.rec_loss)
        l_task = rec_before.mean()
        log: dict[str, torch.Tensor] = {}
        training = torch.is_grad_enabled()
        first = training and not self._micro  # the first micro-batch since the last optimiser step
        if first:  # a skipped window rewinds them (after_optimizer_step)
            self._window_generators = self._generator_states()
        spark = cfg.mode == "spark"
        policy_step = spark and training and self.steps % cfg.credit_every == 0
        paper_reward = spark and training and cfg.policy_signal == "paper" and self.steps % cfg.reward_every == 0
        stash = (
            policy_step
            and cfg.policy_signal == "reinforce"
            and self._pending is None
            and not any("pending" in m for m in self._micro)
        )
        credit_step = (
            policy_step
            and first
            and cfg.policy_signal == "credit"
            and (self.held_out is not None or self._previous_batch is not None)
        )
        sample = weight = signals = cell_kd = gate = None
        if cfg.mode == "qat":
            l_kd = torch.zeros((), device=l_task.device)
        else:
            if cfg.mode in ("spark", "map"):
                signals, cell_kd = difficulty_signals(
                    out, teacher_out, targets, cfg.grid, cfg.kd_loss, backend=cfg.backend
                )
                if cfg.mode == "map":
                    weight = self._fixed_map(signals, out, teacher_out, targets)
                else:
                    weight, sample = self._policy_map(signals, paper_reward)
                    weight = self._applied_map(weight)
                log.update(
                    w_mean=weight.mean(), w_std=weight.std(unbiased=False), w_min=weight.min(), w_max=weight.max()
                )
                if cfg.policy_map == "scale":  # uniform KD; the map's mean scales the total below
                    map_mean, weight = weight.mean(), torch.ones_like(weight)
            if cfg.kd_gate == "teacher":
                with torch.no_grad():
                    gate = ((teacher_out - targets).abs() < (out.detach() - targets).abs()).to(out.dtype)
                log["gate_frac"] = gate.mean()
            if self.dfd is not None:
                l_kd = self.dfd.loss(self.dfd.teacher_features(), weight, backend=cfg.backend)
            elif gate is not None:
                h, w = out.shape[-2:]
                pixel_weight = gate if weight is None else gate * expand_cells(weight, h, w)
                l_kd = fused_weighted_kd(out, teacher_out, pixel_weight, kd_loss=cfg.kd_loss, backend=cfg.backend)
            elif weight is not None:
                l_kd = (weight * cell_kd).sum() / out.numel()
            else:
                l_kd = fused_weighted_kd(out, teacher_out, None, kd_loss=cfg.kd_loss, backend=cfg.backend)
        l_kd_scaled = self._lambda() * l_kd
        # The balancer's parameters enter the student's loss as constants: they learn in
        # after_optimizer_step from the recorded losses, untouched by the caller's loss scaling.
        frozen = {name: p.detach() for name, p in self.balancer.named_parameters()}
        total = torch.func.functional_call(self.balancer, frozen, (l_task, l_kd_scaled))
        if cfg.policy_map == "scale" and cfg.mode == "spark":
            with torch.no_grad():
                plain = l_task + l_kd_scaled
                scale = torch.where(plain > 0, (l_task + map_mean * l_kd_scaled) / plain, torch.ones_like(plain))
            total = scale * total
            log["loss_scale"] = scale
        if self.diffkd is not None:  # DiffKD's own losses; its parameters learn in after_optimizer_step
            if first:
                self.diffkd.zero_grad()
            total = total + self.diffkd.aux_loss
            log.update(self.diffkd.stats())

        if training:
            record: dict[str, Any] = {
                "inputs": inputs.detach(),
                "targets": targets.detach(),
                "l_task": l_task.detach(),
                "l_kd": l_kd_scaled.detach(),
                "loss": total.detach(),
            }
            if credit_step:
                base = self._fp32_output(inputs, student_out)
                record["credit"] = self._cell_credit(inputs, base, teacher_out, gate)
                record["signals"] = signals
            if stash:  # becomes the pending action in after_optimizer_step, unless the step is skipped
                base = self._fp32_output(inputs, student_out)
                record["pending"] = {
                    "inputs": inputs.detach(),
                    "targets": targets.detach(),
                    "signals": signals,
                    "action": sample.action.detach(),
                    "err_before": self._cell_rec_error(base, targets),
                    "due": self.steps + cfg.horizon - 1,
                }
            if paper_reward:
                if low_precision:
                    rec_before = per_image_loss(self._fp32_output(inputs, student_out), targets, cfg.rec_loss)
                record.update(rec_before=rec_before.detach(), log_prob=sample.log_prob, entropy=sample.entropy)
            if self.dfd is not None and (credit_step or stash or (paper_reward and low_precision)):
                self.dfd.discard()  # the extra forwards' features are not distilled
            self._micro.append(record)
        log.update(loss=total.detach(), loss_task=l_task.detach(), loss_kd=l_kd.detach())
        return total, log

    def after_optimizer_step(self, skipped: bool = False) -> dict[str, torch.Tensor]:
        """The distiller's own updates, once per optimiser step (after ``optimizer.step()``), from every
        :meth:`compute_loss` call since the last one: the balancer's Adam step (on the micro-batches' mean
        loss), the policy step (``"credit"``: from the first micro-batch's credit; ``"paper"``: one
        REINFORCE step on the rewards of every micro-batch's images, measured by a no-grad forward of the
        updated student; ``"reinforce"``: a pending action's reward when due) and the step count.

        Args:
            skipped: True when the optimiser did not step (a ``torch.amp.GradScaler`` found inf/NaN
                gradients: ``scale = scaler.get_scale(); scaler.update(); skipped = scaler.get_scale() < scale``),
                or to abandon the micro-batches recorded since the last optimiser step.

        The window is skipped when ``skipped`` is True or when any recorded loss (task, KD, total) is
        not finite (one host sync; under DDP decided on all ranks together): nothing is learnt from it,
        and the balancer, the policy, their optimisers, the running scales and baseline, the private
        generators, the pending action, the previous batch and the step count stay as they were before
        its first :meth:`compute_loss`, as if its batches never happened (a ``held_out`` batch drawn for
        it stays drawn). A non-finite credit (from a ``held_out`` batch holding inf) skips only the
        policy step.

        Returns detached 0-D tensors: ``skipped`` (1.0) alone on a skipped window; else, with the
        ``"credit"`` signal, on credit steps, ``credit``, ``credit_pos``, ``policy_loss``; with
        ``"paper"``, on reward steps, ``reward``, ``baseline``, ``policy_loss``, ``entropy`` (``baseline``
        every step); with ``"reinforce"``, on reward steps, ``reward``, ``policy_loss``, ``entropy``;
        balancer scalars (``gor_s1``, ``gor_s2`` / ``lmr_factor``).
        """
        if not isinstance(skipped, bool):
            raise TypeError(f"skipped must be a bool, got {skipped!r}")
        if not self._micro:
            raise RuntimeError(
                "after_optimizer_step() needs a compute_loss() call (with grad enabled) since the last one"
            )
        micro, self._micro = self._micro, []
        generators, self._window_generators = self._window_generators, None
        if skipped or not self._all_finite([m[k] for m in micro for k in ("l_task", "l_kd", "loss")]):
            if generators is not None:
                self._restore_generators(generators)
            if self.dfd is not None:
                self.dfd.discard()
            return {"skipped": torch.ones((), device=self.device)}
        return self._learn(micro)

    def _learn(self, micro: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """:meth:`after_optimizer_step`'s updates from the window's records ``micro``."""
        cfg = self.config
        spark = cfg.mode == "spark"
        log: dict[str, torch.Tensor] = {}
        stashed = [m["pending"] for m in micro if "pending" in m]
        if stashed:
            self._pending = stashed[0]
        if self.diffkd is not None:
            self.diffkd.optimizer_step()
        with torch.autocast(self.device.type, enabled=False):
            if self.balancer_optimizer is not None:
                self.balancer_optimizer.zero_grad(set_to_none=True)
                (sum(self.balancer(m["l_task"], m["l_kd"]) for m in micro) / len(micro)).backward()
                distributed.average_gradients(list(self.balancer.parameters()), self.group)
                self.balancer_optimizer.step()
            if "credit" in micro[0]:
                log.update(self._credit_update(micro[0]["signals"], micro[0]["credit"]))
            if "log_prob" in micro[0]:
                with torch.no_grad():
                    rec_after = [per_image_loss(self.student(m["inputs"]), m["targets"], cfg.rec_loss) for m in micro]
                if self.dfd is not None:
                    self.dfd.discard()
                rewards = torch.cat([m["rec_before"] for m in micro]) - torch.cat(rec_after)
                log_prob = torch.cat([m["log_prob"] for m in micro])
                entropy = torch.cat([m["entropy"] for m in micro])
                log.update(self.updater.update(rewards, log_prob, entropy))
                log.pop("baseline_used")
            elif spark and cfg.policy_signal == "paper":
                # Keep the log's keys stable: the baseline is still reported.
                log["baseline"] = self.updater.baseline
            if self._pending is not None and self._pending["due"] <= self.steps:
                log.update(self._reinforce_update())
                if self.dfd is not None:
                    self.dfd.discard()
        if self.held_out is None and spark and cfg.policy_signal == "credit":
            self._previous_batch = (micro[-1]["inputs"], micro[-1]["targets"])
        log.update(self.balancer.stats())
        self.steps += 1
        return log

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """One training step on ``(inputs, targets)``: :meth:`compute_loss`, backward, ``grad_clip``,
        ``optimizer.step()``, :meth:`after_optimizer_step`. A non-finite loss (a batch holding inf or NaN)
        skips the backward and the optimiser step, as a GradScaler would, and the distiller learns
        nothing from it (``skipped`` is 1.0 in the log, ``step`` unchanged).

        Args:
            inputs: the student's input batch (``[B, ...]``, B >= 1).
            targets: ground truth ``[B, C, H, W]`` shaped like the student's output.

        Returns:
            The logs of both parts as Python floats, and ``step``.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss, log = self.compute_loss(inputs, targets)
        finite = self._all_finite([loss.detach(), log["loss_task"], log["loss_kd"]])
        if finite:
            loss.backward()
            if self.config.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.config.grad_clip)
            self.optimizer.step()
        log.update(self.after_optimizer_step(skipped=not finite))
        keys = list(log)
        values = torch.stack([log[k].detach().float().reshape(()).to(loss.device) for k in keys]).tolist()
        out = dict(zip(keys, values))
        out["step"] = self.steps
        return out

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def weight_map(self, inputs: torch.Tensor, targets: torch.Tensor, *, mean: bool = True) -> torch.Tensor:
        """The policy's weight map for a batch (no training): ``[B, 1, Gh, Gw]`` float32.

        ``mean=True`` uses the Beta means (deterministic, for pictures);
        ``False`` draws a sample from a throwaway copy of the generator.
        """
        if self.policy is None:
            raise ValueError("weight_map needs mode 'spark'")
        self._check_batch(inputs, targets)
        s = self.student(inputs)
        t = self._teacher_output(inputs, s)
        if self.dfd is not None:
            self.dfd.discard()
        signals, _ = difficulty_signals(
            s, t, targets.to(s.dtype), self.config.grid, self.config.kd_loss, backend=self.config.backend
        )
        return self.policy_weight_map(signals, mean=mean)

    @torch.no_grad()
    def policy_weight_map(self, signals: torch.Tensor, *, mean: bool = True) -> torch.Tensor:
        """The map the student would train on for ``signals [B, 4, Gh, Gw]`` (``mean=True``: from
        the Beta means, deterministic; else one draw from a throwaway copy of the generator); with
        ``policy_map="placement"`` renormalised to mean 1 per image, with ``"scale"`` the map whose
        mean scales the loss."""
        cfg = self.config
        if cfg.policy_signal == "credit" or mean:
            alpha, beta = self.policy(signals)
            a = alpha / (alpha + beta)
        else:
            g = torch.Generator(device=self.device)
            g.set_state(self.generator.get_state())
            a = self.policy.sample(signals, g).action
        return self.policy.weight_map(a) if cfg.policy_signal == "paper" else self._applied_map(cfg.w_bound * a)

    # ------------------------------------------------------------ checkpoint

    def state_dict(self, include_student: bool = True) -> dict:
        """Everything needed to resume: student (with its quantizers' parameters
        and buffers) and its optimiser, policy, policy optimiser, baseline,
        policy generator, balancer and its optimiser, step count, and the
        global CPU (and CUDA) RNG states. Tensors are cloned. Take it between optimiser steps (not
        between :meth:`compute_loss` and :meth:`after_optimizer_step`)."""
        if self._micro:
            raise RuntimeError(
                "state_dict() between compute_loss() and after_optimizer_step(): checkpoint after the latter"
            )
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "mode": self.config.mode,
            "balancer_name": self.config.balancer,
            "policy_signal": self.config.policy_signal,
            "steps": self.steps,
            "optimizer": self.optimizer.state_dict(),
            "balancer": self.balancer.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if include_student:
            state["student"] = self.student.state_dict()
        if self.balancer_optimizer is not None:
            state["balancer_optimizer"] = self.balancer_optimizer.state_dict()
        if self.policy is not None:
            state["policy"] = self.policy.state_dict()
            if self.updater is not None:
                state["reinforce"] = self.updater.state_dict()
            else:
                state["policy_optimizer"] = self.policy_optimizer.state_dict()
                state["signal_scale"] = self.signal_scale.state_dict()
        if self.generator is not None:
            state["policy_rng"] = self.generator.get_state()
        if self._previous_batch is not None:
            state["previous_batch"] = list(self._previous_batch)
        if self._pending is not None:
            state["pending"] = dict(self._pending)
        if self.diffkd is not None:
            state["diffkd"] = self.diffkd.state_dict()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return _clone(state)

    def load_state_dict(self, state: dict, *, restore_global_rng: bool = True) -> None:
        """Restore :meth:`state_dict`'s output into this distiller (same mode/balancer), exactly as a fresh
        distiller resuming from it: micro-batches recorded by :meth:`compute_loss` since the last optimiser
        step (an abandoned step) are dropped. ``held_out``'s position is not restored. ``state`` is not
        modified by later training (the optimisers would otherwise keep its tensors and update them in place),
        so one in-memory checkpoint can be restored any number of times."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"state format {state.get('format')!r} is not {STATE_FORMAT}")
        state = _clone(state)
        for key, mine in (
            ("mode", self.config.mode),
            ("balancer_name", self.config.balancer),
            ("policy_signal", self.config.policy_signal),
        ):
            if state[key] != mine:
                raise ValueError(f"checkpoint {key} {state[key]!r} differs from this distiller's {mine!r}")
        if "student" in state:
            self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.balancer.load_state_dict(state["balancer"])
        if self.balancer_optimizer is not None:
            self.balancer_optimizer.load_state_dict(state["balancer_optimizer"])
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])
            if self.updater is not None:
                self.updater.load_state_dict(state["reinforce"])
            else:
                self.policy_optimizer.load_state_dict(state["policy_optimizer"])
                self.signal_scale.load_state_dict(state["signal_scale"])
        if self.generator is not None:
            self.generator.set_state(state["policy_rng"])
        self._previous_batch = tuple(state["previous_batch"]) if "previous_batch" in state else None
        self._pending = dict(state["pending"]) if "pending" in state else None
        if self.diffkd is not None:
            self.diffkd.load_state_dict(state["diffkd"])
        self.steps = int(state["steps"])
        self._micro, self._window_generators = [], None
        if self.dfd is not None:
            self.dfd.discard()
        if restore_global_rng:
            torch.set_rng_state(state["torch_rng"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])

    def close(self) -> None:
        """Remove DFD hooks (the distiller is unusable afterwards for DFD)."""
        if self.dfd is not None:
            self.dfd.close()

    def __enter__(self) -> SparkDistiller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_clone(v) for v in obj)
    return obj
