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

The policy never receives gradient from ``L`` (its weights are detached).
The student's train/eval mode is left as the caller set it; the reward
forward runs in that same mode (the demo networks have no BatchNorm or
dropout, whose state that forward would otherwise touch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from .._validation import KD_LOSSES, check_choice, check_int, check_real, check_tensor
from ..ops import difficulty_signals, fused_weighted_kd
from ..ops._dispatch import check_backend_name
from . import distributed
from .balancers import BALANCERS, make_balancer
from .dfd import DecoderFreeDistillation
from .diffkd import DiffKD
from .losses import REC_LOSSES, per_image_loss
from .policy import SparkPolicy
from .reinforce import ReinforceUpdater

MODES = ("qat", "kd", "spark")
STATE_FORMAT = 1


@dataclasses.dataclass
class DistillConfig:
    """Settings of :class:`SparkDistiller` (defaults are SPEC §4's).

    mode: ``"qat"`` | ``"kd"`` | ``"spark"``.
    balancer: ``"none"`` | ``"gor"`` | ``"lmr"`` (SPEC §6), trained by its own Adam at ``balancer_lr``.
    lambda_kd: KD weight (scales the KD term before the balancer).
    rec_loss: task loss ``L_rec`` kind: ``"l1"``, ``"l2"``, ``"charbonnier"``.
    kd_loss: KD loss kind, as in SPEC §2.
    grid: ``(Gh, Gw)`` cells of the SPARK weight map.
    reward_every: policy update period in steps (a reward forward costs one no-grad student pass).
    policy_lr, policy_hidden, entropy_coef, baseline_momentum: REINFORCE settings.
    w_min, w_max: optional clamp of the weight map.
    dfd_layer: module name for decoder-free distillation (replaces output KD).
    diffkd_layer: module name for DiffKD feature denoising (replaces output KD; :mod:`.diffkd`).
    grad_clip: optional max-norm clip of the student's gradients.
    seed: seeds the policy's initialisation and its private sampling generator.
    backend: backend for the fused ops (``None`` = process default, ``"auto"``,
        ``"triton"``, ``"reference"``, ...).
    """

    mode: str = "spark"
    balancer: str = "none"
    lambda_kd: float = 1.0
    rec_loss: str = "l1"
    kd_loss: str = "l1"
    grid: tuple[int, int] = (8, 8)
    reward_every: int = 1
    policy_lr: float = 1e-4
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

    def validate(self) -> "DistillConfig":
        check_choice(self.mode, "mode", MODES)
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
        if check_real(self.policy_lr, "policy_lr") <= 0 or check_real(self.balancer_lr, "balancer_lr") <= 0:
            raise ValueError(f"policy_lr and balancer_lr must be > 0, got {self.policy_lr}, {self.balancer_lr}")
        if self.grad_clip is not None and check_real(self.grad_clip, "grad_clip") <= 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        check_int(self.seed, "seed")
        if self.backend is not None:
            check_backend_name(self.backend)
        if self.dfd_layer is not None and self.mode == "qat":
            raise ValueError("dfd_layer needs mode 'kd' or 'spark' (mode 'qat' has no distillation)")
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
        if cfg.mode == "spark":
            if policy is None:
                # Seeded init that leaves the caller's global RNG untouched.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.seed)
                    policy = SparkPolicy(hidden=cfg.policy_hidden, w_min=cfg.w_min, w_max=cfg.w_max)
            self.policy = policy.to(self.device)
            distributed.broadcast_parameters(self.policy.parameters(), process_group)
            self.updater = ReinforceUpdater(
                self.policy,
                cfg.policy_lr,
                baseline_momentum=cfg.baseline_momentum,
                entropy_coef=cfg.entropy_coef,
                process_group=process_group,
            )
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
                raise ValueError(f"teacher {i} output shape {shape} does not match the student output shape {tuple(like.shape)}")
        mean = outs[0] if len(outs) == 1 else torch.stack(outs).mean(0)
        return mean.to(like.dtype)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """One training step on ``(inputs, targets)``.

        Args:
            inputs: the student's input batch (``[B, ...]``, B >= 1).
            targets: ground truth ``[B, C, H, W]`` shaped like the student's output.

        Returns:
            Per-step log of Python floats (one host sync per step): ``loss``,
            ``loss_task``, ``loss_kd`` (before ``lambda_kd``); in ``"spark"``
            mode ``w_mean``, ``w_std``, ``w_min``, ``w_max`` and, on reward
            steps, ``reward``, ``baseline``, ``policy_loss``, ``entropy``;
            balancer scalars (``gor_s1``, ``gor_s2`` / ``lmr_factor``); ``step``.
        """
        cfg = self.config
        self._check_batch(inputs, targets)
        student_out = self.student(inputs)
        if not isinstance(student_out, torch.Tensor) or student_out.dim() != 4:
            raise ValueError(f"student output must be a [B, C, H, W] tensor, got {getattr(student_out, 'shape', type(student_out))}")
        if student_out.shape != targets.shape:
            raise ValueError(f"student output shape {tuple(student_out.shape)} does not match targets shape {tuple(targets.shape)}")
        targets = targets.to(student_out.dtype)
        teacher_out = self._teacher_output(inputs, student_out) if cfg.mode != "qat" else None

        rec_before = per_image_loss(student_out, targets, cfg.rec_loss)
        l_task = rec_before.mean()
        log: dict[str, torch.Tensor] = {}
        reward_step = cfg.mode == "spark" and self.steps % cfg.reward_every == 0
        sample = weight = None
        if cfg.mode == "qat":
            l_kd = torch.zeros((), device=l_task.device)
        else:
            if cfg.mode == "spark":
                signals, cell_kd = difficulty_signals(student_out, teacher_out, targets, cfg.grid, cfg.kd_loss, backend=cfg.backend)
                with torch.set_grad_enabled(reward_step):  # log pi is only needed when the policy learns
                    sample = self.policy.sample(signals, self.generator)
                weight = self.policy.weight_map(sample.action)
                log.update(w_mean=weight.mean(), w_std=weight.std(unbiased=False), w_min=weight.min(), w_max=weight.max())
            if self.dfd is not None:
                l_kd = self.dfd.loss(self.dfd.teacher_features(), weight, backend=cfg.backend)
            elif cfg.mode == "spark":
                l_kd = (weight * cell_kd).sum() / student_out.numel()
            else:
                l_kd = fused_weighted_kd(student_out, teacher_out, None, kd_loss=cfg.kd_loss, backend=cfg.backend)
        total = self.balancer(l_task, cfg.lambda_kd * l_kd)
        if self.diffkd is not None:
            total = total + self.diffkd.aux_loss
            self.diffkd.zero_grad()
            log.update(self.diffkd.stats())

        self.optimizer.zero_grad(set_to_none=True)
        if self.balancer_optimizer is not None:
            self.balancer_optimizer.zero_grad(set_to_none=True)
        total.backward()
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), cfg.grad_clip)
        if self.balancer_optimizer is not None:
            distributed.average_gradients(list(self.balancer.parameters()), self.group)
            self.balancer_optimizer.step()
        self.optimizer.step()
        if self.diffkd is not None:
            self.diffkd.optimizer_step()

        if reward_step:
            with torch.no_grad():
                rec_after = per_image_loss(self.student(inputs), targets, cfg.rec_loss)
            if self.dfd is not None:
                self.dfd.discard()
            rewards = rec_before.detach() - rec_after
            log.update(self.updater.update(rewards, sample.log_prob, sample.entropy))
            log.pop("baseline_used")
        elif cfg.mode == "spark":
            # Keep the log's keys stable: the baseline is still reported.
            log["baseline"] = self.updater.baseline

        log.update(loss=total.detach(), loss_task=l_task.detach(), loss_kd=l_kd.detach())
        log.update(self.balancer.stats())
        self.steps += 1
        keys = list(log)
        values = torch.stack([log[k].detach().float().reshape(()).to(l_task.device) for k in keys]).tolist()
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
        signals, _ = difficulty_signals(s, t, targets.to(s.dtype), self.config.grid, self.config.kd_loss, backend=self.config.backend)
        if mean:
            return self.policy.mean_weight_map(signals)
        g = torch.Generator(device=self.device)
        g.set_state(self.generator.get_state())
        return self.policy.weight_map(self.policy.sample(signals, g).action)

    # ------------------------------------------------------------ checkpoint

    def state_dict(self, include_student: bool = True) -> dict:
        """Everything needed to resume: student (with its quantizers' parameters
        and buffers) and its optimiser, policy, policy optimiser, baseline,
        policy generator, balancer and its optimiser, step count, and the
        global CPU (and CUDA) RNG states. Tensors are cloned."""
        state: dict[str, Any] = {
            "format": STATE_FORMAT,
            "mode": self.config.mode,
            "balancer_name": self.config.balancer,
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
            state["reinforce"] = self.updater.state_dict()
            state["policy_rng"] = self.generator.get_state()
        if self.diffkd is not None:
            state["diffkd"] = self.diffkd.state_dict()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return _clone(state)

    def load_state_dict(self, state: dict, *, restore_global_rng: bool = True) -> None:
        """Restore :meth:`state_dict`'s output into this distiller (same mode/balancer)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"state format {state.get('format')!r} is not {STATE_FORMAT}")
        for key, mine in (("mode", self.config.mode), ("balancer_name", self.config.balancer)):
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
            self.updater.load_state_dict(state["reinforce"])
            self.generator.set_state(state["policy_rng"])
        if self.diffkd is not None:
            self.diffkd.load_state_dict(state["diffkd"])
        self.steps = int(state["steps"])
        if restore_global_rng:
            torch.set_rng_state(state["torch_rng"])
            if "cuda_rng" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])

    def close(self) -> None:
        """Remove DFD hooks (the distiller is unusable afterwards for DFD)."""
        if self.dfd is not None:
            self.dfd.close()

    def __enter__(self) -> "SparkDistiller":
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
